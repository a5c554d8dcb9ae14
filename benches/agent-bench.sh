#!/usr/bin/env bash
# keysync-agent benchmark: the real agent binary against the Kubernetes API stand-in and the Key
# Protect emulator (both in the agent-bench process, on 127.0.0.1). Prints Secret -> file latency
# (p50/p99), a burst of N Secrets, N deletions, the agent's peak RSS and the Key Protect unwrap
# count, each against its target; the last line on stdout is the figures as JSON.
#
#   benches/agent-bench.sh [--secrets 1000] [--latency-samples 200] [--kp-distinct 50] [--kp-copies 2]
#
# Environment: KEYSYNC_AGENT, AGENT_BENCH (binaries; default: built here with --release).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ -z "${KEYSYNC_AGENT:-}" ] || [ -z "${AGENT_BENCH:-}" ]; then
    echo "# building keysync-agent and agent-bench (release)" >&2
    (cd "$ROOT" && cargo build --release --quiet -p keysync-agent --bin keysync-agent -p imgcrypt-benches --bin agent-bench) >&2
fi
KEYSYNC_AGENT="${KEYSYNC_AGENT:-$TARGET_DIR/release/keysync-agent}"
AGENT_BENCH="${AGENT_BENCH:-$TARGET_DIR/release/agent-bench}"
[ -x "$KEYSYNC_AGENT" ] || { echo "agent-bench.sh: $KEYSYNC_AGENT not found" >&2; exit 1; }
echo "# $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
exec timeout 600 "$AGENT_BENCH" --agent "$KEYSYNC_AGENT" "$@"
