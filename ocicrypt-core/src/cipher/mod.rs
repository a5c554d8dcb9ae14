//! The layer cipher `AES_256_CTR_HMAC_SHA256`, as a sans-I/O core.
//!
//! ```text
//!  plaintext ──► AES-256-CTR(key, nonce as 128-bit BE counter) ──► ciphertext ──► HMAC-SHA256(key)
//!                                                                                    │
//!                                       public options {"hmac": …} ◄─────────────────┘
//! ```
//!
//! [`LayerEncryptor`] and [`LayerDecryptor`] work in place over chunks of any size; they do no
//! I/O. The [`io`] module wraps them in `Read`/`Write` adapters and [`tokio`](self::tokio) (feature
//! `tokio`) in `AsyncRead` adapters. [`Keystream`] (CTR) and [`LayerMac`] (HMAC) are the two
//! halves on their own, for callers that run them on different threads: [`parallel`] does that
//! for a reader and a writer, the image pipeline gives each half its own stage.
//!
//! The format is the one containers/ocicrypt writes: the
//! 16-byte nonce is the initial counter block, incremented as a 128-bit big-endian integer, and
//! the MAC covers the ciphertext only, keyed with the same 32-byte key.
//!
//! # ⚠️ Security warning
//! The MAC can only be checked once the whole layer has been read. Every byte a streaming
//! decryptor hands out before that is **unauthenticated**. Callers that cannot roll back must
//! use [`io::decrypt_to_path`], which publishes the plaintext only after verification.

use aes::cipher::{KeyIvInit, StreamCipher};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::Error;

pub mod io;
pub mod parallel;
#[cfg(feature = "tokio")]
pub mod tokio;

/// Name of the only layer cipher containers/ocicrypt defines, as written in public options.
pub const AES_256_CTR_HMAC_SHA256: &str = "AES_256_CTR_HMAC_SHA256";
/// Length of the symmetric layer key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of the CTR nonce (initial counter block) in bytes.
pub const NONCE_LEN: usize = 16;
/// Length of the HMAC-SHA256 tag in bytes.
pub const MAC_LEN: usize = 32;

/// Inner chunk on which CTR and HMAC run back to back, so the bytes stay in L1/L2 cache.
const INNER_CHUNK: usize = 16 * 1024;

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;
type HmacSha256 = Hmac<Sha256>;

/// A 32-byte symmetric layer key. Zeroized on drop; neither `Clone` nor printable.
#[doc(alias = "symkey")]
pub struct LayerKey(Zeroizing<[u8; KEY_LEN]>);

impl LayerKey {
    /// A fresh random key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(k.as_mut());
        Self(k)
    }

    /// A key from raw bytes.
    ///
    /// # Errors
    /// [`Error::InvalidKeyLength`] unless `bytes` is exactly 32 bytes long (Go ocicrypt
    /// silently decrypts to garbage in that case; we refuse).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() != KEY_LEN {
            return Err(Error::InvalidKeyLength {
                expected: KEY_LEN,
                got: bytes.len(),
            });
        }
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        k.copy_from_slice(bytes);
        Ok(Self(k))
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for LayerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LayerKey(<redacted>)")
    }
}

/// The 16-byte CTR nonce (initial counter block).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Nonce([u8; NONCE_LEN]);

impl Nonce {
    /// A fresh random nonce.
    pub fn generate() -> Self {
        let mut n = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut n);
        Self(n)
    }

    /// A nonce from raw bytes.
    ///
    /// # Errors
    /// [`Error::InvalidNonceLength`] unless `bytes` is exactly 16 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        let n: [u8; NONCE_LEN] = bytes.try_into().map_err(|_| Error::InvalidNonceLength {
            expected: NONCE_LEN,
            got: bytes.len(),
        })?;
        Ok(Self(n))
    }

    /// The raw nonce bytes.
    pub fn as_bytes(&self) -> &[u8; NONCE_LEN] {
        &self.0
    }
}

/// The HMAC-SHA256 tag over a layer's ciphertext, as stored in public options.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MacTag(pub [u8; MAC_LEN]);

impl MacTag {
    /// The raw tag bytes.
    pub fn as_bytes(&self) -> &[u8; MAC_LEN] {
        &self.0
    }
}

/// The CTR half of the layer cipher: XORs the AES-256-CTR keystream into a buffer in place.
/// Encryption and decryption are the same operation. With [`LayerMac`] it lets the two halves
/// run on different threads (see [`parallel`]).
pub struct Keystream {
    ctr: Aes256Ctr,
    len: u64,
}

impl Keystream {
    /// The keystream for `key` and `nonce`, starting at the first byte of the layer.
    pub fn new(key: &LayerKey, nonce: &Nonce) -> Self {
        Self {
            ctr: Aes256Ctr::new(key.as_bytes().into(), nonce.as_bytes().into()),
            len: 0,
        }
    }

    /// XORs the next `buf.len()` keystream bytes into `buf`.
    pub fn apply(&mut self, buf: &mut [u8]) {
        self.ctr.apply_keystream(buf);
        self.len += buf.len() as u64;
    }

    /// Number of bytes processed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing has been processed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The MAC half of the layer cipher: HMAC-SHA256 over the ciphertext, keyed with the layer key.
pub struct LayerMac {
    mac: HmacSha256,
}

impl LayerMac {
    /// Starts a MAC keyed with `key`.
    pub fn new(key: &LayerKey) -> Self {
        Self {
            mac: <HmacSha256 as Mac>::new_from_slice(key.as_bytes()).expect("HMAC takes any key length"),
        }
    }

