#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| imgcrypt_fuzz::pgp_message(data));
