//! Rewriting manifests and indexes the way Go tools (containers/image: skopeo, buildah, podman)
//! would, so that a round trip gives back the same bytes and digest.
//!
//! Go marshals manifests from structs (members in struct order), compactly, with `<`, `>`, `&`,
//! U+2028 and U+2029 escaped as `\u003c`… and map members (annotations) sorted. We edit the
//! source document instead of re-serializing a parsed model: every member keeps its position and
//! its value unless the operation changes it, only the changed descriptors are touched, and the
//! result is written in Go's encoding. So `decrypt(encrypt(x))` has `x`'s digest for an image a
//! Go tool wrote, as with skopeo.

use std::io;

use oci_spec::image::Descriptor;
use serde_json::{Map, Value};

use crate::Error;

/// Go's `encoding/json` string escaping on top of serde_json's compact output.
struct GoFormatter;

impl serde_json::ser::Formatter for GoFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            let esc = match c {
                '<' => "\\u003c",
                '>' => "\\u003e",
                '&' => "\\u0026",
                '\u{2028}' => "\\u2028",
                '\u{2029}' => "\\u2029",
                _ => continue,
            };
            writer.write_all(&fragment.as_bytes()[start..i])?;
            writer.write_all(esc.as_bytes())?;
            start = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

/// Serializes like Go's `json.Marshal`: compact, HTML characters escaped, members in the
/// order of the (order-preserving) map.
///
/// # Errors
/// [`Error::Image`] if the value does not serialize.
pub fn to_vec(v: &Value) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, GoFormatter);
    serde::Serialize::serialize(v, &mut ser).map_err(|e| Error::Image(format!("cannot serialize: {e}")))?;
    Ok(out)
}

fn parse_object(bytes: &[u8], what: &str) -> Result<Map<String, Value>, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Image(format!("{what} does not parse: {e}")))
}

/// Makes the descriptor object `obj` say what `d` says (media type, digest, size, annotations),
/// keeping its other members and the order of all of them. New members go where Go's
/// `Descriptor` struct has them; annotations are sorted, as Go sorts map keys.
fn set_descriptor(obj: &mut Map<String, Value>, d: &Descriptor) {
    // Go's imgspecv1.Descriptor field order.
    const ORDER: [&str; 8] = [
        "mediaType",
        "digest",
        "size",
        "urls",
        "annotations",
        "data",
        "platform",
        "artifactType",
    ];
    let put = |obj: &mut Map<String, Value>, key: &str, value: Value| {
        if let Some(slot) = obj.get_mut(key) {
            *slot = value;
            return;
        }
        let rank = ORDER.iter().position(|k| *k == key).unwrap_or(ORDER.len());
        let at = obj
            .keys()
            .position(|k| ORDER.iter().position(|o| o == k).unwrap_or(ORDER.len()) > rank)
            .unwrap_or(obj.len());
        obj.shift_insert(at, key.to_owned(), value);
    };
    put(obj, "mediaType", Value::String(d.media_type().to_string()));
    put(obj, "digest", Value::String(d.digest().to_string()));
    put(obj, "size", Value::from(d.size()));
    match d.annotations().as_ref().filter(|a| !a.is_empty()) {
        Some(a) => {
            let mut sorted: Vec<(&String, &String)> = a.iter().collect();
            sorted.sort();
            let m: Map<String, Value> = sorted
                .into_iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            put(obj, "annotations", Value::Object(m));
        }
        None => {
            obj.shift_remove("annotations");
        }
    }
}

/// Edits the descriptors of an array member (`layers`, `manifests`) whose entries changed.
fn edit_array(doc: &mut Map<String, Value>, key: &str, new: &[Descriptor], what: &str) -> Result<(), Error> {
    let Some(Value::Array(items)) = doc.get_mut(key) else {
        return Err(Error::Image(format!("{what} has no {key:?} array")));
    };
    if items.len() != new.len() {
        return Err(Error::Image(format!(
            "{what}: {} {key}, expected {}",
            items.len(),
            new.len()
        )));
    }
    for (item, d) in items.iter_mut().zip(new) {
        let Value::Object(obj) = item else {
            return Err(Error::Image(format!(
                "{what}: an entry of {key:?} is not an object"
            )));
        };
        let old: Descriptor = serde_json::from_value(Value::Object(obj.clone()))
            .map_err(|e| Error::Image(format!("{what}: a descriptor does not parse: {e}")))?;
        if old != *d {
            set_descriptor(obj, d);
        }
    }
    Ok(())
}

