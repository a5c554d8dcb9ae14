//! Key pair generation (OpenSSL).

use openssl::ec::{EcGroup, EcKey};
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use zeroize::Zeroizing;

use super::parse::Curve;
use super::KeyError;

fn crypto(context: &str) -> impl Fn(openssl::error::ErrorStack) -> KeyError + '_ {
    move |e| KeyError::Crypto {
        context: context.to_owned(),
        reason: e.to_string(),
    }
}

fn encode(pkey: &PKey<Private>) -> Result<(Zeroizing<String>, String), KeyError> {
    let private = Zeroizing::new(
        pkey.private_key_to_pem_pkcs8()
            .map_err(crypto("encoding the private key"))?,
    );
    let public = pkey
        .public_key_to_pem()
        .map_err(crypto("encoding the public key"))?;
    Ok((
        Zeroizing::new(String::from_utf8_lossy(&private).into_owned()),
        String::from_utf8_lossy(&public).into_owned(),
    ))
}

/// Generates an RSA key pair of 2048, 3072 or 4096 bits. Returns the private key as
/// unencrypted PKCS#8 PEM (readable by every Go ocicrypt) and the public key as SPKI PEM (the
/// `jwe:` recipient form).
///
/// # Errors
/// [`KeyError::InvalidParameter`] for another size, [`KeyError::Crypto`].
pub fn generate_rsa(bits: u32) -> Result<(Zeroizing<String>, String), KeyError> {
    if !matches!(bits, 2048 | 3072 | 4096) {
        return Err(KeyError::InvalidParameter(format!(
            "RSA key size {bits}: use 2048, 3072 or 4096"
        )));
    }
    let rsa = Rsa::generate(bits).map_err(crypto("generating an RSA key"))?;
    let pkey = PKey::from_rsa(rsa).map_err(crypto("generating an RSA key"))?;
    encode(&pkey)
}

/// Generates an EC key pair on `P-256`, `P-384` or `P-521`. Returns the private key as
/// unencrypted PKCS#8 PEM and the public key as SPKI PEM.
///
/// # Errors
/// [`KeyError::InvalidParameter`] for another curve name, [`KeyError::Crypto`].
pub fn generate_ec(curve: &str) -> Result<(Zeroizing<String>, String), KeyError> {
    let c = Curve::from_name(curve).ok_or_else(|| {
        KeyError::InvalidParameter(format!("EC curve {curve:?}: use P-256, P-384 or P-521"))
    })?;
    let group = EcGroup::from_curve_name(c.nid()).map_err(crypto("generating an EC key"))?;
    let ec = EcKey::generate(&group).map_err(crypto("generating an EC key"))?;
    let pkey = PKey::from_ec_key(ec).map_err(crypto("generating an EC key"))?;
    encode(&pkey)
}
