#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferrosync_fuzz::service_config(data);
});
