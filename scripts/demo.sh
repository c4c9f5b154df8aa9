#!/usr/bin/env bash
# The demo: a local Kafka broker, the built-in VirusTotal feed simulator and
# the feed worker, all on loopback. Shows records arriving on the topic and
# where the metrics are, then follows the worker's log until Ctrl-C.
#
#   scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

run_dir="${SANDBOX_BRIDGE_RUN:-/tmp/sandbox-bridge-kafka}/demo-app"
mkdir -p "$run_dir"
bin=target/release/sandbox-bridge
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  scripts/kafka.sh stop --name demo >/dev/null 2>&1 || true
  echo "demo stopped (broker data kept in ${SANDBOX_BRIDGE_RUN:-/tmp/sandbox-bridge-kafka}/demo)"
}
trap cleanup EXIT

scripts/setup.sh
scripts/kafka.sh fetch
echo "== building sandbox-bridge (release)"
cargo build --release --quiet

echo "== starting Kafka on 127.0.0.1:29092"
scripts/kafka.sh start --name demo --port 29092 >/dev/null

echo "== starting the VirusTotal feed simulator on 127.0.0.1:8480 (downloads on :8481)"
"$bin" simulate --api-listen 127.0.0.1:8480 --download-listen 127.0.0.1:8481 \
  --api-key demo-key --records-per-minute 40 --missing 3% --bad-lines 5% \
  >"$run_dir/simulator.log" 2>&1 &
pids+=($!)

echo "== starting the feed worker (config/demo.toml); log: $run_dir/worker.log"
"$bin" feed --config config/demo.toml >"$run_dir/worker.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 120); do
  grep -q "batch published" "$run_dir/worker.log" 2>/dev/null && break
  if ! kill -0 "${pids[1]}" 2>/dev/null; then cat "$run_dir/worker.log"; exit 1; fi
  sleep 1
done

echo
echo "== the first records on vt.file-behaviours (read_committed; values cut to 160 characters)"
scripts/kafka.sh tool org.apache.kafka.tools.consumer.ConsoleConsumer \
  --bootstrap-server 127.0.0.1:29092 --topic vt.file-behaviours --from-beginning \
  --isolation-level read_committed --max-messages 5 --timeout-ms 20000 \
  --property print.key=true --property print.headers=true \
  --property key.separator=' | ' 2>/dev/null | cut -c1-400 || true

echo
echo "== metrics: http://127.0.0.1:9464/metrics (also /healthz, /readyz)"
curl -s http://127.0.0.1:9464/metrics | grep -E '^sandbox_bridge_feed_(records_total|lag_seconds|batches_total|dlq_records_total)' || true
echo
echo "== following the worker log (one line per batch; a new minute every 60 s). Ctrl-C stops the demo."
tail -n 20 -f "$run_dir/worker.log"
