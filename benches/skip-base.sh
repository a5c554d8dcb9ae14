#!/usr/bin/env bash
# encrypt with and without --skip-base: an application image made of one big base layer and one
# small application layer, layout to layout and registry to registry (Debian's docker-registry on
# 127.0.0.1). Prints wall clock and CPU time of each run, the bytes that went through imgcrypt
# (encrypted or streamed, from its --json report) versus the bytes the kernel copied or the
# registry mounted, and the ratios.
#
#   benches/skip-base.sh [--base-size 512M] [--app-size 16M] [--no-registry] [--dir DIR]
#   benches/skip-base.sh --smoke        # 8 MiB base, 1 MiB app (CI-sized)
#
# Environment: IMGCRYPT (the binary; default: built here with --release), SKOPEO, REGISTRY_BIN.
set -euo pipefail

BASE_SIZE=512M
APP_SIZE=16M
REG=1
DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --base-size) BASE_SIZE="$2"; shift 2 ;;
        --app-size) APP_SIZE="$2"; shift 2 ;;
        --no-registry) REG=0; shift ;;
        --dir) DIR="$2"; shift 2 ;;
        --smoke) BASE_SIZE=8M; APP_SIZE=1M; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "skip-base.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
SKOPEO="${SKOPEO:-skopeo}"
REGISTRY_BIN="${REGISTRY_BIN:-/usr/bin/docker-registry}"
TIME=/usr/bin/time
die() { echo "skip-base.sh: $*" >&2; exit 1; }
for t in openssl python3; do command -v "$t" >/dev/null || die "$t is missing"; done
[ -x "$TIME" ] || die "$TIME is missing: apt-get install time"
if [ "$REG" = 1 ]; then
    command -v "$SKOPEO" >/dev/null || die "skopeo is missing"
    [ -x "$REGISTRY_BIN" ] || die "$REGISTRY_BIN is missing: apt-get install docker-registry"
fi
if [ -z "${IMGCRYPT:-}" ]; then
    echo "# building imgcrypt (release)" >&2
    (cd "$ROOT" && cargo build --release --quiet -p imgcrypt-cli --bin imgcrypt) >&2
    IMGCRYPT="${CARGO_TARGET_DIR:-$ROOT/target}/release/imgcrypt"
fi
[ -x "$IMGCRYPT" ] || die "imgcrypt binary $IMGCRYPT not found"

if [ -z "$DIR" ]; then
    DIR="$(mktemp -d "${BENCH_DIR:-/tmp}/imgcrypt-skipbase.XXXXXX")"
    OWN_DIR=1
else
    mkdir -p "$DIR"; OWN_DIR=0
fi
REG_PID=""
cleanup() {
    [ -n "$REG_PID" ] && kill "$REG_PID" 2>/dev/null || true
    [ "$OWN_DIR" = 1 ] && rm -rf "$DIR"
}
trap cleanup EXIT

# --- images: base = [B]; app = [B, A]; plain tar layers of incompressible bytes ----------------
python3 - "$DIR" "$BASE_SIZE" "$APP_SIZE" <<'EOF'
import hashlib, io, json, os, sys, tarfile
d, bs, as_ = sys.argv[1], sys.argv[2], sys.argv[3]
def size(s):
    m = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * m[s[-1].upper()] if s[-1].upper() in m else int(s)
def layer_file(path, n, seed):
    # A tar with one file of n random (incompressible: skopeo gzips layers it pushes) bytes.
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w|") as t:
        info = tarfile.TarInfo(f"data-{seed}.bin"); info.size = n; info.mtime = 1_700_000_000
        class R(io.RawIOBase):
            def __init__(s): s.left = n
            def readable(s): return True
            def readinto(s, b):
                k = min(len(b), s.left, 1 << 20)
                if k == 0: return 0
                b[:k] = os.urandom(k); s.left -= k; return k
        t.addfile(info, io.BufferedReader(R(), 1 << 20))
def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for c in iter(lambda: f.read(1 << 20), b""): h.update(c)
    return h.hexdigest()
tmp = os.path.join(d, "layers"); os.makedirs(tmp, exist_ok=True)
layers = []
for name, n, seed in (("base", size(bs), 1), ("app", size(as_), 2)):
    p = os.path.join(tmp, name); layer_file(p, n, seed)
    layers.append((sha(p), os.path.getsize(p), p))
