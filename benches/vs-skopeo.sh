#!/usr/bin/env bash
# imgcrypt vs skopeo 1.9.3: encrypt and decrypt the same images, layout to layout and registry to
# registry (Debian's docker-registry on 127.0.0.1), timing wall clock, CPU time and peak RSS of
# each tool, and checking that both tools' outputs decrypt to the source's bytes.
#
#   benches/vs-skopeo.sh [--size 1G] [--no-ten] [--no-registry] [--rss-size 4G|none] [--dir DIR]
#   benches/vs-skopeo.sh --smoke          # 32 MiB, no ten-layer image, no RSS scaling run (CI)
#
# Images: a single-layer image whose layer holds --size bytes of incompressible data as a real
# tar+gzip (stored deflate blocks), and a ten-layer image of --size/10 per layer. --rss-size runs
# imgcrypt alone on a bigger single layer to show that peak RSS does not grow with the layer.
#
# Work files go to --dir (default: a fresh directory under $BENCH_DIR, else /dev/shm when it
# has room, else /tmp). On tmpfs the fsync both tools do is free, so the figures measure the
# tools, not the disk. Everything is removed at exit; the registry is stopped at exit.
#
# Environment: IMGCRYPT (path of the imgcrypt binary; default: built here with --release),
# SKOPEO (default skopeo), REGISTRY_BIN (default /usr/bin/docker-registry).
set -euo pipefail

SIZE=1G
TEN=1
REG=1
RSS_SIZE=4G
SMOKE=0
DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --size) SIZE="$2"; shift 2 ;;
        --no-ten) TEN=0; shift ;;
        --no-registry) REG=0; shift ;;
        --rss-size) RSS_SIZE="$2"; shift 2 ;;
        --dir) DIR="$2"; shift 2 ;;
        --smoke) SMOKE=1; SIZE=32M; TEN=0; RSS_SIZE=none; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "vs-skopeo.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
SKOPEO="${SKOPEO:-skopeo}"
REGISTRY_BIN="${REGISTRY_BIN:-/usr/bin/docker-registry}"
TIME=/usr/bin/time

die() { echo "vs-skopeo.sh: $*" >&2; exit 1; }
for t in "$SKOPEO" openssl python3; do
    command -v "$t" >/dev/null || die "$t is missing: install it (scripts/deps.sh lists the packages)"
done
[ -x "$TIME" ] || die "$TIME is missing: apt-get install time"
[ "$REG" = 0 ] || [ -x "$REGISTRY_BIN" ] || die "$REGISTRY_BIN is missing: apt-get install docker-registry"

to_bytes() { python3 -c 'import sys
s=sys.argv[1].strip().upper(); m={"K":1<<10,"M":1<<20,"G":1<<30}
print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))' "$1"; }
SIZE_B=$(to_bytes "$SIZE")

# --- binaries ---------------------------------------------------------------------------------
if [ -z "${IMGCRYPT:-}" ]; then
    echo "# building imgcrypt and mkimage (release)" >&2
    (cd "$ROOT" && cargo build --release --quiet -p imgcrypt-cli --bin imgcrypt -p imgcrypt-benches --bin mkimage) >&2
    TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
    IMGCRYPT="$TARGET_DIR/release/imgcrypt"
    MKIMAGE="$TARGET_DIR/release/mkimage"
else
    MKIMAGE="${MKIMAGE:-$(dirname "$IMGCRYPT")/mkimage}"
fi
[ -x "$IMGCRYPT" ] || die "imgcrypt binary $IMGCRYPT not found"
[ -x "$MKIMAGE" ] || die "mkimage binary $MKIMAGE not found (cargo build --release -p imgcrypt-benches)"

# --- work directory, cleanup -------------------------------------------------------------------
need=$(( SIZE_B * 6 + (64 << 20) ))
if [ -z "$DIR" ]; then
    base="${BENCH_DIR:-}"
    if [ -z "$base" ]; then
        shm_free=$(df -B1 --output=avail /dev/shm 2>/dev/null | tail -1 || echo 0)
        if [ "${shm_free:-0}" -gt $(( need * 2 )) ]; then base=/dev/shm; else base=/tmp; fi
    fi
    DIR="$(mktemp -d "$base/imgcrypt-bench.XXXXXX")"
    OWN_DIR=1
else
    mkdir -p "$DIR"; OWN_DIR=0
