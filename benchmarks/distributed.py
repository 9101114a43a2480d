"""What the distributed run costs, measured in one run (ratios, since these machines are noisy).

1. Orchestration overhead per sample: the same clip through the same zero-latency test-double services
   (``--backend double``), once in-process (the embedded default's ``run_sample``) and once over the queues
   (gateway-side submission, stage messages on ``sparkle.cpu``, service calls on six queues, artifacts in the
   store, one sample at a time). Overhead = distributed wall - in-process wall, per sample.
2. Busy fraction of the slowest service in a bulk run: every service call sleeps its capacity-plan
   GPU-seconds x ``--scale`` (control synthesis 600 s -> 2 s at 1/300), one worker per service, a bounded
   window of samples in flight. Busy fraction = summed call time / (last call end - first call start), from
   the start and end times the service workers record with every answer. Target: >= 0.95.

    .venv/bin/python benchmarks/distributed.py [--samples 12] [--window 6] [--scale 0.00333]

Infrastructure: a private redis-server and a local-directory store (``local:DIR``), so store latency is a
filesystem's, not MinIO's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparkle.backends import load_backends  # noqa: E402
from sparkle.config import PipelineConfig  # noqa: E402
from sparkle.orchestrator import jobs, journey  # noqa: E402
from sparkle.orchestrator.celery_app import make_app  # noqa: E402
from sparkle.orchestrator.local import replace_one  # noqa: E402
from sparkle.settings import DistributedSettings  # noqa: E402
from sparkle.store import LocalStore  # noqa: E402
from sparkle.orchestrator.cluster import DOUBLES, Cluster, redis_server  # noqa: E402
from sparkle.queues import CPU_QUEUE, SERVICE_QUEUES  # noqa: E402

CLIP = REPO.parent / "shared" / "data" / "videos" / "static_01_juggle.mp4"
PROMPT = "Replace the background with a snowy mountain village at dusk"
CONFIG = PipelineConfig(conform={"max_long_side": 320, "max_short_side": 192, "max_frames": 17})


def wait(store, ids, timeout_s=900):
    deadline = time.monotonic() + timeout_s
    while True:
        docs = [jobs.read_job(store, i) for i in ids]
        if all(d["state"] in jobs.TERMINAL for d in docs):
            return docs
        if time.monotonic() > deadline:
            raise TimeoutError([(d["id"], d["state"], d["stage"]) for d in docs])
        time.sleep(0.05)


def op_results(redis_url: str) -> list[dict]:
    """Every service call's answer kept by the result backend: ``(task id, worker start/end)``."""
    import redis

    r = redis.Redis.from_url(redis_url)
    out = []
    for key in r.scan_iter("celery-task-meta-*"):
        meta = json.loads(r.get(key))
        if meta.get("status") == "SUCCESS" and isinstance(meta.get("result"), dict) and "worker" in meta["result"]:
            service = meta["task_id"].split(".")[1]
            out.append({"service": service, **meta["result"]["worker"]})
    return out


def busy_fraction(calls: list[dict]) -> float:
    span = max(c["ended"] for c in calls) - min(c["started"] for c in calls)
    return sum(c["ended"] - c["started"] for c in calls) / span if span > 0 else 1.0


def main(samples: int = typer.Option(12, "--samples", min=2), window: int = typer.Option(6, "--window", min=1),
         scale: float = typer.Option(1 / 300, "--scale", help="x capacity-plan GPU-seconds per call"),
         overhead_samples: int = typer.Option(5, "--overhead-samples", min=1)) -> None:
    with tempfile.TemporaryDirectory(prefix="sparkle-bench-") as tmp:
        tmp = Path(tmp)
        with redis_server() as url:
            run(tmp, url, samples, window, scale, overhead_samples)


