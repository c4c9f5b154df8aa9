#!/usr/bin/env bash
# The rescan consumer benchmark: the KTIP simulator answering every call
# after 50 ms, `sandbox-bridge rescan` with max_in_flight 32, N pre-published
# requests; throughput as a ratio to the ceiling max_in_flight / latency
# (640 requests/s), CPU cores and peak RSS of the rescan process, and a check
# that every request got exactly one committed result.
#
#   scripts/bench-rescan.sh [--requests N] [--runs R] [--latency-ms MS] ...
#   scripts/bench-rescan.sh --help   (every option; see also bench/README.md)
#
# Self-contained: installs missing Debian packages (scripts/setup.sh), the
# Python venv with bench/requirements.txt under $CACHE/bench-venv (shared
# with scripts/bench.sh), builds the release binary, starts its own Kafka
# broker under a unique name on free ports and deletes it (topics included)
# on exit, even on Ctrl-C (scripts/bench-broker.sh). Logs, configs and results.json go to
# /tmp/sandbox-bridge-bench/rescan-<run>/. ($CACHE = ${SANDBOX_BRIDGE_CACHE:-~/.cache/sandbox-bridge})
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${SANDBOX_BRIDGE_CACHE:-$HOME/.cache/sandbox-bridge}
venv=$cache/bench-venv

say() { printf '[bench-rescan.sh] %s\n' "$*" >&2; }

# shellcheck source=scripts/bench-broker.sh
. scripts/bench-broker.sh

for a in "$@"; do
  if [[ $a == -h || $a == --help ]]; then
    exec python3 bench/bench_rescan.py --help
  fi
done

SECONDS=0
scripts/setup.sh
scripts/bench-venv.sh
say "building sandbox-bridge (release)"
cargo build --release --quiet
start_bench_broker bench-rescan

status=0
"$venv/bin/python" bench/bench_rescan.py --bootstrap "$bootstrap" --broker-pid "${broker_pid:-0}" \
  --bin target/release/sandbox-bridge "$@" || status=$?
say "done in $((SECONDS / 60)) min $((SECONDS % 60)) s (exit $status)"
exit "$status"
