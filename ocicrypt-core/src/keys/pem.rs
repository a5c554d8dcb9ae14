//! A small PEM reader: finds every `-----BEGIN X-----` block, its RFC 1421 headers
//! (`Proc-Type`, `DEK-Info`) and its DER body. Text around and between blocks is ignored, as
//! OpenSSL and Go do.

use base64::Engine as _;
use zeroize::Zeroizing;

use crate::redact;

const BEGIN: &[u8] = b"-----BEGIN ";
const DASHES: &[u8] = b"-----";

/// One PEM block.
pub(crate) struct PemBlock<'a> {
    /// The label, e.g. `PRIVATE KEY`.
    pub label: String,
    /// Header lines (`Proc-Type: 4,ENCRYPTED`), name and value trimmed.
    pub headers: Vec<(String, String)>,
    /// The decoded body.
    pub der: Zeroizing<Vec<u8>>,
    /// The whole block text from `-----BEGIN` to the end of the `-----END …-----` line.
    pub text: &'a [u8],
}

impl PemBlock<'_> {
    /// Legacy OpenSSL encryption (`Proc-Type: 4,ENCRYPTED`).
    pub fn is_legacy_encrypted(&self) -> bool {
        self.headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("Proc-Type") && v.to_ascii_uppercase().contains("ENCRYPTED"))
    }
}

/// Whether the data contains a PEM begin line.
pub(crate) fn contains_pem(data: &[u8]) -> bool {
    find(data, BEGIN, 0).is_some()
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > hay.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn line_end(data: &[u8], from: usize) -> usize {
    data[from..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(data.len(), |p| from + p + 1)
}

/// Parses every PEM block. Errors name the block and what is wrong with it.
pub(crate) fn parse_blocks(data: &[u8]) -> Result<Vec<PemBlock<'_>>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(start) = find(data, BEGIN, pos) {
        let label_start = start + BEGIN.len();
        let first_end = line_end(data, label_start);
        let first_line = &data[label_start..first_end];
        let label_len = find(first_line, DASHES, 0)
            .ok_or_else(|| "a PEM BEGIN line without closing dashes".to_owned())?;
        let label = String::from_utf8_lossy(&first_line[..label_len])
            .trim()
            .to_owned();
        if !valid_label(&label) {
            // A BEGIN line whose closing dashes are missing runs on into the body: the "label"
            // is then key material, so it is never quoted.
            return Err(format!(
                "a PEM BEGIN line with an invalid label {} (is the line missing its closing \"-----\"?)",
                quote_label(&label)
            ));
        }
        let end_marker = format!("-----END {label}-----");
        let end = find(data, end_marker.as_bytes(), first_end).ok_or_else(|| {
            format!(
                "PEM block {} has no \"-----END {}-----\" line (file truncated?)",
                quote_label(&label),
                redact::token(&label)
            )
        })?;
        let body = &data[first_end..end];
        let block_end = line_end(data, end + end_marker.len());

        let mut headers = Vec::new();
        let mut b64 = Zeroizing::new(Vec::with_capacity(body.len()));
        let mut in_headers = true;
        for line in body.split(|&b| b == b'\n') {
            let line = trim(line);
            if in_headers {
                if line.is_empty() {
                    if !headers.is_empty() {
                        in_headers = false;
                    }
                    continue;
                }
                if let Some(colon) = line.iter().position(|&b| b == b':') {
                    let k = String::from_utf8_lossy(&line[..colon]).trim().to_owned();
                    let v = String::from_utf8_lossy(&line[colon + 1..]).trim().to_owned();
                    headers.push((k, v));
                    continue;
                }
                in_headers = false;
            }
            if label.starts_with("PGP ") && line.first() == Some(&b'=') {
                // OpenPGP armor checksum (`=XXXX`), not part of the body.
                continue;
            }
            b64.extend(line.iter().filter(|b| !b.is_ascii_whitespace()));
        }
        let lenient = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        let der = Zeroizing::new(
            lenient
                .decode(&b64[..])
                .map_err(|e| format!("PEM block {} is not valid base64 ({e})", quote_label(&label)))?,
        );
        out.push(PemBlock {
            label,
            headers,
            der,
            text: &data[start..block_end],
        });
        pos = block_end;
    }
    Ok(out)
}

/// The longest label accepted: the longest real one (`PGP PRIVATE KEY BLOCK`) is 21 characters.
const MAX_LABEL: usize = 64;

/// RFC 7468 labels: printable ASCII except `-`, words separated by single spaces. Checked
/// before any message quotes a label.
fn valid_label(label: &str) -> bool {
    label.len() <= MAX_LABEL
        && label
            .bytes()
            .all(|b| (b.is_ascii_graphic() && b != b'-') || b == b' ')
        && !label.contains("  ")
        && !redact::looks_encoded(label)
}

/// A PEM label as quoted in messages: always through [`redact::token`], so a label that is
/// really a key body (a BEGIN line without its closing dashes) never reaches a message.
pub(crate) fn quote_label(label: &str) -> String {
    format!("\"{}\"", redact::token(label))
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if first.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if last.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_headers_and_surrounding_text() {
        let data = b"Bag Attributes\n    foo: bar\n-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n\
-----BEGIN RSA PRIVATE KEY-----\r\nProc-Type: 4,ENCRYPTED\r\nDEK-Info: AES-256-CBC,00\r\n\r\nAAEC\r\nAw==\r\n-----END RSA PRIVATE KEY-----\r\ntrailer";
        let blocks = parse_blocks(data).unwrap();
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].label, "EC PARAMETERS");
        assert_eq!(
            &blocks[0].der[..],
            &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
        );
        assert!(!blocks[0].is_legacy_encrypted());
        assert_eq!(blocks[1].label, "RSA PRIVATE KEY");
        assert!(blocks[1].is_legacy_encrypted());
        assert_eq!(
            blocks[1].headers[1],
            ("DEK-Info".to_owned(), "AES-256-CBC,00".to_owned())
        );
        assert_eq!(&blocks[1].der[..], &[0, 1, 2, 3]);
        assert!(blocks[1].text.starts_with(b"-----BEGIN RSA"));
        assert!(blocks[1].text.ends_with(b"-----END RSA PRIVATE KEY-----\r\n"));
    }

    #[test]
    fn truncated_and_bad_base64_are_errors() {
        let e = parse_blocks(b"-----BEGIN PRIVATE KEY-----\nAAAA\n")
            .err()
            .unwrap();
        assert!(e.contains("no \"-----END PRIVATE KEY-----\""), "{e}");
        let e = parse_blocks(b"-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n")
            .err()
            .unwrap();
        assert!(e.contains("not valid base64"), "{e}");
        assert!(parse_blocks(b"no pem here").unwrap().is_empty());
    }
}
