//! `imgcrypt-decoder`: containerd stream processor decrypting ocicrypt layers (a drop-in for
//! imgcrypt's `ctd-decoder`). The process plumbing is [`imgcrypt_cli::decoder`], the decrypt
//! logic [`ocicrypt_core::stream_processor`].

fn main() -> std::process::ExitCode {
    imgcrypt_cli::decoder::main()
}
