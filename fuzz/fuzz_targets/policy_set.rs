//! libFuzzer entry point for [`tollgate_fuzz::policy_set`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::policy_set(data));
