#!/usr/bin/env bash
# The benchmark: sandbox-bridge end to end (simulator -> worker -> Kafka,
# exactly-once) against `lbzip2 -dc -n 2` (decode only) and a straightforward
# Python bridge (bench/python_bridge.py), on the same simulated minutes; then
# sandbox-bridge's peak RSS on one minute that decodes to about 1 GB.
#
#   scripts/bench.sh [--minutes N] [--seed S] [--skip-python] [--skip-rss] ...
#   scripts/bench.sh --help          (every option; see also bench/README.md)
#
# Self-contained: installs missing Debian packages (scripts/setup.sh), a
# Python venv with bench/requirements.txt under $CACHE/bench-venv, builds the
# release binary, starts its own Kafka broker under a unique name on free
# ports and deletes it (topics included) on exit, even on Ctrl-C. Batches are
# cached in $CACHE/bench-batches; logs and results.json go to
# /tmp/sandbox-bridge-bench/<run>/. ($CACHE = ${SANDBOX_BRIDGE_CACHE:-~/.cache/sandbox-bridge})
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${SANDBOX_BRIDGE_CACHE:-$HOME/.cache/sandbox-bridge}
venv=$cache/bench-venv

say() { printf '[bench.sh] %s\n' "$*" >&2; }

# shellcheck source=scripts/bench-broker.sh
. scripts/bench-broker.sh

for a in "$@"; do
  if [[ $a == -h || $a == --help ]]; then
    exec python3 bench/bench.py --help
  fi
done

SECONDS=0
scripts/setup.sh
if [[ ! -x /usr/bin/time ]]; then
  say "installing GNU time (for peak RSS)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null
fi
scripts/bench-venv.sh
# The decoder may be edited while we build: hash it around the build and
# build again until both hashes agree, so the report names what was measured.
decode_sha() { sha256sum src/feed/decode.rs | cut -c1-12; }
for attempt in 1 2 3; do
  before=$(decode_sha)
  say "building sandbox-bridge (release; src/feed/decode.rs $before)"
  cargo build --release --quiet
  [[ $(decode_sha) == "$before" ]] && break
  say "src/feed/decode.rs changed during the build; building again"
done
export BENCH_BUILT_DECODE_RS_SHA=$before
start_bench_broker bench

status=0
"$venv/bin/python" bench/bench.py --bootstrap "$bootstrap" --broker-pid "${broker_pid:-0}" \
  --bin target/release/sandbox-bridge "$@" || status=$?
say "done in $((SECONDS / 60)) min $((SECONDS % 60)) s (exit $status)"
exit "$status"
