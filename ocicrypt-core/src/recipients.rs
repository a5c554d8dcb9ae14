//! Who can decrypt a layer, read from its annotations alone (no private key), and removing
//! recipients by key id.
//!
//! Each scheme whose wrapped keys name their recipients implements [`IdScheme`]; [`id_scheme`]
//! lists them (add a scheme there to give it ids, `remove` and duplicate-free `add`):
//!
//! * **jwe**: every JWE recipient we write carries a `kid`: the RFC 7638 thumbprint of its
//!   public key ([`PublicKey::thumbprint`](crate::keys::PublicKey::thumbprint)). Removing one
//!   drops its recipient object from a JWE in general serialization and the others stay as
//!   they were (the per-recipient headers are not covered by the JWE's authentication tag);
//!   a JWE with that recipient alone is dropped whole. JWEs written by Go ocicrypt (skopeo)
//!   carry no ids: a layer with such a recipient is refused, since its owner cannot be known.
//! * **pkcs7**: a `KeyTransRecipientInfo` names its certificate by issuer and serial number;
//!   the id is `SERIAL@ISSUER` ([`crate::pkcs7::Certificate::recipient_id`]). Removing one
//!   rewrites the `EnvelopedData` without that `RecipientInfo`; every other byte (the other
//!   RecipientInfos, the encrypted content) stays.
//! * **pgp**: a PKESK packet names the (sub)key it is encrypted to by its 64-bit key id (16
//!   hex digits). Removing one drops that packet; the rest of the message stays byte for byte.
//!
//! Ids of different schemes cannot be confused: a thumbprint is 43 base64url characters, a
//! PGP key id 16 hex digits, a PKCS#7 id contains `@`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::mediatype::{keys_annotation, KEYS_ANNOTATION_PREFIX};
use crate::options::{decode_b64, encode_b64};

/// The JWE scheme name.
const JWE: &str = "jwe";

/// A wrapped-key scheme whose entries name their recipients.
pub trait IdScheme: Send + Sync {
    /// The annotation scheme (`jwe`, `pkcs7`, `pgp`…).
    fn scheme(&self) -> &'static str;
    /// The id of each recipient of one wrapped-key blob, `None` where a recipient carries none.
    ///
    /// # Errors
    /// A message when the blob does not parse.
    fn ids(&self, blob: &[u8]) -> Result<Vec<Option<String>>, String>;
    /// The blob without the recipients whose id is in `ids` (`None` when none is left), every
    /// other recipient unchanged; called only when at least one id matches.
    ///
    /// # Errors
    /// A message when the blob does not parse.
    fn remove(&self, blob: &[u8], ids: &BTreeSet<String>) -> Result<Option<Vec<u8>>, String>;
}

struct JweIds;

impl IdScheme for JweIds {
    fn scheme(&self) -> &'static str {
        JWE
    }
    fn ids(&self, blob: &[u8]) -> Result<Vec<Option<String>>, String> {
        jwe_entry_ids(blob)
    }
    fn remove(&self, blob: &[u8], ids: &BTreeSet<String>) -> Result<Option<Vec<u8>>, String> {
        remove_from_jwe(blob, ids).map(|(b, _)| b)
    }
}

/// The schemes with recipient ids, by annotation scheme name.
pub fn id_scheme(scheme: &str) -> Option<&'static dyn IdScheme> {
    match scheme {
        JWE => Some(&JweIds),
        #[cfg(feature = "jwe")]
        crate::pkcs7::SCHEME => Some(&crate::pkcs7::Pkcs7Ids),
        #[cfg(feature = "pgp")]
        crate::pgp::SCHEME => Some(&crate::pgp::PgpIds),
        _ => None,
    }
}

/// The recipients of one layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LayerRecipients {
    /// Per scheme with ids (see [`id_scheme`]; serialized as `"jwe": […]`, `"pkcs7": […]`…):
    /// the id of every recipient over all of the scheme's entries, `None` for a recipient that
    /// carries no id (a JWE written by another tool).
    #[serde(flatten)]
    pub by_scheme: BTreeMap<String, Vec<Option<String>>>,
    /// Other schemes, with their number of wrapped-key entries.
    pub other: Vec<(String, usize)>,
}

