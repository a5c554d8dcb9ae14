"""Drives IBM's Python Key Protect SDKs against a Key Protect endpoint (the kp-emulator in CI).

Environment: KP_BASE (Key Protect and IAM base URL), KP_INSTANCE_ID, KP_APIKEY.
Prints one JSON object on stdout: {"ok": true, "steps": [...], ...}. Exits non-zero on the first
failed expectation, with the reason on stderr.

Two independent IBM clients are used:
  * `keyprotect` (PyPI, the generated IbmKeyProtectApiV2 on ibm-cloud-sdk-core, IAMAuthenticator);
  * `redstone` (PyPI, redstone.client.KeyProtect with redstone.auth.TokenManager, /oidc/token).
"""
import base64
import json
import os
import sys

from ibm_cloud_sdk_core import ApiException
from ibm_cloud_sdk_core.authenticators import IAMAuthenticator
import keyprotect
import redstone.auth
import redstone.client

BASE = os.environ["KP_BASE"]
INSTANCE = os.environ["KP_INSTANCE_ID"]
APIKEY = os.environ["KP_APIKEY"]
steps = []


def check(cond, what):
    if not cond:
        print("FAILED: " + what, file=sys.stderr)
        sys.exit(1)
    steps.append(what)


def body(obj):
    return json.dumps(obj).encode("utf-8")


def expect_status(fn, status, what):
    try:
        fn()
    except ApiException as e:
        check(e.code == status, "%s -> HTTP %s (got %s: %s)" % (what, status, e.code, e.message))
        return e
    check(False, "%s should fail with HTTP %s" % (what, status))


# ---- the generated SDK -------------------------------------------------------------------
auth = IAMAuthenticator(APIKEY, url=BASE)
kp = keyprotect.IbmKeyProtectApiV2(authenticator=auth)
kp.set_service_url(BASE)

created = kp.create_key(
    bluemix_instance=INSTANCE,
    key_create_body=body({
        "metadata": {"collectionType": "application/vnd.ibm.kms.key+json", "collectionTotal": 1},
        "resources": [{"type": "application/vnd.ibm.kms.key+json", "name": "sdk-root", "extractable": False}],
    }),
    prefer="return=representation",
)
check(created.get_status_code() == 201, "sdk: create root key -> 201")
key = created.get_result()["resources"][0]
root_id = key["id"]
check(key["extractable"] is False and key["state"] == 1, "sdk: root key is active and not extractable")

pem = b"-----BEGIN PRIVATE KEY-----\nMIIB...\n-----END PRIVATE KEY-----\n"
wrapped = kp.wrap_key(
    id=root_id,
    bluemix_instance=INSTANCE,
    key_action_wrap_body=body({"plaintext": base64.b64encode(pem).decode()}),
).get_result()
ct1 = wrapped["ciphertext"]
check(wrapped["keyVersion"]["id"] != "", "sdk: wrap returns ciphertext and keyVersion")
envelope = json.loads(base64.b64decode(ct1))
check(set(envelope) == {"ciphertext", "iv", "version", "handle"} and envelope["version"] == "4.0.0",
      "sdk: ciphertext is the documented envelope")

unwrapped = kp.unwrap_key(
    id=root_id, bluemix_instance=INSTANCE, key_action_unwrap_body=body({"ciphertext": ct1})
).get_result()
check(base64.b64decode(unwrapped["plaintext"]) == pem, "sdk: unwrap returns the plaintext")
check("rewrappedKeyVersion" not in unwrapped, "sdk: no rewrap before rotation")

aad_wrapped = kp.wrap_key(
    id=root_id, bluemix_instance=INSTANCE,
    key_action_wrap_body=body({"plaintext": base64.b64encode(b"dek").decode(), "aad": ["a", "b"]}),
).get_result()
expect_status(lambda: kp.unwrap_key(id=root_id, bluemix_instance=INSTANCE,
                                     key_action_unwrap_body=body({"ciphertext": aad_wrapped["ciphertext"], "aad": ["b", "a"]})),
              422, "sdk: unwrap with AAD in another order")

generated = kp.wrap_key(id=root_id, bluemix_instance=INSTANCE, key_action_wrap_body=body({})).get_result()
check(len(base64.b64decode(generated["plaintext"])) == 32, "sdk: wrap without plaintext generates a 256-bit DEK")

