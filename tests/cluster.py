"""A distributed run on loopback for tests and benchmarks: ``sparkle worker`` processes (and model servers)
against a Redis server and an artifact store, all started here and stopped on exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.infra import _free_port, _wait_port

SPARKLE = str(Path(sys.executable).with_name("sparkle"))
DOUBLES = "sparkle.doubles:make_backend"
SERVICE_QUEUES = ["sparkle.grounding", "sparkle.image_edit", "sparkle.i2v", "sparkle.tracking", "sparkle.control",
                  "sparkle.editscore"]


class Cluster:
    """Processes of one distributed run. ``env``: the ``SPARKLE_*`` variables every process gets."""

    def __init__(self, env: dict, logs: Path):
        self.env = {**os.environ, **env}
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

    def server(self, name: str, service: str, backend: str, store_url: str) -> int:
        """Start ``sparkle serve SERVICE`` on a free port, wait for /readyz; returns the port."""
        import httpx

        port = _free_port()
        log = self.logs / f"{name}.log"
        proc = subprocess.Popen([SPARKLE, "serve", service, "--backend", backend, "--port", str(port),
                                 "--store", store_url], env=self.env, stdout=log.open("wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        _wait_port(port, proc, name, timeout_s=60)
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