fi
REG_PID=""
cleanup() {
    if [ -n "$REG_PID" ]; then kill "$REG_PID" 2>/dev/null || true; wait "$REG_PID" 2>/dev/null || true; fi
    if [ "$OWN_DIR" = 1 ]; then rm -rf "$DIR"; else rm -rf "$DIR"/w; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
W="$DIR/w"; mkdir -p "$W"
fs_type=$(df --output=fstype "$W" | tail -1)

# --- keys --------------------------------------------------------------------------------------
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$W/priv.pem" 2>/dev/null
openssl pkey -in "$W/priv.pem" -pubout -out "$W/pub.pem"
chmod 600 "$W/priv.pem"

# --- measuring ---------------------------------------------------------------------------------
RESULTS="$W/results.tsv"; : > "$RESULTS"
# run LABEL TOOL CMD...: times CMD, records "label tool wall user sys rss_kib".
run() {
    local label="$1" tool="$2"; shift 2
    local tf="$W/time.out"
    if ! "$TIME" -f '%e %U %S %M' -o "$tf" "$@" > "$W/cmd.log" 2>&1; then
        cat "$W/cmd.log" >&2
        die "$tool failed in '$label': $*"
    fi
    read -r wall user sys rss < "$tf"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$tool" "$wall" "$user" "$sys" "$rss" >> "$RESULTS"
    awk -v l="$label" -v t="$tool" -v w="$wall" -v u="$user" -v s="$sys" -v r="$rss" \
        'BEGIN { printf "  %-34s %-8s wall %7.2fs  cpu %7.2fs  rss %7.1f MiB\n", l, t, w, u + s, r / 1024 }' >&2
}

# Layer digests of image TAG in LAYOUT, one per line.
layout_layers() {
    python3 - "$1" "$2" <<'PY'
import json, sys, os
root, tag = sys.argv[1], sys.argv[2]
idx = json.load(open(os.path.join(root, "index.json")))
m = [d for d in idx["manifests"] if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag][0]
man = json.load(open(os.path.join(root, "blobs", *m["digest"].split(":"))))
for l in man["layers"]:
    print(l["digest"], l["mediaType"])
PY
}
# sha256 of every layer blob file, recomputed from the bytes on disk.
layout_layer_sums() {
    local root="$1" tag="$2"
    layout_layers "$root" "$tag" | while read -r d _; do
        sha256sum "$root/blobs/sha256/${d#sha256:}" | awk '{print "sha256:" $1}'
    done
}
check_same() {
    local what="$1" a="$2" b="$3"
    if [ "$a" != "$b" ]; then
        printf 'MISMATCH %s:\n--- expected\n%s\n--- got\n%s\n' "$what" "$a" "$b" >&2
        die "outputs differ: $what"
    fi
    echo "  ok: $what" >&2
}
check_encrypted() {
    local root="$1" tag="$2" n
    n=$(layout_layers "$root" "$tag" | grep -vc '+encrypted$' || true)
    [ "$n" = 0 ] || die "$root:$tag has $n layer(s) that are not encrypted"
}

# --- one image, layout to layout ----------------------------------------------------------------
bench_layout() {
    local name="$1" src="$2"
    local want; want=$(layout_layer_sums "$src" bench)
    check_same "$name source blobs match their digests" "$(layout_layers "$src" bench | awk '{print $1}')" "$want"
    echo "# $name: layout -> layout" >&2
    run "$name encrypt oci->oci" skopeo "$SKOPEO" copy -q --encryption-key "jwe:$W/pub.pem" "oci:$src:bench" "oci:$W/sk-enc:bench"
    run "$name encrypt oci->oci" imgcrypt "$IMGCRYPT" -q encrypt --recipient "jwe:$W/pub.pem" "oci:$src:bench" "oci:$W/ic-enc:bench"
    check_encrypted "$W/sk-enc" bench; check_encrypted "$W/ic-enc" bench
    run "$name decrypt oci->oci" skopeo "$SKOPEO" copy -q --decryption-key "$W/priv.pem" "oci:$W/sk-enc:bench" "oci:$W/sk-dec:bench"
    run "$name decrypt oci->oci" imgcrypt "$IMGCRYPT" -q decrypt --key "$W/priv.pem" "oci:$W/ic-enc:bench" "oci:$W/ic-dec:bench"
    check_same "$name skopeo decrypt == source" "$want" "$(layout_layer_sums "$W/sk-dec" bench)"
    check_same "$name imgcrypt decrypt == source" "$want" "$(layout_layer_sums "$W/ic-dec" bench)"
    rm -rf "$W/sk-dec" "$W/ic-dec"
    # Cross-check (not timed): each tool decrypts what the other encrypted.
    "$IMGCRYPT" -q decrypt --key "$W/priv.pem" "oci:$W/sk-enc:bench" "oci:$W/x1:bench" >/dev/null
    check_same "$name imgcrypt decrypts skopeo's encryption to the source" "$want" "$(layout_layer_sums "$W/x1" bench)"
    rm -rf "$W/x1"
    "$SKOPEO" copy -q --decryption-key "$W/priv.pem" "oci:$W/ic-enc:bench" "oci:$W/x2:bench" >/dev/null
    check_same "$name skopeo decrypts imgcrypt's encryption to the source" "$want" "$(layout_layer_sums "$W/x2" bench)"
    rm -rf "$W/x2" "$W/sk-enc" "$W/ic-enc"
}

# --- one image, registry to registry --------------------------------------------------------------
start_registry() {
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    REG_ADDR="127.0.0.1:$port"
    mkdir -p "$W/registry"
    cat > "$W/registry/config.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $W/registry/data
  delete:
    enabled: true
http:
  addr: $REG_ADDR
EOF
    "$REGISTRY_BIN" serve "$W/registry/config.yml" > "$W/registry/log" 2>&1 &
    REG_PID=$!
    for _ in $(seq 1 100); do
        if python3 -c 'import sys, urllib.request; urllib.request.urlopen("http://" + sys.argv[1] + "/v2/", timeout=2)' "$REG_ADDR" >/dev/null 2>&1; then return 0; fi
        kill -0 "$REG_PID" 2>/dev/null || { cat "$W/registry/log" >&2; die "docker-registry exited"; }
        sleep 0.1
    done
    die "docker-registry did not answer on $REG_ADDR within 10 s"
}
# The manifest of REPO:TAG in the registry, as JSON.
registry_manifest() {
    python3 - "$REG_ADDR" "$1" "$2" <<'PY'
import sys, urllib.request
addr, repo, tag = sys.argv[1:4]
req = urllib.request.Request(f"http://{addr}/v2/{repo}/manifests/{tag}",
                             headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
print(urllib.request.urlopen(req, timeout=30).read().decode())
PY
}
registry_layers() {
    registry_manifest "$1" "$2" |
        python3 -c 'import json,sys; [print(l["digest"]) for l in json.load(sys.stdin)["layers"]]'
}
registry_plain_count() {
    registry_manifest "$1" "$2" |
        python3 -c 'import json,sys; print(sum(1 for l in json.load(sys.stdin)["layers"] if not l["mediaType"].endswith("+encrypted")))'
}
bench_registry() {
    local name="$1" src="$2" r="docker://$REG_ADDR"
    local repo; repo=$(echo "$name" | tr '[:upper:]' '[:lower:]')
    local tls=(--src-tls-verify=false --dest-tls-verify=false)
    echo "# $name: registry -> registry ($REG_ADDR)" >&2
    "$SKOPEO" copy -q "${tls[@]}" "oci:$src:bench" "$r/$repo/plain:v1" >/dev/null
    local want; want=$(layout_layers "$src" bench | awk '{print $1}')
    check_same "$name pushed to the registry" "$want" "$(registry_layers "$repo/plain" v1)"
    run "$name encrypt reg->reg" skopeo "$SKOPEO" copy -q "${tls[@]}" --encryption-key "jwe:$W/pub.pem" "$r/$repo/plain:v1" "$r/$repo/sk:enc"
    run "$name encrypt reg->reg" imgcrypt "$IMGCRYPT" -q --tls-verify=false encrypt --recipient "jwe:$W/pub.pem" "$r/$repo/plain:v1" "$r/$repo/ic:enc"
    [ "$(registry_plain_count "$repo/sk" enc)" = 0 ] || die "skopeo left plain layers in $repo/sk:enc"
    [ "$(registry_plain_count "$repo/ic" enc)" = 0 ] || die "imgcrypt left plain layers in $repo/ic:enc"
    run "$name decrypt reg->reg" skopeo "$SKOPEO" copy -q "${tls[@]}" --decryption-key "$W/priv.pem" "$r/$repo/sk:enc" "$r/$repo/sk:dec"
    run "$name decrypt reg->reg" imgcrypt "$IMGCRYPT" -q --tls-verify=false decrypt --key "$W/priv.pem" "$r/$repo/ic:enc" "$r/$repo/ic:dec"
    # The registry checks every pushed blob against its digest, so equal digests are equal bytes.
    check_same "$name skopeo registry decrypt == source" "$want" "$(registry_layers "$repo/sk" dec)"
    check_same "$name imgcrypt registry decrypt == source" "$want" "$(registry_layers "$repo/ic" dec)"
}

# --- run ------------------------------------------------------------------------------------------
echo "# imgcrypt $("$IMGCRYPT" --version 2>/dev/null | head -1) vs $("$SKOPEO" --version)" >&2
echo "# work dir $W ($fs_type), size $SIZE, $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2

echo "# making images" >&2
"$MKIMAGE" "$W/src1" bench --size "$SIZE_B" --seed 1 >/dev/null
bench_layout "1x$SIZE" "$W/src1"
if [ "$REG" = 1 ]; then start_registry; bench_registry "1x$SIZE" "$W/src1"; fi
rm -rf "$W/src1"
if [ "$TEN" = 1 ]; then
    "$MKIMAGE" "$W/src10" bench --size $(( SIZE_B / 10 )) --layers 10 --seed 100 >/dev/null
    bench_layout "10x$(( SIZE_B / 10 >> 20 ))M" "$W/src10"
    if [ "$REG" = 1 ]; then bench_registry "10x$(( SIZE_B / 10 >> 20 ))M" "$W/src10"; fi
    rm -rf "$W/src10"
fi
if [ "$REG" = 1 ]; then
    kill "$REG_PID" 2>/dev/null || true; wait "$REG_PID" 2>/dev/null || true; REG_PID=""
    rm -rf "$W/registry"
fi
if [ "$RSS_SIZE" != none ]; then
    RSS_B=$(to_bytes "$RSS_SIZE")
    echo "# imgcrypt alone on a 1x$RSS_SIZE layer (peak RSS must not grow with the layer)" >&2
    "$MKIMAGE" "$W/big" bench --size "$RSS_B" --seed 7 >/dev/null
    run "1x$RSS_SIZE encrypt oci->oci" imgcrypt "$IMGCRYPT" -q encrypt --recipient "jwe:$W/pub.pem" "oci:$W/big:bench" "oci:$W/big-enc:bench"
    rm -rf "$W/big"
    run "1x$RSS_SIZE decrypt oci->oci" imgcrypt "$IMGCRYPT" -q decrypt --key "$W/priv.pem" "oci:$W/big-enc:bench" "oci:$W/big-dec:bench"
    rm -rf "$W/big-enc" "$W/big-dec"
fi

# --- summary --------------------------------------------------------------------------------------
echo
python3 - "$RESULTS" "$SIZE" "$RSS_SIZE" <<'PY'
import sys, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = collections.OrderedDict()
for label, tool, wall, user, sys_, rss in rows:
    by.setdefault(label, {})[tool] = (float(wall), float(user) + float(sys_), int(rss) / 1024)
print(f"{'operation':34} {'tool':8} {'wall s':>8} {'cpu s':>8} {'rss MiB':>8}")
for label, t in by.items():
    for tool, (w, c, r) in t.items():
        print(f"{label:34} {tool:8} {w:8.2f} {c:8.2f} {r:8.1f}")
print()
print(f"{'operation':34} {'wall ratio':>11} {'cpu ratio':>10} {'rss ratio':>10}   (skopeo / imgcrypt)")
for label, t in by.items():
    if "skopeo" in t and "imgcrypt" in t:
        s, i = t["skopeo"], t["imgcrypt"]
        f = lambda a, b: f"{a / b:10.1f}x" if b > 0 else "       inf"
        print(f"{label:34} {f(s[0], i[0])} {f(s[1], i[1])} {f(s[2], i[2])}")
small = {k: v["imgcrypt"][2] for k, v in by.items() if "imgcrypt" in v}
size, big = sys.argv[2], sys.argv[3]
for op in ("encrypt", "decrypt"):
    a, b = small.get(f"1x{size} {op} oci->oci"), small.get(f"1x{big} {op} oci->oci")
    if a and b:
        print(f"imgcrypt peak RSS {op}: {a:.1f} MiB at {size}, {b:.1f} MiB at {big} ({(b - a) / a * 100:+.1f}%)")
PY
