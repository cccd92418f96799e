//! libFuzzer entry point for [`tollgate_fuzz::websocket_frames`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::websocket_frames(data));
