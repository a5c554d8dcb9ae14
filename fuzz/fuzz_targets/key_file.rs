#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| imgcrypt_fuzz::key_file(data));
