#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferrosync_fuzz::evaluate(data);
});
