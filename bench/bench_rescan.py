#!/usr/bin/env python3
"""The rescan consumer benchmark (run it through scripts/bench-rescan.sh).

Given a running broker (--bootstrap), starts the KTIP simulator once
(`sandbox-bridge simulate --ktip`, answering every call after --latency),
then per round:

  1. creates fresh topics and pre-publishes --requests valid rescan
     requests with distinct task ids;
  2. starts `sandbox-bridge rescan` as its own process;
  3. reads the results topic (read_committed) until every request has a
     committed result, sampling the process's CPU time (/proc/<pid>/stat)
     at the first and at the last result, its in-flight and buffered gauges
     (/metrics) meanwhile, and its peak RSS (VmHWM) at the end;
  4. stops it (SIGTERM), reads on for --settle seconds and checks exactly
     one result per request arrived, all accepted, none in the DLQ.

Figures: requests/s from the first result to the last (the steady state,
the headline) and from process start (start-up included), each as a ratio
to the ceiling max_in_flight / latency; CPU cores of the rescan process
(CPU seconds / wall seconds) over the same two windows; peak RSS.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from benchproc import free_port, spawn, stop, stop_all

REPO = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
KTIP_USER, KTIP_PASSWORD = "demo", "demo-password"  # the simulator's defaults
START_TIMEOUT = 120  # hang guards, not timing assertions



def log(msg):
    print(f"[bench-rescan {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args():
    p = argparse.ArgumentParser(
        description="throughput and CPU of the rescan consumer (see bench/README.md)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--bootstrap", required=True, help="Kafka bootstrap address")
    p.add_argument("--broker-pid", type=int, default=0, help="the broker's pid (its CPU is reported, not counted as noise)")
    p.add_argument("--bin", default=str(REPO / "target/release/sandbox-bridge"), help="sandbox-bridge binary")
    p.add_argument("--requests", type=int, default=20_000, help="requests per round")
    p.add_argument("--runs", type=int, default=3, help="rounds (medians are reported)")
    p.add_argument("--latency-ms", type=int, default=50, help="the simulator's delay before every answer")
    p.add_argument("--max-in-flight", type=int, default=32, help="rescan.max_in_flight")
    p.add_argument("--partitions", type=int, default=6, help="partitions of the requests topic")
    p.add_argument("--rescan-setting", action="append", default=[], metavar="KEY=TOML",
                   help="extra [rescan] key for experiments, value in TOML syntax (e.g. commit_interval='\"50ms\"')")
    p.add_argument("--kafka-property", action="append", default=[], metavar="KEY=VALUE",
                   help="extra librdkafka property in [kafka.properties] for experiments (e.g. linger.ms=5)")
    p.add_argument("--quiet-wait", type=float, default=60,
                   help="before each round, wait up to this many seconds for other processes to go idle")
    p.add_argument("--settle", type=float, default=3.0, help="seconds to read on after the process stopped")
    p.add_argument("--timeout", type=float, default=900, help="give a round up after this many seconds")
    p.add_argument("--work", help="directory for logs, configs and results.json (default: a new one under /tmp)")
    return p.parse_args()


# ---------------------------------------------------------------- processes and /proc


def cpu_s(pid):
    """CPU seconds (user+sys) of a live process; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def peak_rss_kb(pid):
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
    except (OSError, AttributeError):
        return 0


