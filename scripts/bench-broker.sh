# Sourced by the benchmark scripts (scripts/bench.sh, scripts/bench-rescan.sh):
# a Kafka broker of their own, under a unique name on free loopback ports,
# deleted (topics included) when the script exits, even on Ctrl-C.
#
#   start_bench_broker PREFIX    sets $bootstrap and $broker_pid
#
# Needs the caller's `say` and the working directory at the repository root.

# A port P with P and P+1 (the controller) both free.
free_port_pair() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 30000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null &&
      ! (exec 3<>"/dev/tcp/127.0.0.1/$((p + 1))") 2>/dev/null; then
      echo "$p"
      return
    fi
  done
  return 1
}

start_bench_broker() {
  bench_broker_name="$1-$(date +%s)-$$"
  local port
  port=$(free_port_pair)
  trap 'say "deleting broker $bench_broker_name"; scripts/kafka.sh clean --name "$bench_broker_name" >/dev/null 2>&1 || true' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  scripts/kafka.sh fetch >&2
  say "starting Kafka broker $bench_broker_name on 127.0.0.1:$port"
  bootstrap=$(scripts/kafka.sh start --name "$bench_broker_name" --port "$port" | tail -n 1)
  broker_pid=$(scripts/kafka.sh status --name "$bench_broker_name" | grep -o 'pid=[0-9]*' | cut -d= -f2 || true)
}
