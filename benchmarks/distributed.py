"""What the distributed run costs, measured in one run (ratios, since these machines are noisy).

1. Orchestration overhead per sample: the same clip through the same zero-latency test-double services
   (``--backend double``), once in-process (the embedded default's ``run_sample``) and once over the queues
   (gateway-side submission, stage messages on ``sparkle.cpu``, service calls on six queues, artifacts in the
   store, one sample at a time). Overhead = distributed wall - in-process wall, per sample.
2. Busy fraction of the slowest service in a bulk run: every service call sleeps its capacity-plan
   GPU-seconds x ``--scale`` (control synthesis 600 s -> 2 s at 1/300), one worker per service, a bounded
   window of samples in flight. Busy fraction = summed call time / (last call end - first call start), from
   the start and end times the service workers record with every answer. Target: >= 0.95.
3. A balanced bulk run: every service's replica count follows the capacity plan (``sparkle capacity``) for a
   target rate, and every call sleeps the plan's GPU-seconds x ``--balanced-scale``. Replicas are threads of
   one worker per service (the doubles only sleep). The plan is made for this run's funnel: the doubles accept
   every sample (every gate keeps 1.0), every entry brings its prompt (``--prompts-given 1``), and the
   replicas are saturated (utilisation 1.0). Reported, over the steady window (from one control-call duration
   after the first control call starts, until the last sample enters its first GPU call): the busy fraction
   of every service (busy replica-seconds / (replicas x window)) and the throughput against the plan's
   prediction (its target rate, in real time: rate / scale). Targets: every service >= 0.90, throughput
   within 10 %. A call costs more than its sleep (the doubles fetch, decode, encode and store like the real
   services, under CPU contention): the run prints each service's measured overhead per call and the
   ``--balanced-overhead`` flags that plan the next run with it (the plan's ``--overhead``, in this run's
   seconds: divided by the scale before planning).

    .venv/bin/python benchmarks/distributed.py [--part all|overhead|bulk|balanced] [--samples 12] [--window 6]
        [--scale 0.00333] [--balanced-rate 26000] [--balanced-scale 0.2] [--balanced-samples 600]
        [--balanced-overhead i2v=4.2 ...]

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

from sparkle.backends import SERVICES, load_backends  # noqa: E402
from sparkle.capacity import GATES, _pairs, plan  # noqa: E402
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
    """Every service call's answer kept by the result backend: sample, service, operation and the worker's
    start and end times (epoch seconds)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    out = []
    for key in r.scan_iter("celery-task-meta-*"):
        meta = json.loads(r.get(key))
        if meta.get("status") == "SUCCESS" and isinstance(meta.get("result"), dict) and "worker" in meta["result"]:
            sample, service, op = meta["task_id"].split(".")[:3]
            out.append({"sample": sample, "service": service, "op": op, **meta["result"]["worker"]})
    return out


def busy_fraction(calls: list[dict]) -> float:
    span = max(c["ended"] for c in calls) - min(c["started"] for c in calls)
    return sum(c["ended"] - c["started"] for c in calls) / span if span > 0 else 1.0


def main(part: str = typer.Option("all", "--part", help="all, overhead, bulk or balanced"),
         samples: int = typer.Option(12, "--samples", min=2), window: int = typer.Option(6, "--window", min=1),
         scale: float = typer.Option(1 / 300, "--scale", help="x capacity-plan GPU-seconds per call"),
         overhead_samples: int = typer.Option(5, "--overhead-samples", min=1),
         balanced_rate: int = typer.Option(26_000, "--balanced-rate", help="plan target, accepted pairs per day"),
         balanced_scale: float = typer.Option(0.2, "--balanced-scale", help="x plan GPU-seconds per call"),
         balanced_samples: int = typer.Option(600, "--balanced-samples", min=10),
         balanced_window: int = typer.Option(300, "--balanced-window", min=1),
         balanced_overhead: list[str] = typer.Option([], "--balanced-overhead",
                                                     help="SERVICE=seconds per call beyond the sleep, in this "
                                                          "run's time (printed by the previous balanced run)")) -> None:
    if part not in ("all", "overhead", "bulk", "balanced"):
        raise typer.BadParameter("--part is all, overhead, bulk or balanced")
    with tempfile.TemporaryDirectory(prefix="sparkle-bench-") as tmp:
        tmp = Path(tmp)
        with redis_server() as url:
            if part in ("all", "overhead"):
                overhead(tmp, url, overhead_samples)
            if part in ("all", "bulk"):
                bulk(tmp, url, samples, window, scale)
            if part in ("all", "balanced"):
                balanced(tmp, url, balanced_rate, balanced_scale, balanced_samples, balanced_window,
                         _overheads(balanced_overhead))


