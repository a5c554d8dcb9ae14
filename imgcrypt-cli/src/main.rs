//! The `imgcrypt` binary: everything is in the library.
fn main() -> std::process::ExitCode {
    imgcrypt_cli::run()
}