/// A manifest with new layer descriptors (and, when given, new manifest and config media
/// types), edited in place.
///
/// # Errors
/// [`Error::Image`] when the manifest does not parse or the layer count differs.
pub fn edit_manifest(
    orig: &[u8],
    layers: &[Descriptor],
    media_type: Option<&str>,
    config_media_type: Option<&str>,
) -> Result<Vec<u8>, Error> {
    let mut doc = parse_object(orig, "the manifest")?;
    edit_array(&mut doc, "layers", layers, "the manifest")?;
    if let Some(mt) = media_type {
        match doc.get_mut("mediaType") {
            Some(v) => *v = Value::String(mt.to_owned()),
            None => {
                // After schemaVersion, where Go's manifest structs have it.
                let at = usize::from(doc.keys().next().map(String::as_str) == Some("schemaVersion"));
                doc.shift_insert(at, "mediaType".into(), Value::String(mt.to_owned()));
            }
        }
    }
    if let (Some(mt), Some(Value::Object(c))) = (config_media_type, doc.get_mut("config")) {
        c.insert("mediaType".into(), Value::String(mt.to_owned()));
    }
    to_vec(&Value::Object(doc))
}

/// An index with new child descriptors (and optionally a new media type), edited in place.
///
/// # Errors
/// [`Error::Image`] when the index does not parse or the child count differs.
pub fn edit_index(orig: &[u8], manifests: &[Descriptor], media_type: Option<&str>) -> Result<Vec<u8>, Error> {
    let mut doc = parse_object(orig, "the index")?;
    edit_array(&mut doc, "manifests", manifests, "the index")?;
    if let (Some(mt), Some(v)) = (media_type, doc.get_mut("mediaType")) {
        *v = Value::String(mt.to_owned());
    }
    to_vec(&Value::Object(doc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_escaping_and_order() {
        let v: Value = serde_json::from_str(r#"{"z":"a<b>&c\u2028","a":1,"m":{"y":"\n","b":[]}}"#).unwrap();
        assert_eq!(
            String::from_utf8(to_vec(&v).unwrap()).unwrap(),
            r#"{"z":"a\u003cb\u003e\u0026c\u2028","a":1,"m":{"y":"\n","b":[]}}"#
        );
    }

    #[test]
    fn edits_only_what_changed_and_round_trips() {
        let orig = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","size":7},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","size":9}],"annotations":{"org.opencontainers.image.created":"x\u003cy"}}"#;
        let m = oci_spec::image::ImageManifest::from_reader(&orig[..]).unwrap();
        let old = m.layers()[0].clone();
        // The same layers: the same bytes.
        assert_eq!(
            edit_manifest(orig, std::slice::from_ref(&old), None, None).unwrap(),
            orig.to_vec()
        );
        // An encrypted layer: annotations land after size, sorted.
        let mut enc = crate::image::layout::descriptor(
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
            "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc",
            11,
        )
        .unwrap();
        enc.set_annotations(Some(
            [("z".to_owned(), "1".to_owned()), ("a".to_owned(), "2".to_owned())].into(),
        ));
        let e = edit_manifest(orig, &[enc], None, None).unwrap();
        let text = String::from_utf8(e.clone()).unwrap();
        assert!(
            text.contains(r#"{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip+encrypted","digest":"sha256:cccc"#),
            "{text}"
        );
        assert!(
            text.contains(r#""size":11,"annotations":{"a":"2","z":"1"}}]"#),
            "{text}"
        );
        assert!(
            text.ends_with(r#""annotations":{"org.opencontainers.image.created":"x\u003cy"}}"#),
            "{text}"
        );
        // And back.
        assert_eq!(edit_manifest(&e, &[old], None, None).unwrap(), orig.to_vec());
    }
}
