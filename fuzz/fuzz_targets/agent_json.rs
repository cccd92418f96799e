//! libFuzzer entry point for [`tollgate_fuzz::agent_json`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::agent_json(data));
