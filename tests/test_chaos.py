"""Chaos: a bulk run under random SIGKILLs of workers and model servers, a Redis restart and an ``enqueue`` kill.

``make test-chaos`` runs it alone (with its figures printed); ``make test`` (CI) runs it with the rest.

The run: 12 samples (two real clips, 320x192, 17 frames) on loopback Redis with AOF and an S3 server (moto);
two orchestrator workers, two service workers (in-process test doubles of five services), and the i2v
service as a model server plus its queue worker (``--service-url``), as in a Kubernetes pod. Settings are the
shipped ones (visibility timeout 2 h, sample lease 20 s, stall 15 s, op lease 20 s) except the retry back-off
(0.2 s doubling to 2 s) and the doubles' 0.3 s per call.

Chaos, from a seeded generator (``SPARKLE_CHAOS_SEED``; printed): 10 SIGKILLs of a random process among the
six, each started again 0.5-2 s later (as Kubernetes restarts a pod); Redis stopped for 3 s and restarted after
the fourth kill; ``sparkle enqueue`` SIGKILLed after the sixth and started again with the same manifest.

Asserted: every sample exactly once in the export (CSV rows, the five records, the edited videos), none
failed, no staging area left; no process exited that was not killed; each kill's recovery (the time until
every sample in flight at the kill had moved on) within 90 s; the whole run within ``BOUND_S``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import time
import uuid

import pytest

from sparkle import layout
from sparkle.orchestrator import datasets, jobs
from sparkle.orchestrator.cluster import DOUBLES, REDIS_SERVER, SPARKLE, Cluster, free_port, wait_port
from sparkle.queues import CPU_QUEUE, SERVICE_QUEUES
from sparkle.store_s3 import open_store
from tests.test_distributed import _manifest

pytestmark = pytest.mark.chaos

SAMPLES = 12
KILLS = 10
BOUND_S = 420.0
"""The whole run (first enqueue to the last sample finished), seconds: about 60 s undisturbed, plus the
recoveries (each <= 40 s, several overlapping)."""
RECOVERY_BOUND_S = 90.0
"""Per kill; a lone kill is recovered within 60 s (tests/test_liveness.py), overlapping faults add up."""


class Redis:
    """A redis-server with AOF (everysec) in ``dir``, on a fixed port, that can be restarted."""

    def __init__(self, dir, log):
        self.port = free_port()
        self.argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--appendonly", "yes",
                     "--save", "", "--dir", str(dir)]
        self.log = log
        self.start()

    def start(self):
        self.proc = subprocess.Popen(self.argv, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc, "redis-server")

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def _in_flight(store, ids):
    """{sample id: updated_at} of the submitted samples not yet finished."""
    out = {}
    for sid in ids:
        try:
            doc = jobs.read_job(store, sid)
        except KeyError:
            continue
        if doc["state"] not in jobs.TERMINAL:
            out[sid] = doc["updated_at"]
    return out


def test_bulk_run_under_random_kills_and_a_redis_restart_exports_every_sample_once(settings, bucket, tmp_path):
    seed = int(os.environ.get("SPARKLE_CHAOS_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    redis = Redis(tmp_path, tmp_path / "redis.log")
    broker = f"redis://127.0.0.1:{redis.port}/0"
    store_url = f"s3://{bucket}/chaos-{uuid.uuid4().hex[:10]}"
    env = {"SPARKLE_BROKER_URL": broker, "SPARKLE_STORE_URL": store_url, "SPARKLE_S3_ENDPOINT": settings.s3_endpoint,
           "SPARKLE_S3_ACCESS_KEY": "testing", "SPARKLE_S3_SECRET_KEY": "testing",
           "SPARKLE_OP_BACKOFF_S": "0.2", "SPARKLE_OP_BACKOFF_MAX_S": "2"}
    store = open_store(store_url, settings.model_copy(update={"broker_url": broker, "store_url": store_url}))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    manifest = _manifest(inputs / "manifest.jsonl", SAMPLES)
    enqueue_args = [SPARKLE, "enqueue", str(manifest), "--window", "4", "--max-size", "320x192", "--max-frames", "17",
                    "--poll-s", "0.5", "--json"]
    i2v_port = free_port()
    five = [q for q in SERVICE_QUEUES.values() if q != SERVICE_QUEUES["i2v"]]
    events: list[str] = []
    try:
        with Cluster(env, tmp_path / "logs") as c:
            start = {
                "cpu1": lambda: c.worker("cpu1", [CPU_QUEUE], "--pool", "threads", "--concurrency", "4"),
                "cpu2": lambda: c.worker("cpu2", [CPU_QUEUE], "--pool", "threads", "--concurrency", "4"),
                "svc1": lambda: c.worker("svc1", five, "--backend", DOUBLES, "--option", "delay_s=0.3",
                                         "--concurrency", "2"),
                "svc2": lambda: c.worker("svc2", five, "--backend", DOUBLES, "--option", "delay_s=0.3",
                                         "--concurrency", "2"),
                "i2v-server": lambda: c.server("i2v-server", "i2v", DOUBLES, store_url, i2v_port,
                                               "--option", "delay_s=0.3"),
                "i2v-worker": lambda: c.worker("i2v-worker", [SERVICE_QUEUES["i2v"]], "--service-url",
                                               f"http://127.0.0.1:{i2v_port}", "--concurrency", "2"),
            }
            for name in start:
                start[name]()
            t0 = time.monotonic()
            enqueue = subprocess.Popen(enqueue_args, env=c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       start_new_session=True)
            deadline = t0 + 120
            while not store.list_keys("datasets/"):
                assert time.monotonic() < deadline and enqueue.poll() is None, enqueue.stderr.read().decode()
                time.sleep(0.2)
            time.sleep(3)
            [did] = {k.split("/")[1] for k in store.list_keys("datasets/") if k.endswith("dataset.json")}
            ids = datasets.dataset_samples(store, did)
            kills: list[dict] = []
            for k in range(1, KILLS + 1):
                time.sleep(rng.uniform(1.0, 3.0))
                victim = rng.choice(sorted(start))
                kills.append({"n": k, "victim": victim, "at": time.time(), "t": time.monotonic() - t0,
                              "in_flight": _in_flight(store, ids)})
                c.kill(victim)
                events.append(f"{time.monotonic() - t0:6.1f} s  SIGKILL {victim}")
                time.sleep(rng.uniform(0.5, 2.0))
                start[victim]()
                if k == 4:
                    redis.stop()
                    events.append(f"{time.monotonic() - t0:6.1f} s  Redis stopped")
                    time.sleep(3)
                    redis.start()
                    events.append(f"{time.monotonic() - t0:6.1f} s  Redis restarted")
                if k == 6:
                    enqueue.send_signal(signal.SIGKILL)
                    enqueue.wait()
                    events.append(f"{time.monotonic() - t0:6.1f} s  SIGKILL sparkle enqueue; started again")
                    enqueue = subprocess.Popen(enqueue_args, env=c.env, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, start_new_session=True)
            # Recovery of each kill: until every sample in flight at the kill has moved on (or finished).
            while True:
                for kill in kills:
                    if "recovered_s" in kill:
                        continue
                    moved = all(jobs.read_job(store, sid)["updated_at"] > kill["at"] for sid in kill["in_flight"])
                    if moved:
                        kill["recovered_s"] = time.time() - kill["at"]
                if enqueue.poll() is not None:
                    break
                assert time.monotonic() - t0 < BOUND_S, (events, _in_flight(store, ids))
                time.sleep(0.2)
            for kill in kills:  # moved on after enqueue ended (not expected: enqueue ends when all are done)
                kill.setdefault("recovered_s", None)
            elapsed = time.monotonic() - t0
            out, err = enqueue.communicate()
            assert enqueue.returncode == 0, err.decode()[-3000:]
            status = json.loads(out)
            dead = {n: p.returncode for n, p in c.procs.items() if p.poll() is not None}
            logs = {n: c.log(n)[-2000:] for n in dead}
    finally:
        redis.proc.kill()
        redis.proc.wait()

    recoveries = [k["recovered_s"] for k in kills if k["recovered_s"] is not None]
    report = ["", f"chaos run (seed {seed}): {SAMPLES} samples, {KILLS} SIGKILLs, 1 Redis restart, 1 enqueue kill",
              *events, "recovery per kill (s, until every sample in flight at the kill moved on):",
              *(f"  kill {k['n']:2d} {k['victim']:<10} at {k['t']:5.1f} s: {len(k['in_flight'])} in flight, "
                f"recovered in {k['recovered_s']:.1f} s" for k in kills),
              f"recovery: median {statistics.median(recoveries):.1f} s, max {max(recoveries):.1f} s; "
              f"whole run {elapsed:.1f} s (bound {BOUND_S:.0f} s); counts {status['counts']}"]
    print("\n".join(report))
    (tmp_path / "chaos.json").write_text(json.dumps({"seed": seed, "kills": kills, "elapsed_s": elapsed}, default=str))

    assert dead == {}, logs  # every process not killed by the test is alive, Redis restart included
    assert status["done"] and status["total"] == SAMPLES
    assert sum(status["counts"].values()) == SAMPLES and status["counts"].get("failed", 0) == 0, status["counts"]
    assert len(recoveries) == KILLS and max(recoveries) <= RECOVERY_BOUND_S, report
    assert elapsed <= BOUND_S

    accepted = sorted(sid for sid in ids if jobs.read_job(store, sid)["state"] == "accepted")
    assert accepted, status
    out_dir = tmp_path / "export"
    proc = subprocess.run([SPARKLE, "export", str(out_dir), "--store", store_url, "--json"], env=c.env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = (out_dir / "prompts" / "location_train.csv").read_text().splitlines()[1:]
    assert sorted(r.rsplit(",", 1)[1] for r in rows) == accepted  # exactly once each
    for name in layout.RECORD_NAMES:
        lines = (out_dir / layout.record("location", name)).read_text().splitlines()
        assert sorted(json.loads(line)["id"] for line in lines) == accepted, name
    assert sorted(p.stem for p in (out_dir / "location" / "edited_video").iterdir()) == accepted
    assert store.list_keys("staging/") == []
