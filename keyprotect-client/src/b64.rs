//! Base64 as Key Protect and Go speak it: always send canonical padded standard base64; accept
//! what Go's `StdEncoding` accepts (embedded CR/LF, non-canonical trailing bits, missing padding).

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;

const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Encodes as canonical, padded standard base64.
pub fn encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Decodes standard base64 leniently: ASCII whitespace is skipped, padding is optional and
/// non-zero trailing bits are accepted (as Go's `encoding/base64.StdEncoding` and Python do).
///
/// # Errors
/// The input is not base64 even after removing whitespace.
pub fn decode_lenient(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    if s.bytes().any(|b| b.is_ascii_whitespace()) {
        let cleaned: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        LENIENT.decode(cleaned)
    } else {
        LENIENT.decode(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_accepts_go_inputs() {
        assert_eq!(decode_lenient("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_lenient("aGVs\nbG8=\n").unwrap(), b"hello");
        assert_eq!(decode_lenient("aGVsbG8").unwrap(), b"hello");
        // non-canonical trailing bits ("In1=" from the IBM runbook example)
        assert_eq!(decode_lenient("In1=").unwrap(), b"\"}");
        assert!(decode_lenient("not base64!").is_err());
        assert_eq!(encode(b"hello"), "aGVsbG8=");
    }
}