def machine_busy_s():
    """CPU seconds the whole machine spent busy (all but idle and iowait; steal included)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / TICK


class Snapshot:
    """CPU counters at one instant: the measured process, the other
    benchmark processes (driver, simulator, broker) and the whole machine."""

    def __init__(self, pid, own_pids):
        self.t = time.monotonic()
        self.cpu = cpu_s(pid)
        self.own = {name: cpu_s(p) for name, p in own_pids.items()}
        self.busy = machine_busy_s()


def window(a, b):
    """Figures between two snapshots: wall, the process's CPU, the others', and noise in cores."""
    wall = b.t - a.t
    cpu = b.cpu - a.cpu
    own = {k: b.own[k] - a.own.get(k, 0.0) for k in b.own}
    foreign = max((b.busy - a.busy) - cpu - sum(own.values()), 0.0)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "cores": cpu / wall if wall > 0 else 0.0,
        "others_cores": {k: v / wall for k, v in own.items()} if wall > 0 else {},
        "noise_cores": foreign / wall if wall > 0 else 0.0,
    }


def wait_quiet(max_wait, own_pids, threshold=0.15):
    """Waits (up to max_wait s) until processes outside the benchmark use < threshold cores."""
    deadline = time.monotonic() + max_wait
    while True:
        a = Snapshot(0, own_pids)
        time.sleep(2.0)
        load = window(a, Snapshot(0, own_pids))["noise_cores"]
        if load < threshold or time.monotonic() > deadline:
            log(f"  other processes use {load:.2f} cores before the round"
                + ("" if load < threshold else " (going ahead anyway)"))
            return load


# ---------------------------------------------------------------- simulator and Kafka


def start_sim(args, work):
    """The KTIP simulator on free ports; returns (proc, base_url, ca_cert, client_cert)."""
    cmd = [args.bin, "simulate",
           # The VT feed simulator cannot be switched off; it idles on free ports.
           "--api-listen", "127.0.0.1:0", "--download-listen", "127.0.0.1:0",
           "--ktip", "--ktip-listen", "127.0.0.1:0",
           "--ktip-latency", f"{args.latency_ms}ms",
           "--ktip-pki-dir", str(work / "pki")]
    errlog = open(work / "simulator.log", "w")
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=errlog, text=True)
    found = {}
    deadline = time.monotonic() + START_TIMEOUT
    while len(found) < 3 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"the simulator exited (status {proc.wait()}); see {work / 'simulator.log'}")
        parts = line.split()
        if parts[:2] == ["listening", "ktip-api"]:
            found["base_url"] = parts[2]
        elif parts[:1] == ["ktip-ca-cert"]:
            found["ca"] = parts[1]
        elif parts[:1] == ["ktip-client-cert"]:
            found["client"] = parts[1]
    if len(found) < 3:
        raise SystemExit("the simulator did not print its KTIP address and certificates")
    # Keep draining stdout so the simulator never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, found["base_url"], found["ca"], found["client"]


def warm_up_broker(bootstrap):
    """Makes the broker create its transaction-state and consumer-offsets
    topics now, so the first round's start-up does not pay for them."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"bench-warm-up-{uuid.uuid4().hex[:8]}",
                  "log_level": 3})  # its "coordinator load in progress" retries are expected
    p.init_transactions(120)
    p.begin_transaction()
    p.commit_transaction(60)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-warm-up-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "log_level": 3})
    try:
        c.commit(offsets=[TopicPartition("__bench_warm_up", 0, 0)], asynchronous=False)
    except Exception:  # noqa: BLE001 - only the coordinator's creation matters
        pass
    c.close()


def create_topics(bootstrap, names, partitions):
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    topics = [NewTopic(names[k], num_partitions=partitions, replication_factor=1,
                       config={"cleanup.policy": "delete"}) for k in ("requests", "results", "dlq")]
    for topic, fut in admin.create_topics(topics, operation_timeout=30).items():
        fut.result()


def publish_requests(bootstrap, topic, n):
    """Publishes n valid requests with distinct task ids; returns the seconds it took."""
    from confluent_kafka import Producer

    t = time.monotonic()
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 20,
                  "enable.idempotence": True, "compression.type": "lz4"})
    failed = []
    for i in range(n):
        task = f"b-{i}"
        value = json.dumps({"task_id": task, "url": f"https://samples.example.com/{task}.exe"})
        while True:
            try:
                p.produce(topic, key=task, value=value,
                          on_delivery=lambda err, _m: err and failed.append(err))
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    if p.flush(120) or failed:
        raise SystemExit(f"publishing the requests failed: {failed[:3]}")
    return time.monotonic() - t


