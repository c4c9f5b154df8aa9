#!/usr/bin/env python3
"""The sandbox-bridge benchmark (run it through scripts/bench.sh).

Given a running broker (--bootstrap), in one run:

  1. pregenerates N consecutive minutes of realistic batches (625 records a
     minute, fixed seed) with the simulator into a disk cache kept between
     runs, and one minute that decodes to about 1 GB;
  2. times `lbzip2 -dc -n 2` over the N batch files: the decode-only ceiling;
  3. runs sandbox-bridge (exactly-once, fresh topics) over those minutes,
     served by the simulator, from process start to the last commit;
  4. runs the Python baseline (bench/python_bridge.py) over the same minutes
     into its own topics;
  5. runs sandbox-bridge over the 1 GB minute under /usr/bin/time -v for its
     peak RSS;
  6. checks every record arrived once (read_committed), prints a summary and
     writes it as JSON next to the logs.

Which minutes: the feed (and so the simulator and the worker) only serves
minutes between now - 7 days and now - 60 minutes, and a batch's bytes
depend on (seed, minute). The benchmark's first minute is aligned to a
4-day grid, so the cached batches are reused for up to 4 days; then the
next grid period's minutes are generated (same seed, same size
distribution). Cached files that have left the 7-day window are deleted.
"""

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from benchproc import free_port, spawn, stop, stop_all

REPO = Path(__file__).resolve().parent.parent
CACHE_ROOT = Path(os.environ.get("SANDBOX_BRIDGE_CACHE", Path.home() / ".cache" / "sandbox-bridge"))
API_KEY = "bench-key"
MB = 1_000_000
GRID_MINUTES = 4 * 24 * 60
LAG_MARGIN_MINUTES = 65
SIM_READY_TIMEOUT = 60
# Generous hang guards, not timing assertions.
RUN_TIMEOUT = 1800



def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args():
    p = argparse.ArgumentParser(
        description="sandbox-bridge vs lbzip2 vs a Python bridge (see bench/README.md)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--bootstrap", help="Kafka bootstrap address (scripts/bench.sh starts a broker and passes it)")
    p.add_argument("--broker-pid", type=int, help="the broker's pid (its CPU is the benchmark's, not foreign load)")
    p.add_argument("--bin", default=str(REPO / "target/release/sandbox-bridge"), help="sandbox-bridge binary")
    p.add_argument("--minutes", type=int, default=20, help="consecutive minutes in the throughput runs")
    p.add_argument("--records-per-minute", type=int, default=625, help="mean records per minute")
    p.add_argument("--records-variation", default="0.3", help="per-minute variation of the record count")
    p.add_argument("--seed", type=int, default=20261123, help="simulator seed")
    p.add_argument("--big-records", type=int, default=50_000, help="records in the ~1 GB minute of the RSS run")
    p.add_argument("--partitions", type=int, default=6, help="partitions of the feed topics")
    p.add_argument("--lbzip2-runs", type=int, default=2, help="timed lbzip2 passes per round (the lower median is used)")
    p.add_argument("--runs", type=int, default=3,
                   help="rounds of lbzip2 + sandbox-bridge + Python bridge (medians are reported)")
    p.add_argument("--quiet-wait", type=float, default=120,
                   help="before each timed run, wait up to this many seconds for other processes to go idle")
    p.add_argument("--worker-property", action="append", default=[], metavar="KEY=VALUE",
                   help="extra librdkafka property for sandbox-bridge ([kafka.properties]), e.g. compression.type=zstd")
    p.add_argument("--skip-python", action="store_true", help="do not run the Python bridge")
    p.add_argument("--skip-rss", action="store_true", help="do not run the 1 GB peak-RSS test")
    p.add_argument("--python-big", action="store_true", help="also run the Python bridge on the 1 GB minute")
    p.add_argument("--perf", action="store_true", help="record the worker's throughput run with perf (perf.data in the work dir)")
    p.add_argument("--cache-dir", default=str(CACHE_ROOT / "bench-batches"), help="batch cache")
    p.add_argument("--work-dir", help="logs, configs and results (default /tmp/sandbox-bridge-bench/<run id>)")
    args = p.parse_args()
    if not args.bootstrap:
        p.error("--bootstrap is required (run scripts/bench.sh, which starts a broker)")
    if args.minutes < 1:
        p.error("--minutes must be at least 1")
    return args


# ---------------------------------------------------------------- minutes


def fmt_minute(m):
    return m.strftime("%Y%m%d%H%M")


def parse_minute(s):
    return dt.datetime.strptime(s, "%Y%m%d%H%M").replace(tzinfo=dt.timezone.utc)


