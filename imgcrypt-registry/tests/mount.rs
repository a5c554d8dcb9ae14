//! Cross-repository blob mounts against Debian's docker-registry on 127.0.0.1.

use std::path::Path;

use imgcrypt_registry::{RegistryImage, RegistryOptions, RegistryRef};
use ocicrypt_core::image::layout::descriptor;
use ocicrypt_core::image::ImageDest;
use testkit::image::{write_image, Compression, LayerSpec};
use testkit::registry::Registry;
use testkit::tools::{have_tool, skopeo_ok};

/// Open uploads the registry keeps for `repo` (a deleted upload loses its `data` file;
/// docker-registry leaves an empty `hashstates` directory).
fn open_uploads(reg: &Registry, repo: &str) -> usize {
    let dir = reg
        .storage()
        .join("docker/registry/v2/repositories")
        .join(repo)
        .join("_uploads");
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().join("data").exists())
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn mounts_from_another_repository_and_falls_back_when_it_cannot() {
    if !(have_tool("skopeo") && have_tool("docker-registry")) {
        return;
    }
    let reg = Registry::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let facts = write_image(&src, "v1", &[LayerSpec::random(50_000, 31, Compression::Gzip)]);
    let oci = format!("oci:{}:v1", Path::new(&src).display());
    skopeo_ok(&["copy", "--dest-tls-verify=false", &oci, &reg.image("base/app:v1")]);
    let layer = &facts.layers[0];
    let desc = descriptor(&layer.media_type, &layer.digest, layer.size).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let opts = RegistryOptions::default().tls_verify(false);
        let dst_ref = RegistryRef::parse(&reg.image("team/app:v1")).unwrap();
        let dst = RegistryImage::connect(dst_ref, opts.clone(), true).await.unwrap();
        assert_eq!(dst.repository(), (reg.addr.as_str(), "team/app"));
        assert!(!dst.has_blob(&desc).await.unwrap());

        // From a repository without the blob: docker-registry opens a plain upload (202)
        // instead, which is deleted; nothing is mounted.
        assert!(!dst.mount_blob(&layer.digest, "empty/repo").await.unwrap());
        assert!(!dst.has_blob(&desc).await.unwrap());
        assert_eq!(
            open_uploads(&reg, "team/app"),
            0,
            "the fallback upload was left open"
        );

        // From the repository that has it: mounted, and the destination now serves it.
        assert!(dst.mount_blob(&layer.digest, "base/app").await.unwrap());
        assert!(dst.has_blob(&desc).await.unwrap());
        assert_eq!(open_uploads(&reg, "team/app"), 0);
    });
}
