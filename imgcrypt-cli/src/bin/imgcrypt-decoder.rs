//! `imgcrypt-decoder`: containerd stream processor decrypting ocicrypt layers (a drop-in for
//! imgcrypt's `ctd-decoder`). All logic is in [`ocicrypt_core::stream_processor`].

fn main() -> std::process::ExitCode {
    ocicrypt_core::stream_processor::main()
}
