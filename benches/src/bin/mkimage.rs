//! Writes a benchmark image into an OCI layout: `N` layers, each a real tar+gzip holding one file
//! of pseudo-random (incompressible) bytes, wrapped in stored deflate blocks so generation runs
//! at disk speed. Streams; memory use does not depend on the size.
//!
//! ```text
//! mkimage LAYOUT TAG --size BYTES [--layers N] [--seed S]
//! ```
//! `--size` is the payload of each layer (suffixes K, M, G: binary).
fn main() -> std::process::ExitCode {
    match imgcrypt_benches::mkimage::main_with_args(std::env::args().skip(1).collect()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mkimage: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