def bench_minutes(n, now):
    """First and last minute: N minutes inside the feed window, grid-aligned for caching."""
    newest = now.replace(second=0, microsecond=0) - dt.timedelta(minutes=LAG_MARGIN_MINUTES)
    latest_first = newest - dt.timedelta(minutes=n - 1)
    epoch_minutes = int(latest_first.timestamp()) // 60
    first = dt.datetime.fromtimestamp(epoch_minutes // GRID_MINUTES * GRID_MINUTES * 60, dt.timezone.utc)
    if first < now - dt.timedelta(days=7) + dt.timedelta(hours=3):
        first = latest_first  # a very long run: no room for the grid
    return first, first + dt.timedelta(minutes=n - 1)


def prune_cache(cache_dir, now):
    """Deletes cached batches that have left the 7-day window: they can never be served again."""
    oldest = now - dt.timedelta(days=7)
    for f in Path(cache_dir).glob("*/*/*.bz2"):
        try:
            if parse_minute(f.stem) < oldest:
                f.unlink()
        except ValueError:
            pass


# ---------------------------------------------------------------- processes


def child_pid(parent):
    """The pid of the (single) child of `parent`, e.g. the command under /usr/bin/time."""
    for _ in range(200):
        try:
            kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
            if kids:
                return int(kids[0])
        except OSError:
            pass
        time.sleep(0.01)
    return None


class LineReader:
    """Reads a process's output on a thread, stamping each line on arrival."""

    def __init__(self, stream, copy_to):
        self.lines = []  # (monotonic time, text)
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, args=(stream, copy_to), daemon=True)
        self.thread.start()

    def _run(self, stream, copy_to):
        with open(copy_to, "a", encoding="utf-8") as out:
            for raw in stream:
                t = time.monotonic()
                text = raw.decode("utf-8", "replace").rstrip("\n")
                out.write(text + "\n")
                out.flush()
                with self.cond:
                    self.lines.append((t, text))
                    self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait_for(self, predicate, timeout, proc=None):
        """The first (time, line) matching predicate, or None at EOF/timeout/exit."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for t, line in self.lines[seen:]:
                    if predicate(line):
                        return t, line
                seen = len(self.lines)
                if self.closed or time.monotonic() > deadline:
                    return None
                self.cond.wait(0.5)


def proc_tree_cpu(pid):
    """CPU seconds (user+sys) of a live process and its live descendants."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ForeignLoad.TICK
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            pass
    return total


def parse_time_v(path):
    """Fields of a GNU `time -v` report."""
    out = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key == "Maximum resident set size (kbytes)":
            out["max_rss_kb"] = int(value)
        elif key == "User time (seconds)":
            out["user_s"] = float(value)
        elif key == "System time (seconds)":
            out["sys_s"] = float(value)
        elif key == "Elapsed (wall clock) time (h:mm:ss or m:ss)":
            out["elapsed"] = value
    return out


class ForeignLoad:
    """CPU used during a phase by processes that are not part of the benchmark
    (other jobs on a shared machine, steal time), in cores: a noise gauge.

    busy = everything /proc/stat counts except idle and iowait (steal included);
    ours = the benchmark's own long-lived processes (this driver, the
    simulator, the broker) read from /proc, plus the measured process's CPU
    passed to `stop`."""

    TICK = os.sysconf("SC_CLK_TCK")
    own_pids = {"driver": os.getpid()}

    @staticmethod
    def _busy():
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(f[:8]) - f[3] - f[4]) / ForeignLoad.TICK

    @staticmethod
    def _own():
        out = {}
        for name, pid in ForeignLoad.own_pids.items():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[name] = (int(fields[11]) + int(fields[12])) / ForeignLoad.TICK
            except (OSError, IndexError, ValueError):
                out[name] = 0.0
        return out

    def __init__(self):
        self.t, self.busy, self.own = time.monotonic(), self._busy(), self._own()
        self.own_cpu = {}

    def stop(self, measured_cpu_s):
        """Foreign load in cores; CPU seconds of the broker and simulator go to self.own_cpu."""
        wall = time.monotonic() - self.t
        own = self._own()
        self.own_cpu = {k: v - self.own.get(k, v) for k, v in own.items()}
        foreign = (self._busy() - self.busy) - sum(self.own_cpu.values()) - measured_cpu_s
        return max(foreign, 0.0) / wall if wall > 0 else 0.0


def wait_quiet(max_wait, threshold=0.15):
    """Waits (up to max_wait s) until other processes use less than `threshold` cores."""
    deadline = time.monotonic() + max_wait
    told = False
    while True:
        meter = ForeignLoad()
        time.sleep(2.0)
        load = meter.stop(0.0)
        if load < threshold or time.monotonic() > deadline:
            if told or load >= threshold:
                log(f"  other processes use {load:.2f} cores{'' if load < threshold else '; going ahead anyway'}")
            return load
        if not told:
            log(f"  waiting up to {max_wait} s for the machine to quieten ({load:.2f} cores busy elsewhere)")
            told = True


# ---------------------------------------------------------------- simulator


def sim_flags(args, rpm, variation, cache_dir):
    return [
        "--api-key", API_KEY, "--seed", str(args.seed),
        "--records-per-minute", str(rpm), "--records-variation", str(variation),
        "--cache-dir", str(cache_dir),
    ]