class ResultReader:
    """Reads a topic read_committed on a thread, from the beginning; calls
    on_first / on_all (with the arrival time) at the first and n-th record."""

    def __init__(self, bootstrap, topic, n, on_first, on_all):
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self.n, self.on_first, self.on_all = n, on_first, on_all
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-rescan-reader-{uuid.uuid4().hex}",  # never joined: partitions are assigned
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 10,
        })
        parts = self.consumer.list_topics(topic, timeout=30).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        self.count, self.first_batch, self.errors = 0, 0, []
        self.task_ids, self.statuses = set(), {}
        self.t_first = self.t_all = None
        self.per_second = {}  # whole seconds since the first result -> results
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping.is_set():
            msgs = self.consumer.consume(2000, timeout=0.05)
            now = time.monotonic()
            got = 0
            for m in msgs:
                if m.error():
                    self.errors.append(str(m.error()))
                    continue
                got += 1
                try:
                    r = json.loads(m.value())
                except ValueError:
                    r = {}
                self.task_ids.add(r.get("task_id"))
                status = r.get("status", "?")
                self.statuses[status] = self.statuses.get(status, 0) + 1
            if not got:
                continue
            if self.t_first is None:
                self.t_first, self.first_batch = now, got
                self.on_first(now)
            sec = int(now - self.t_first)
            self.per_second[sec] = self.per_second.get(sec, 0) + got
            before, self.count = self.count, self.count + got
            if before < self.n <= self.count:
                self.t_all = now
                self.on_all(now)

    def close(self):
        self.stopping.set()
        self.thread.join()
        self.consumer.close()


def count_topic(bootstrap, topic):
    """Committed records on `topic` (read to the end of every partition)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-count-{uuid.uuid4().hex}",
                  "enable.auto.commit": False, "isolation.level": "read_committed",
                  "enable.partition.eof": True})
    try:
        parts = list(c.list_topics(topic, timeout=30).topics[topic].partitions)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        eof, count = set(), 0
        deadline = time.monotonic() + 60
        while len(eof) < len(parts) and time.monotonic() < deadline:
            for m in c.consume(1000, timeout=1.0):
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        eof.add(m.partition())
                    continue
                eof.discard(m.partition())
                count += 1
        return count
    finally:
        c.close()


def scrape(port):
    """The rescan consumer's in-flight and buffered gauges and its API call
    time totals (seconds, calls), or None."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except OSError:
        return None
    out = {}
    for key in ("in_flight", "buffered"):
        m = re.search(rf"^\w*rescan_requests_{key} (\S+)$", text, re.M)
        if m:
            out[key] = float(m.group(1))
    for key in ("sum", "count"):
        out[f"api_{key}"] = sum(float(v) for v in re.findall(
            rf"^\w*rescan_api_duration_seconds_{key}{{[^}}]*}} (\S+)$", text, re.M))
    return out if "in_flight" in out and "buffered" in out else None


# ---------------------------------------------------------------- one round


def rescan_config(args, sim, names, metrics_port):
    base_url, ca, client = sim
    extra = "".join(f"{k} = {v}\n" for k, _, v in (kv.partition("=") for kv in args.rescan_setting))
    properties = "".join(f'"{k}" = "{v}"\n' for k, _, v in (kv.partition("=") for kv in args.kafka_property))
    return f"""# Written by bench/bench_rescan.py for one benchmark round.
[kafka]
bootstrap_servers = "{args.bootstrap}"
[kafka.properties]
{properties}
[rescan]
base_url = "{base_url}"
username = "{KTIP_USER}"
password = "{KTIP_PASSWORD}"
client_cert = "{client}"
ca_cert = "{ca}"
requests_topic = "{names['requests']}"
results_topic = "{names['results']}"
dlq_topic = "{names['dlq']}"
dedup_topic = "{names['outcomes']}"
group_id = "{names['group']}"
transactional_id_prefix = "{names['tx']}"
instance_id = "bench"
partitions = {args.partitions}
max_in_flight = {args.max_in_flight}
# High enough never to be the limit.
max_requests_per_minute = 1000000
{extra}
[metrics]
listen = "127.0.0.1:{metrics_port}"

[log]
format = "json"
level = "info"
"""


