#!/usr/bin/env python3
"""The VirusTotal file-behaviour feed to Kafka, written the straightforward way.

The baseline sandbox-bridge is measured against: what a competent engineer
writes in an afternoon with the usual libraries. For each minute, in order:

    GET {base}/api/v3/feeds/file-behaviours/{YYYYMMDDhhmm}   (x-apikey, no redirects)
      302 -> GET Location (no key)  -> bz2.decompress -> split lines
      -> json.loads each line -> key = id up to the first "_"
      -> produce, all inside one Kafka transaction per minute, together
         with the new position on a compacted state topic -> commit

The whole batch is held in memory (downloaded, then decompressed), like
vt-py does. Records carry the same key, headers and timestamp as
sandbox-bridge's: key = SHA-256, headers vt.id, vt.sandbox_name, vt.batch,
vt.line, content-type; lines that are not records go to the DLQ topic with
a dlq.reason header. 404 = no batch for that minute (skipped); 400
NotAvailableYet = wait; 429/5xx = back off and retry.

One JSON line per committed minute goes to stdout (the benchmark reads them).

    python_bridge.py --base-url http://127.0.0.1:8480 --api-key KEY \
        --bootstrap 127.0.0.1:9092 --topic vt.file-behaviours \
        --start 202611230900 [--end 202611231000]
"""

import argparse
import bz2
import datetime as dt
import json
import logging
import re
import sys
import time

import requests
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

API_PATH = "/api/v3/feeds/file-behaviours/"
SHA256 = re.compile(rb"^[0-9a-f]{64}$")
log = logging.getLogger("python_bridge")


def parse_minute(s):
    return dt.datetime.strptime(s, "%Y%m%d%H%M").replace(tzinfo=dt.timezone.utc)


def fmt_minute(m):
    return m.strftime("%Y%m%d%H%M")


# ---------------------------------------------------------------- upstream


def fetch_batch(session, base_url, api_key, minute):
    """The compressed batch of `minute`, or None when there is none (404)."""
    url = base_url.rstrip("/") + API_PATH + fmt_minute(minute)
    backoff = 1.0
    while True:
        try:
            r = session.get(url, headers={"x-apikey": api_key}, allow_redirects=False, timeout=30)
            if r.status_code == 302:
                # The download host must not see the key: a fresh request without it.
                d = session.get(r.headers["Location"], timeout=600)
                if d.status_code == 200:
                    return d.content
                log.warning("download of %s: HTTP %s; retrying", fmt_minute(minute), d.status_code)
            elif r.status_code == 404:
                return None
            elif r.status_code == 400 and error_code(r) == "NotAvailableYet":
                log.info("%s not available yet; waiting 20 s", fmt_minute(minute))
                time.sleep(20)
                continue
            elif r.status_code == 429 or r.status_code >= 500:
                log.warning("%s: HTTP %s; retrying in %.0f s", fmt_minute(minute), r.status_code, backoff)
            else:
                raise SystemExit(f"VirusTotal answered HTTP {r.status_code} {error_code(r)}: giving up")
        except requests.RequestException as e:
            log.warning("%s: %s; retrying in %.0f s", fmt_minute(minute), e, backoff)
        time.sleep(backoff)
        backoff = min(backoff * 2, 300)


def error_code(response):
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return ""


# ---------------------------------------------------------------- Kafka


