#!/usr/bin/env bash
# A cluster in one machine: N keysync-agent processes (one per simulated node, own target
# directory) against one Kubernetes API stand-in and one Key Protect emulator (both in the
# cluster-bench process, on 127.0.0.1). Prints rollout convergence, unwraps per node per
# ciphertext, a kp-key under 429 + Retry-After, a delete, an API server restart with compaction,
# API requests per node and peak RSS per agent; the last line on stdout is the figures as JSON.
#
#   benches/cluster-bench.sh [--nodes 40] [--keys 200] [--kp-keys 10] [--kms-jitter 5s]
#   benches/cluster-bench.sh --smoke      # CI: 4 nodes, 20 + 2 Secrets, the debug build
#
# Environment: KEYSYNC_AGENT, CLUSTER_BENCH (binaries; default: built here with --release, or
# the debug build for --smoke).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
profile=release
args=()
for a in "$@"; do
    if [ "$a" = --smoke ]; then
        profile=debug
        args+=(--nodes 4 --keys 20 --kp-keys 2 --timeout-secs 120)
    else
        args+=("$a")
    fi
done
if [ -z "${KEYSYNC_AGENT:-}" ] || [ -z "${CLUSTER_BENCH:-}" ]; then
    echo "# building keysync-agent and cluster-bench ($profile)" >&2
    flag=()
    [ "$profile" = release ] && flag=(--release)
    (cd "$ROOT" && cargo build "${flag[@]}" --quiet -p keysync-agent --bin keysync-agent -p imgcrypt-benches --bin cluster-bench) >&2
fi
KEYSYNC_AGENT="${KEYSYNC_AGENT:-$TARGET_DIR/$profile/keysync-agent}"
CLUSTER_BENCH="${CLUSTER_BENCH:-$TARGET_DIR/$profile/cluster-bench}"
[ -x "$KEYSYNC_AGENT" ] || { echo "cluster-bench.sh: $KEYSYNC_AGENT not found" >&2; exit 1; }
echo "# $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
# Each agent holds a few file descriptors; 40 agents and the stand-in's connections fit easily.
exec timeout 900 "$CLUSTER_BENCH" --agent "$KEYSYNC_AGENT" "${args[@]}"