    /// Feeds the next ciphertext bytes.
    pub fn update(&mut self, ciphertext: &[u8]) {
        self.mac.update(ciphertext);
    }

    /// The tag over everything fed.
    pub fn finish(self) -> MacTag {
        MacTag(self.mac.finalize().into_bytes().into())
    }

    /// Checks the tag over everything fed against `expected`, in constant time.
    ///
    /// # Errors
    /// [`Error::AuthenticationFailed`], deliberately without details, when it does not match.
    pub fn verify(self, expected: &ExpectedMac) -> Result<(), Error> {
        let actual: [u8; MAC_LEN] = self.mac.finalize().into_bytes().into();
        if bool::from(actual.ct_eq(&expected.0)) {
            Ok(())
        } else {
            Err(Error::AuthenticationFailed)
        }
    }
}

/// The tag a layer must verify against, checked for presence and length before any byte is
/// decrypted. Zeroized on drop (a tag is not secret, but it is cheap to be tidy).
pub struct ExpectedMac([u8; MAC_LEN]);

impl ExpectedMac {
    /// The expected tag from the public options' `hmac` bytes.
    ///
    /// # Errors
    /// [`Error::MissingHmac`] when `bytes` is empty, [`Error::InvalidHmacLength`] when it is not
    /// 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.is_empty() {
            return Err(Error::MissingHmac);
        }
        let tag: [u8; MAC_LEN] = bytes.try_into().map_err(|_| Error::InvalidHmacLength {
            expected: MAC_LEN,
            got: bytes.len(),
        })?;
        Ok(Self(tag))
    }
}

impl Drop for ExpectedMac {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Encrypts a layer in place, chunk by chunk: CTR first, then HMAC over the ciphertext.
///
/// Consuming [`finish`](Self::finish) makes use after the end a compile error.
#[doc(alias = "LayerBlockCipher")]
pub struct LayerEncryptor {
    ks: Keystream,
    mac: LayerMac,
}

impl LayerEncryptor {
    /// Starts encrypting with `key` and `nonce`.
    pub fn new(key: &LayerKey, nonce: &Nonce) -> Self {
        Self {
            ks: Keystream::new(key, nonce),
            mac: LayerMac::new(key),
        }
    }

    /// Encrypts `buf` in place (plaintext in, ciphertext out) and feeds the MAC.
    pub fn update(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(INNER_CHUNK) {
            self.ks.apply(chunk);
            self.mac.update(chunk);
        }
    }

    /// Number of bytes encrypted so far.
    pub fn len(&self) -> u64 {
        self.ks.len()
    }

    /// Whether nothing has been encrypted yet.
    pub fn is_empty(&self) -> bool {
        self.ks.is_empty()
    }

    /// Ends the stream and returns the HMAC over all ciphertext.
    pub fn finish(self) -> MacTag {
        self.mac.finish()
    }
}

/// Decrypts a layer in place, chunk by chunk: HMAC over the ciphertext, then CTR.
///
/// Nothing is authenticated until [`verify`](Self::verify) succeeds.
pub struct LayerDecryptor {
    ks: Keystream,
    mac: LayerMac,
    expected: ExpectedMac,
}

impl LayerDecryptor {
    /// Starts decrypting with `key` and `nonce`, to be checked against `expected_mac`.
    ///
    /// # Errors
    /// [`Error::MissingHmac`] when `expected_mac` is empty, [`Error::InvalidHmacLength`] when it is
    /// not 32 bytes.
    pub fn new(key: &LayerKey, nonce: &Nonce, expected_mac: &[u8]) -> Result<Self, Error> {
        let expected = ExpectedMac::from_slice(expected_mac)?;
        Ok(Self {
            ks: Keystream::new(key, nonce),
            mac: LayerMac::new(key),
            expected,
        })
    }

    /// Decrypts `buf` in place (ciphertext in, unauthenticated plaintext out).
    pub fn update(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(INNER_CHUNK) {
            self.mac.update(chunk);
            self.ks.apply(chunk);
        }
    }

    /// Number of bytes decrypted so far.
    pub fn len(&self) -> u64 {
        self.ks.len()
    }

    /// Whether nothing has been decrypted yet.
    pub fn is_empty(&self) -> bool {
        self.ks.is_empty()
    }

    /// Ends the stream and checks the MAC in constant time.
    ///
    /// # Errors
    /// [`Error::AuthenticationFailed`], deliberately without details, when the MAC does not match.
    pub fn verify(self) -> Result<(), Error> {
        self.mac.verify(&self.expected)
    }
}

/// Encrypts a whole buffer at once. For tests and small blobs; layers should stream.
pub fn encrypt_in_place(key: &LayerKey, nonce: &Nonce, buf: &mut [u8]) -> MacTag {
    let mut e = LayerEncryptor::new(key, nonce);
    e.update(buf);
    e.finish()
}

/// Decrypts and verifies a whole buffer at once. On failure `buf` holds unauthenticated data
/// and must be discarded.
///
/// # Errors
/// As [`LayerDecryptor::new`] and [`LayerDecryptor::verify`].
pub fn decrypt_in_place(key: &LayerKey, nonce: &Nonce, mac: &[u8], buf: &mut [u8]) -> Result<(), Error> {
    let mut d = LayerDecryptor::new(key, nonce, mac)?;
    d.update(buf);
    d.verify()
}

#[cfg(test)]
mod tests;
