"""Processes the benchmarks start: spawned, remembered, stopped on exit.

Shared by bench.py and bench_rescan.py.
"""

import signal
import socket
import subprocess

children = []  # every process started through spawn(), stopped by stop_all()


def spawn(cmd, **kw):
    proc = subprocess.Popen(cmd, **kw)
    children.append(proc)
    return proc


def stop(proc, sig=signal.SIGTERM, timeout=60):
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_all():
    for proc in reversed(children):
        stop(proc, timeout=30)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
