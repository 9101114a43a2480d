"""``sparkle enqueue`` of a million-line manifest: peak memory of the client, Redis and the store (issue 12).

Writes a manifest of ``--lines`` entries (one real clip file, referenced by every line, a prompt per line),
registers it with ``sparkle enqueue --detach`` in a child process (its peak resident memory is ``ru_maxrss``),
then drives the run's first ticks in this process with no workers attached, so the window's samples stay in
flight: their stage messages wait in Redis. Reported: registration time and client peak RSS, Redis
``used_memory`` before and after (the queue holds the window, not the manifest), the store's bytes for the
dataset (the manifest's chunks: O(lines) on disk by design) and its largest object, and the size of the
progress document ``state.json``. Then the enqueue is run again, as after a crash: same dataset id, cursor
kept, nothing submitted twice.

    .venv/bin/python benchmarks/enqueue_scale.py [--lines 1000000] [--window 64]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import redis
import typer

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO.parent / "shared" / "data" / "videos" / "static_01_juggle.mp4"

from sparkle.orchestrator import datasets  # noqa: E402
from sparkle.orchestrator.celery_app import make_app  # noqa: E402
from sparkle.orchestrator.cluster import SPARKLE, redis_server  # noqa: E402
from sparkle.settings import DistributedSettings  # noqa: E402
from sparkle.store import LocalStore  # noqa: E402


def main(lines: int = typer.Option(1_000_000, "--lines", min=1), window: int = typer.Option(64, "--window", min=1),
         ticks: int = typer.Option(3, "--ticks", min=1)) -> None:
    with tempfile.TemporaryDirectory(prefix="enqueue-scale-") as tmp, redis_server() as url:
        tmp = Path(tmp)
        (tmp / CLIP.name).write_bytes(CLIP.read_bytes())
        manifest = tmp / "manifest.jsonl"
        with open(manifest, "w", encoding="utf-8") as f:
            for i in range(lines):
                f.write(json.dumps({"video": CLIP.name, "prompt": f"Replace the background with scene {i}",
                                    "theme": ("location", "season", "time", "style")[i % 4]}) + "\n")
        broker = f"{url}/0"
        env = {**os.environ, "SPARKLE_BROKER_URL": broker, "SPARKLE_STORE_URL": f"local:{tmp / 'store'}"}
        r = redis.Redis.from_url(broker)
        redis_before = r.info("memory")["used_memory"]
        t0 = time.perf_counter()
        args = [SPARKLE, "enqueue", str(manifest), "--window", str(window), "--detach"]
        first = subprocess.run(args, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if first.returncode != 0:
            raise SystemExit(first.stderr)
        client_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        did = first.stdout.strip().splitlines()[-1]
        print(f"registered {lines:,} entries as dataset {did} in {wall:.0f} s "
              f"(manifest {manifest.stat().st_size / 1e6:.0f} MB); client peak RSS {client_mb:.0f} MB")

        store = LocalStore(tmp / "store")
        app = make_app(DistributedSettings(broker_url=broker, store_url=f"local:{tmp / 'store'}"))
        for _ in range(ticks):
            state = datasets.dataset_tick(app, store, did, window)
        redis_after = r.info("memory")["used_memory"]
        keys = store.list_keys(f"datasets/{did}/")
        sizes = {k: store.path(k).stat().st_size for k in keys}
        largest = max(sizes, key=sizes.get)
        print(f"after {ticks} ticks: cursor {state['cursor']}, {len(state['in_flight'])} in flight; Redis "
              f"used_memory {redis_before / 1e6:.1f} MB -> {redis_after / 1e6:.1f} MB "
              f"({r.dbsize()} keys, {r.llen('sparkle.cpu')} queued messages)")
        print(f"store: {sum(sizes.values()) / 1e6:.0f} MB in {len(keys)} objects under datasets/{did}/ (the manifest "
              f"with ids, {datasets.CHUNK} entries per chunk); largest object {largest.split('/')[-1]} "
              f"{sizes[largest] / 1e3:.0f} kB; state.json {sizes[f'datasets/{did}/state.json']} bytes")

        t0 = time.perf_counter()  # as after a crash of the client: the same command again
        again = subprocess.run(args, env=env, capture_output=True, text=True)
        if again.returncode != 0:
            raise SystemExit(again.stderr)
        state2 = datasets.dataset_tick(app, store, did, window)
        same = again.stdout.strip().splitlines()[-1] == did
        print(f"re-run: same dataset {same}, in {time.perf_counter() - t0:.0f} s; cursor {state['cursor']} -> "
              f"{state2['cursor']} (nothing submitted twice: {state2['cursor'] == state['cursor']})")
        print(f"enqueue of {lines:,} lines: client peak RSS {client_mb:.0f} MB, Redis +"
              f"{(redis_after - redis_before) / 1e6:.1f} MB, progress document {sizes[f'datasets/{did}/state.json']} "
              f"bytes")


if __name__ == "__main__":
    typer.run(main)
