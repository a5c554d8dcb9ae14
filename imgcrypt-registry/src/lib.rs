//! # imgcrypt-registry
//!
//! Where images come from and go to, for programs that encrypt and decrypt them with
//! `ocicrypt-core`, without the `imgcrypt` command line: registries reached the way
//! containers/image (skopeo, podman, CRI-O) reaches them, and image archives. Each is an
//! [`ImageSource`](ocicrypt_core::image::ImageSource) and
//! [`ImageDest`](ocicrypt_core::image::ImageDest) that `ocicrypt_core::image::ops` reads and
//! writes. `docs/embedding.md` shows the few lines that encrypt an image registry to registry.
//!
//! * [`reference`]: image references in skopeo's syntax (`docker://`, `oci:`, `oci-archive:`,
//!   `docker-archive:`).
//! * [`client`]: the `docker://` client ([`RegistryImage`]) and how to reach a registry
//!   ([`RegistryOptions`]): streaming pulls and pushes, the token flow, bounded bodies, stalls.
//! * [`auth`]: credentials: given, auth files (`auths`), credential helpers.
//! * [`credhelper`]: Docker credential helpers (`credsStore`, `credHelpers`).
//! * [`tls`]: trusted roots (web, system store, `certs.d`), client certificates,
//!   `--tls-verify=false`, and failures explained.
//! * [`archive`]: `oci-archive:` and `docker-archive:`, read without unpacking, written atomically.
//! * [`error`]: what can go wrong, one variant per thing a caller can act on ([`Error`]).
#![warn(missing_docs)]

pub mod archive;
pub mod auth;
pub mod client;
pub mod credhelper;
pub mod error;
pub mod reference;
pub mod tls;

pub use auth::Creds;
pub use client::{RegistryImage, RegistryOptions};
pub use error::Error;
pub use reference::{ImageRef, Reference, RegistryRef};
