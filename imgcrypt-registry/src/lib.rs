//! # imgcrypt-registry
//!
//! Where images come from and go to, for programs that encrypt and decrypt them with
//! `ocicrypt-core`: registries reached the way containers/image (skopeo, podman, CRI-O) reaches
//! them, and image archives.
//!
//! * [`archive`]: `oci-archive:` and `docker-archive:`, read without unpacking, written atomically.
//! * [`credhelper`]: Docker credential helpers (`credsStore`, `credHelpers`).
//! * [`tls`]: trusted roots (web, system store, `certs.d`), client certificates,
//!   `--tls-verify=false`, and failures explained.
#![warn(missing_docs)]

pub mod archive;
pub mod credhelper;
pub mod tls;
