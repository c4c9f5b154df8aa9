#!/usr/bin/env bash
# Fetch and run a real single-node Apache Kafka (KRaft) broker for the tests,
# the demo and the benchmarks of sandbox-bridge. Run with no arguments for help.
#
# Kafka comes from Maven Central (through `mvn`), is cached outside the
# checkout, and every broker runs from its own runtime directory.
set -euo pipefail

readonly KAFKA_VERSION=4.1.1
readonly LOG4J_VERSION=2.24.3
readonly DEPENDENCY_PLUGIN=org.apache.maven.plugins:maven-dependency-plugin:3.8.1
readonly MARKER_PROP=sandbox.bridge.kafka

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
readonly TEMPLATE_DIR="$SCRIPT_DIR/kafka"
readonly CACHE_ROOT="${SANDBOX_BRIDGE_CACHE:-$HOME/.cache/sandbox-bridge}"
readonly KAFKA_HOME="$CACHE_ROOT/kafka-$KAFKA_VERSION"
readonly LIBS_DIR="$KAFKA_HOME/libs"
readonly RUN_ROOT="${SANDBOX_BRIDGE_RUN:-/tmp/sandbox-bridge-kafka}"
readonly LOCK_DIR="$RUN_ROOT/.locks"

usage() {
    cat <<EOF
Usage: scripts/kafka.sh COMMAND [OPTIONS]

Fetch and run a single-node Apache Kafka $KAFKA_VERSION broker (KRaft, combined
broker+controller, node.id=1, PLAINTEXT on 127.0.0.1) for tests and benchmarks.

Commands:
  fetch
      Download the Kafka jars from Maven Central (via mvn) into
      $LIBS_DIR
      once. Idempotent, safe to run concurrently, atomic. Installs maven and a
      Java runtime with apt-get if they are missing.

  start --name NAME --port PORT [--controller-port CPORT] [--dir DIR]
        [--timeout SECS] [--set KEY=VALUE]...
      Start broker NAME listening on 127.0.0.1:PORT (controller on
      127.0.0.1:CPORT, default PORT+1) and wait until it answers Kafka
      requests. Runs fetch first if needed. Storage is formatted only on the
      first start of DIR, so stop+start keeps topics and data. --set adds or
      overrides a broker property (repeatable). Prints the bootstrap address
      127.0.0.1:PORT as the last line of stdout. The broker keeps running
      after this script exits; its output goes to DIR/server.log.
      If NAME is already running on the same ports and answers requests,
      start does nothing and prints the bootstrap address again (new --set
      values are NOT applied then); on other ports it is an error.

  stop --name NAME [--dir DIR]
      SIGTERM, wait up to \$SANDBOX_BRIDGE_KAFKA_STOP_TIMEOUT (30) s, then
      SIGKILL. Succeeds if NAME is not running. Keeps the data.
  kill --name NAME [--dir DIR]
      SIGKILL at once (crash tests). Succeeds if NAME is not running.
  status --name NAME [--dir DIR]
      Exit 0 and print pid, bootstrap and dir if NAME is running, else exit 1.
  clean --name NAME [--dir DIR]
      Stop NAME and delete its runtime directory.
  list
      Print the brokers started by this script that are running now.
  tool CLASS [ARGS...]
      Run a Kafka tool class with the cached classpath, e.g.
        scripts/kafka.sh tool org.apache.kafka.tools.TopicCommand \\
            --bootstrap-server 127.0.0.1:9092 --list
      Other useful classes: org.apache.kafka.tools.ProducerPerformance,
      org.apache.kafka.tools.ConsumerPerformance,
      org.apache.kafka.tools.consumer.ConsoleConsumer,
      org.apache.kafka.tools.ConsoleProducer, org.apache.kafka.tools.GroupsCommand,
      org.apache.kafka.tools.consumer.group.ConsumerGroupCommand.
  help
      Show this text.

NAME is [A-Za-z0-9][A-Za-z0-9._-]* and identifies the broker on this machine
(its java command line carries -D$MARKER_PROP=NAME, so stop/kill/clean find
it even without a pid file). DIR defaults to \$SANDBOX_BRIDGE_RUN/NAME and
holds server.properties, log4j2.properties, data/, kafka.pid and server.log.

Environment:
  SANDBOX_BRIDGE_CACHE               cache root (default ~/.cache/sandbox-bridge)
  SANDBOX_BRIDGE_RUN                 runtime root (default /tmp/sandbox-bridge-kafka)
  SANDBOX_BRIDGE_KAFKA_START_TIMEOUT start timeout in seconds (default 120)
  SANDBOX_BRIDGE_KAFKA_STOP_TIMEOUT  stop grace period in seconds (default 30)
  SANDBOX_BRIDGE_KAFKA_HEAP          broker heap options (default -Xms1g -Xmx1g)
  SANDBOX_BRIDGE_KAFKA_JAVA_OPTS     extra JVM options for the broker
  SANDBOX_BRIDGE_KAFKA_TOOL_HEAP     heap options for 'tool' (default -Xmx512m)
  JAVA_HOME                          java to use (default: java on PATH)
EOF
}

