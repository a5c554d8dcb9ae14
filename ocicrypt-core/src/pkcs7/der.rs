//! The little DER this scheme needs: a bounded TLV reader and a writer.
//!
//! Hand-rolled on purpose: Go's `encoding/asn1` writes the AES-GCM parameters with a
//! *primitive* universal tag 16 (`0x10`), which general ASN.1 libraries (RustCrypto `der`,
//! OpenSSL) refuse to decode. Only single-byte tags and definite lengths are read (DER);
//! every length is checked against the bytes that remain.

/// Universal tags and context tags used here.
pub(crate) const INTEGER: u8 = 0x02;
pub(crate) const OCTET_STRING: u8 = 0x04;
pub(crate) const OID: u8 = 0x06;
pub(crate) const SEQUENCE: u8 = 0x30;
pub(crate) const SET: u8 = 0x31;
/// `[0]` constructed.
pub(crate) const CONTEXT_0_CONS: u8 = 0xa0;
/// `[0]` primitive.
pub(crate) const CONTEXT_0_PRIM: u8 = 0x80;
/// `[4]` primitive (Go's `asn1:"tag:4"` on the GCM nonce).
pub(crate) const CONTEXT_4_PRIM: u8 = 0x84;
/// Universal 16 with the constructed bit clear: how Go tags the GCM parameters.
pub(crate) const GO_PRIMITIVE_SEQUENCE: u8 = 0x10;

/// One TLV: its tag, its contents and the whole encoding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tlv<'a> {
    pub tag: u8,
    pub contents: &'a [u8],
    pub full: &'a [u8],
}

/// A cursor over DER bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// The bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.rest
    }

    /// The next TLV's tag, without consuming it.
    pub fn peek_tag(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    /// Reads any TLV.
    pub fn any(&mut self) -> Result<Tlv<'a>, String> {
        let b = self.rest;
        let tag = *b.first().ok_or("truncated: a field is missing")?;
        if tag & 0x1f == 0x1f {
            return Err(format!("multi-byte ASN.1 tag 0x{tag:02x} is not supported"));
        }
        let first = *b.get(1).ok_or("truncated length")?;
        let (len, hl) = if first < 0x80 {
            (usize::from(first), 2)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 {
                return Err("indefinite length (BER) is not allowed".into());
            }
            if n > 4 {
                return Err("length too large".into());
            }
            let bytes = b.get(2..2 + n).ok_or("truncated length")?;
            let len = bytes.iter().fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
            (len, 2 + n)
        };
        let end = hl.checked_add(len).ok_or("length overflow")?;
        if end > b.len() {
            return Err(format!(
                "truncated: a field of {len} bytes has only {} left",
                b.len() - hl
            ));
        }
        self.rest = &b[end..];
        Ok(Tlv {
            tag,
            contents: &b[hl..end],
            full: &b[..end],
        })
    }

    /// Reads a TLV that must have tag `tag`; `what` names it in errors.
    pub fn expect(&mut self, tag: u8, what: &str) -> Result<Tlv<'a>, String> {
        let t = self.any().map_err(|e| format!("{what}: {e}"))?;
        if t.tag != tag {
            return Err(format!("{what}: expected tag 0x{tag:02x}, found 0x{:02x}", t.tag));
        }
        Ok(t)
    }

    /// Reads a constructed TLV with tag `tag` and returns a reader over its contents.
    pub fn nested(&mut self, tag: u8, what: &str) -> Result<Reader<'a>, String> {
        Ok(Reader::new(self.expect(tag, what)?.contents))
    }

    /// Reads a small non-negative INTEGER.
    pub fn small_uint(&mut self, what: &str) -> Result<u64, String> {
        let t = self.expect(INTEGER, what)?;
        small_uint(t.contents).ok_or_else(|| format!("{what}: not a small non-negative integer"))
    }
}

/// The value of a small non-negative INTEGER's contents.
pub(crate) fn small_uint(c: &[u8]) -> Option<u64> {
    if c.is_empty() || c.len() > 8 || c[0] & 0x80 != 0 {
        return None;
    }
    Some(c.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
}

/// Encodes one TLV.
pub(crate) fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(contents.len() + 6);
    out.push(tag);
    let len = contents.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(contents);
    out
}

/// Encodes a TLV whose contents are the concatenation of `parts`.
pub(crate) fn tlv_of(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    tlv(tag, &parts.concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_trip() {
        for len in [0usize, 1, 127, 128, 255, 256, 65535, 65536] {
            let data = vec![7u8; len];
            let enc = tlv(OCTET_STRING, &data);
            let mut r = Reader::new(&enc);
            let t = r.expect(OCTET_STRING, "x").unwrap();
            assert_eq!(t.contents.len(), len);
            assert_eq!(t.full, &enc[..]);
            assert!(r.is_empty());
        }
    }

    #[test]
    fn hostile_lengths_are_refused() {
        for bad in [
            &[0x30u8][..],
            &[0x30, 0x81],
            &[0x30, 0x80, 0, 0],
            &[0x30, 0x85, 1, 1, 1, 1, 1],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff, 0],
            &[0x30, 0x05, 1],
            &[0x1f, 0x01, 0x00],
        ] {
            assert!(Reader::new(bad).any().is_err(), "{bad:02x?}");
        }
    }

    #[test]
    fn small_uints() {
        assert_eq!(small_uint(&[0]), Some(0));
        assert_eq!(small_uint(&[0x10]), Some(16));
        assert_eq!(small_uint(&[0x00, 0x80]), Some(128));
        assert_eq!(small_uint(&[0x80]), None);
        assert_eq!(small_uint(&[]), None);
    }
}
