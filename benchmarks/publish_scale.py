"""Publish cost against dataset size, and the cost of materialising the layout (issue 12).

Publishes synthetic accepted samples into a fresh local store through the real publish path
(``sparkle.store.ArtifactStore.publish_sample``: eight staged media files moved into the layout, then one record
document), with records of the released size (:func:`sparkle.synthetic.synthetic_sample`: four EditScore
entries with raw outputs, 11 round-2 frames; about 8 KB of JSON per sample). One theme holds every sample, the
worst case for folder sizes. The timed publishes are sequential, 100 around 1 000 samples and 100 around
100 000; the publishes in between run on ``--fill-threads`` threads (publishing takes no lock, so they may).

Then the layout's shared files (the CSV, the metadata JSONL and the five record JSONL files) are materialised
from the documents into a fresh folder, once at about 1 000 samples and once at 100 000, each in a child
process whose peak resident memory (``VmHWM``) is reported; and once incrementally after 100 more
publishes (only the new documents are read).

The store lives in memory (``/dev/shm`` when it has 10 GB free, else the temp folder; ``--dir`` chooses):
on a virtual disk the write-back of the 1.6 GB of documents, not the publish, sets the pace, and a timed
window that meets a flush measures the disk. Dirty pages are synced before each timed window.

Prints, as its last line: ``publish ms per sample: at 1000 = A, at 100000 = B, ratio B/A = R`` (medians).
Goals: R <= 1.5; materialising 100 000 samples in under 5 minutes, memory not growing with the samples.
Usage: ``python benchmarks/publish_scale.py [--samples 100000] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sparkle import layout
from sparkle.published import sample_document
from sparkle.store import LocalStore, staging_prefix
from sparkle.synthetic import synthetic_sample

THEME = "location"
WINDOW = 100  # publishes timed around each point
MEDIA = (layout.source_video, layout.edited_video, layout.source_frame0, layout.edited_frame0, layout.clean_plate,
         layout.background_video, layout.mask, layout.canny_video)

_CHILD = """
import json, sys, time
from sparkle.published import materialise_layout
from sparkle.store import LocalStore
t0 = time.perf_counter()
result = materialise_layout(LocalStore(sys.argv[1]), sys.argv[2], incremental=sys.argv[3] == "1")
# VmHWM: this process's own peak (ru_maxrss would carry the forking parent's over the exec)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": hwm / 1024, "result": result}))
"""


def stage(store: LocalStore, index: int) -> tuple[dict[str, str], str, dict]:
    """Stage sample ``index``'s eight media files; return its moves, document key and document."""
    s = synthetic_sample(THEME, index)
    sid = s["id"]
    moves = {}
    for key_of in MEDIA:
        key = key_of(THEME, sid)
        moves[store.put_bytes(staging_prefix(sid) + key, sid.encode())] = key
    doc = sample_document(sid, THEME, s["prompt"], s["chosen_keyword"], s["original_scene"], s["records"])
    return moves, layout.document(THEME, sid), doc


def publish(store: LocalStore, index: int) -> float:
    """Stage then publish sample ``index``; returns the publish's wall time in ms (staging not counted)."""
    moves, key, doc = stage(store, index)
    t0 = time.perf_counter()
    assert store.publish_sample(moves, key, doc)
    return (time.perf_counter() - t0) * 1000  # the moves emptied and removed staging/{id}/


def fill(store: LocalStore, start: int, stop: int, threads: int) -> None:
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(lambda i: publish(store, i), range(start, stop), chunksize=64):
            pass


def materialise(store: LocalStore, out: Path, incremental: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(store.root), str(out), "1" if incremental else "0"],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=100_000, help="the far point (default 100000)")
    parser.add_argument("--near", type=int, default=1_000, help="the near point (default 1000)")
    parser.add_argument("--fill-threads", type=int, default=4)
    parser.add_argument("--dir", type=Path, help="where to make the temporary store (default: /dev/shm if it has "
                        "10 GB free, else the temp folder)")
    parser.add_argument("--keep", type=Path, help="keep the store in this folder (default: a temp folder, removed)")
    args = parser.parse_args()
    base = args.dir
    if base is None and Path("/dev/shm").is_dir() and shutil.disk_usage("/dev/shm").free > 10 * 10**9:
        base = Path("/dev/shm")
    root = Path(args.keep or tempfile.mkdtemp(prefix="publish-scale-", dir=base))
    store = LocalStore(root / "store")
    t_start = time.perf_counter()
    try:
        points = {}
        done = 0
        for point in (args.near, args.samples):
            lo = point - WINDOW // 2
            fill(store, done, lo, args.fill_threads)
            os.sync()
            points[point] = statistics.median(publish(store, i) for i in range(lo, lo + WINDOW))
            done = lo + WINDOW
            print(f"{done} samples published ({time.perf_counter() - t_start:.0f} s): median publish "
                  f"{points[point]:.3f} ms around {point}", flush=True)
            if point == args.near:
                near = materialise(store, root / "near", incremental=False)
                print(f"materialise {done} samples: {near['seconds']:.2f} s, peak RSS {near['peak_rss_mb']:.0f} MB",
                      flush=True)
        far = materialise(store, root / "far", incremental=False)
        size_mb = sum(p.stat().st_size for p in (root / "far").rglob("*") if p.is_file()) / 1e6
        fill(store, done, done + WINDOW, args.fill_threads)
        again = materialise(store, root / "far", incremental=True)
        print(f"materialise {done} samples ({size_mb:.0f} MB of CSV/JSONL): {far['seconds']:.1f} s, peak RSS "
              f"{far['peak_rss_mb']:.0f} MB (at {args.near}: {near['peak_rss_mb']:.0f} MB); incremental, "
              f"{WINDOW} new: {again['seconds']:.1f} s ({again['result'][THEME]['mode']}, "
              f"{again['result'][THEME]['new']} documents read)")
        a, b = points[args.near], points[args.samples]
        print(f"publish ms per sample: at {args.near} = {a:.3f}, at {args.samples} = {b:.3f}, ratio B/A = {b / a:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