def _overheads(items: list[str]) -> dict[str, float]:
    """``--balanced-overhead SERVICE=seconds`` items (``sparkle capacity --overhead``'s parser, service names
    checked)."""
    out = _pairs(items, "--balanced-overhead")
    unknown = set(out) - set(SERVICES)
    if unknown:
        raise typer.BadParameter(f"--balanced-overhead: unknown service(s) {sorted(unknown)} (one of {list(SERVICES)})")
    return out


def enqueue(c: Cluster, tmp: Path, samples: int, window: int, poll_s: float, prompts: bool = True) -> tuple[dict, float]:
    """``sparkle enqueue`` a manifest of ``samples`` copies of the clip; returns its final status and wall (s)."""
    inputs = tmp / "inputs"
    inputs.mkdir(exist_ok=True)
    (inputs / CLIP.name).write_bytes(CLIP.read_bytes())
    manifest = inputs / f"manifest-{samples}.jsonl"
    manifest.write_text("".join(json.dumps({"video": CLIP.name, **({"prompt": f"{PROMPT}, variant {i}"} if prompts
                                                                   else {"theme": "location"})}) + "\n"
                                for i in range(samples)))
    t0 = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).with_name("sparkle")), "enqueue", str(manifest), "--window",
                           str(window), "--max-size", "320x192", "--max-frames", "17", "--poll-s", str(poll_s),
                           "--json"], env=c.env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout), wall


def overhead(tmp: Path, redis_base: str, overhead_samples: int) -> None:
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


def bulk(tmp: Path, redis_base: str, samples: int, window: int, scale: float) -> None:
    # --- 2. busy fraction of the slowest service in a bulk run ------------------------------------------
    broker = f"{redis_base}/2"
    store_url = f"local:{tmp / 'store2'}"
    env = {"SPARKLE_BROKER_URL": broker, "SPARKLE_STORE_URL": store_url}
    with Cluster(env, tmp / "logs2") as c:
        c.worker("cpu", [CPU_QUEUE], "--pool", "threads", "--concurrency", str(max(4, window)))
        for q in SERVICE_QUEUES.values():
            c.worker(q.split(".")[1], [q], "--backend", DOUBLES, "--option", f"scale={scale}", "--concurrency", "1")
        status, wall = enqueue(c, tmp, samples, window, 0.1)
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


def _plan(rate: int, scale: float, overhead: dict[str, float]) -> dict:
    """The capacity plan for this run's funnel; ``overhead``: seconds per call in this run's (scaled) time."""
    return plan(accepted=rate, days=1.0, utilisation=1.0, keep={g[0]: 1.0 for g in GATES}, prompts_given=1.0,
                overhead={svc: overhead.get(svc, 0.0) / scale for svc in SERVICES})