rot = kp.rotate_key(id=root_id, bluemix_instance=INSTANCE, key_action_rotate_body=body({}))
check(rot.get_status_code() in (200, 204), "sdk: rotate")
after = kp.unwrap_key(
    id=root_id, bluemix_instance=INSTANCE, key_action_unwrap_body=body({"ciphertext": ct1})
).get_result()
check(base64.b64decode(after["plaintext"]) == pem, "sdk: old ciphertext still unwraps after rotation")
check("ciphertext" in after and after["rewrappedKeyVersion"]["id"] != after["keyVersion"]["id"],
      "sdk: unwrap after rotation returns the rewrapped ciphertext and rewrappedKeyVersion")
rewrapped = kp.rewrap_key(
    id=root_id, bluemix_instance=INSTANCE, key_action_rewrap_body=body({"ciphertext": ct1})
).get_result()
check(rewrapped["rewrappedKeyVersion"]["id"] == after["rewrappedKeyVersion"]["id"], "sdk: rewrap")

meta = kp.get_key_metadata(id=root_id, bluemix_instance=INSTANCE).get_result()["resources"][0]
check(meta["keyVersion"]["id"] == after["rewrappedKeyVersion"]["id"], "sdk: metadata shows the latest version")
listed = kp.get_keys(bluemix_instance=INSTANCE).get_result()
check(any(k["id"] == root_id for k in listed["resources"]), "sdk: list keys")

kp.disable_key(id=root_id, bluemix_instance=INSTANCE)
expect_status(lambda: kp.unwrap_key(id=root_id, bluemix_instance=INSTANCE,
                                    key_action_unwrap_body=body({"ciphertext": ct1})), 409, "sdk: unwrap with a disabled key")
kp.enable_key(id=root_id, bluemix_instance=INSTANCE)
kp.unwrap_key(id=root_id, bluemix_instance=INSTANCE, key_action_unwrap_body=body({"ciphertext": ct1}))
steps.append("sdk: enable, unwrap works again")

# A ciphertext made by the Rust client, if given, unwraps with the SDK.
if os.environ.get("KP_RUST_CIPHERTEXT"):
    got = kp.unwrap_key(
        id=os.environ["KP_RUST_ROOT_KEY"], bluemix_instance=INSTANCE,
        key_action_unwrap_body=body({"ciphertext": os.environ["KP_RUST_CIPHERTEXT"]}),
    ).get_result()
    check(base64.b64decode(got["plaintext"]) == os.environ["KP_RUST_PLAINTEXT"].encode(),
          "sdk: unwrap of the Rust client's ciphertext")

# ---- redstone ------------------------------------------------------------------------------
rs = redstone.client.KeyProtect(
    region=None,
    service_instance_id=INSTANCE,
    endpoint_url=BASE,
    credentials=redstone.auth.TokenManager(APIKEY, iam_endpoint=BASE),
)
rkey = rs.create_key(name="redstone-root", root=True)
check(rkey["extractable"] is False, "redstone: create root key")
rwrapped = rs.wrap(rkey["id"], b"redstone secret", aad=["x"])
check(rs.unwrap(rkey["id"], rwrapped["ciphertext"], aad=["x"]) == b"redstone secret", "redstone: wrap/unwrap with AAD")
rs.rotate_key(rkey["id"])
check(rs.unwrap(rkey["id"], rwrapped["ciphertext"], aad=["x"]) == b"redstone secret", "redstone: unwrap after rotate")
# Redstone unwraps the SDK's ciphertext too (same service, same key).
check(rs.unwrap(root_id, ct1) == pem, "redstone: unwrap of the SDK's ciphertext")
try:
    rs.unwrap(rkey["id"], ct1)
    check(False, "redstone: wrong key must fail")
except redstone.client.KeyProtect.KeyProtectError as e:
    check(e.http_error.response.status_code == 422, "redstone: wrong key -> 422 with the service's errorMsg")
rs.delete_key(rkey["id"])
try:
    rs.unwrap(rkey["id"], rwrapped["ciphertext"], aad=["x"])
    check(False, "redstone: deleted key must fail")
except redstone.client.KeyProtect.KeyProtectError as e:
    check(e.http_error.response.status_code == 410, "redstone: deleted key -> 410")

print(json.dumps({"ok": True, "root_key_id": root_id, "ciphertext": ct1, "plaintext_b64": base64.b64encode(pem).decode(), "rotated_version": after["rewrappedKeyVersion"]["id"],
                  "steps": steps}))
