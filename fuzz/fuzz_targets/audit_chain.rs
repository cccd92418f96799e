//! libFuzzer entry point for [`tollgate_fuzz::audit_chain`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::audit_chain(data));