def run_round(args, work, label, sim, own_pids):
    run_id = f"bench-rescan-{uuid.uuid4().hex[:8]}-{label}"
    names = {k: f"{run_id}.{k}" for k in ("requests", "results", "dlq", "outcomes", "group", "tx")}
    create_topics(args.bootstrap, names, args.partitions)
    publish_s = publish_requests(args.bootstrap, names["requests"], args.requests)
    log(f"  published {args.requests} requests in {publish_s:.1f} s")
    port = free_port()
    cfg = work / f"rescan-{label}.toml"
    cfg.write_text(rescan_config(args, sim, names, port))
    wait_quiet(args.quiet_wait, own_pids)

    marks = {}
    done = threading.Event()
    logfile = open(work / f"rescan-{label}.log", "w")
    t_start = time.monotonic()
    proc = spawn([args.bin, "rescan", "--config", str(cfg)], stdout=logfile, stderr=subprocess.STDOUT)
    marks["start"] = Snapshot(proc.pid, own_pids)
    marks["start"].t = t_start

    def on_first(t):
        marks["first"] = Snapshot(proc.pid, own_pids)
        marks["first"].t = t

    def on_all(t):
        marks["all"] = Snapshot(proc.pid, own_pids)
        marks["all"].t = t
        marks["rss_kb"] = peak_rss_kb(proc.pid)
        done.set()

    reader = ResultReader(args.bootstrap, names["results"], args.requests, on_first, on_all)
    gauges = []
    deadline = t_start + args.timeout
    while not done.wait(0.25):
        if proc.poll() is not None:
            break
        if time.monotonic() > deadline:
            log(f"  timed out after {args.timeout} s with {reader.count} results")
            break
        if "first" in marks:
            g = scrape(port)
            if g:
                gauges.append(g)
    rss_kb = marks.get("rss_kb") or peak_rss_kb(proc.pid)
    last = scrape(port)
    stop(proc)
    exit_code = proc.returncode
    time.sleep(args.settle)
    reader.close()
    dlq = count_topic(args.bootstrap, names["dlq"])

    n = args.requests
    ceiling = args.max_in_flight * 1000 / args.latency_ms
    result = {"label": label, "names": names, "exit": exit_code, "publish_s": publish_s,
              "results": reader.count, "distinct_task_ids": len(reader.task_ids - {None}),
              "statuses": reader.statuses, "dlq": dlq, "read_errors": reader.errors[:5],
              "peak_rss_kb": rss_kb, "ceiling_rps": ceiling}
    result["verified"] = (reader.count == n == result["distinct_task_ids"]
                          and reader.statuses.get("accepted", 0) == n and dlq == 0)
    if "all" not in marks:
        result["complete"] = False
        return result
    result["complete"] = True
    steady = window(marks["first"], marks["all"])
    total = window(marks["start"], marks["all"])
    steady["rps"] = (n - reader.first_batch) / steady["wall_s"] if steady["wall_s"] > 0 else 0.0
    total["rps"] = n / total["wall_s"]
    for w in (steady, total):
        w["ratio"] = w["rps"] / ceiling
    result.update({
        "startup_s": marks["first"].t - t_start,
        "first_batch": reader.first_batch,
        "steady": steady,
        "from_start": total,
        "mean_in_flight": statistics.fmean(g["in_flight"] for g in gauges) if gauges else None,
        "mean_buffered": statistics.fmean(g["buffered"] for g in gauges) if gauges else None,
        # Mean time of an API call as the client saw it (simulator latency + HTTPS + scheduling).
        "mean_call_ms": 1000 * last["api_sum"] / last["api_count"] if last and last["api_count"] else None,
        "per_second": [reader.per_second.get(s, 0) for s in range(max(reader.per_second) + 1)],
    })
    return result


# ---------------------------------------------------------------- report


def machine():
    model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                  if l.startswith("model name")), "")
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3]}