impl LayerRecipients {
    /// Reads a layer's recipients from its annotations.
    ///
    /// # Errors
    /// A message when a JWE entry does not parse.
    pub fn from_annotations(ann: &BTreeMap<String, String>) -> Result<Self, String> {
        let mut out = LayerRecipients::default();
        for (k, v) in ann {
            let Some(scheme) = k.strip_prefix(KEYS_ANNOTATION_PREFIX) else {
                continue;
            };
            let entries = entries(v);
            if let Some(ids) = id_scheme(scheme) {
                if entries.is_empty() {
                    continue;
                }
                let list = out.by_scheme.entry(scheme.to_owned()).or_default();
                for e in entries {
                    list.extend(ids.ids(&decode_entry(e)?)?);
                }
            } else if !entries.is_empty() {
                out.other.push((scheme.to_owned(), entries.len()));
            }
        }
        Ok(out)
    }

    /// The recipients of one scheme with ids (empty when the layer has none).
    pub fn of(&self, scheme: &str) -> &[Option<String>] {
        self.by_scheme.get(scheme).map_or(&[], Vec::as_slice)
    }

    /// The ids of the recipients that have one, over all schemes.
    pub fn ids(&self) -> BTreeSet<String> {
        self.by_scheme.values().flatten().flatten().cloned().collect()
    }

    /// How many recipients carry no id.
    pub fn without_ids(&self) -> usize {
        self.by_scheme.values().flatten().filter(|i| i.is_none()).count()
    }

    /// How many recipients (of the schemes with ids, plus other schemes' entries).
    pub fn count(&self) -> usize {
        self.by_scheme.values().map(Vec::len).sum::<usize>()
            + self.other.iter().map(|(_, n)| n).sum::<usize>()
    }

    /// One line per recipient: `jwe:<id>`, `pgp:<id>`, `jwe:(no key id)`, `<scheme> (N entries)`.
    pub fn describe(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .by_scheme
            .iter()
            .flat_map(|(s, ids)| {
                ids.iter().map(move |id| match id {
                    Some(id) => format!("{s}:{id}"),
                    None => format!("{s}:(no key id)"),
                })
            })
            .collect();
        v.extend(
            self.other
                .iter()
                .map(|(s, n)| format!("{s} ({n} entr{})", if *n == 1 { "y" } else { "ies" })),
        );
        v
    }
}

/// Why recipients could not be removed from a layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoveError {
    /// A recipient on the layer has no key id, so it cannot be told whose it is.
    #[error("{count} recipient(s) of this layer carry no key id (a JWE written by another tool, e.g. skopeo), so it cannot be told whose they are")]
    WithoutIds {
        /// How many.
        count: usize,
    },
    /// Removing would leave the layer without any recipient.
    #[error("removing {} would leave the layer with no recipient at all", removed.join(", "))]
    LastRecipient {
        /// The ids that would be removed.
        removed: Vec<String>,
    },
    /// A wrapped-key entry does not parse.
    #[error("{0}")]
    Malformed(String),
}

/// What [`remove_from_annotations`] did to one layer.
#[derive(Debug, Clone)]
pub struct Removal {
    /// The layer's annotations afterwards.
    pub annotations: BTreeMap<String, String>,
    /// The ids that were on the layer and are gone now.
    pub removed: BTreeSet<String>,
}

fn entries(v: &str) -> Vec<&str> {
    v.split(',').map(str::trim).filter(|e| !e.is_empty()).collect()
}

fn decode_entry(e: &str) -> Result<Vec<u8>, String> {
    decode_b64(e).map_err(|err| format!("a wrapped-key entry is not base64 ({err})"))
}

