//! libFuzzer entry point for [`tollgate_fuzz::config`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::config(data));
