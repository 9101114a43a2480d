"""A distributed run on loopback: ``sparkle worker`` processes, model servers and a Redis server, started here
and stopped on exit. What the tests and the benchmarks of the distributed run share (public, so that neither
reaches into the other's private helpers).

    with redis_server() as url, Cluster({"SPARKLE_BROKER_URL": url, "SPARKLE_STORE_URL": "local:/tmp/s"}, logs) as c:
        c.worker("cpu", [CPU_QUEUE], "--pool", "threads", "--concurrency", "4")
        c.worker("services", list(SERVICE_QUEUES.values()), "--backend", DOUBLES)
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

SPARKLE = str(Path(sys.executable).with_name("sparkle"))
DOUBLES = "double"
"""The test-double backends (``services/<name>/double.py``), as ``--backend`` takes them."""
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 20.0) -> None:
    """Wait until ``proc`` listens on loopback ``port``. Raises RuntimeError if it exits or stays silent
    ``timeout_s`` seconds (then it is killed)."""
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


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
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
    port = free_port()
    proc = subprocess.Popen(argv_for_port(port), stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, what)
        yield port
    finally:
        stop_process(proc)


@contextmanager
def redis_server(log: Path | None = None):
    """A private ``redis-server`` on a free loopback port, keeping nothing on disk; yields its URL."""
    with serving(lambda port: [REDIS_SERVER, "--port", str(port), "--save", "", "--appendonly", "no"],
                 "redis-server", log or Path(os.devnull)) as port:
        yield f"redis://127.0.0.1:{port}"


class Cluster:
    """Processes of one distributed run. ``env``: the ``SPARKLE_*`` variables every process gets."""

    def __init__(self, env: dict, logs: Path):
        # The model servers' API key, which their queue workers send (generated unless ``env`` gives one).
        self.env = {"SPARKLE_SERVE_API_KEY": secrets.token_urlsafe(24), **os.environ, **env}
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def worker(self, name: str, queues: list[str], *args: str, ready_s: float = 60) -> subprocess.Popen:
        """Start ``sparkle worker`` named ``name`` on ``queues`` and wait until Celery says it is ready."""
        log = self.logs / f"{name}.log"
        proc = subprocess.Popen([SPARKLE, "worker", "--queues", ",".join(queues), "--hostname", f"{name}@test",
                                 "--loglevel", "info", *args], env=self.env, stdout=log.open("wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        deadline = time.monotonic() + ready_s
        while f"{name}@test ready." not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        return proc

    def server(self, name: str, service: str, backend: str, store_url: str, port: int | None = None,
               *args: str) -> int:
        """Start ``sparkle serve SERVICE`` on ``port`` (default: a free one), wait for /readyz; returns the port."""
        import httpx

        port = port or free_port()
        log = self.logs / f"{name}.log"
        proc = subprocess.Popen([SPARKLE, "serve", service, "--backend", backend, "--port", str(port),
                                 "--store", store_url, *args], env=self.env, stdout=log.open("wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        wait_port(port, proc, name, timeout_s=60)
        deadline = time.monotonic() + 60
        while httpx.get(f"http://127.0.0.1:{port}/readyz").status_code != 200:
            assert time.monotonic() < deadline, f"{name} never became ready"
            time.sleep(0.1)
        return port

    def pool_children(self, name: str) -> list[int]:
        """PIDs of the pool processes of worker ``name`` (prefork)."""
        out = subprocess.run(["pgrep", "-P", str(self.procs[name].pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill(self, name: str) -> None:
        """SIGKILL a whole process group (a worker and its pool): a crash, no warm shutdown."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
