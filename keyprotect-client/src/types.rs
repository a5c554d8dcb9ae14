//! Request and response types of the Key Protect API.

use std::fmt;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Integer key states of Key Protect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum KeyState {
    /// 0: pre-activation.
    PreActivation,
    /// 1: active (wrap, unwrap).
    Active,
    /// 2: suspended / disabled (unwrap gives 409).
    Suspended,
    /// 3: deactivated / expired (unwrap still works, wrap does not).
    Deactivated,
    /// 5: destroyed / deleted (unwrap gives 410).
    Destroyed,
    /// Any other number.
    Other(i64),
}

impl KeyState {
    /// From the API's integer.
    pub fn from_i64(n: i64) -> Self {
        match n {
            0 => Self::PreActivation,
            1 => Self::Active,
            2 => Self::Suspended,
            3 => Self::Deactivated,
            5 => Self::Destroyed,
            n => Self::Other(n),
        }
    }
    /// The API's integer.
    pub fn as_i64(self) -> i64 {
        match self {
            Self::PreActivation => 0,
            Self::Active => 1,
            Self::Suspended => 2,
            Self::Deactivated => 3,
            Self::Destroyed => 5,
            Self::Other(n) => n,
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PreActivation => f.write_str("pre-activation (0)"),
            Self::Active => f.write_str("active (1)"),
            Self::Suspended => f.write_str("suspended (2)"),
            Self::Deactivated => f.write_str("deactivated (3)"),
            Self::Destroyed => f.write_str("destroyed (5)"),
            Self::Other(n) => write!(f, "unknown ({n})"),
        }
    }
}

/// A key version (`keyVersion`, `rewrappedKeyVersion`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyVersion {
    /// Version id.
    pub id: String,
    /// RFC 3339 creation date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_date: Option<String>,
}

/// A key as returned by get/list/create (`resources[i]`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Key {
    /// Key id (UUID).
    #[serde(default)]
    pub id: String,
    /// Human-readable name.
    #[serde(default)]
    pub name: String,
    /// Aliases.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Integer state; see [`Key::key_state`].
    #[serde(default)]
    pub state: i64,
    /// `false` for root keys.
    #[serde(default)]
    pub extractable: bool,
    /// CRN.
    #[serde(default)]
    pub crn: Option<String>,
    /// Latest version.
    #[serde(default)]
    pub key_version: Option<KeyVersion>,
    /// Creation date.
    #[serde(default)]
    pub creation_date: Option<String>,
    /// Last update date.
    #[serde(default)]
    pub last_update_date: Option<String>,
    /// Last rotation date.
    #[serde(default)]
    pub last_rotate_date: Option<String>,
    /// Expiration date.
    #[serde(default)]
    pub expiration_date: Option<String>,
    /// Key ring.
    #[serde(default, rename = "keyRingID")]
    pub key_ring_id: Option<String>,
    /// Deleted flag.
    #[serde(default)]
    pub deleted: Option<bool>,
    /// Imported flag.
    #[serde(default)]
    pub imported: Option<bool>,
    /// Key material (standard keys, `GET /keys/{id}` only), base64.
    #[serde(default)]
    pub payload: Option<SecretString>,
}

impl Key {
    /// The state as an enum.
    pub fn key_state(&self) -> KeyState {
        KeyState::from_i64(self.state)
    }
    /// True for a root key (`extractable: false`).
    pub fn is_root(&self) -> bool {
        !self.extractable
    }
}

/// Result of a wrap.
pub struct WrapOutput {
    /// The opaque ciphertext string to store.
    pub ciphertext: String,
    /// The key version that wrapped it.
    pub key_version: Option<KeyVersion>,
    /// The generated data key when the wrap was called without plaintext.
    pub plaintext: Option<Zeroizing<Vec<u8>>>,
}

impl fmt::Debug for WrapOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrapOutput")
            .field("ciphertext", &self.ciphertext)
            .field("key_version", &self.key_version)
            .field("plaintext", &self.plaintext.as_ref().map(|_| "[REDACTED]"))
            .finish()
    }
}

/// A newer ciphertext returned by unwrap after the root key was rotated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewrapped {
    /// The same data key wrapped under the latest key version.
    pub ciphertext: String,
    /// That latest version.
    pub key_version: Option<KeyVersion>,
}

/// Result of an unwrap.
pub struct UnwrapOutput {
    /// The raw data key (decoded from the response's base64).
    pub plaintext: Zeroizing<Vec<u8>>,
    /// The key version that had wrapped the ciphertext.
    pub key_version: Option<KeyVersion>,
    /// Present when the root key was rotated since the wrap: store it instead of the old one.
    pub rewrapped: Option<Rewrapped>,
}

impl fmt::Debug for UnwrapOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnwrapOutput")
            .field("plaintext", &"[REDACTED]")
            .field("key_version", &self.key_version)
            .field("rewrapped", &self.rewrapped)
            .finish()
    }
}

/// Result of a rewrap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RewrapOutput {
    /// The data key wrapped under the latest key version.
    pub ciphertext: String,
    /// Version of the input ciphertext.
    pub key_version: Option<KeyVersion>,
    /// The latest version (the one that wrapped `ciphertext`).
    pub rewrapped_key_version: Option<KeyVersion>,
}

/// Filters for [`Client::list_keys`](crate::Client::list_keys).
#[derive(Clone, Debug, Default)]
pub struct ListKeysOptions {
    /// Page size (service default 200, max 5000).
    pub limit: Option<u32>,
    /// Offset.
    pub offset: Option<u32>,
    /// States to include (service default: 0,1,2,3).
    pub states: Vec<KeyState>,
    /// `Some(false)`: root keys only.
    pub extractable: Option<bool>,
}

/// What to create with [`Client::create_key`](crate::Client::create_key).
#[derive(Clone, Debug, Default)]
pub struct CreateKey {
    /// Name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// `false` = root key.
    pub extractable: bool,
    /// Imported key material (raw bytes), none to let the service generate it.
    pub payload: Option<Zeroizing<Vec<u8>>>,
    /// Aliases.
    pub aliases: Vec<String>,
}

#[derive(Deserialize)]
pub(crate) struct Collection<T> {
    #[serde(default = "Vec::new")]
    pub resources: Vec<T>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WrapResponse {
    pub ciphertext: String,
    #[serde(default)]
    pub plaintext: Option<String>,
    #[serde(default)]
    pub key_version: Option<KeyVersion>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct UnwrapResponse {
    pub plaintext: String,
    #[serde(default)]
    pub ciphertext: Option<String>,
    #[serde(default)]
    pub key_version: Option<KeyVersion>,
    #[serde(default)]
    pub rewrapped_key_version: Option<KeyVersion>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RewrapResponse {
    pub ciphertext: String,
    #[serde(default)]
    pub key_version: Option<KeyVersion>,
    #[serde(default)]
    pub rewrapped_key_version: Option<KeyVersion>,
}
