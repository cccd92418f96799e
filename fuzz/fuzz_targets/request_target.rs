//! libFuzzer entry point for [`tollgate_fuzz::request_target`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::request_target(data));