def ensure_topics(bootstrap, topic, dlq_topic, state_topic, partitions):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = admin.list_topics(timeout=30).topics
    wanted = [
        NewTopic(topic, partitions, config={"cleanup.policy": "delete"}),
        NewTopic(dlq_topic, partitions, config={"cleanup.policy": "delete"}),
        NewTopic(state_topic, 1, config={"cleanup.policy": "compact"}),
    ]
    missing = [t for t in wanted if t.topic not in existing]
    for name, future in (admin.create_topics(missing) if missing else {}).items():
        try:
            future.result()
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def load_position(bootstrap, state_topic, key):
    """The saved next minute of this bridge, or None."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "python-bridge-state-reader",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
    })
    try:
        tp = TopicPartition(state_topic, 0, 0)
        for attempt in range(150):
            try:
                low, high = consumer.get_watermark_offsets(tp, timeout=30)
                break
            except KafkaException as e:
                # A topic created a moment ago may not have a leader yet.
                starting = (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                            KafkaError.UNKNOWN_TOPIC_OR_PART)
                if e.args[0].code() not in starting or attempt == 149:
                    raise
                time.sleep(0.2)
        if high <= low:
            return None
        tp.offset = low
        consumer.assign([tp])
        position = None
        while True:
            msg = consumer.poll(10)
            if msg is None:
                break
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    break
                raise KafkaException(msg.error())
            if msg.key() == key.encode():
                position = json.loads(msg.value())["next"]
        return parse_minute(position) if position else None
    finally:
        consumer.close()


def produce(producer, **kwargs):
    """produce(), waiting while the local queue is full."""
    while True:
        try:
            producer.produce(**kwargs)
            return
        except BufferError:
            producer.poll(0.05)


# ---------------------------------------------------------------- the bridge


def publish_batch(producer, args, minute, text):
    """Produces every line of a decompressed batch; returns (records, dead letters)."""
    batch = fmt_minute(minute).encode()
    timestamp = int(minute.timestamp() * 1000)
    records = dead = 0
    for number, line in enumerate(text.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record_id = json.loads(line)["id"].encode()
            sha256, _, sandbox = record_id.partition(b"_")
            if not SHA256.match(sha256) or not sandbox:
                raise ValueError("bad id")
        except (ValueError, KeyError, TypeError, AttributeError):
            send_dead_letter(producer, args, batch, number, line, "invalid", timestamp)
            dead += 1
            continue
        headers = [
            ("vt.id", record_id),
            ("vt.sandbox_name", sandbox),
            ("vt.batch", batch),
            ("vt.line", str(number).encode()),
            ("content-type", b"application/json"),
        ]
        if len(line) + len(sha256) + 200 > args.max_message_bytes:
            send_dead_letter(producer, args, batch, number, line, "too_large", timestamp)
            dead += 1
            continue
        produce(producer, topic=args.topic, key=sha256, value=line, headers=headers, timestamp=timestamp)
        records += 1
        if records % 1000 == 0:
            producer.poll(0)
    return records, dead


def send_dead_letter(producer, args, batch, number, line, reason, timestamp):
    headers = [("dlq.reason", reason.encode()), ("vt.batch", batch), ("vt.line", str(number).encode())]
    produce(producer, topic=args.dlq_topic, value=line[:65536], headers=headers, timestamp=timestamp)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", default="vt.file-behaviours")
    p.add_argument("--dlq-topic", default="vt.file-behaviours.dlq")
    p.add_argument("--state-topic", default="python-bridge.feed-state")
    p.add_argument("--transactional-id", default="python-bridge-feed")
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--max-message-bytes", type=int, default=1048576)
    p.add_argument("--start", required=True, help="first minute (YYYYMMDDhhmm) when none is saved")
    p.add_argument("--end", help="last minute (YYYYMMDDhhmm) to publish, then exit")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")

    ensure_topics(args.bootstrap, args.topic, args.dlq_topic, args.state_topic, args.partitions)
    minute = load_position(args.bootstrap, args.state_topic, args.transactional_id) or parse_minute(args.start)
    end = parse_minute(args.end) if args.end else None
    producer = Producer({
        "bootstrap.servers": args.bootstrap,
        "transactional.id": args.transactional_id,
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": "murmur2_random",
        "compression.type": "lz4",
        "linger.ms": 20,
        "message.max.bytes": args.max_message_bytes,
    })
    producer.init_transactions(60)
    session = requests.Session()
    log.info("publishing from %s", fmt_minute(minute))

    while end is None or minute <= end:
        # The newest batch lags 60 minutes.
        available_at = minute + dt.timedelta(minutes=61)
        now = dt.datetime.now(dt.timezone.utc)
        if now < available_at:
            time.sleep((available_at - now).total_seconds())
        started = time.monotonic()
        data = fetch_batch(session, args.base_url, args.api_key, minute)
        records = dead = decoded = 0
        producer.begin_transaction()
        if data is not None:
            text = bz2.decompress(data)
            decoded = len(text)
            records, dead = publish_batch(producer, args, minute, text)
            del text
        nxt = minute + dt.timedelta(minutes=1)
        state = json.dumps({"next": fmt_minute(nxt)}).encode()
        produce(producer, topic=args.state_topic, key=args.transactional_id.encode(), value=state)
        producer.commit_transaction(300)
        print(json.dumps({
            "batch": fmt_minute(minute),
            "missing": data is None,
            "records": records,
            "dlq": dead,
            "compressed_bytes": len(data or b""),
            "decoded_bytes": decoded,
            "seconds": round(time.monotonic() - started, 3),
        }), flush=True)
        minute = nxt
    producer.flush(60)


if __name__ == "__main__":
    main()