def balanced(tmp: Path, redis_base: str, rate: int, scale: float, samples: int, window: int,
             overhead: dict[str, float]) -> None:
    # --- 3. a balanced bulk run: replicas from the capacity plan -----------------------------------------
    p = _plan(rate, scale, overhead)
    replicas = {svc: p["services"][svc]["gpus_rounded"] for svc in SERVICES}
    predicted = rate / 86_400 / scale  # samples per real second
    broker = f"{redis_base}/3"
    store_url = f"local:{tmp / 'store3'}"
    env = {"SPARKLE_BROKER_URL": broker, "SPARKLE_STORE_URL": store_url}
    print(f"\nbalanced bulk run: plan for {rate:,} accepted pairs a day (every gate keeps all, prompts given, "
          f"utilisation 1.0, overhead s per call {overhead or 0}) -> replicas {replicas}; calls sleep plan "
          f"GPU-s x {scale:g}; {samples} samples, "
          f"window {window}; plan predicts {predicted:.3f} samples/s", flush=True)
    with Cluster(env, tmp / "logs3") as c:
        c.worker("cpu", [CPU_QUEUE], "--pool", "threads", "--concurrency", str(window + 16), ready_s=120)
        for svc, n in replicas.items():
            q = SERVICE_QUEUES[svc]
            c.worker(svc, [q], "--backend", DOUBLES, "--option", f"scale={scale}", "--pool", "threads",
                     "--concurrency", str(n), ready_s=120)
        status, wall = enqueue(c, tmp, samples, window, 1.0)
        calls = op_results(broker)
    control_s = scale * next(c["gpu_s"] for c in p["calls"] if c["call"] == "control.synthesize")
    t_a = min(c["started"] for c in calls if c["service"] == "control") + control_s
    first_call: dict[str, float] = {}  # sample -> start of its first GPU call
    for c in calls:
        first_call[c["sample"]] = min(first_call.get(c["sample"], c["started"]), c["started"])
    t_b = max(first_call.values())  # the last sample enters: from here on, upstream services run dry
    span = t_b - t_a
    if span <= control_s:
        raise SystemExit(f"the steady window is {span:.0f} s, shorter than one control call ({control_s:.0f} s): "
                         "run more --balanced-samples")
    done = sum(1 for c in calls if c["service"] == "control" and t_a <= c["ended"] <= t_b)
    print(f"  {status['counts']} in {wall:.0f} s; steady window {span:.0f} s "
          f"({span / control_s:.1f} control-call durations)")
    # Service time per sample, measured (all calls) and as the plan counts it (its GPU-seconds x scale): the
    # difference is what a call costs beyond its GPU work (fetching, decoding, encoding, storing artifacts).
    # The plan's replica-seconds per sample (GPU x scale + the overhead it was given) against the measured
    # ones; the measured overhead per call = (measured - slept) / calls.
    planned = {svc: scale * p["services"][svc]["replica_s_per_accepted"] for svc in replicas}
    print(f"  {'service':<11} {'replicas':>8} {'calls':>6} {'s/sample':>9} {'plan s':>7} {'overhead s/call':>16} "
          f"{'busy fraction':>14}")
    fractions, measured_overhead = {}, {}
    for svc, n in replicas.items():
        mine = [c for c in calls if c["service"] == svc]
        busy = sum(max(0.0, min(c["ended"], t_b) - max(c["started"], t_a)) for c in mine)
        fractions[svc] = busy / (n * span)
        n_samples = len({c["sample"] for c in mine})
        per_sample = sum(c["ended"] - c["started"] for c in mine) / n_samples
        slept = scale * p["services"][svc]["gpu_s_per_accepted"]
        measured_overhead[svc] = max(0.0, (per_sample - slept) * n_samples / len(mine))
        print(f"  {svc:<11} {n:>8} {len(mine):>6} {per_sample:>9.2f} {planned[svc]:>7.2f} "
              f"{measured_overhead[svc]:>16.3f} {fractions[svc]:>14.3f}")
    replanned = _plan(rate, scale, measured_overhead)
    flags = " ".join(f"--balanced-overhead {svc}={v:.3f}" for svc, v in measured_overhead.items())
    print(f"  with the measured overhead the plan gives replicas "
          f"{ {svc: replanned['services'][svc]['gpus_rounded'] for svc in SERVICES} } (re-run: {flags})")
    measured = done / span
    print(f"  throughput {measured:.3f} samples/s in the steady window, plan {predicted:.3f}: ratio "
          f"{measured / predicted:.3f}")
    worst = min(fractions, key=fractions.get)
    ok = fractions[worst] >= 0.90 and abs(measured / predicted - 1) <= 0.10
    print(f"balanced run: least busy service {worst} at {fractions[worst]:.3f}, throughput / plan "
          f"{measured / predicted:.3f} (targets >= 0.90 and within 10 %: {'met' if ok else 'MISSED'})")


if __name__ == "__main__":
    typer.run(main)
