#!/usr/bin/env python3
"""Regenerates fuzz/corpus/<target>/ seeds from the committed skopeo-made vectors
(ocicrypt-core/tests/data/vectors) and small hand-written samples. Deterministic; run from
anywhere: python3 fuzz/seed.py. Entries libFuzzer adds later (fuzz/run.sh --keep) stay.
"""
import base64
import hashlib
import json
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
VEC = os.path.join(HERE, "..", "ocicrypt-core", "tests", "data", "vectors")
CORPUS = os.path.join(HERE, "corpus")


def put(target, data, name=None):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    name = name or hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def blob(layout, digest):
    with open(os.path.join(VEC, "layouts", layout, "blobs", "sha256", digest.split(":")[1]), "rb") as f:
        return f.read()


def any_bytes(type_url, value):
    def varint(n):
        out = bytearray()
        while n >= 0x80:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)
        return bytes(out)

    t = type_url.encode()
    return b"\x0a" + varint(len(t)) + t + b"\x12" + varint(len(value)) + value


layouts = sorted(os.listdir(os.path.join(VEC, "layouts")))
for layout in layouts:
    index_bytes = open(os.path.join(VEC, "layouts", layout, "index.json"), "rb").read()
    put("manifest_index", index_bytes, f"{layout}-index")
    index = json.loads(index_bytes)
    mdesc = index["manifests"][0]
    mbytes = blob(layout, mdesc["digest"])
    put("manifest_index", mbytes, f"{layout}-manifest")
    manifest = json.loads(mbytes)
    layer = manifest["layers"][0]
    ann = layer.get("annotations", {})
    if not ann:
        continue
    put("options_annotations", json.dumps(ann), f"{layout}-annotations")
    if "org.opencontainers.image.enc.pubopts" in ann:
        put("options_annotations", ann["org.opencontainers.image.enc.pubopts"], f"{layout}-pubopts")
    for key, target in [
        ("org.opencontainers.image.enc.keys.jwe", "jwe"),
        ("org.opencontainers.image.enc.keys.pkcs7", "pkcs7"),
        ("org.opencontainers.image.enc.keys.pgp", "pgp_message"),
    ]:
        if key in ann:
            put("options_annotations", ann[key], f"{layout}-{target}-annotation")
            for i, entry in enumerate(ann[key].split(",")):
                put(target, base64.b64decode(entry), f"{layout}-{i}")
    # The payload containerd sends for this layer, with and without keys.
    payload = {"DecryptConfig": {"Parameters": None}, "Descriptor": layer}
    put("decoder_payload", any_bytes("io.containerd.ocicrypt.v1.Payload", json.dumps(payload).encode()), f"{layout}-any")
    if layout == "enc-jwe":
        payload["DecryptConfig"]["Parameters"] = {
            "privkeys": [base64.b64encode(b"not a key").decode()],
            "privkeys-passwords": [None],
            "x509s": [],
            "gpg-privatekeys": [base64.b64encode(b"\x95\x01").decode()],
            "gpg-privatekeys-passwords": [""],
        }
        put("decoder_payload", json.dumps(payload), f"{layout}-json-params")
        put("decoder_payload", any_bytes("io.containerd.ocicrypt.v1.Payload", json.dumps(payload).encode()), f"{layout}-any-params")

put("options_annotations", json.dumps({
    "symkey": base64.b64encode(bytes(range(32))).decode(),
    "digest": "sha256:" + "0" * 64,
    "cipheroptions": {"nonce": base64.b64encode(bytes(range(16))).decode()},
}), "private-options")

keys = os.path.join(VEC, "keys")
for name in sorted(os.listdir(keys)):
    data = open(os.path.join(keys, name), "rb").read()
    if name.startswith("pgp-"):
        put("pgp_key", data, name)
        try:
            binary = subprocess.run(["gpg", "--dearmor"], input=data, capture_output=True, check=True).stdout
            put("pgp_key", binary, name.replace(".asc", ".gpg"))
            put("key_file", binary, name.replace(".asc", ".gpg"))
        except (OSError, subprocess.CalledProcessError):
            pass
    else:
        put("key_file", data, name)
        if name == "cert.pem":
            put("pkcs7", data, name)
put("key_file", json.dumps({"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA", "d": "AAAA"}), "jwk-ec")
put("key_file", "pkcs11:\n  uri: pkcs11:token=t;object=k?module-name=softhsm2\nmodule:\n  env:\n    SOFTHSM2_CONF: /x\n", "pkcs11.yaml")

put("keyprovider_json", json.dumps({"key-providers": {"kp": {"cmd": {"path": "/usr/bin/kp", "args": ["-x"]}}, "g": {"grpc": "127.0.0.1:1"}}}), "config")
put("keyprovider_json", json.dumps({"op": "keyunwrap", "keywrapparams": {}, "keyunwrapparams": {"dc": {"Parameters": {"kp": ["YQ=="]}}, "annotation": "e30="}}), "request")
put("keyprovider_json", json.dumps({"keywrapresults": {"annotation": "YWJj"}, "keyunwrapresults": {"optsdata": "e30="}}), "response")

envelope = {"ciphertext": "c2VjcmV0IHN0dWZm", "iv": "aXZpdml2aXZpdml2", "version": "4.0.0", "handle": "0b7c1d6e-0000-4000-8000-000000000000"}
put("kp_envelope", json.dumps(envelope), "envelope-json")
put("kp_envelope", base64.b64encode(json.dumps(envelope).encode()), "envelope-b64")
put("kp_envelope", base64.b64encode(json.dumps(envelope).encode()).decode().rstrip("=") + "\n", "envelope-b64-unpadded")
put("kp_envelope", json.dumps({"keyprotect-url": "https://127.0.0.1:1", "instance-id": "i", "apikey": "k", "iam-url": "https://127.0.0.1:2"}), "config")

rsa = open(os.path.join(keys, "rsa.pem"), "rb").read()
secret = lambda ty, data: json.dumps({"apiVersion": "v1", "kind": "Secret", "type": ty, "metadata": {"name": "s", "namespace": "n", "annotations": {"keyprotect.ibm.com/root-key-id": "r"}}, "data": {k: base64.b64encode(v).decode() for k, v in data.items()}})
put("agent_secret", secret("key", {"rsa.pem": rsa, "bad": b"x"}), "key")
put("agent_secret", secret("kp-key", {"rootkeyid": b"r", "ciphertext": base64.b64encode(json.dumps(envelope).encode()), "image.pem": b"abc"}), "kp-key")
put("agent_secret", secret("Opaque", {"config.json": b"{}"}), "opaque")
