#!/usr/bin/env bash
# Runs every test of sandbox-bridge against a real Apache Kafka broker:
# installs missing system packages, fetches Kafka (cached under
# ~/.cache/sandbox-bridge), starts a fresh single-node broker on loopback,
# builds, runs `cargo test`, and stops the broker again.
#
#   scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
scripts/kafka.sh fetch

name="test-$$"
port="${SANDBOX_BRIDGE_TEST_PORT:-39192}"
cleanup() { scripts/kafka.sh clean --name "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
bootstrap=$(scripts/kafka.sh start --name "$name" --port "$port" | tail -n 1)
export SANDBOX_BRIDGE_TEST_BOOTSTRAP="$bootstrap"
echo "test broker: $bootstrap" >&2

cargo build --all-targets
cargo test --all-targets "$@"
# Dashboards, alert rules (promtool check + unit tests) and docker-compose.
scripts/check-observability.sh
