#!/usr/bin/env bash
# The benchmarks' Python venv (bench/requirements.txt) under
# ${SANDBOX_BRIDGE_CACHE:-~/.cache/sandbox-bridge}/bench-venv: created or
# rebuilt when the requirements change, else reused. Used by scripts/bench.sh
# and scripts/bench-rescan.sh.
#
#   scripts/bench-venv.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${SANDBOX_BRIDGE_CACHE:-$HOME/.cache/sandbox-bridge}
venv=$cache/bench-venv
stamp=$venv/.requirements.sha256
want=$(sha256sum bench/requirements.txt | cut -d' ' -f1)
if [[ -x $venv/bin/python && -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  echo "[bench-venv] installing python3-venv" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
echo "[bench-venv] creating the Python venv in $venv" >&2
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r bench/requirements.txt
echo "$want" >"$stamp"
