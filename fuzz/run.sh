#!/usr/bin/env bash
# Fuzzes every target (or the ones named) for SECONDS each, one at a time, single process, and
# prints per target: executions, executions per second, new corpus entries and findings.
#
#   fuzz/run.sh SECONDS [TARGET...]
#
# Needs the nightly toolchain (`cargo +nightly`) and cargo-fuzz (installed here when missing:
# cargo install cargo-fuzz --locked). New inputs libFuzzer finds go to a scratch directory
# unless KEEP=1 (then into fuzz/corpus/TARGET: minimize before committing, keep it small).
# A finding (crash, timeout, out-of-memory) is saved by libFuzzer under fuzz/artifacts/TARGET/;
# the script exits 1 if any target had one. Reproduce: cargo +nightly fuzz run TARGET FILE.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
# -a: debug assertions and overflow checks on (release optimisations kept).
cargo +nightly fuzz build -a >&2
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
status=0
printf '%-22s %12s %10s %8s %9s\n' target executions exec/s new findings
for t in "${targets[@]}"; do
  mkdir -p "artifacts/$t"
  before=$(find "artifacts/$t" -type f | wc -l)
  if [ "${KEEP:-0}" = 1 ]; then dirs=("corpus/$t"); else mkdir -p "$scratch/$t"; dirs=("$scratch/$t" "corpus/$t"); fi
  log="$scratch/$t.log"
  rc=0
  cargo +nightly fuzz run -a "$t" "${dirs[@]}" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  new=$(sed -n 's/^stat::new_units_added: *//p' "$log" | tail -1)
  found=$(( $(find "artifacts/$t" -type f | wc -l) - before ))
  if [ "$rc" -ne 0 ] || [ "$found" -gt 0 ]; then
    status=1
    echo "== $t: exit $rc; log tail:" >&2
    tail -30 "$log" >&2
  fi
  printf '%-22s %12s %10s %8s %9s\n' "$t" "${execs:-?}" "${rate:-?}" "${new:-?}" "$found"
done
exit $status