def pregenerate(args, rpm, variation, cache_dir, first, last, logfile):
    cmd = [args.bin, "simulate", *sim_flags(args, rpm, variation, cache_dir),
           "--pregenerate", f"{fmt_minute(first)}..{fmt_minute(last)}", "--pregenerate-only"]
    t = time.monotonic()
    with open(logfile, "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=f)
    return time.monotonic() - t


def start_sim(args, rpm, variation, cache_dir, missing_from, logfile, cache_mib=256):
    # Minutes after the benchmark's are 404: the worker then idles instead of
    # making the simulator generate (and compete for the CPU).
    missing = f"{fmt_minute(missing_from)}..{fmt_minute(missing_from + dt.timedelta(days=30))}"
    cmd = [args.bin, "simulate", *sim_flags(args, rpm, variation, cache_dir),
           "--api-listen", "127.0.0.1:0", "--download-listen", "127.0.0.1:0",
           "--missing", missing, "--cache-memory-mib", str(cache_mib)]
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=open(logfile, "a"))
    ForeignLoad.own_pids["simulator"] = proc.pid
    base_url = None
    deadline = time.monotonic() + SIM_READY_TIMEOUT
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if not line:
            raise SystemExit(f"simulator exited early; see {logfile}")
        if line.startswith("listening vt-feed-api "):
            base_url = line.split()[-1]
        if line.startswith("listening vt-feed-downloads "):
            return proc, base_url
    raise SystemExit(f"simulator did not start; see {logfile}")


def served_files(base_url, cache_dir, minutes):
    """Paths of the cached batch files, found by comparing one served batch with the cache."""
    import requests

    r = requests.get(f"{base_url}/api/v3/feeds/file-behaviours/{fmt_minute(minutes[0])}",
                     headers={"x-apikey": API_KEY}, allow_redirects=False, timeout=60)
    if r.status_code != 302:
        raise SystemExit(f"simulator answered HTTP {r.status_code} for {fmt_minute(minutes[0])}: {r.text[:200]}")
    body = requests.get(r.headers["Location"], timeout=600).content
    for d in sorted(Path(cache_dir).iterdir()):
        f = d / f"{fmt_minute(minutes[0])}.bz2"
        if f.is_file() and f.stat().st_size == len(body) and f.read_bytes() == body:
            files = [d / f"{fmt_minute(m)}.bz2" for m in minutes]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise SystemExit(f"batches missing from the cache: {missing[:3]}")
            return files
    raise SystemExit(f"no file under {cache_dir} matches the served batch")


# ---------------------------------------------------------------- lbzip2


def decoded_stats(files, meta_path):
    """(decoded bytes, lines) per file, cached by path, size and mtime."""
    try:
        meta = json.loads(Path(meta_path).read_text())
    except (OSError, ValueError):
        meta = {}
    out = []
    for f in files:
        st = f.stat()
        key = str(f)
        entry = meta.get(key)
        if not entry or entry["size"] != st.st_size or entry["mtime_ns"] != st.st_mtime_ns:
            proc = subprocess.Popen(["lbzip2", "-dc", "-n", "2", str(f)], stdout=subprocess.PIPE)
            nbytes = nlines = 0
            while chunk := proc.stdout.read(1 << 20):
                nbytes += len(chunk)
                nlines += chunk.count(b"\n")
            if proc.wait() != 0:
                raise SystemExit(f"lbzip2 cannot decode {f}")
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "decoded_bytes": nbytes, "lines": nlines}
            meta[key] = entry
        out.append(entry)
    meta = {k: v for k, v in meta.items() if Path(k).exists()}
    Path(meta_path).write_text(json.dumps(meta, indent=1))
    return out


NOISY = 0.25  # cores used by outside processes above which a run counts as disturbed


