//! RFC 7638 JWK thumbprints: the key ids (`kid`) written into every JWE recipient header, so
//! that recipients can be listed and removed without a private key.

use base64::Engine as _;
use openssl::hash::MessageDigest;
use openssl::pkey::{HasPublic, PKeyRef};

use super::{Curve, KeyKind, PrivateKey, PublicKey};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The RFC 7638 SHA-256 thumbprint (base64url, no padding) of a public key: the digest of
/// its required JWK members in lexicographic order, without whitespace
/// (`{"e":…,"kty":"RSA","n":…}`, `{"crv":…,"kty":"EC","x":…,"y":…}`).
fn thumbprint_of<T: HasPublic>(pkey: &PKeyRef<T>, kind: KeyKind) -> String {
    let json = match kind {
        KeyKind::Rsa { .. } => {
            let rsa = pkey.rsa().expect("an RSA key has RSA parameters");
            format!(
                r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
                b64(&rsa.e().to_vec()),
                b64(&rsa.n().to_vec())
            )
        }
        KeyKind::Ec(curve) => {
            let ec = pkey.ec_key().expect("an EC key has EC parameters");
            let (x, y) = super::parse::ec_coordinates(&ec, curve).expect("EC coordinates encode");
            format!(
                r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
                Curve::name(curve),
                b64(&x),
                b64(&y)
            )
        }
    };
    let d = openssl::hash::hash(MessageDigest::sha256(), json.as_bytes()).expect("sha256 is available");
    b64(&d)
}

impl PublicKey {
    /// The key's id: its RFC 7638 JWK thumbprint (SHA-256, base64url). Every JWE recipient
    /// we write carries it as `kid`, and `recipients remove` finds entries by it.
    pub fn thumbprint(&self) -> String {
        thumbprint_of(self.pkey(), self.kind())
    }
}

impl PrivateKey {
    /// The id of the matching public key (see [`PublicKey::thumbprint`]).
    pub fn thumbprint(&self) -> String {
        thumbprint_of(self.pkey(), self.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7638 §3.1's example key and thumbprint.
    #[test]
    fn rfc7638_example() {
        let jwk = br#"{"kty":"RSA","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw","e":"AQAB","alg":"RS256","kid":"2011-04-29"}"#;
        let k = PublicKey::from_bytes(jwk, "rfc7638.jwk").unwrap();
        assert_eq!(k.thumbprint(), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    }

    #[test]
    fn private_and_public_agree_and_keys_differ() {
        for (p, q) in [
            super::super::generate_ec("P-256").unwrap(),
            super::super::generate_ec("P-521").unwrap(),
            super::super::generate_rsa(2048).unwrap(),
        ] {
            let private = PrivateKey::from_bytes(p.as_bytes(), None, "k.pem").unwrap();
            let public = PublicKey::from_bytes(q.as_bytes(), "k.pub.pem").unwrap();
            assert_eq!(private.thumbprint(), public.thumbprint());
            assert_eq!(public.thumbprint().len(), 43);
        }
        let (_, a) = super::super::generate_ec("P-256").unwrap();
        let (_, b) = super::super::generate_ec("P-256").unwrap();
        assert_ne!(
            PublicKey::from_bytes(a.as_bytes(), "a").unwrap().thumbprint(),
            PublicKey::from_bytes(b.as_bytes(), "b").unwrap().thumbprint()
        );
    }
}