def run(tmp: Path, redis_base: str, samples: int, window: int, scale: float, overhead_samples: int) -> None:
    # --- 1. orchestration overhead, zero-latency services ---------------------------------------------
    backends = load_backends(DOUBLES, {s: {} for s in ("grounding", "image_edit", "i2v", "tracking", "control",
                                                          "editscore")})
    local_walls = []
    for i in range(overhead_samples):
        t0 = time.perf_counter()
        task, _ = replace_one(CLIP, PROMPT, tmp / "inprocess", config=CONFIG, backends=backends)
        local_walls.append(time.perf_counter() - t0)
        assert task.status == "accepted", task.reason

    broker = f"{redis_base}/1"
    store_url = f"local:{tmp / 'store1'}"
    env = {"SPARKLE_BROKER_URL": broker, "SPARKLE_STORE_URL": store_url}
    settings = DistributedSettings(broker_url=broker, store_url=store_url)
    store, app = LocalStore(tmp / "store1"), make_app(settings)
    with Cluster(env, tmp / "logs1") as c:
        c.worker("cpu", [CPU_QUEUE], "--pool", "threads", "--concurrency", "4")
        c.worker("services", list(SERVICE_QUEUES.values()), "--backend", DOUBLES, "--concurrency", "1")
        warm = journey.submit_files(app, store, CLIP, PROMPT, config=CONFIG)  # warm-up: imports, first decode
        wait(store, [warm["id"]])
        remote_walls = []
        for _ in range(overhead_samples):
            t0 = time.perf_counter()
            doc = journey.submit_files(app, store, CLIP, PROMPT, config=CONFIG)
            [final] = wait(store, [doc["id"]])
            remote_walls.append(time.perf_counter() - t0)
            assert final["state"] == "accepted", final
    local_s, remote_s = sorted(local_walls)[len(local_walls) // 2], sorted(remote_walls)[len(remote_walls) // 2]
    print(f"orchestration overhead (zero-latency test doubles, 17 frames 320x176, median of {overhead_samples}):")
    print(f"  in-process run_sample   {local_s * 1000:8.0f} ms per sample")
    print(f"  over queues + store     {remote_s * 1000:8.0f} ms per sample")
    print(f"  overhead                {(remote_s - local_s) * 1000:8.0f} ms per sample "
          f"(distributed / in-process = {remote_s / local_s:.2f}x)")

    # --- 2. busy fraction of the slowest service in a bulk run ------------------------------------------
    broker = f"{redis_base}/2"
    store_url = f"local:{tmp / 'store2'}"
    env = {"SPARKLE_BROKER_URL": broker, "SPARKLE_STORE_URL": store_url}
    store, app = LocalStore(tmp / "store2"), make_app(DistributedSettings(broker_url=broker, store_url=store_url))
    with Cluster(env, tmp / "logs2") as c:
        c.worker("cpu", [CPU_QUEUE], "--pool", "threads", "--concurrency", str(max(4, window)))
        for q in SERVICE_QUEUES.values():
            c.worker(q.split(".")[1], [q], "--backend", DOUBLES, "--option", f"scale={scale}", "--concurrency", "1")
        inputs = tmp / "inputs"
        inputs.mkdir()
        (inputs / CLIP.name).write_bytes(CLIP.read_bytes())
        manifest = inputs / "manifest.jsonl"
        manifest.write_text("".join(json.dumps({"video": CLIP.name, "prompt": f"{PROMPT}, variant {i}"}) + "\n"
                                    for i in range(samples)))
        t0 = time.perf_counter()
        proc = subprocess.run([str(Path(sys.executable).with_name("sparkle")), "enqueue", str(manifest), "--window",
                               str(window), "--max-size", "320x192", "--max-frames", "17", "--poll-s", "0.1",
                               "--json"], env=c.env, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        status = json.loads(proc.stdout)
        calls = op_results(broker)
    by_service: dict[str, list[dict]] = {}
    for call in calls:
        by_service.setdefault(call["service"], []).append(call)
    print(f"\nbulk run: {samples} samples, window {window}, service calls sleep capacity-plan GPU-s x {scale:.5f}; "
          f"{status['counts']} in {wall:.1f} s")
    print(f"  {'service':<11} {'calls':>5} {'busy s':>8} {'span s':>8} {'busy fraction':>14}")
    for service, cs in sorted(by_service.items(), key=lambda kv: -sum(c["ended"] - c["started"] for c in kv[1])):
        busy = sum(c["ended"] - c["started"] for c in cs)
        span = max(c["ended"] for c in cs) - min(c["started"] for c in cs)
        print(f"  {service:<11} {len(cs):>5} {busy:>8.2f} {span:>8.2f} {busy_fraction(cs):>14.3f}")
    slowest = max(by_service, key=lambda s: sum(c["ended"] - c["started"] for c in by_service[s]))
    frac = busy_fraction(by_service[slowest])
    print(f"slowest service: {slowest}, busy fraction {frac:.3f} (target >= 0.95: {'met' if frac >= 0.95 else 'MISSED'})")


if __name__ == "__main__":
    typer.run(main)