def pick_median(samples, wall=lambda x: x["wall_s"], noise=lambda x: x["foreign_cores"]):
    """The median run by wall time, among the undisturbed runs if there are any."""
    clean = [x for x in samples if noise(x) < NOISY] or samples
    return sorted(clean, key=wall)[(len(clean) - 1) // 2]


def time_lbzip2(files, runs, quiet_wait):
    """`lbzip2 -dc -n 2 FILES > /dev/null`: (median wall, its CPU s, its foreign load, all walls)."""
    samples = []
    for _ in range(runs):
        wait_quiet(quiet_wait)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        meter = ForeignLoad()
        t = time.monotonic()
        subprocess.run(["lbzip2", "-dc", "-n", "2", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
        wall = time.monotonic() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        samples.append((wall, cpu, meter.stop(cpu)))
    walls = [(x[0], x[2]) for x in samples]
    wall, cpu, foreign = pick_median(samples, wall=lambda x: x[0], noise=lambda x: x[2])
    return wall, cpu, foreign, walls


# ---------------------------------------------------------------- Kafka checks


def count_topic(bootstrap, topic, timeout=600):
    """Records on `topic` read read_committed: (count, distinct (batch, line), value bytes)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"bench-count-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
    })
    try:
        md = c.list_topics(topic, timeout=30)
        parts = list(md.topics[topic].partitions)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        eof, count, size, seen = set(), 0, 0, set()
        deadline = time.monotonic() + timeout
        while len(eof) < len(parts) and time.monotonic() < deadline:
            for m in c.consume(1000, timeout=1.0):
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        eof.add(m.partition())
                        continue
                    raise SystemExit(f"reading {topic}: {m.error()}")
                eof.discard(m.partition())
                count += 1
                size += len(m.value() or b"")
                h = dict(m.headers() or [])
                seen.add((h.get("vt.batch"), h.get("vt.line")))
        return count, len(seen), size
    finally:
        c.close()


# ---------------------------------------------------------------- the runs


def worker_config(path, args, base_url, names, start, metrics_port):
    properties = ""
    if args.worker_property:
        properties = "\n[kafka.properties]\n" + "".join(
            f'"{k}" = "{v}"\n' for k, _, v in (kv.partition("=") for kv in args.worker_property))
    text = f"""# Written by bench/bench.py for one benchmark run.
[kafka]
bootstrap_servers = "{args.bootstrap}"

{properties}
[feed]
base_url = "{base_url}"
api_key = "{API_KEY}"
topic = "{names['topic']}"
dlq_topic = "{names['dlq']}"
state_topic = "{names['state']}"
transactional_id = "{names['txid']}"
start = "{fmt_minute(start)}"
delivery = "exactly-once"
partitions = {args.partitions}
# After the last benchmark minute the simulator answers 404: sit still.
missing_policy = "halt"
missing_recheck_backoff = "1h"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[log]
format = "json"
level = "info"
"""
    Path(path).write_text(text)
    return text


def scrape_metrics(port):
    import requests

    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except requests.RequestException:
        return {}
    stages = {}
    for m in re.finditer(r'^sandbox_bridge_feed_stage_duration_seconds_sum\{stage="(\w+)"\} (\S+)$', text, re.M):
        stages[m.group(1)] = float(m.group(2))
    return stages


def run_sandbox_bridge(args, work, label, base_url, first, last, perf=False):
    """Runs the worker from `first` until `last` is committed; returns its figures."""
    run_id = f"bench-{uuid.uuid4().hex[:8]}-sb-{label}"
    names = {"topic": f"{run_id}.records", "dlq": f"{run_id}.dlq", "state": f"{run_id}.state", "txid": run_id}
    port = free_port()
    cfg = work / f"worker-{label}.toml"
    worker_config(cfg, args, base_url, names, first, port)
    logfile = work / f"worker-{label}.log"
    timefile = work / f"worker-{label}.time"
    cmd = ["/usr/bin/time", "-v", "-o", str(timefile), args.bin, "feed", "--config", str(cfg)]
    if perf:
        cmd = ["perf", "record", "-F", "499", "-g", "-o", str(work / "perf.data"), "--", *cmd]
    env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
    wait_quiet(args.quiet_wait)
    meter = ForeignLoad()
    t0 = time.monotonic()
    proc = spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    reader = LineReader(proc.stderr, logfile)
    want = fmt_minute(last)
    batches = []

    def published(line):
        try:
            ev = json.loads(line)
        except ValueError:
            return False
        if ev.get("message") == "batch published":
            batches.append(ev)
            return ev.get("batch") == want
        return False

    hit = reader.wait_for(published, RUN_TIMEOUT)
    if hit is None:
        stop(proc)
        raise SystemExit(f"sandbox-bridge did not publish {want}; see {logfile}")
    t_done = hit[0]
    first_commit = min(t for t, line in reader.lines if '"batch published"' in line)
    own_cpu = proc_tree_cpu(proc.pid)
    foreign = meter.stop(own_cpu)
    stages = scrape_metrics(port)
    # SIGTERM the worker itself (the child of time/perf), so time reports it.
    pid = proc.pid
    for _ in range(2 if perf else 1):
        pid = child_pid(pid) or pid
    os.kill(pid, signal.SIGTERM)
    proc.wait(120)
    reader.thread.join(10)
    tv = parse_time_v(timefile)
    return {
        "names": names,
        "config": str(cfg),
        "log": str(logfile),
        "wall_s": t_done - t0,
        "first_commit_s": first_commit - t0,
        "batches": len(batches),
        "records": sum(b.get("records", 0) for b in batches),
        "dlq": sum(b.get("dlq", 0) for b in batches),
        "decoded_bytes": sum(b.get("decoded_bytes", 0) for b in batches),
        "compressed_bytes": sum(b.get("compressed_bytes", 0) for b in batches),
        "first_batch": batches[0] if batches else None,
        "last_batch": batches[-1] if batches else None,
        "batch_duration_ms": [b.get("duration_ms") for b in batches],
        "commit_ms": [b.get("commit_ms") for b in batches],
        "stage_seconds": stages,
        "foreign_cores": foreign,
        "others_cpu_s": meter.own_cpu,
        "exit": proc.returncode,
        **tv,
    }


def run_python_bridge(args, work, label, base_url, first, last):
    run_id = f"bench-{uuid.uuid4().hex[:8]}-py-{label}"
    names = {"topic": f"{run_id}.records", "dlq": f"{run_id}.dlq", "state": f"{run_id}.state", "txid": run_id}
    logfile = work / f"python-{label}.log"
    timefile = work / f"python-{label}.time"
    cmd = ["/usr/bin/time", "-v", "-o", str(timefile), sys.executable, str(REPO / "bench/python_bridge.py"),
           "--base-url", base_url, "--api-key", API_KEY, "--bootstrap", args.bootstrap,
           "--topic", names["topic"], "--dlq-topic", names["dlq"], "--state-topic", names["state"],
           "--transactional-id", names["txid"], "--partitions", str(args.partitions),
           "--start", fmt_minute(first), "--end", fmt_minute(last)]
    wait_quiet(args.quiet_wait)
    meter = ForeignLoad()
    t0 = time.monotonic()
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=open(work / f"python-{label}.stderr.log", "a"))
    reader = LineReader(proc.stdout, logfile)
    want = fmt_minute(last)
    hit = reader.wait_for(lambda line: f'"batch": "{want}"' in line, RUN_TIMEOUT)
    proc.wait(120)
    reader.thread.join(10)
    tv = parse_time_v(timefile)
    foreign = meter.stop(tv.get("user_s", 0) + tv.get("sys_s", 0))
    if hit is None or proc.returncode != 0:
        raise SystemExit(f"the Python bridge failed (exit {proc.returncode}); see {work}/python-{label}.stderr.log")
    batches = [json.loads(line) for _, line in reader.lines if line.startswith("{")]
    first_commit = reader.lines[0][0]
    return {
        "names": names,
        "log": str(logfile),
        "wall_s": hit[0] - t0,
        "first_commit_s": first_commit - t0,
        "batches": len(batches),
        "records": sum(b["records"] for b in batches),
        "dlq": sum(b["dlq"] for b in batches),
        "decoded_bytes": sum(b["decoded_bytes"] for b in batches),
        "compressed_bytes": sum(b["compressed_bytes"] for b in batches),
        "first_batch": batches[0],
        "foreign_cores": foreign,
        "others_cpu_s": meter.own_cpu,
        "exit": proc.returncode,
        **tv,
    }


def warm_up_broker(bootstrap):
    """Makes the broker create its transaction-state topic now: otherwise the
    first transactional client (the first bridge measured) pays for it."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"bench-warm-up-{uuid.uuid4().hex[:8]}",
                  "log_level": 3})  # its "coordinator load in progress" retries are expected
    p.init_transactions(120)
    p.begin_transaction()
    p.commit_transaction(60)


def verify(args, result, expected_records):
    n, distinct, size = count_topic(args.bootstrap, result["names"]["topic"])
    dlq, _, _ = count_topic(args.bootstrap, result["names"]["dlq"])
    result["topic_records"] = n
    result["topic_distinct_lines"] = distinct
    result["topic_dlq"] = dlq
    result["verified"] = n == expected_records == distinct and dlq == 0
    return result["verified"]


# ---------------------------------------------------------------- report


def machine():
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    except (OSError, AttributeError):
        pass
    return {
        "nproc": int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or 0),
        "cpu": model,
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def decode_rs_sha():
    import hashlib

    return hashlib.sha256((REPO / "src/feed/decode.rs").read_bytes()).hexdigest()[:12]


def source_version():
    def git(*a):
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()

    return {
        "commit": git("log", "-1", "--format=%h"),
        # As built: scripts/bench.sh hashes decode.rs around the build.
        "decode_rs_sha": os.environ.get("BENCH_BUILT_DECODE_RS_SHA") or decode_rs_sha(),
        "decode_rs_status": git("status", "--short", "src/feed/decode.rs") or "unmodified",
        "decode_rs_header": next(iter((REPO / "src/feed/decode.rs").read_text().splitlines()), ""),
        "dirty_src_files": len([l for l in git("status", "--short", "src", "Cargo.toml", "Cargo.lock").splitlines() if l]),
    }


def rate(n, seconds):
    return n / seconds if seconds > 0 else 0.0


def fmt_rss(kb):
    return f"{kb / 1024:.0f} MiB" if kb else "-"


def runs_text(walls):
    """'5.3 s, 4.8 s*, 9.1 s (noisy)' for a list of (wall, noise)."""
    return ", ".join(f"{w:.2f} s" + (" (noise %.2f)" % n if n >= NOISY else "") for w, n in walls) + \
        f"; the median of the undisturbed runs (noise < {NOISY}) is reported, else of all"


def summary(r):
    m, v, w = r["machine"], r["version"], r["workload"]
    lb, sb, py = r["lbzip2"], r["sandbox_bridge"], r.get("python")
    lines = []
    add = lines.append
    add("")
    add("=" * 96)
    add(f"sandbox-bridge benchmark  {r['started']}  (took {r['duration_s'] / 60:.1f} min)")
    add("=" * 96)
    add(f"machine   {m['nproc']} cores (nproc), {m['cpu']}, {m['mem_gib']} GiB RAM, Linux {m['kernel']}")
    add(f"source    {v['commit']} + {v['dirty_src_files']} uncommitted change(s) under src/, Cargo.*; "
        f"src/feed/decode.rs {v['decode_rs_status'].split()[0] if v['decode_rs_status'] != 'unmodified' else 'unmodified'}"
        f" (sha256 {v['decode_rs_sha']}): \"{v['decode_rs_header'][4:70]}\"")
    if v.get("changed_during_run"):
        add("WARNING   src/feed/decode.rs changed during the run: the figures are for the sha above")
    add(f"workload  {w['minutes']} minutes {w['first']}..{w['last']}, {w['records_per_minute']} records/min "
        f"±{float(w['records_variation']) * 100:.0f}%, seed {w['seed']}: {w['records']:,} records, "
        f"{w['decoded_bytes'] / MB:.1f} MB decoded, {w['compressed_bytes'] / MB:.1f} MB bzip2")
    add(f"kafka     Apache Kafka 4.1.1, one local broker (KRaft) on the same machine, {r['partitions']} partitions, "
        f"fresh topics per run")
    add("worker    delivery=exactly-once (one transaction per minute, acks=all, idempotent), lz4, linger 20 ms,")
    add("          prefetch 4, decode_threads = cores, spool 8 MiB (all defaults; config in the work dir)"
        + (f"; extra properties: {', '.join(r['worker_properties'])}" if r.get("worker_properties") else ""))
    add("python    requests + bz2 + json + confluent-kafka "
        f"{r.get('python_versions', '')}: same keys/headers/partitioner, transactional, lz4, linger 20 ms")
    add("")
    hdr = f"{'':32}{'wall s':>7}{'records/s':>10}{'MB/s':>7}{'CPU s':>7}{'peak RSS':>9}{'noise':>7}  verified"
    add(hdr)
    add("-" * len(hdr))
    add(f"{'lbzip2 -dc -n 2 (decode only)':32}{lb['wall_s']:7.2f}{'':>10}{lb['mb_s']:7.1f}{lb['cpu_s']:7.2f}"
        f"{'-':>9}{lb['foreign_cores']:7.2f}")
    add(f"{'':34}runs {runs_text(lb['walls'])}")

    def row(name, x):
        cpu = x.get("user_s", 0) + x.get("sys_s", 0)
        ok = f"{x.get('topic_records', 0):,}/{w['records']:,} {'OK' if x.get('verified') else 'MISMATCH'}"
        add(f"{name:32}{x['wall_s']:7.2f}{x['records_s']:10,.0f}{x['mb_s']:7.1f}{cpu:7.2f}"
            f"{fmt_rss(x.get('max_rss_kb')):>9}{x.get('foreign_cores', 0):7.2f}  {ok}")
        if len(x.get("walls", [])) > 1:
            add(f"{'':34}runs {runs_text(x['walls'])}")

    row("sandbox-bridge (end to end)", sb)
    if py:
        row("python bridge (end to end)", py)
    add("")
    add("wall = from process start to the last minute committed (includes start-up: topics, "
        "init_transactions, state read);")
    add(f"       sandbox-bridge's first commit came {sb['first_commit_s']:.2f} s after start"
        + (f", the Python bridge's {py['first_commit_s']:.2f} s" if py else "") + ". MB = 10^6 decoded bytes.")
    add("CPU s = user+sys of that process alone. Meanwhile the broker used "
        + ", ".join(f"{x['others_cpu_s'].get('broker', 0):.2f} s ({n})" for n, x in (("sandbox-bridge", sb), ("python", py)) if x)
        + " and the simulator "
        + ", ".join(f"{x['others_cpu_s'].get('simulator', 0):.2f} s" for x in (sb, py) if x) + " of CPU.")
    add("noise = cores used meanwhile by processes outside the benchmark (other containers on this VM, steal):")
    add(f"        0 on an idle machine; above {NOISY} the row is slowed by someone else's work - run again.")
    if sb.get("stage_seconds"):
        st = sb["stage_seconds"]
        add("sandbox-bridge stage totals (s, summed over batches; stages overlap): "
            + ", ".join(f"{k} {st[k]:.2f}" for k in ("download", "decode", "publish", "commit") if k in st))
    add("")
    if len(r["rounds"]) > 1:
        for i, x in enumerate(r["rounds"], 1):
            add(f"round {i}: lbzip2 {x['lbzip2']['mb_s']:.1f} MB/s ({x['lbzip2']['cpu_s']:.2f} CPU s), "
                f"sandbox-bridge {x['sandbox_bridge']['mb_s']:.1f} MB/s = {x['vs_lbzip2']:.2f}x"
                + (f", python {x['python']['mb_s']:.1f} MB/s -> {x['vs_python']:.2f}x" if "python" in x else "")
                + ("  (noisy)" if x["noisy"] else ""))
        add("ratios below: median over the rounds (undisturbed rounds only, if any); each ratio is taken within a round")
    ratio_lb = r["vs_lbzip2"]
    add(f"sandbox-bridge / lbzip2 decode  = {ratio_lb:5.2f}x   (target >= 0.6x)  {'PASS' if ratio_lb >= 0.6 else 'FAIL'}")
    if py:
        ratio_py = r["vs_python"]
        add(f"sandbox-bridge / python bridge  = {ratio_py:5.2f}x   (target >= 3x)    {'PASS' if ratio_py >= 3 else 'FAIL'}")
    big = r.get("big")
    if big:
        b = big["sandbox_bridge"]
        rss = b.get("max_rss_kb", 0)
        add(f"peak RSS, one {big['decoded_bytes'] / MB:,.0f} MB minute ({big['records']:,} records, "
            f"{big['compressed_bytes'] / MB:.0f} MB bzip2): {fmt_rss(rss)}   (target <= 150 MB) "
            f"{'PASS' if rss and rss * 1024 <= 150 * MB else 'FAIL'}")
        add(f"    records on topic {b.get('topic_records', 0):,}/{big['records']:,} "
            f"{'OK' if b.get('verified') else 'MISMATCH'} (dlq {b.get('topic_dlq', 0)}); "
            f"wall {b['wall_s']:.1f} s = {b['mb_s']:.1f} MB/s; lbzip2 alone on that file: "
            f"{big['lbzip2_mb_s']:.1f} MB/s (noise {big['lbzip2_foreign_cores']:.2f})")
        add(f"    worker CPU {b.get('user_s', 0) + b.get('sys_s', 0):.1f} s, broker CPU "
            f"{b['others_cpu_s'].get('broker', 0):.1f} s, noise {b['foreign_cores']:.2f} cores")
        if big.get("python"):
            p = big["python"]
            add(f"    python bridge on the same minute: peak RSS {fmt_rss(p.get('max_rss_kb'))}, "
                f"wall {p['wall_s']:.1f} s = {p['mb_s']:.1f} MB/s, "
                f"{p.get('topic_records', 0):,} records {'OK' if p.get('verified') else 'MISMATCH'}")
    add("")
    add(f"logs, configs, results.json: {r['work_dir']}")
    add("=" * 96)
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main():
    args = parse_args()
    if args.broker_pid:
        ForeignLoad.own_pids["broker"] = args.broker_pid
    started = time.monotonic()
    now = dt.datetime.now(dt.timezone.utc)
    work = Path(args.work_dir or f"/tmp/sandbox-bridge-bench/{now:%Y%m%dT%H%M%S}-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir)
    prune_cache(cache, now)
    first, last = bench_minutes(args.minutes, now)
    minutes = [first + dt.timedelta(minutes=i) for i in range(args.minutes)]
    r = {
        "started": now.strftime("%Y-%m-%d %H:%M UTC"),
        "work_dir": str(work),
        "machine": machine(),
        "version": source_version(),
        "partitions": args.partitions,
        "worker_properties": args.worker_property,
    }
    import confluent_kafka
    import requests

    r["python_versions"] = f"{confluent_kafka.version()[0]} (librdkafka {confluent_kafka.libversion()[0]}), requests {requests.__version__}"

    # 1. Batches, cached outside the checkout.
    tp_cache = cache / f"seed{args.seed}-rpm{args.records_per_minute}-var{args.records_variation}"
    log(f"pregenerating {args.minutes} minutes {fmt_minute(first)}..{fmt_minute(last)} into {tp_cache} (cached)")
    took = pregenerate(args, args.records_per_minute, args.records_variation, tp_cache, first, last,
                       work / "simulator.log")
    log(f"  batches ready in {took:.1f} s")
    sim, base_url = start_sim(args, args.records_per_minute, args.records_variation, tp_cache,
                              last + dt.timedelta(minutes=1), work / "simulator.log")
    files = served_files(base_url, tp_cache, minutes)
    stats = decoded_stats(files, cache / "decoded-sizes.json")
    w = {
        "minutes": args.minutes, "first": fmt_minute(first), "last": fmt_minute(last),
        "records_per_minute": args.records_per_minute, "records_variation": args.records_variation,
        "seed": args.seed, "records": sum(s["lines"] for s in stats),
        "decoded_bytes": sum(s["decoded_bytes"] for s in stats),
        "compressed_bytes": sum(f.stat().st_size for f in files), "files": [str(f) for f in files],
    }
    r["workload"] = w

    warm_up_broker(args.bootstrap)
    # The broker's JIT is cold at first: the first bridge measured used to
    # pay for it (3x the broker CPU and twice the wall time of later runs).
    warm_last = minutes[min(len(minutes), 5) - 1]
    log(f"warming the broker up: untimed sandbox-bridge run over {fmt_minute(first)}..{fmt_minute(warm_last)}")
    run_sandbox_bridge(args, work, "warm-up", base_url, first, warm_last)

    # 2-4. Rounds of lbzip2, sandbox-bridge and the Python bridge, back to
    # back: the ratios are taken within a round, so a host whose speed drifts
    # (other VMs on it: invisible from here) moves all three together.
    rounds = []
    for i in range(args.runs):
        tag = f" (round {i + 1}/{args.runs})" if args.runs > 1 else ""
        label = f"throughput{i + 1}" if args.runs > 1 else "throughput"
        log(f"timing lbzip2 -dc -n 2 over the {len(files)} files{tag}")
        wall, cpu, foreign, walls = time_lbzip2(files, args.lbzip2_runs, args.quiet_wait)
        rnd = {"lbzip2": {"wall_s": wall, "cpu_s": cpu, "foreign_cores": foreign, "walls": walls,
                          "mb_s": rate(w["decoded_bytes"], wall) / MB}}
        log(f"  {wall:.2f} s, {rnd['lbzip2']['mb_s']:.1f} MB/s, {cpu:.2f} CPU s, noise {foreign:.2f} cores")
        runners = [("sandbox_bridge", "sandbox-bridge",
                    lambda: run_sandbox_bridge(args, work, label, base_url, first, last, perf=args.perf and i == 0))]
        if not args.skip_python:
            runners.append(("python", "the Python bridge",
                            lambda: run_python_bridge(args, work, label, base_url, first, last)))
        for key, name, run in runners:
            log(f"running {name} over the same minutes{tag}")
            x = run()
            x["records_s"] = rate(x["records"], x["wall_s"])
            x["mb_s"] = rate(x["decoded_bytes"], x["wall_s"]) / MB
            verify(args, x, w["records"])
            log(f"  {x['wall_s']:.2f} s, {x['mb_s']:.1f} MB/s, noise {x['foreign_cores']:.2f} cores, "
                f"verified={x['verified']}")
            rnd[key] = x
        rnd["vs_lbzip2"] = rnd["sandbox_bridge"]["mb_s"] / rnd["lbzip2"]["mb_s"]
        if "python" in rnd:
            rnd["vs_python"] = rnd["sandbox_bridge"]["mb_s"] / rnd["python"]["mb_s"]
        rnd["noisy"] = max(rnd[k]["foreign_cores"] for k in ("lbzip2", "sandbox_bridge", "python") if k in rnd) >= NOISY
        rounds.append(rnd)

    def median_run(key):
        chosen = pick_median([x[key] for x in rounds])
        chosen["walls"] = [(x[key]["wall_s"], x[key]["foreign_cores"]) for x in rounds]
        chosen["verified"] = all(x[key].get("verified", True) for x in rounds)
        return chosen

    def median_ratio(key):
        clean = [x[key] for x in rounds if not x["noisy"]] or [x[key] for x in rounds]
        return statistics.median(clean)

    r["rounds"] = rounds
    r["lbzip2"] = median_run("lbzip2")
    r["sandbox_bridge"] = sb = median_run("sandbox_bridge")
    r["vs_lbzip2"] = median_ratio("vs_lbzip2")
    if not args.skip_python:
        r["python"] = median_run("python")
        r["vs_python"] = median_ratio("vs_python")
    stop(sim)

    # 5. Peak RSS on one ~1 GB minute.
    if not args.skip_rss:
        big_cache = cache / f"seed{args.seed}-rpm{args.big_records}-var0"
        log(f"pregenerating one minute of {args.big_records:,} records into {big_cache} (cached; minutes the first time)")
        took = pregenerate(args, args.big_records, 0, big_cache, first, first, work / "simulator-big.log")
        log(f"  ready in {took:.1f} s")
        sim, base_url = start_sim(args, args.big_records, 0, big_cache, first + dt.timedelta(minutes=1),
                                  work / "simulator-big.log", cache_mib=1024)
        [big_file] = served_files(base_url, big_cache, [first])
        [bs] = decoded_stats([big_file], cache / "decoded-sizes.json")
        bwall, _, bnoise, _ = time_lbzip2([big_file], 1, args.quiet_wait)
        big = {"file": str(big_file), "records": bs["lines"], "decoded_bytes": bs["decoded_bytes"],
               "compressed_bytes": big_file.stat().st_size, "lbzip2_mb_s": rate(bs["decoded_bytes"], bwall) / MB, "lbzip2_foreign_cores": bnoise}
        log(f"  {big['decoded_bytes'] / MB:,.0f} MB decoded; running sandbox-bridge under /usr/bin/time -v")
        b = run_sandbox_bridge(args, work, "big", base_url, first, first)
        b["mb_s"] = rate(b["decoded_bytes"], b["wall_s"]) / MB
        verify(args, b, big["records"])
        big["sandbox_bridge"] = b
        log(f"  peak RSS {fmt_rss(b.get('max_rss_kb'))}, verified={b['verified']}")
        if args.python_big:
            log("running the Python bridge on the 1 GB minute")
            p = run_python_bridge(args, work, "big", base_url, first, first)
            p["mb_s"] = rate(p["decoded_bytes"], p["wall_s"]) / MB
            verify(args, p, big["records"])
            big["python"] = p
        stop(sim)
        r["big"] = big

    r["version"]["changed_during_run"] = decode_rs_sha() != r["version"]["decode_rs_sha"]
    r["duration_s"] = time.monotonic() - started
    (work / "results.json").write_text(json.dumps(r, indent=1, default=str))
    text = summary(r)
    (work / "summary.txt").write_text(text + "\n")
    print(text, flush=True)
    ok = sb.get("verified") and (args.skip_rss or r["big"]["sandbox_bridge"].get("verified"))
    return 0 if ok else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        stop_all()
