"""The viewer's sample list at dataset scale (issue 17): one page must take under 300 ms with 100 000 samples.

Writes ``--samples`` job documents (the gateway's and ``sparkle replace``'s ``jobs/{id}.json``, with the eight
stage decisions and the gate scores of a real sample: about 3 KB each) into a fresh local store, in five themes
and every state (60 % accepted, 25 % rejected at a gate, 10 % refused at the camera filter, 5 % failed), then:

1. builds the viewer's index from nothing (``SampleIndex.refresh``: every document read once), and times a
   refresh that finds nothing changed (the stat scan the background thread repeats);
2. times list pages through the whole HTTP stack (FastAPI's TestClient on ``/ui/`` and ``/ui/api/samples``):
   the first page, a middle one and the last one; each filter (theme, state, mean O_score range, refusal stage);
   a text search; and the funnel page.

Each figure is the median of 7 requests; the last line prints the slowest page against the 300 ms budget as a
ratio (< 1 meets it). Usage: ``python benchmarks/viewer_list.py [--samples 100000] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient

from sparkle import layout
from sparkle.orchestrator.viewer import build_viewer
from sparkle.orchestrator.viewer.index import SampleIndex
from sparkle.store import LocalStore

BUDGET_MS = 300.0
STAGES = [(0, "ingest"), (1, "camera_filter"), (1, "camera_filter_fine"), (1, "instruction"), (2, "frame0_edit"),
          (3, "background_video"), (4, "bait"), (5, "synthesis")]


def job_document(i: int) -> dict:
    """A job document as ``jobs.write_job`` writes it, for sample ``i`` (deterministic mix of themes and states)."""
    et = layout.EDIT_TYPES[i % 5]
    sid = layout.sample_id(et, i)
    kind = i % 20
    state = "accepted" if kind < 12 else "rejected" if kind < 19 else "failed"
    stop = len(STAGES)
    if kind in (12, 13):
        stop = 2  # refused by the camera filter
    elif kind in (14, 15, 16):
        stop = 5  # refused at the frame-0 edit gate
    elif kind == 19:
        stop = 6  # failed in stage 4
    decisions = []
    for n, (stage, name) in enumerate(STAGES[:stop]):
        last = n == stop - 1
        accepted = not (last and state == "rejected")
        scores = {"overall": 9.1, "prompt_following": 8.7, "perceptual_quality": 9.3, "SC_reasoning": "x" * 200}
        if name == "synthesis":
            mean = 6.0 + (i % 41) / 10
            scores = {"mean_O_score": mean, "O_scores": [mean] * 4}
            accepted = mean >= 8
            state = "accepted" if accepted else "rejected"
        decisions.append({"stage": stage, "name": name, "accepted": accepted, "reason": f"{name} decision",
                          "scores": scores if name in ("frame0_edit", "background_video", "synthesis") else {},
                          "seconds": 1.5})
    error = {"stage": "bait", "reason": "ServiceRejected: tracking: HTTP 422"} if state == "failed" else None
    return {"id": sid, "edit_type": et, "state": state, "stage": decisions[-1]["name"],
            "prompt": f"Replace the background with scene number {i}, with people walking by",
            "chosen_keyword": "custom: a scene", "dataset": f"ds{i // 10000}", "owner": "", "submitted_at": 1e9 + i,
            "updated_at": 1e9 + i, "reason": "accepted at every stage" if state == "accepted" else "refused",
            "error": error, "stages": decisions, "timings": {d["name"]: d["seconds"] for d in decisions},
            "artifacts": {}, "fps": 16.0, "shape": [81, 720, 1280], "retries": 0, "callback_url": None}


def median_ms(client: TestClient, url: str, params: dict | None = None, n: int = 7) -> tuple[float, int]:
    times, status = [], 0
    for _ in range(n):
        started = time.perf_counter()
        r = client.get(url, params=params or {})
        times.append((time.perf_counter() - started) * 1000)
        status = r.status_code
        assert status == 200, (url, params, r.text[:300])
    return statistics.median(times), len(r.content)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--dir", type=Path, default=None, help="where the store goes (default: /dev/shm or temp)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    base = args.dir or Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    root = Path(tempfile.mkdtemp(prefix="sparkle-viewer-bench-", dir=base))
    try:
        store = LocalStore(root / "store")
        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: store.put_bytes(f"jobs/{layout.sample_id(layout.EDIT_TYPES[i % 5], i)}.json",
                                                    json.dumps(job_document(i)).encode()), range(args.samples)))
        print(f"wrote {args.samples} job documents in {time.perf_counter() - started:.1f} s")

        index = SampleIndex(store, root / "index.sqlite", min_interval_s=3600)
        started = time.perf_counter()
        indexed = index.refresh(force=True)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        again = index.refresh(force=True)
        rescan_s = time.perf_counter() - started
        print(f"index built from nothing: {indexed} samples in {build_s:.1f} s; a refresh finding nothing "
              f"changed ({again} re-read): {rescan_s * 1000:.0f} ms (background thread, not on the page path)")

        app = FastAPI()
        app.mount("/ui", build_viewer(store, index=index))
        client = TestClient(app)
        pages = -(-args.samples // 50)
        cases = [
            ("HTML list, first page", "/ui/", {}),
            ("HTML list, middle page", "/ui/", {"page": pages // 2}),
            ("HTML list, last page", "/ui/", {"page": pages}),
            ("JSON list, first page", "/ui/api/samples", {}),
            ("theme = season", "/ui/", {"theme": "season"}),
            ("state = rejected, page 100", "/ui/", {"state": "rejected", "page": 100}),
            ("mean O_score 8.5..9.0", "/ui/", {"min_score": 8.5, "max_score": 9.0}),
            ("refused at frame0_edit", "/ui/", {"refused": "frame0_edit"}),
            ("theme + state + score", "/ui/", {"theme": "time", "state": "accepted", "min_score": 9}),
            ("dataset = ds3", "/ui/", {"dataset": "ds3"}),
            ("text search (id or prompt)", "/ui/", {"q": "number 4242,"}),
            ("funnel page (all samples)", "/ui/funnel", {}),
        ]
        worst = 0.0
        print(f"{'page':32s} {'median ms':>10s} {'bytes':>8s}")
        for name, url, params in cases:
            ms, size = median_ms(client, url, params)
            if url != "/ui/funnel":
                worst = max(worst, ms)
            print(f"{name:32s} {ms:10.1f} {size:8d}")
        funnel_ms, _ = median_ms(client, "/ui/funnel", {}, n=3)
        print(f"list pages at {args.samples} samples: slowest {worst:.1f} ms, budget {BUDGET_MS:.0f} ms, "
              f"ratio {worst / BUDGET_MS:.3f} (funnel page {funnel_ms:.0f} ms)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