fn b64url_json(s: &str) -> Result<Map<String, Value>, String> {
    use base64::Engine as _;
    let bytes = base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    )
    .decode(s)
    .map_err(|e| format!("a JWE protected header is not base64url ({e})"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("a JWE protected header is not a JSON object ({e})"))
}

/// A parsed JWE entry: the JSON object (flattened or general), or the compact form's
/// protected header.
enum Parsed {
    Json(Map<String, Value>),
    Compact(Map<String, Value>),
}

fn parse(blob: &[u8]) -> Result<Parsed, String> {
    if blob.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        let v: Map<String, Value> =
            serde_json::from_slice(blob).map_err(|e| format!("a JWE entry is not JSON ({e})"))?;
        Ok(Parsed::Json(v))
    } else {
        let s =
            std::str::from_utf8(blob).map_err(|_| "a JWE entry is neither JSON nor compact".to_owned())?;
        let protected = s.trim().split('.').next().unwrap_or_default();
        Ok(Parsed::Compact(b64url_json(protected)?))
    }
}

fn kid_of(headers: &[Option<&Map<String, Value>>]) -> Option<String> {
    // go-jose merges protected, unprotected, per-recipient; the first one wins.
    headers
        .iter()
        .flatten()
        .find_map(|h| h.get("kid"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// The key id of each recipient of one JWE (flattened, general or compact), `None` where a
/// recipient has none.
///
/// # Errors
/// A message when the JWE does not parse.
pub fn jwe_entry_ids(blob: &[u8]) -> Result<Vec<Option<String>>, String> {
    match parse(blob)? {
        Parsed::Compact(p) => Ok(vec![kid_of(&[Some(&p)])]),
        Parsed::Json(v) => {
            let protected = match v.get("protected").and_then(Value::as_str) {
                Some(p) if !p.is_empty() => Some(b64url_json(p)?),
                _ => None,
            };
            let unprotected = v.get("unprotected").and_then(Value::as_object);
            match v.get("recipients").and_then(Value::as_array) {
                Some(rs) => Ok(rs
                    .iter()
                    .map(|r| {
                        kid_of(&[
                            protected.as_ref(),
                            unprotected,
                            r.get("header").and_then(Value::as_object),
                        ])
                    })
                    .collect()),
                None => Ok(vec![kid_of(&[
                    protected.as_ref(),
                    unprotected,
                    v.get("header").and_then(Value::as_object),
                ])]),
            }
        }
    }
}

/// Removes the recipients with these ids from one JWE. Returns the new JWE (`None` when no
/// recipient is left) and how many were removed; other recipient objects are kept as they
/// are.
fn remove_from_jwe(blob: &[u8], ids: &BTreeSet<String>) -> Result<(Option<Vec<u8>>, usize), String> {
    let found = jwe_entry_ids(blob)?;
    let hits = found
        .iter()
        .filter(|id| id.as_ref().is_some_and(|i| ids.contains(i)))
        .count();
    if hits == 0 {
        return Ok((Some(blob.to_vec()), 0));
    }
    if hits == found.len() {
        return Ok((None, hits));
    }
    // Only a general-serialization JWE has several recipients.
    let Parsed::Json(mut v) = parse(blob)? else {
        unreachable!("compact JWEs have one recipient")
    };
    let rs = match v.get("recipients") {
        Some(Value::Array(rs)) => rs.clone(),
        _ => unreachable!("several recipients means a recipients array"),
    };
    let mut kept = Vec::new();
    let mut dropped_keys = Vec::new();
    for (r, id) in rs.into_iter().zip(&found) {
        if id.as_ref().is_some_and(|i| ids.contains(i)) {
            dropped_keys.push(r.get("encrypted_key").cloned());
        } else {
            kept.push(r);
        }
    }
    // Edited in place: every other member keeps its position.
    v.insert("recipients".into(), Value::Array(kept));
    // go-jose writes a redundant top-level copy of the first recipient's key: drop it with it.
    if let Some(top) = v.get("encrypted_key").cloned() {
        if dropped_keys.contains(&Some(top)) {
            v.shift_remove("encrypted_key");
        }
    }
    let out = v;
    let bytes = serde_json::to_vec(&out).map_err(|e| format!("cannot serialize a JWE ({e})"))?;
    Ok((Some(bytes), hits))
}

/// Removes every recipient whose id is in `ids` from a layer's annotations, of every scheme
/// with ids, without any private key. Entries without those recipients are kept byte for
/// byte, and so are the other recipients inside an entry (see the module docs).
///
/// # Errors
/// [`RemoveError::WithoutIds`] when a recipient of the layer has no id and at least one id
/// was asked for (it might be the one); [`RemoveError::LastRecipient`] when nothing would be
/// left; [`RemoveError::Malformed`].
pub fn remove_from_annotations(
    ann: &BTreeMap<String, String>,
    ids: &BTreeSet<String>,
) -> Result<Removal, RemoveError> {
    let before = LayerRecipients::from_annotations(ann).map_err(RemoveError::Malformed)?;
    let without = before.without_ids();
    if without > 0 {
        return Err(RemoveError::WithoutIds { count: without });
    }
    let present = before.ids();
    let removed: BTreeSet<String> = present.intersection(ids).cloned().collect();
    let mut annotations = ann.clone();
    if removed.is_empty() {
        return Ok(Removal { annotations, removed });
    }
    for scheme in before.by_scheme.keys() {
        let Some(idscheme) = id_scheme(scheme) else {
            continue;
        };
        let key = keys_annotation(scheme);
        let mut kept_entries = Vec::new();
        for e in entries(ann.get(&key).map_or("", String::as_str)) {
            let blob = decode_entry(e).map_err(RemoveError::Malformed)?;
            let hit = idscheme
                .ids(&blob)
                .map_err(RemoveError::Malformed)?
                .iter()
                .any(|i| i.as_ref().is_some_and(|i| ids.contains(i)));
            if !hit {
                kept_entries.push(e.to_owned());
                continue;
            }
            if let Some(b) = idscheme.remove(&blob, ids).map_err(RemoveError::Malformed)? {
                kept_entries.push(encode_b64(&b));
            }
        }
        if kept_entries.is_empty() {
            annotations.remove(&key);
        } else {
            annotations.insert(key, kept_entries.join(","));
        }
    }
    let after = LayerRecipients::from_annotations(&annotations).map_err(RemoveError::Malformed)?;
    if after.count() == 0 {
        return Err(RemoveError::LastRecipient {
            removed: removed.into_iter().collect(),
        });
    }
    Ok(Removal { annotations, removed })
}

#[cfg(all(test, feature = "jwe"))]
mod tests {
    use super::*;
    use crate::jwe::{JweUnwrapper, JweWrapper};
    use crate::keys::{generate_ec, PrivateKey, PublicKey};
    use crate::KeyUnwrapper as _;
    use crate::KeyWrapper as _;

    fn pair() -> (PrivateKey, PublicKey) {
        let (p, q) = generate_ec("P-256").unwrap();
        (
            PrivateKey::from_bytes(p.as_bytes(), None, "k.pem").unwrap(),
            PublicKey::from_bytes(q.as_bytes(), "k.pub.pem").unwrap(),
        )
    }

    fn ann(blobs: &[Vec<u8>]) -> BTreeMap<String, String> {
        let mut a = BTreeMap::new();
        a.insert(
            keys_annotation(JWE),
            blobs.iter().map(|b| encode_b64(b)).collect::<Vec<_>>().join(","),
        );
        a.insert(crate::mediatype::PUBOPTS_ANNOTATION.into(), "e30=".into());
        a
    }

    #[test]
    fn remove_one_of_three_keeps_the_others_byte_identical() {
        let (ka, a) = pair();
        let (kb, b) = pair();
        let (kc, c) = pair();
        let blob = JweWrapper::new(vec![a.clone(), b.clone(), c.clone()])
            .unwrap()
            .wrap_keys(b"{}")
            .unwrap();
        let before: Value = serde_json::from_slice(&blob).unwrap();
        let ids = BTreeSet::from([b.thumbprint()]);
        let r = remove_from_annotations(&ann(std::slice::from_ref(&blob)), &ids).unwrap();
        assert_eq!(r.removed, ids);
        let after_ids = LayerRecipients::from_annotations(&r.annotations).unwrap();
        assert_eq!(after_ids.of("jwe"), [Some(a.thumbprint()), Some(c.thumbprint())]);
        let new = decode_b64(&r.annotations[&keys_annotation(JWE)]).unwrap();
        let after: Value = serde_json::from_slice(&new).unwrap();
        assert_eq!(after["recipients"][0], before["recipients"][0]);
        assert_eq!(after["recipients"][1], before["recipients"][2]);
        for k in ["protected", "iv", "ciphertext", "tag"] {
            assert_eq!(after[k], before[k]);
        }
        // The text of each kept recipient object is unchanged, and the member order too.
        let text = String::from_utf8(new.clone()).unwrap();
        let orig = String::from_utf8(blob).unwrap();
        let first = serde_json::to_string(&before["recipients"][0]).unwrap();
        assert!(orig.contains(&first) && text.contains(&first));
        assert!(text.starts_with(r#"{"protected":"#) && text.find("\"recipients\"") < text.find("\"iv\""));
        assert_eq!(
            JweUnwrapper::new(vec![ka]).unwrap_key(&new).unwrap().as_slice(),
            b"{}"
        );
        assert_eq!(
            JweUnwrapper::new(vec![kc]).unwrap_key(&new).unwrap().as_slice(),
            b"{}"
        );
        assert!(JweUnwrapper::new(vec![kb]).unwrap_key(&new).is_err());
    }

    #[test]
    fn whole_entries_absent_ids_last_recipient_and_ids_missing() {
        let (_, a) = pair();
        let (_, b) = pair();
        let (_, m) = pair();
        let ea = JweWrapper::new(vec![a.clone()])
            .unwrap()
            .wrap_keys(b"{}")
            .unwrap();
        let eb = JweWrapper::new(vec![b.clone()])
            .unwrap()
            .wrap_keys(b"{}")
            .unwrap();
        let both = ann(&[ea.clone(), eb.clone()]);
        // Not there: nothing changes.
        let r = remove_from_annotations(&both, &BTreeSet::from([m.thumbprint()])).unwrap();
        assert!(r.removed.is_empty());
        assert_eq!(r.annotations, both);
        // Removing b drops b's entry, a's stays as it was.
        let r = remove_from_annotations(&both, &BTreeSet::from([b.thumbprint()])).unwrap();
        assert_eq!(r.annotations[&keys_annotation(JWE)], encode_b64(&ea));
        // The last one is refused.
        let err = remove_from_annotations(&ann(std::slice::from_ref(&ea)), &BTreeSet::from([a.thumbprint()]))
            .unwrap_err();
        assert!(matches!(err, RemoveError::LastRecipient { .. }), "{err}");
        // Another scheme still holds it: allowed.
        let mut with_provider = ann(std::slice::from_ref(&ea));
        with_provider.insert(keys_annotation("provider.kp"), "eA==".into());
        let r = remove_from_annotations(&with_provider, &BTreeSet::from([a.thumbprint()])).unwrap();
        assert!(!r.annotations.contains_key(&keys_annotation(JWE)));
        // An entry without ids (as Go writes): refused.
        let mut v: Map<String, Value> = serde_json::from_slice(&ea).unwrap();
        v.insert(
            "protected".into(),
            Value::String({
                use base64::Engine as _;
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(br#"{"alg":"ECDH-ES+A256KW","enc":"A256GCM"}"#)
            }),
        );
        let go = serde_json::to_vec(&v).unwrap();
        let err = remove_from_annotations(&ann(&[go, eb]), &BTreeSet::from([b.thumbprint()])).unwrap_err();
        assert_eq!(err, RemoveError::WithoutIds { count: 1 });
    }
}
