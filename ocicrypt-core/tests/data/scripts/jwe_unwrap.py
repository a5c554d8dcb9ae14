#!/usr/bin/env python3
"""Independent JWE unwrapper (pyca/cryptography) for the interop tests.

Usage: jwe_unwrap.py JWE_JSON_FILE PRIVATE_KEY_PEM
Reads a flattened or general JSON JWE, tries every recipient with the key and writes the
plaintext to stdout. Supports RSA-OAEP, RSA-OAEP-256, ECDH-ES+A128KW/A192KW/A256KW and
A128GCM/A192GCM/A256GCM. Exit status 1 when no recipient can be opened.
"""
import base64
import json
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap


def b64u(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def lp(b):
    return len(b).to_bytes(4, "big") + b


CURVES = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
KW = {"ECDH-ES+A128KW": 16, "ECDH-ES+A192KW": 24, "ECDH-ES+A256KW": 32}


def cek_for(priv, header, ek):
    alg = header["alg"]
    if alg in ("RSA-OAEP", "RSA-OAEP-256") and isinstance(priv, rsa.RSAPrivateKey):
        h = hashes.SHA1() if alg == "RSA-OAEP" else hashes.SHA256()
        return priv.decrypt(ek, padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None))
    if alg in KW and isinstance(priv, ec.EllipticCurvePrivateKey):
        epk = header["epk"]
        x = int.from_bytes(b64u(epk["x"]), "big")
        y = int.from_bytes(b64u(epk["y"]), "big")
        peer = ec.EllipticCurvePublicNumbers(x, y, CURVES[epk["crv"]]).public_key()
        z = priv.exchange(ec.ECDH(), peer)
        size = KW[alg]
        other = lp(alg.encode()) + lp(b64u(header.get("apu", ""))) + lp(b64u(header.get("apv", ""))) + (size * 8).to_bytes(4, "big")
        kek = ConcatKDFHash(algorithm=hashes.SHA256(), length=size, otherinfo=other).derive(z)
        return aes_key_unwrap(kek, ek)
    return None


def main():
    jwe = json.load(open(sys.argv[1]))
    priv = serialization.load_pem_private_key(open(sys.argv[2], "rb").read(), None)
    prot = json.loads(b64u(jwe["protected"]))
    if "recipients" in jwe:
        recips = [(dict(prot, **r.get("header", {})), r["encrypted_key"]) for r in jwe["recipients"]]
    else:
        recips = [(dict(prot, **jwe.get("header", {})), jwe["encrypted_key"])]
    for header, ek in recips:
        try:
            cek = cek_for(priv, header, b64u(ek))
            if cek is None:
                continue
            aad = jwe["protected"].encode()
            if "aad" in jwe:
                aad += b"." + jwe["aad"].encode()
            pt = AESGCM(cek).decrypt(b64u(jwe["iv"]), b64u(jwe["ciphertext"]) + b64u(jwe["tag"]), aad)
        except Exception as e:  # wrong key for this recipient
            print("recipient %s: %s" % (header.get("alg"), e), file=sys.stderr)
            continue
        sys.stdout.buffer.write(pt)
        return 0
    print("no recipient could be opened", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
