#!/usr/bin/env bash
# Peak memory and throughput of the release `imgcrypt-decoder` on a large layer.
#
#   benches/decoder-rss.sh            # 1024 MiB layer
#   benches/decoder-rss.sh 4096       # layer size in MiB
#
# Builds the release binaries, encrypts a one-layer OCI image with `imgcrypt encrypt` (JWE, RSA
# key made by openssl), then runs the decoder the way containerd does (payload = protobuf Any on
# fd 3, encrypted blob on stdin, STREAM_PROCESSOR_MEDIATYPE, stdout to a file) in both output
# modes, checks the output digest and prints the decoder's peak RSS (getrusage of the child: ru_maxrss) and its
# throughput (wall clock, and CPU seconds of the decoder). Needs python3 and openssl; uses $TMPDIR
# for about 3x the layer size. DECODER=path runs another decoder build on the same input (to
# compare two builds, run the script once per build).
set -euo pipefail
cd "$(dirname "$0")/.."
MIB="${1:-1024}"

cargo build --release --quiet -p imgcrypt-cli --bin imgcrypt --bin imgcrypt-decoder
BIN="$(pwd)/target/release"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$WORK/key.pem" 2>/dev/null
openssl pkey -in "$WORK/key.pem" -pubout -out "$WORK/pub.pem"
mkdir -m 0700 "$WORK/keys" "$WORK/spool"
cp "$WORK/key.pem" "$WORK/keys/key.pem"

python3 - "$WORK" "$MIB" <<'PY'
import hashlib, json, os, sys
work, mib = sys.argv[1], int(sys.argv[2])
lay = os.path.join(work, "src")
blobs = os.path.join(lay, "blobs", "sha256")
os.makedirs(blobs)
def put(data):
    d = hashlib.sha256(data).hexdigest()
    open(os.path.join(blobs, d), "wb").write(data)
    return "sha256:" + d, len(data)
h = hashlib.sha256()
tmp = os.path.join(blobs, "layer.tmp")
with open(tmp, "wb") as f:
    for _ in range(mib):
        chunk = os.urandom(1 << 20)
        h.update(chunk)
        f.write(chunk)
ldig = h.hexdigest()
os.rename(tmp, os.path.join(blobs, ldig))
open(os.path.join(work, "plain.sha256"), "w").write(ldig)
cfg = json.dumps({"architecture": "amd64", "os": "linux",
                  "rootfs": {"type": "layers", "diff_ids": ["sha256:" + ldig]}}).encode()
cdig, clen = put(cfg)
man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                  "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdig, "size": clen},
                  "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                              "digest": "sha256:" + ldig, "size": mib << 20}]}).encode()
mdig, mlen = put(man)
open(os.path.join(lay, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
           "digest": mdig, "size": mlen, "annotations": {"org.opencontainers.image.ref.name": "v1"}}]},
          open(os.path.join(lay, "index.json"), "w"))
PY

"$BIN/imgcrypt" encrypt -q --recipient "jwe:$WORK/pub.pem" "oci:$WORK/src:v1" "oci:$WORK/enc:v1"
rm -rf "$WORK/src"

python3 - "$WORK" "${DECODER:-$BIN/imgcrypt-decoder}" <<'PY'
import hashlib, json, os, resource, subprocess, sys, time
work, decoder = sys.argv[1], sys.argv[2]
enc = os.path.join(work, "enc")
blob = lambda d: os.path.join(enc, "blobs", "sha256", d.split(":", 1)[1])
index = json.load(open(os.path.join(enc, "index.json")))
man = json.load(open(blob(index["manifests"][0]["digest"])))
layer = man["layers"][0]
def varint(n):
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
value = json.dumps({"DecryptConfig": {"Parameters": None}, "Descriptor": layer}).encode()
url = b"io.containerd.ocicrypt.v1.Payload"
payload = b"\x0a" + varint(len(url)) + url + b"\x12" + varint(len(value)) + value
ppath = os.path.join(work, "payload")
open(ppath, "wb").write(payload)
want = open(os.path.join(work, "plain.sha256")).read()
size = layer["size"]
print(f"layer: {size >> 20} MiB, {layer['mediaType']}")
for mode in (["--spool-dir", os.path.join(work, "spool")], ["--stream"]):
    pfd = os.open(ppath, os.O_RDONLY)
    def fd3():
        if pfd != 3:
            os.dup2(pfd, 3)
        os.set_inheritable(3, True)  # dup2(3, 3) would leave close-on-exec set
    env = dict(os.environ, STREAM_PROCESSOR_MEDIATYPE=layer["mediaType"])
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = ru0.ru_maxrss
    t0 = time.monotonic()
    out_path = os.path.join(work, "out")
    # stdout goes to a file (on the work directory's file system), hashed after the run, so the
    # time and CPU measured are the decoder's alone.
    with open(blob(layer["digest"]), "rb") as stdin, open(out_path, "wb") as out:
        p = subprocess.Popen([decoder, "--decryption-keys-path", os.path.join(work, "keys")] + mode,
                             stdin=stdin, stdout=out, stderr=subprocess.PIPE,
                             preexec_fn=fd3, close_fds=False, env=env)
        err = p.stderr.read().decode()
        rc = p.wait()
    dt = time.monotonic() - t0
    os.close(pfd)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss = ru1.ru_maxrss
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    assert rc == 0, f"decoder failed: {err}"
    h = hashlib.sha256()
    n = 0
    with open(out_path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    os.remove(out_path)
    assert n == size and h.hexdigest() == want, "plaintext digest mismatch"
    peak = f"{rss} KiB" if rss > before else f"<= {before} KiB (not above an earlier child)"
    print(f"{' '.join(mode):<40} peak RSS {peak}, {n / dt / 2**20:.0f} MiB/s ({dt:.2f} s wall, {cpu:.2f} s CPU)")
PY
