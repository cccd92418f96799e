//! libFuzzer entry point for [`tollgate_fuzz::policy_tests`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::policy_tests(data));
