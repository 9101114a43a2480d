"""Infrastructure the distributed tests start on loopback: processes on free ports, waited for and stopped."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

BUCKET = "sparkle-test"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = proc.stdout.read().decode()[-2000:] if proc.stdout else "(see its log file)"
            raise RuntimeError(f"{what} exited with {proc.returncode}: {output}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout_s} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def serving(argv_for_port, what: str, log: Path):
    """Start ``argv_for_port(port)`` on a free loopback port, logging to ``log`` (never to a pipe nobody reads:
    a full pipe blocks the server), wait until it listens; yields the port, stops the process on exit."""
    port = _free_port()
    proc = subprocess.Popen(argv_for_port(port), stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc, what)
        yield port
    finally:
        _stop(proc)
