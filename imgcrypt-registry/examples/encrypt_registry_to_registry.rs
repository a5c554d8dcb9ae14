//! Encrypts an image from one registry into another (or another repository of the same one)
//! for a JWE recipient, streaming each layer from the source through the cipher to the
//! destination: what `imgcrypt encrypt docker://… docker://…` does, with the library crates
//! only (`ocicrypt-core` and `imgcrypt-registry`).
//!
//! ```text
//! cargo run -p imgcrypt-registry --example encrypt_registry_to_registry -- \
//!     docker://127.0.0.1:5000/app:v1 docker://127.0.0.1:5000/app:v1-enc pub.pem [--tls-verify=false]
//! ```
//!
//! The result decrypts with `skopeo copy --decryption-key priv.pem …` and `imgcrypt decrypt`.

use std::path::Path;
use std::sync::Arc;

use imgcrypt_registry::{RegistryImage, RegistryOptions, RegistryRef};
use ocicrypt_core::image::ops::NoProgress;
use ocicrypt_core::image::{transform_image, LayerSelection, Operation, TransformReport};
use ocicrypt_core::jwe::JweWrapper;
use ocicrypt_core::keys::PublicKey;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Encrypts every layer of `src` for the holder of the private key of `public_key`, and pushes
/// the result to `dst` (blobs first, the tag last: a failure leaves no tag behind).
pub async fn encrypt(
    src: &str,
    dst: &str,
    public_key: &Path,
    opts: RegistryOptions,
) -> Result<TransformReport, BoxError> {
    let recipient = JweWrapper::new(vec![PublicKey::from_file(public_key)?])?;
    let src = RegistryImage::connect(RegistryRef::parse(src)?, opts.clone(), false).await?;
    let dst = RegistryImage::connect(RegistryRef::parse(dst)?, opts, true).await?;
    let op = Operation::Encrypt {
        wrappers: vec![Arc::new(recipient)],
    };
    let report = transform_image(
        Arc::new(src),
        Arc::new(dst),
        op,
        LayerSelection::default(),
        Arc::new(NoProgress),
        4,
    )
    .await?;
    Ok(report)
}

#[tokio::main]
#[allow(dead_code)] // The test includes this file for `encrypt` only.
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (tls_verify, args): (Vec<_>, Vec<_>) = args.into_iter().partition(|a| a.starts_with("--tls-verify"));
    let [src, dst, key] = args.as_slice() else {
        return Err("usage: encrypt_registry_to_registry SRC DST PUBLIC_KEY [--tls-verify=false]".into());
    };
    // Credentials come from the auth files and credential helpers, TLS roots from the system
    // store and certs.d, as for skopeo; `--tls-verify=false` also allows a plain-HTTP registry.
    let opts = RegistryOptions::default().tls_verify(!tls_verify.iter().any(|a| a == "--tls-verify=false"));
    let report = encrypt(src, dst, Path::new(key), opts).await?;
    println!("{dst}: {} ({} layers)", report.digest, report.layers.len());
    Ok(())
}