def layout(root, ls):
    blobs = os.path.join(root, "blobs", "sha256"); os.makedirs(blobs, exist_ok=True)
    diff = []
    for h, n, p in ls:
        dst = os.path.join(blobs, h)
        if not os.path.exists(dst): __import__("shutil").copyfile(p, dst)
        diff.append("sha256:" + h)
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff}}).encode()
    def put(b):
        h = hashlib.sha256(b).hexdigest(); open(os.path.join(blobs, h), "wb").write(b); return h
    ch = put(cfg)
    m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + ch, "size": len(cfg)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:" + h, "size": n} for h, n, _ in ls]}).encode()
    mh = put(m)
    open(os.path.join(root, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
    open(os.path.join(root, "index.json"), "w").write(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + mh, "size": len(m),
         "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
layout(os.path.join(d, "base"), layers[:1])
layout(os.path.join(d, "app"), layers)
__import__("shutil").rmtree(tmp)
EOF
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$DIR/k.pem" 2>/dev/null
openssl pkey -in "$DIR/k.pem" -pubout -out "$DIR/k.pub.pem"

# Runs imgcrypt --json encrypt ARGS…; prints "WALL CPU STREAMED KERNEL_OR_MOUNTED" (seconds, bytes).
run() {
    local out="$DIR/out.json" t="$DIR/time.txt"
    "$TIME" -f '%e %U %S' -o "$t" "$IMGCRYPT" --json "$@" >"$out"
    python3 - "$out" "$t" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1])); e, u, s = open(sys.argv[2]).read().split()[-3:]
through = sum(l["size"] for l in r["layers"] if l["action"] == "encrypted" or l.get("transfer") == "streamed")
free = sum(l["size"] for l in r["layers"] if l.get("transfer") in ("kernel-copy", "reflink", "mounted", "present"))
print(f"{float(e):.2f} {float(u) + float(s):.2f} {through} {free}")
EOF
}

report() { # NAME "WALL CPU THROUGH FREE" (without) "…" (with)
    read -r w1 c1 t1 f1 <<<"$2"; read -r w2 c2 t2 f2 <<<"$3"
    python3 - "$1" "$w1" "$c1" "$t1" "$f1" "$w2" "$c2" "$t2" "$f2" <<'EOF'
import sys
n, w1, c1, t1, f1, w2, c2, t2, f2 = sys.argv[1], *map(float, sys.argv[2:])
mib = lambda b: f"{b / (1 << 20):.1f} MiB"
print(f"{n}:")
print(f"  without --skip-base: {w1:.2f} s wall, {c1:.2f} s CPU, {mib(t1)} through imgcrypt, {mib(f1)} copied by the kernel/mounted")
print(f"  with    --skip-base: {w2:.2f} s wall, {c2:.2f} s CPU, {mib(t2)} through imgcrypt, {mib(f2)} copied by the kernel/mounted")
r = lambda a, b: f"{a / b:.1f}x" if b > 0 else "inf"
print(f"  ratio (without/with): wall {r(w1, w2)}, CPU {r(c1, c2)}, bytes through imgcrypt {r(t1, t2)}")
EOF
}

RCP="jwe:$DIR/k.pub.pem"
echo "# base layer $BASE_SIZE, application layer $APP_SIZE; imgcrypt: $IMGCRYPT; dir: $DIR"
without=$(run encrypt --recipient "$RCP" "oci:$DIR/app:v1" "oci:$DIR/enc-all:v1")
with=$(run encrypt --recipient "$RCP" --skip-base "oci:$DIR/base:v1" "oci:$DIR/app:v1" "oci:$DIR/enc-app:v1")
report "layout -> layout" "$without" "$with"

if [ "$REG" = 1 ]; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat >"$DIR/registry.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $DIR/registry
http:
  addr: 127.0.0.1:$port
EOF
    "$REGISTRY_BIN" serve "$DIR/registry.yml" >/dev/null 2>&1 &
    REG_PID=$!
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break; sleep 0.1; done
    R="docker://127.0.0.1:$port"
    "$SKOPEO" --insecure-policy copy -q --dest-tls-verify=false "oci:$DIR/base:v1" "$R/library/base:v1"
    "$SKOPEO" --insecure-policy copy -q --dest-tls-verify=false "oci:$DIR/app:v1" "$R/team/app:v1"
    without=$(run --tls-verify=false encrypt --recipient "$RCP" "$R/team/app:v1" "$R/team/enc-all:v1")
    with=$(run --tls-verify=false encrypt --recipient "$RCP" --skip-base "$R/library/base:v1" "$R/team/app:v1" "$R/team/enc-app:v1")
    report "registry -> registry (other repository, same registry)" "$without" "$with"
fi
