//! The decoding chain for Secret values (research note §3.3).
//!
//! * Secret `data` arrives base64-decoded already (k8s-openapi `ByteString`).
//! * Text values (`rootkeyid`, `ciphertext`, `config.json`) are UTF-8 with surrounding ASCII
//!   whitespace trimmed (`--from-file` secrets end with a newline).
//! * A Key Protect ciphertext is an opaque base64 string. Users who put it under `data:` instead
//!   of `stringData:` make the API server decode it once, so the agent receives the JSON envelope
//!   `{"ciphertext":…,"iv":…}` instead: it is re-encoded as canonical padded base64 (exact, since
//!   Key Protect emits canonical base64). Other ciphertexts are decoded leniently (Go's
//!   `StdEncoding` dialect: embedded newlines, missing padding, non-zero trailing bits) and
//!   re-encoded canonically, so what is sent is always canonical.
//! * A key that was base64-encoded once too often (the decoded bytes are base64 text of a PEM) is
//!   decoded once more, with a warning.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use zeroize::Zeroizing;

const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A Secret value that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The value is not UTF-8 text.
    #[error(
        "{what} is not UTF-8 text; put the value under stringData (or base64-encode it once under data)"
    )]
    NotText {
        /// Which value.
        what: String,
    },
    /// The value is empty (or only whitespace).
    #[error("{what} is empty")]
    Empty {
        /// Which value.
        what: String,
    },
    /// The value is not base64.
    #[error("{what} is not valid base64 ({reason}); paste the ciphertext exactly as `ibmcloud kp key wrap` printed it")]
    NotBase64 {
        /// Which value.
        what: String,
        /// The decoder's complaint (positions only, never content).
        reason: String,
    },
}

/// Decodes standard base64 leniently, skipping ASCII whitespace (Go `StdEncoding` semantics).
pub fn lenient_base64(s: &str) -> Result<Zeroizing<Vec<u8>>, base64::DecodeError> {
    let cleaned: Zeroizing<String> = Zeroizing::new(s.chars().filter(|c| !c.is_ascii_whitespace()).collect());
    LENIENT.decode(cleaned.as_bytes()).map(Zeroizing::new)
}

/// UTF-8 text with surrounding ASCII whitespace removed.
pub fn trimmed_text<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str, DecodeError> {
    let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::NotText {
        what: what.to_string(),
    })?;
    let s = s.trim_matches(|c: char| c.is_ascii_whitespace());
    if s.is_empty() {
        return Err(DecodeError::Empty {
            what: what.to_string(),
        });
    }
    Ok(s)
}

/// The Key Protect ciphertext string to send, from a Secret value (see the module docs).
pub fn kp_ciphertext(bytes: &[u8], what: &str) -> Result<String, DecodeError> {
    if looks_like_envelope(bytes) {
        return Ok(STANDARD.encode(bytes));
    }
    let text = trimmed_text(bytes, what)?;
    let raw = lenient_base64(text).map_err(|e| DecodeError::NotBase64 {
        what: what.to_string(),
        reason: e.to_string(),
    })?;
    if raw.is_empty() {
        return Err(DecodeError::Empty {
            what: what.to_string(),
        });
    }
    Ok(STANDARD.encode(&raw[..]))
}

/// Whether the bytes are a Key Protect ciphertext envelope (JSON with `ciphertext` and `iv`).
fn looks_like_envelope(bytes: &[u8]) -> bool {
    let trimmed = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map(|i| &bytes[i..]);
    if trimmed.is_none_or(|t| t.first() != Some(&b'{')) {
        return false;
    }
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| {
            v.as_object()
                .map(|o| o.contains_key("ciphertext") && o.contains_key("iv"))
        })
        .unwrap_or(false)
}

/// When `bytes` are base64 text whose decoding starts with `-----BEGIN` (a PEM encoded once too
/// often), the decoded PEM; otherwise `None`.
pub fn extra_base64_layer(bytes: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let text = text.trim_matches(|c: char| c.is_ascii_whitespace());
    if text.is_empty() || text.starts_with("-----") {
        return None;
    }
    let decoded = lenient_base64(text).ok()?;
    let start = decoded
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(decoded.len());
    decoded[start..].starts_with(b"-----BEGIN").then_some(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_trimmed() {
        assert_eq!(trimmed_text(b"  abc\n", "rootkeyid").unwrap(), "abc");
        assert!(matches!(
            trimmed_text(b"\n \t", "rootkeyid"),
            Err(DecodeError::Empty { .. })
        ));
        assert!(matches!(
            trimmed_text(&[0xff, 0xfe], "rootkeyid"),
            Err(DecodeError::NotText { .. })
        ));
    }

    #[test]
    fn ciphertext_is_sent_canonical() {
        // The IBM runbook's example ends in non-canonical trailing bits: Go accepts it.
        assert_eq!(kp_ciphertext(b"In1=", "c").unwrap(), "In0=");
        // Line-wrapped (GNU base64 without -w0), trailing newline, missing padding.
        let c = STANDARD.encode(vec![7u8; 100]);
        let wrapped = format!("{}\n{}\n", &c[..76], &c[76..]);
        assert_eq!(kp_ciphertext(wrapped.as_bytes(), "c").unwrap(), c);
        assert_eq!(kp_ciphertext(c.trim_end_matches('=').as_bytes(), "c").unwrap(), c);
        assert!(matches!(
            kp_ciphertext(b"not base64!", "c"),
            Err(DecodeError::NotBase64 { .. })
        ));
        assert!(matches!(kp_ciphertext(b"", "c"), Err(DecodeError::Empty { .. })));
    }

    #[test]
    fn envelope_under_data_is_reencoded_exactly() {
        let env = br#"{"ciphertext":"AAAA","iv":"BBBB","version":"4.0.0","handle":"h"}"#;
        let c = STANDARD.encode(env);
        assert_eq!(kp_ciphertext(env, "c").unwrap(), c);
        // JSON without the envelope fields is not an envelope (and not base64 either).
        assert!(kp_ciphertext(br#"{"a":1}"#, "c").is_err());
    }

    #[test]
    fn double_encoded_pem_is_detected() {
        let pem = b"-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n";
        let once = STANDARD.encode(pem);
        assert_eq!(extra_base64_layer(once.as_bytes()).unwrap().as_slice(), pem);
        let wrapped = format!("{}\n{}\n", &once[..40], &once[40..]);
        assert_eq!(extra_base64_layer(wrapped.as_bytes()).unwrap().as_slice(), pem);
        assert!(extra_base64_layer(pem).is_none());
        assert!(extra_base64_layer(STANDARD.encode(b"hello").as_bytes()).is_none());
        assert!(extra_base64_layer(&[0x30, 0x82, 0x01]).is_none());
    }
}
