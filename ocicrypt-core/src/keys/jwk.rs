//! JSON Web Key (RFC 7517/7518) parsing for RSA and EC keys, and writing public JWKs.

use base64::Engine as _;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::pkey::{PKey, Private, Public};
use openssl::rsa::Rsa;
use serde::Deserialize;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::parse::Curve;
use super::KeyError;
use crate::redact;

/// A parsed JWK.
pub(crate) struct Jwk<T> {
    pub pkey: PKey<T>,
    pub alg: Option<String>,
    pub kid: Option<String>,
}

/// The members we read. Private members are wiped when this is dropped.
#[derive(Deserialize, Zeroize, ZeroizeOnDrop, Default)]
struct RawJwk {
    kty: Option<String>,
    crv: Option<String>,
    alg: Option<String>,
    kid: Option<String>,
    x: Option<String>,
    y: Option<String>,
    n: Option<String>,
    e: Option<String>,
    d: Option<String>,
    p: Option<String>,
    q: Option<String>,
    dp: Option<String>,
    dq: Option<String>,
    qi: Option<String>,
    #[zeroize(skip)]
    keys: Option<serde::de::IgnoredAny>,
    #[zeroize(skip)]
    k: Option<serde::de::IgnoredAny>,
}

fn b64url(s: &str) -> Result<Zeroizing<Vec<u8>>, base64::DecodeError> {
    let e = base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    e.decode(s.trim()).map(Zeroizing::new)
}

/// Base64url without padding, as JOSE writes byte fields.
#[cfg(test)]
pub(crate) fn b64url_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

struct Ctx<'a> {
    source_name: &'a str,
}

impl Ctx<'_> {
    fn malformed(&self, reason: impl Into<String>) -> KeyError {
        KeyError::Malformed {
            source_name: self.source_name.to_owned(),
            what: "JWK".into(),
            reason: reason.into(),
        }
    }

    fn unsupported(&self, found: impl Into<String>) -> KeyError {
        KeyError::Unsupported {
            source_name: self.source_name.to_owned(),
            found: found.into(),
        }
    }

    fn member<'m>(&self, raw: &'m Option<String>, name: &str, kty: &str) -> Result<&'m str, KeyError> {
        raw.as_deref()
            .ok_or_else(|| self.malformed(format!("{kty} key without the \"{name}\" member")))
    }

    fn bn(&self, raw: &Option<String>, name: &str, kty: &str) -> Result<BigNum, KeyError> {
        let s = self.member(raw, name, kty)?;
        let bytes =
            b64url(s).map_err(|e| self.malformed(format!("member \"{name}\" is not base64url ({e})")))?;
        if bytes.is_empty() {
            return Err(self.malformed(format!("member \"{name}\" is empty")));
        }
        BigNum::from_slice(&bytes).map_err(|e| self.malformed(format!("member \"{name}\": {e}")))
    }
}