# ---------------------------------------------------------------- helpers

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() {
    printf 'kafka.sh: error: %s\n' "$*" >&2
    exit 1
}
usage_error() {
    printf 'kafka.sh: %s\n' "$*" >&2
    printf "Run 'scripts/kafka.sh help' for usage.\n" >&2
    exit 2
}

java_bin() {
    if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
        printf '%s\n' "$JAVA_HOME/bin/java"
    else
        command -v java || true
    fi
}

# Install Debian packages as root, or through sudo when that is available.
apt_install() {
    local -a sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 ||
            die "need root or sudo to install: $* (install them by hand)"
        sudo=(sudo)
    fi
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install by hand: $*"
    log "installing $* with apt-get"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2
}

# Make sure java (17 or newer, as Kafka 4 requires) is available.
ensure_java() {
    local java
    java=$(java_bin)
    if [[ -z "$java" ]]; then
        apt_install openjdk-17-jre-headless
        java=$(java_bin)
        [[ -n "$java" ]] || die "java still not found after installing it"
    fi
    local version major
    version=$("$java" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p;T;q' || true)
    major=${version%%.*}
    if [[ "$major" =~ ^[0-9]+$ ]] && ((major < 17)); then
        die "Kafka $KAFKA_VERSION needs Java 17 or newer, found $version at $java (set JAVA_HOME)"
    fi
}

ensure_maven() {
    if ! command -v mvn >/dev/null 2>&1; then
        apt_install maven
        command -v mvn >/dev/null 2>&1 || die "mvn still not found after installing maven"
    fi
}

libs_ready() {
    [[ -f "$LIBS_DIR/kafka_2.13-$KAFKA_VERSION.jar" && -f "$LIBS_DIR/kafka-tools-$KAFKA_VERSION.jar" ]]
}

validate_name() {
    [[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
        usage_error "invalid --name '$1' (use letters, digits, '.', '_', '-')"
}

validate_port() {
    local what=$1 value=$2
    if ! [[ "$value" =~ ^[0-9]{1,5}$ ]] || ((10#$value < 1 || 10#$value > 65535)); then
        usage_error "invalid $what '$value' (expected 1-65535)"
    fi
}

# Is the process alive (and not a zombie)?
pid_alive() {
    local pid=$1 state
    [[ -n "$pid" ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    state=$(sed -n 's/^[0-9]* (.*) \([A-Za-z]\) .*/\1/p' "/proc/$pid/stat" 2>/dev/null || true)
    [[ "$state" != "Z" && "$state" != "X" ]]
}

# Does the process carry our marker for NAME on its command line?
pid_is_broker() {
    local pid=$1 name=$2
    pid_alive "$pid" || return 1
    # No `| grep -q`: with pipefail an early grep exit can fail the pipe.
    grep -qxF -- "-D$MARKER_PROP=$name" < <(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null)
}

# Print the runtime dir recorded on the command line of broker process PID.
proc_broker_dir() {
    tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | sed -n "s/^-D$MARKER_PROP\.dir=//p;T;q" || true
}

# Print the pids of running java processes marked with NAME.
marker_pids() {
    local name=$1 cmdline pid
    for cmdline in /proc/[0-9]*/cmdline; do
        pid=${cmdline#/proc/}
        pid=${pid%/cmdline}
        # Cheap filter first, exact check second.
        grep -qF -- "-D$MARKER_PROP=$name" "$cmdline" 2>/dev/null || continue
        if pid_is_broker "$pid" "$name"; then
            printf '%s\n' "$pid"
        fi
    done
}

# Print the pid of broker NAME if it is running (pid file first, then marker).
broker_pid() {
    local name=$1 dir=$2 pid=""
    if [[ -f "$dir/kafka.pid" ]]; then
        pid=$(<"$dir/kafka.pid")
        if [[ "$pid" =~ ^[0-9]+$ ]] && pid_is_broker "$pid" "$name"; then
            printf '%s\n' "$pid"
            return 0
        fi
    fi
    read -r pid < <(marker_pids "$name") || true
    [[ -n "$pid" ]] || return 1
    printf '%s\n' "$pid"
}

# Is something accepting TCP connections on 127.0.0.1:PORT?
port_open() {
    # shellcheck disable=SC2016 # $1 is expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# Send a Kafka ApiVersions v0 request and check for a successful answer, so
# "ready" means the broker really processes client requests.
kafka_answers() {
    local port=$1 reply
    # shellcheck disable=SC2016 # $1 is expanded by the inner bash
    reply=$(timeout 5 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        # size=10, api_key=18 (ApiVersions), api_version=0, correlation_id=1,
        # client_id="" (length 0)
        printf "\x00\x00\x00\x0a\x00\x12\x00\x00\x00\x00\x00\x01\x00\x00" >&3
        head -c 10 <&3 | od -An -v -tx1
    ' _ "$port" 2>/dev/null) || return 1
    reply=$(printf '%s' "$reply" | tr -d ' \n')
    # 4 bytes size, then correlation_id=1, then error_code=0.
    [[ ${#reply} -eq 20 && "${reply:8:12}" == "000000010000" ]]
}

print_log_tail() {
    local dir=$1 lines=${2:-60} offset=${3:-1}
    if [[ -f "$dir/server.log" ]]; then
        # The first errors of this run, which a long stack trace can push out
        # of the tail.
        tail -c +"$offset" "$dir/server.log" | grep -m 5 -E '^\[[^]]*\] (ERROR|FATAL) ' |
            sed 's/^/kafka.sh: broker log: /' >&2 || true
        printf -- '--- last %s lines of %s ---\n' "$lines" "$dir/server.log" >&2
        tail -n "$lines" "$dir/server.log" >&2 || true
        printf -- '--- end of %s ---\n' "$dir/server.log" >&2
    else
        printf 'kafka.sh: (no %s yet)\n' "$dir/server.log" >&2
    fi
}

# Take the per-NAME lock on fd 9 (released when this script exits).
lock_name() {
    local name=$1
    mkdir -p "$LOCK_DIR"
    exec 9>"$LOCK_DIR/$name.lock"
    if ! flock -w 300 9; then
        die "timed out waiting for the lock $LOCK_DIR/$name.lock (another kafka.sh on '$name'?)"
    fi
}

read_state() {
    # Sets STATE_PORT and STATE_CONTROLLER_PORT from DIR/broker.env if present.
    local dir=$1 key value
    STATE_PORT=""
    STATE_CONTROLLER_PORT=""
    [[ -f "$dir/broker.env" ]] || return 0
    while IFS='=' read -r key value; do
        case "$key" in
            PORT) STATE_PORT=$value ;;
            CONTROLLER_PORT) STATE_CONTROLLER_PORT=$value ;;
        esac
    done <"$dir/broker.env"
}

# ---------------------------------------------------------------- fetch

FETCH_TMP=""
FETCH_MVN_PID=""

fetch_cleanup() {
    if [[ -n "$FETCH_MVN_PID" ]]; then
        kill -TERM "$FETCH_MVN_PID" 2>/dev/null || true
        wait "$FETCH_MVN_PID" 2>/dev/null || true
        FETCH_MVN_PID=""
    fi
    if [[ -n "$FETCH_TMP" ]]; then
        rm -rf "$FETCH_TMP"
        FETCH_TMP=""
    fi
}

cmd_fetch() {
    (($# == 0)) || usage_error "fetch takes no arguments"
    ensure_java
    libs_ready && return 0
    ensure_maven
    mkdir -p "$CACHE_ROOT"
    local lock="$CACHE_ROOT/kafka-$KAFKA_VERSION.lock"
    exec 8>"$lock"
    flock -w 900 8 || die "timed out waiting for $lock"
    if libs_ready; then
        exec 8>&-
        return 0
    fi
    mkdir -p "$KAFKA_HOME"
    # Leftovers of an interrupted fetch (only the lock holder creates them).
    rm -rf "$LIBS_DIR" "$KAFKA_HOME"/.fetch.*
    FETCH_TMP=$(mktemp -d "$KAFKA_HOME/.fetch.XXXXXX")
    FETCH_MVN_PID=""
    trap fetch_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    local tmp=$FETCH_TMP
    sed -e "s/@KAFKA_VERSION@/$KAFKA_VERSION/g" -e "s/@LOG4J_VERSION@/$LOG4J_VERSION/g" \
        "$TEMPLATE_DIR/pom.xml.in" >"$tmp/pom.xml"
    log "fetching Kafka $KAFKA_VERSION jars from Maven Central into $LIBS_DIR"
    local start=$SECONDS rc=0
    # In the background so that an interrupt can stop mvn too (fetch_cleanup).
    mvn -B -q -f "$tmp/pom.xml" "$DEPENDENCY_PLUGIN:copy-dependencies" \
        -DoutputDirectory="$tmp/libs" -DincludeScope=runtime >"$tmp/mvn.log" 2>&1 </dev/null &
    FETCH_MVN_PID=$!
    wait "$FETCH_MVN_PID" || rc=$?
    FETCH_MVN_PID=""
    if ((rc != 0)); then
        cat "$tmp/mvn.log" >&2
        die "mvn could not resolve the Kafka $KAFKA_VERSION jars (exit $rc, see above)"
    fi
    [[ -f "$tmp/libs/kafka_2.13-$KAFKA_VERSION.jar" && -f "$tmp/libs/kafka-tools-$KAFKA_VERSION.jar" ]] ||
        die "mvn finished but the Kafka jars are missing in $tmp/libs"
    # The rename is the commit point: libs/ exists only when it is complete.
    mv -T "$tmp/libs" "$LIBS_DIR"
    fetch_cleanup
    trap - EXIT INT TERM
    exec 8>&-
    log "fetched $(find "$LIBS_DIR" -name '*.jar' | wc -l) jars in $((SECONDS - start)) s"
}

# ---------------------------------------------------------------- start

cmd_start() {
    local name="" port="" cport="" dir="" timeout="${SANDBOX_BRIDGE_KAFKA_START_TIMEOUT:-120}"
    local -a overrides=()
    while (($#)); do
        case "$1" in
            --name) name=${2-}; shift 2 || usage_error "--name needs a value" ;;
            --port) port=${2-}; shift 2 || usage_error "--port needs a value" ;;
            --controller-port) cport=${2-}; shift 2 || usage_error "--controller-port needs a value" ;;
            --dir) dir=${2-}; shift 2 || usage_error "--dir needs a value" ;;
            --timeout) timeout=${2-}; shift 2 || usage_error "--timeout needs a value" ;;
            --set)
                [[ "${2-}" == *=* ]] || usage_error "--set needs KEY=VALUE"
                overrides+=("$2")
                shift 2
                ;;
            *) usage_error "start: unknown argument '$1'" ;;
        esac
    done
    [[ -n "$name" ]] || usage_error "start needs --name NAME"
    [[ -n "$port" ]] || usage_error "start needs --port PORT"
    validate_name "$name"
    validate_port --port "$port"
    port=$((10#$port))
    if [[ -z "$cport" ]]; then
        cport=$((port + 1))
    fi
    validate_port --controller-port "$cport"
    cport=$((10#$cport))
    ((cport != port)) || usage_error "--controller-port must differ from --port"
    if ! [[ "$timeout" =~ ^[0-9]{1,6}$ ]] || ((10#$timeout == 0)); then
        usage_error "invalid --timeout '$timeout' (expected seconds > 0)"
    fi
    timeout=$((10#$timeout))
    dir=${dir:-$RUN_ROOT/$name}

    cmd_fetch
    lock_name "$name"
    mkdir -p "$dir"
    dir=$(cd -- "$dir" && pwd)

    local pid
    if pid=$(broker_pid "$name" "$dir"); then
        read_state "$dir"
        if [[ "$STATE_PORT" == "$port" && "$STATE_CONTROLLER_PORT" == "$cport" ]] && kafka_answers "$port"; then
            log "broker '$name' is already running (pid $pid) on 127.0.0.1:$port; leaving it as it is"
            printf '127.0.0.1:%s\n' "$port"
            return 0
        fi
        die "broker '$name' is already running (pid $pid, port ${STATE_PORT:-unknown}); stop it first: scripts/kafka.sh stop --name $name"
    fi

    local p
    for p in "$port" "$cport"; do
        if port_open "$p"; then
            die "port 127.0.0.1:$p is already in use by another process (choose another --port/--controller-port)"
        fi
    done

    local java
    java=$(java_bin)
    local config="$dir/server.properties"
    local data="$dir/data"

    # Config: template with placeholders, then --set overrides appended (the
    # last value of a key wins in a Java properties file).
    local tpl
    tpl=$(<"$TEMPLATE_DIR/server.properties.in")
    tpl=${tpl//@NAME@/"$name"}
    tpl=${tpl//@PORT@/"$port"}
    tpl=${tpl//@CONTROLLER_PORT@/"$cport"}
    tpl=${tpl//@DATA_DIR@/"$data"}
    {
        printf '%s\n' "$tpl"
        if ((${#overrides[@]})); then
            printf '\n# Overrides from scripts/kafka.sh start --set\n'
            printf '%s\n' "${overrides[@]}"
        fi
    } >"$config.tmp"
    mv -f "$config.tmp" "$config"
    cp -f "$TEMPLATE_DIR/log4j2.properties" "$dir/log4j2.properties"
    printf 'PORT=%s\nCONTROLLER_PORT=%s\n' "$port" "$cport" >"$dir/broker.env"

    local -a log_opts=(
        "-Dlog4j2.configurationFile=file:$dir/log4j2.properties"
        "-Dkafka.logs.dir=$dir"
    )

    # Format storage once per runtime dir. The .formatted marker is written
    # only after a successful format, so an interrupted one is redone.
    if [[ ! -f "$dir/.formatted" ]]; then
        rm -rf "$data"
        mkdir -p "$data"
        local cluster_id
        cluster_id=$(new_cluster_id)
        log "formatting storage of '$name' in $data (cluster id $cluster_id)"
        if ! "$java" -Xmx256m "${log_opts[@]}" -cp "$LIBS_DIR/*" kafka.tools.StorageTool \
            format -t "$cluster_id" -c "$config" >>"$dir/server.log" 2>&1 </dev/null; then
            print_log_tail "$dir" 30
            die "formatting the storage of '$name' failed"
        fi
        touch "$dir/.formatted"
    fi

    local heap="${SANDBOX_BRIDGE_KAFKA_HEAP:--Xms1g -Xmx1g}"
    local -a heap_opts extra_opts=()
    read -r -a heap_opts <<<"$heap"
    if [[ -n "${SANDBOX_BRIDGE_KAFKA_JAVA_OPTS:-}" ]]; then
        read -r -a extra_opts <<<"$SANDBOX_BRIDGE_KAFKA_JAVA_OPTS"
    fi

    local log_offset=0
    if [[ -f "$dir/server.log" ]]; then
        log_offset=$(stat -c %s "$dir/server.log")
    fi
    printf '\n==== kafka.sh start %s on 127.0.0.1:%s at %s ====\n' "$name" "$port" "$(date -Is)" >>"$dir/server.log"
    log_offset=$((log_offset + 1))

    local started=$SECONDS t0=${EPOCHREALTIME/[.,]/}
    # New session (setsid), stdin from /dev/null, all output to server.log and
    # every other inherited fd (our lock, a caller's pipes) closed: the broker
    # outlives this script and never holds the caller's pipes open.
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            if ((fd > 2)); then
                eval "exec ${fd}>&-"
            fi
        done
        exec setsid "$java" "-D$MARKER_PROP=$name" "-D$MARKER_PROP.dir=$dir" \
            "${heap_opts[@]}" \
            -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
            -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
            "${log_opts[@]}" \
            "${extra_opts[@]}" \
            -cp "$LIBS_DIR/*" kafka.Kafka "$config"
    ) </dev/null >>"$dir/server.log" 2>&1 &
    pid=$!
    # setsid normally execs java in place; if it forked, find java by marker.
    if ! pid_is_broker "$pid" "$name"; then
        sleep 0.5
        read -r pid < <(marker_pids "$name") || true
        pid=${pid:-$!}
    fi
    printf '%s\n' "$pid" >"$dir/kafka.pid"

    log "started '$name' (pid $pid), waiting up to ${timeout}s for 127.0.0.1:$port"
    local logged=no
    while :; do
        if ! pid_alive "$pid"; then
            print_log_tail "$dir" 60 "$log_offset"
            rm -f "$dir/kafka.pid"
            die "broker '$name' exited during startup (full log: $dir/server.log)"
        fi
        if [[ $logged == no ]] && grep -q 'Kafka Server started' < <(tail -c +"$log_offset" "$dir/server.log"); then
            logged=yes
        fi
        if [[ $logged == yes ]] && kafka_answers "$port"; then
            break
        fi
        if ((SECONDS - started >= timeout)); then
            print_log_tail "$dir" 60 "$log_offset"
            kill -KILL "$pid" 2>/dev/null || true
            wait_gone "$pid" 10 || true
            rm -f "$dir/kafka.pid"
            die "broker '$name' was not ready after ${timeout}s; killed it (full log: $dir/server.log)"
        fi
        sleep 0.25
    done
    local ms=$(((${EPOCHREALTIME/[.,]/} - t0) / 1000))
    log "broker '$name' ready on 127.0.0.1:$port after $((ms / 1000)).$(printf '%03d' $((ms % 1000))) s (log: $dir/server.log)"
    printf '127.0.0.1:%s\n' "$port"
}

# A Kafka cluster id: 16 random bytes, URL-safe base64 without padding.
new_cluster_id() {
    local id
    while :; do
        id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
        [[ "$id" == -* ]] || break
    done
    printf '%s\n' "$id"
}

# ---------------------------------------------------------------- stop etc.

# Parse --name NAME [--dir DIR]; sets NAME and DIR.
parse_name_dir() {
    local cmd=$1
    shift
    NAME=""
    DIR=""
    while (($#)); do
        case "$1" in
            --name) NAME=${2-}; shift 2 || usage_error "--name needs a value" ;;
            --dir) DIR=${2-}; shift 2 || usage_error "--dir needs a value" ;;
            *) usage_error "$cmd: unknown argument '$1'" ;;
        esac
    done
    [[ -n "$NAME" ]] || usage_error "$cmd needs --name NAME"
    validate_name "$NAME"
    DIR=${DIR:-$RUN_ROOT/$NAME}
}

wait_gone() {
    local pid=$1 seconds=$2 deadline
    deadline=$((SECONDS + seconds))
    while pid_alive "$pid"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# Stop every process of broker NAME with SIG (TERM: graceful, KILL: crash).
stop_broker() {
    local name=$1 dir=$2 sig=$3
    local grace="${SANDBOX_BRIDGE_KAFKA_STOP_TIMEOUT:-30}"
    local -a pids=()
    local pid
    if [[ -f "$dir/kafka.pid" ]]; then
        pid=$(<"$dir/kafka.pid")
        if [[ "$pid" =~ ^[0-9]+$ ]] && pid_is_broker "$pid" "$name"; then
            pids+=("$pid")
        fi
    fi
    while read -r pid; do
        [[ -n "$pid" && " ${pids[*]-} " != *" $pid "* ]] && pids+=("$pid")
    done < <(marker_pids "$name")
    if ((${#pids[@]} == 0)); then
        rm -f "$dir/kafka.pid"
        log "broker '$name' is not running"
        return 0
    fi
    local started=$SECONDS
    local -a dirs=("$dir")
    for pid in "${pids[@]}"; do
        dirs+=("$(proc_broker_dir "$pid")")
        if [[ $sig == TERM ]]; then
            log "stopping '$name' (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            if ! wait_gone "$pid" "$grace"; then
                log "'$name' (pid $pid) did not stop within ${grace}s; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
                wait_gone "$pid" 10 || die "could not kill pid $pid"
            fi
        else
            log "killing '$name' (pid $pid) with SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            wait_gone "$pid" 10 || die "could not kill pid $pid"
        fi
    done
    local d
    for d in "${dirs[@]}"; do
        if [[ -n "$d" ]]; then
            rm -f "$d/kafka.pid"
        fi
    done
    log "broker '$name' stopped in $((SECONDS - started)) s"
}

cmd_stop() {
    parse_name_dir stop "$@"
    lock_name "$NAME"
    stop_broker "$NAME" "$DIR" TERM
}

cmd_kill() {
    parse_name_dir kill "$@"
    # No lock: a crash test must be able to kill a broker at any moment.
    stop_broker "$NAME" "$DIR" KILL
}

cmd_status() {
    parse_name_dir status "$@"
    local pid
    if pid=$(broker_pid "$NAME" "$DIR"); then
        # The broker may run from another dir (other --dir/SANDBOX_BRIDGE_RUN).
        local actual
        actual=$(proc_broker_dir "$pid")
        DIR=${actual:-$DIR}
        read_state "$DIR"
        printf '%s running pid=%s bootstrap=127.0.0.1:%s dir=%s\n' \
            "$NAME" "$pid" "${STATE_PORT:-?}" "$DIR"
        return 0
    fi
    printf '%s not running\n' "$NAME"
    return 1
}

cmd_clean() {
    parse_name_dir clean "$@"
    lock_name "$NAME"
    stop_broker "$NAME" "$DIR" TERM
    if [[ -e "$DIR" ]]; then
        rm -rf -- "$DIR"
        log "deleted $DIR"
    fi
}

cmd_list() {
    (($# == 0)) || usage_error "list takes no arguments"
    local cmdline pid name
    for cmdline in /proc/[0-9]*/cmdline; do
        grep -qF -- "-D$MARKER_PROP=" "$cmdline" 2>/dev/null || continue
        pid=${cmdline#/proc/}
        pid=${pid%/cmdline}
        name=$(tr '\0' '\n' <"$cmdline" 2>/dev/null | sed -n "s/^-D$MARKER_PROP=//p;T;q" || true)
        [[ -n "$name" ]] || continue
        pid_alive "$pid" || continue
        printf '%s pid=%s\n' "$name" "$pid"
    done
}

cmd_tool() {
    (($# >= 1)) || usage_error "tool needs a CLASS"
    cmd_fetch
    local java heap="${SANDBOX_BRIDGE_KAFKA_TOOL_HEAP:--Xmx512m}"
    local -a heap_opts
    read -r -a heap_opts <<<"$heap"
    java=$(java_bin)
    exec "$java" "${heap_opts[@]}" -XX:+UseG1GC -Djava.awt.headless=true \
        "-Dlog4j2.configurationFile=file:$TEMPLATE_DIR/tools-log4j2.properties" \
        -cp "$LIBS_DIR/*" "$@"
}

main() {
    (($#)) || {
        usage >&2
        exit 2
    }
    local cmd=$1
    shift
    case "$cmd" in
        fetch) cmd_fetch "$@" ;;
        start) cmd_start "$@" ;;
        stop) cmd_stop "$@" ;;
        kill) cmd_kill "$@" ;;
        status) cmd_status "$@" ;;
        clean) cmd_clean "$@" ;;
        list) cmd_list "$@" ;;
        tool) cmd_tool "$@" ;;
        help | -h | --help) usage ;;
        *) usage_error "unknown command '$cmd'" ;;
    esac
}

main "$@"
