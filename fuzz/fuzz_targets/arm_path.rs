//! libFuzzer entry point for [`tollgate_fuzz::arm_path`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::arm_path(data));
