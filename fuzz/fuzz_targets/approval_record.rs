//! libFuzzer entry point for [`tollgate_fuzz::approval_record`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::approval_record(data));
