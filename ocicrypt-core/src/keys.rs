//! Public and private key parsing. (Filled in by the keys work; see docs/architecture.md.)

/// Why a key could not be read or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The data is not a supported key.
    #[error("{source_name}: unsupported key: {found}")]
    Unsupported {
        /// File or other origin of the key.
        source_name: String,
        /// What was found in it.
        found: String,
    },
}
