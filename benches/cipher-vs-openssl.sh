#!/usr/bin/env bash
# Layer cipher throughput (criterion, benches/benches/cipher.rs) against `openssl speed -evp sha256`
# on the same machine: the HMAC-SHA256 bounds the layer cipher, target >= 80% of OpenSSL's SHA-256.
#
#   benches/cipher-vs-openssl.sh [--quick]
#
# --quick: shorter criterion runs (1 s warm-up, 2 s measurement) and a 2 s openssl run.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
WARM=2; MEAS=5; OSSL_SECS=3
if [ "${1:-}" = "--quick" ]; then WARM=1; MEAS=2; OSSL_SECS=2; fi
command -v openssl >/dev/null || { echo "openssl is missing" >&2; exit 1; }

echo "# openssl speed -evp sha256 (and aes-256-ctr for reference), ${OSSL_SECS}s per size" >&2
sha=$(openssl speed -seconds "$OSSL_SECS" -evp sha256 2>/dev/null | awk '/^sha256/ {print $NF}')
aes=$(openssl speed -seconds "$OSSL_SECS" -evp aes-256-ctr 2>/dev/null | awk '/^AES-256-CTR/ {print $NF}')

echo "# cargo bench -p imgcrypt-benches --bench cipher" >&2
(cd "$ROOT" && cargo bench -q -p imgcrypt-benches --bench cipher -- --noplot \
    --warm-up-time "$WARM" --measurement-time "$MEAS" >&2)
CRIT="${CARGO_TARGET_DIR:-$ROOT/target}/criterion"

python3 - "$CRIT" "$sha" "$aes" <<'PY'
import json, os, sys
crit, sha, aes = sys.argv[1], sys.argv[2], sys.argv[3]
def kb(s):  # openssl prints e.g. 1118587.03k (1000s of bytes per second, per user-CPU second)
    return float(s.rstrip("k")) * 1000
sha_bps, aes_bps = kb(sha), kb(aes)
total = 16 << 20
def mbps(group, op, size):
    f = os.path.join(crit, group, op, str(size), "new", "estimates.json")
    if not os.path.exists(f):
        return None
    ns = json.load(open(f))["mean"]["point_estimate"]
    return total / (ns / 1e9)
print(f"openssl sha256      (16 KiB blocks): {sha_bps / 1e6:8.0f} MB/s")
print(f"openssl aes-256-ctr (16 KiB blocks): {aes_bps / 1e6:8.0f} MB/s")
print(f"{'layer cipher':12} {'chunk':>8} {'MB/cpu-s':>9} {'vs sha256':>10} {'MB/s wall':>10}")
worst = None
for op in ("encrypt", "decrypt"):
    d = os.path.join(crit, "layer-cipher-cpu", op)
    for size in sorted(int(x) for x in os.listdir(d) if x.isdigit()):
        c = mbps("layer-cipher-cpu", op, size)
        w = mbps("layer-cipher", op, size)
        ratio = c / sha_bps
        if size >= 64 << 10:
            worst = ratio if worst is None else min(worst, ratio)
        ws = f"{w / 1e6:10.0f}" if w else "         -"
        print(f"{op:12} {size >> 10:6} Ki {c / 1e6:9.0f} {ratio * 100:9.0f}% {ws}")
print(f"lowest ratio at chunks >= 64 KiB: {worst * 100:.0f}% of openssl sha256 (one thread, CPU time)")
# cipher::parallel: CTR and HMAC on two threads, wall clock (reads from memory, writes to a sink).
d = os.path.join(crit, "layer-cipher-2threads")
worst2 = None
if os.path.isdir(d):
    print(f"{'two threads':12} {'chunk':>8} {'MB/s wall':>9} {'vs sha256':>10}")
    for op in ("encrypt", "decrypt"):
        for size in sorted(int(x) for x in os.listdir(os.path.join(d, op)) if x.isdigit()):
            w = mbps("layer-cipher-2threads", op, size)
            ratio = w / sha_bps
            worst2 = ratio if worst2 is None else min(worst2, ratio)
            print(f"{op:12} {size >> 10:6} Ki {w / 1e6:9.0f} {ratio * 100:9.0f}%")
    print(f"lowest ratio, two threads: {worst2 * 100:.0f}% of openssl sha256 (target >= 80%)")
PY