/// What is wrong with the JSON, without serde_json's own text (which may quote values).
fn json_error(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Io => "cannot be read",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "a member has the wrong type",
        serde_json::error::Category::Eof => "ends early",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

fn parse_raw(bytes: &[u8], c: &Ctx<'_>) -> Result<RawJwk, KeyError> {
    let raw: RawJwk = serde_json::from_slice(bytes)
        .map_err(|e| c.malformed(format!("not valid JWK JSON ({})", json_error(&e))))?;
    if raw.kty.is_none() && raw.keys.is_some() {
        return Err(c.unsupported("a JWK Set (give a single JWK, not {\"keys\":[…]})"));
    }
    match raw.kty.as_deref() {
        None => Err(c.unsupported("JSON that is not a JWK (no \"kty\")")),
        Some("RSA" | "EC") => Ok(raw),
        Some("oct") => Err(c.unsupported("a symmetric JWK (kty \"oct\"), not a public/private key pair")),
        Some("OKP") => Err(KeyError::UnsupportedAlgorithm {
            source_name: c.source_name.to_owned(),
            found: format!("OKP {}", redact::token(raw.crv.as_deref().unwrap_or(""))),
        }),
        Some(other) => Err(KeyError::UnsupportedAlgorithm {
            source_name: c.source_name.to_owned(),
            found: format!("JWK kty \"{}\"", redact::token(other)),
        }),
    }
}

fn curve(raw: &RawJwk, c: &Ctx<'_>) -> Result<Curve, KeyError> {
    let crv = c.member(&raw.crv, "crv", "EC")?;
    Curve::from_name(crv).ok_or_else(|| KeyError::UnsupportedAlgorithm {
        source_name: c.source_name.to_owned(),
        found: format!("EC curve \"{}\"", redact::token(crv)),
    })
}

fn ec_public(raw: &RawJwk, c: &Ctx<'_>) -> Result<(EcGroup, EcKey<Public>), KeyError> {
    let curve = curve(raw, c)?;
    let group = EcGroup::from_curve_name(curve.nid()).map_err(|e| c.malformed(e.to_string()))?;
    let x = c.bn(&raw.x, "x", "EC")?;
    let y = c.bn(&raw.y, "y", "EC")?;
    // Checks that the point is on the curve.
    let key = EcKey::from_public_key_affine_coordinates(&group, &x, &y)
        .map_err(|_| c.malformed(format!("x/y is not a point on {curve}")))?;
    Ok((group, key))
}

fn rsa_public(raw: &RawJwk, c: &Ctx<'_>) -> Result<Rsa<Public>, KeyError> {
    let n = c.bn(&raw.n, "n", "RSA")?;
    let e = c.bn(&raw.e, "e", "RSA")?;
    Rsa::from_public_components(n, e).map_err(|e| c.malformed(e.to_string()))
}

/// A public JWK; a private one is refused with a hint.
pub(crate) fn parse_public(bytes: &[u8], source_name: &str) -> Result<Jwk<Public>, KeyError> {
    let c = Ctx { source_name };
    let raw = parse_raw(bytes, &c)?;
    if raw.d.is_some() {
        return Err(c.unsupported(
            "a private JWK (a recipient needs the public key: remove the private members d, p, q, dp, dq, qi)",
        ));
    }
    let pkey = match raw.kty.as_deref() {
        Some("RSA") => PKey::from_rsa(rsa_public(&raw, &c)?),
        _ => PKey::from_ec_key(ec_public(&raw, &c)?.1),
    }
    .map_err(|e| c.malformed(e.to_string()))?;
    Ok(Jwk {
        pkey,
        alg: raw.alg.clone(),
        kid: raw.kid.clone(),
    })
}

/// A private JWK; a public one is refused with a hint.
pub(crate) fn parse_private(bytes: &[u8], source_name: &str) -> Result<Jwk<Private>, KeyError> {
    let c = Ctx { source_name };
    let raw = parse_raw(bytes, &c)?;
    if raw.d.is_none() {
        return Err(c.unsupported("a public JWK (decryption needs the private key: the JWK has no \"d\")"));
    }
    let pkey = match raw.kty.as_deref() {
        Some("RSA") => {
            if raw.p.is_none() || raw.q.is_none() {
                return Err(c.malformed(
                    "RSA private JWK without the prime factors p and q (not supported, as in Go ocicrypt)",
                ));
            }
            let n = c.bn(&raw.n, "n", "RSA")?;
            let e = c.bn(&raw.e, "e", "RSA")?;
            let d = c.bn(&raw.d, "d", "RSA")?;
            let p = c.bn(&raw.p, "p", "RSA")?;
            let q = c.bn(&raw.q, "q", "RSA")?;
            let dp = c.bn(&raw.dp, "dp", "RSA")?;
            let dq = c.bn(&raw.dq, "dq", "RSA")?;
            let qi = c.bn(&raw.qi, "qi", "RSA")?;
            // The numbers move into the RSA object, which OpenSSL clears on free.
            let rsa = Rsa::from_private_components(n, e, d, p, q, dp, dq, qi)
                .map_err(|e| c.malformed(e.to_string()))?;
            if !rsa.check_key().unwrap_or(false) {
                return Err(c.malformed("the RSA private members are inconsistent (check_key failed)"));
            }
            PKey::from_rsa(rsa)
        }
        _ => {
            let mut d = c.bn(&raw.d, "d", "EC")?;
            let key = if raw.x.is_none() && raw.y.is_none() {
                // x/y are required by RFC 7518, but the public point follows from d.
                let curve = curve(&raw, &c)?;
                let group = EcGroup::from_curve_name(curve.nid()).map_err(|e| c.malformed(e.to_string()))?;
                derive_public(&group, &d).and_then(|p| EcKey::from_private_components(&group, &d, &p))
            } else {
                let (group, public) = ec_public(&raw, &c)?;
                EcKey::from_private_components(&group, &d, public.public_key())
            };
            d.clear();
            let key = key.map_err(|e| c.malformed(e.to_string()))?;
            key.check_key()
                .map_err(|_| c.malformed("\"d\" does not match the public point x/y"))?;
            PKey::from_ec_key(key)
        }
    }
    .map_err(|e| c.malformed(e.to_string()))?;
    Ok(Jwk {
        pkey,
        alg: raw.alg.clone(),
        kid: raw.kid.clone(),
    })
}

fn derive_public(group: &EcGroup, d: &BigNum) -> Result<openssl::ec::EcPoint, openssl::error::ErrorStack> {
    let mut ctx = openssl::bn::BigNumContext::new()?;
    let mut p = openssl::ec::EcPoint::new(group)?;
    p.mul_generator2(group, d, &mut ctx)?;
    Ok(p)
}
