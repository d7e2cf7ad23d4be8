#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| herald_fuzz::targets::cluster_wire(data));