def source_version():
    def git(*a):
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()

    return {"commit": git("log", "-1", "--format=%h"),
            "dirty_src_files": len([l for l in git("status", "--short", "src").splitlines() if l])}


def round_line(r):
    if not r.get("complete"):
        return (f"  {r['label']}: INCOMPLETE, {r['results']} of the results (exit {r['exit']})")
    s, t = r["steady"], r["from_start"]
    others = ", ".join(f"{k} {v:.2f}" for k, v in sorted(s["others_cores"].items()))
    return (f"  {r['label']}: {s['rps']:.0f} req/s = {s['ratio']:.3f}x | from start {t['rps']:.0f} req/s = "
            f"{t['ratio']:.3f}x (start-up {r['startup_s']:.1f} s) | CPU {s['cores']:.3f} cores "
            f"(from start {t['cores']:.3f}) | peak RSS {r['peak_rss_kb'] / 1024:.1f} MiB | "
            f"results {r['results']}, distinct {r['distinct_task_ids']}, dlq {r['dlq']} "
            f"{'OK' if r['verified'] else 'MISMATCH'} | mean in flight "
            f"{r['mean_in_flight'] or 0:.1f}, buffered {r['mean_buffered'] or 0:.0f}, call "
            f"{r['mean_call_ms'] or 0:.1f} ms | noise "
            f"{s['noise_cores']:.2f} cores; others: {others}")


def summary(args, rounds, info):
    ceiling = args.max_in_flight * 1000 / args.latency_ms
    lines = [
        f"rescan consumer benchmark: {args.requests} requests, simulator latency {args.latency_ms} ms, "
        f"max_in_flight {args.max_in_flight}, ceiling {ceiling:.0f} req/s",
        f"machine: {info['machine']['nproc']} cores, {info['machine']['cpu']}; source {info['source']}",
        f"settings: rescan {args.rescan_setting or 'defaults'}, kafka {args.kafka_property or 'defaults'}",
        "rounds (steady = first result -> last result; CPU and noise over the same window):",
    ]
    lines += [round_line(r) for r in rounds]
    ok = [r for r in rounds if r.get("complete")]
    if ok:
        med = lambda f: statistics.median(f(r) for r in ok)  # noqa: E731
        lines.append(
            f"median: {med(lambda r: r['steady']['rps']):.0f} req/s = "
            f"{med(lambda r: r['steady']['ratio']):.3f}x of {ceiling:.0f} (target >= 0.9x); "
            f"from start {med(lambda r: r['from_start']['ratio']):.3f}x; "
            f"CPU {med(lambda r: r['steady']['cores']):.3f} cores (target < 1); "
            f"peak RSS {med(lambda r: r['peak_rss_kb']) / 1024:.1f} MiB")
    lines.append(f"all rounds verified (exactly one accepted result per request, DLQ empty): "
                 f"{all(r['verified'] for r in rounds)}")
    return "\n".join(lines)


def main():
    args = parse_args()
    work = Path(args.work or f"/tmp/sandbox-bridge-bench/rescan-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    log(f"work dir {work}")
    info = {"machine": machine(), "source": source_version(), "args": vars(args)}
    rounds = []
    try:
        warm_up_broker(args.bootstrap)
        sim_proc, *sim = start_sim(args, work)
        own_pids = {"driver": os.getpid(), "simulator": sim_proc.pid}
        if args.broker_pid:
            own_pids["broker"] = args.broker_pid
        log(f"KTIP simulator at {sim[0]} (latency {args.latency_ms} ms)")
        for i in range(1, args.runs + 1):
            log(f"round {i} of {args.runs}")
            r = run_round(args, work, f"r{i}", sim, own_pids)
            rounds.append(r)
            log(round_line(r))
    finally:
        stop_all()
    text = summary(args, rounds, info)
    (work / "results.json").write_text(json.dumps({**info, "rounds": rounds}, indent=2, default=str))
    (work / "summary.txt").write_text(text + "\n")
    print(text)
    return 0 if rounds and all(r["verified"] and r.get("complete") for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
