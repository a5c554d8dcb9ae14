//! Encrypts every layer of an image in an `oci-archive` (or a `docker save` archive) for a JWE
//! recipient and writes an encrypted `oci-archive`, with the library crates only.
//!
//! ```text
//! cargo run -p imgcrypt-registry --example encrypt_archive -- SRC.tar DST.tar public.pem [docker]
//! ```
use std::path::Path;
use std::sync::Arc;

use imgcrypt_registry::archive::{ArchiveDest, ArchiveKind, ArchiveSource};
use ocicrypt_core::image::ops::NoProgress;
use ocicrypt_core::image::{transform_image, LayerSelection, Operation};
use ocicrypt_core::jwe::JweWrapper;
use ocicrypt_core::keys::PublicKey;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: encrypt_archive SRC.tar DST.tar public.pem [docker]");
        std::process::exit(2);
    }
    let src = if args.get(4).map(String::as_str) == Some("docker") {
        ArchiveSource::open_docker(Path::new(&args[1]), None)?
    } else {
        ArchiveSource::open_oci(Path::new(&args[1]), None)?
    };
    let dst = ArchiveDest::create(Path::new(&args[2]), ArchiveKind::Oci { tag: None })?;
    let wrapper = Arc::new(JweWrapper::new(vec![PublicKey::from_file(args[3].as_ref())?])?);
    let op = Operation::Encrypt {
        wrappers: vec![wrapper],
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
    for l in &report.layers {
        println!("layer {} {}: {} -> {}", l.index, l.action, l.from, l.to);
    }
    Ok(())
}
