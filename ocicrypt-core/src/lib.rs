//! # ocicrypt-core
//!
//! Encrypted OCI image layers, interoperable byte for byte with containers/ocicrypt (skopeo,
//! buildah, podman, containerd's imgcrypt).
//!
//! * [`cipher`]: the streaming layer cipher `AES_256_CTR_HMAC_SHA256`, a sans-I/O core with
//!   `Read`/`Write` and tokio `AsyncRead` adapters;
//! * [`options`]: the private and public options JSON;
//! * [`mediatype`]: media types and annotation names;
//! * [`keywrap`]: the `KeyWrapper`/`KeyUnwrapper` traits (sync and async) and the unwrap logic
//!   that tries every scheme and entry;
//! * [`keys`]: public and private key parsing (PEM, DER, JWK, certificates, encrypted keys);
//! * [`jwe`]: the JWE key-wrap scheme;
//! * [`pgp`]: the OpenPGP key-wrap scheme (rPGP);
//! * [`pkcs11`]: the PKCS#11 key-wrap scheme (keys on HSMs and SoftHSM, through `cryptoki`);
//! * [`pkcs7`]: the PKCS#7 (CMS EnvelopedData) key-wrap scheme, for X.509 certificates;
//! * [`image`]: image operations over OCI layouts and other stores (encrypt, decrypt, add and
//!   remove recipients, inspect, check authorization);
//! * [`keyprovider`]: the client side of the ocicrypt key-provider protocol;
//! * [`fsutil`]: atomic, synced file writes;
//! * [`redact`]: the one rule for messages (no key material or secret quoted, input shown only
//!   as a short sanitized token).
//!
//! ## Crate features
//! * `jwe` (default): JWE key wrapping and key parsing (OpenSSL).
//! * `pgp` (default): the OpenPGP key-wrap scheme (the `pgp` crate).
//! * `pkcs11`: the PKCS#11 scheme's token operations (loads PKCS#11 modules; off by default,
//!   on in the CLI). Without it the scheme's formats are still parsed.
//! * `tokio`: `AsyncRead` adapters for the layer cipher.
//! * `image` (default, implies `tokio`): image operations.
//!
//! ## Example: encrypt and decrypt a layer stream
//! ```
//! use std::io::Read;
//! use ocicrypt_core::cipher::{io::{DecryptReader, EncryptReader}, LayerKey, Nonce};
//!
//! let key = LayerKey::generate();
//! let nonce = Nonce::generate();
//! let plaintext = b"a layer blob".repeat(1000);
//!
//! let mut enc = EncryptReader::new(&plaintext[..], &key, &nonce);
//! let mut ciphertext = Vec::new();
//! enc.read_to_end(&mut ciphertext)?;
//! let (_, mac) = enc.finish()?;
//!
//! let mut dec = DecryptReader::new(&ciphertext[..], &key, &nonce, mac.as_bytes())?;
//! let mut back = Vec::new();
//! dec.read_to_end(&mut back)?; // fails with InvalidData if the MAC does not match
//! assert_eq!(back, plaintext);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

pub mod cipher;
mod error;
pub mod fsutil;
#[cfg(feature = "image")]
pub mod image;
#[cfg(feature = "jwe")]
pub mod jwe;
pub mod keyprovider;
pub mod keys;
pub mod keywrap;
pub mod mediatype;
pub mod options;
#[cfg(feature = "pgp")]
pub mod pgp;
#[cfg(feature = "jwe")]
pub mod pkcs11;
#[cfg(feature = "jwe")]
pub mod pkcs7;
pub mod recipients;
pub mod redact;
#[cfg(feature = "jwe")]
pub mod stream_processor;

pub use error::Error;
pub use keywrap::{AsyncKeyUnwrapper, AsyncKeyWrapper, KeyUnwrapper, KeyWrapper, UnwrapError, WrapError};
pub use options::{PrivateLayerOptions, PublicLayerOptions};
