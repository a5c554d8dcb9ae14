//! Encrypts every layer of an image in an OCI layout for JWE recipients, then decrypts it again.
//!
//! ```text
//! cargo run -p ocicrypt-core --example encrypt_layout -- SRC_LAYOUT TAG DST_LAYOUT public.pem [private.pem]
//! ```
use std::sync::Arc;

use ocicrypt_core::image::layout::OciLayout;
use ocicrypt_core::image::ops::NoProgress;
use ocicrypt_core::image::{transform_image, LayerSelection, Operation};
use ocicrypt_core::jwe::{JweUnwrapper, JweWrapper};
use ocicrypt_core::keys::{PrivateKey, PublicKey};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: encrypt_layout SRC_LAYOUT TAG DST_LAYOUT public.pem [private.pem]");
        std::process::exit(2);
    }
    let (src, tag, dst, public) = (&args[1], &args[2], &args[3], &args[4]);

    let recipient = PublicKey::from_file(public.as_ref())?;
    let wrapper = Arc::new(JweWrapper::new(vec![recipient])?);
    let report = transform_image(
        Arc::new(OciLayout::open(src, Some(tag))?),
        Arc::new(OciLayout::open_or_create(dst, Some(tag))?),
        Operation::Encrypt {
            wrappers: vec![wrapper],
        },
        LayerSelection::default(),
        Arc::new(NoProgress),
        4,
    )
    .await?;
    for l in &report.layers {
        println!("layer {} {}: {} -> {}", l.index, l.action, l.from, l.to);
    }

    if let Some(private) = args.get(5) {
        let key = PrivateKey::from_file(private.as_ref(), None)?;
        let back = format!("{dst}-decrypted");
        transform_image(
            Arc::new(OciLayout::open(dst, Some(tag))?),
            Arc::new(OciLayout::open_or_create(&back, Some(tag))?),
            Operation::Decrypt {
                unwrappers: vec![Arc::new(JweUnwrapper::new(vec![key]))],
            },
            LayerSelection::default(),
            Arc::new(NoProgress),
            4,
        )
        .await?;
        println!("decrypted into {back}");
    }
    Ok(())
}
