"""BAIT (every 2-FPS anchor, majority vote) against single-anchor tracking (frame 0 only), same tracker.

Run: ``.venv/bin/python benchmarks/bait_stability.py [--profile cpu|tiny] [CLIP ...]``. For each clip (default:
the fixed-camera clips in ../shared/data/videos) it conforms the source, grounds round 1 and round 2 with the
profile's grounder, tracks with the profile's tracker from every anchor (BAIT) and from frame 0 alone, and
prints the temporal stability of both masks (:func:`sparkle.algorithms.bait.temporal_stability`): mean IoU
between consecutive frames (higher is steadier), area drift over the clip and area variation (lower is
steadier), empty frames, and the ratio BAIT/single of the IoU, all measured in this one run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sparkle.algorithms.bait import anchors_from_round2, run_bait, temporal_stability
from sparkle.backends import SampleContext, load_backend
from sparkle.config import PipelineConfig
from sparkle.media import conform, read_video, sample_indices

VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "videos"
DEFAULT = [VIDEOS / "static_01_juggle.mp4", VIDEOS / "static_03_pedestrians_vtest.mp4"]


def measure(clip: Path, profile: str, cfg: PipelineConfig) -> dict:
    grounder = load_backend("grounding", profile)
    tracker = load_backend("tracking", profile)
    grounder.setup()
    tracker.setup()
    video = conform(read_video(clip, max_frames=cfg.conform.max_frames), cfg.conform)
    t, h, w = video.shape
    ctx = SampleContext(clip.stem, "benchmark", video)
    objects = grounder.ground_round1(ctx, video.frames[0], video.frames[0])
    labels = [o.label for o in objects]
    indices = sample_indices(t, video.fps, cfg.bait.anchor_fps)
    anchors, skipped = anchors_from_round2(indices, grounder.ground_round2(ctx, video.frames[indices], indices, labels),
                                           w, h)
    single = [a for a in anchors if a.frame_index == 0]
    if not single:
        raise SystemExit(f"{clip.name}: no box on frame 0, single-anchor tracking has nothing to start from")
    started = time.perf_counter()
    bait = run_bait(tracker, ctx, video.frames, anchors, cfg.bait.tie_is_foreground)
    bait_s = time.perf_counter() - started
    started = time.perf_counter()
    one = run_bait(tracker, ctx, video.frames, single, cfg.bait.tie_is_foreground)
    one_s = time.perf_counter() - started
    return {"clip": clip.name, "frames": t, "anchors": len(anchors), "skipped": len(skipped),
            "bait": temporal_stability(bait), "single": temporal_stability(one), "bait_s": bait_s, "single_s": one_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clips", nargs="*", type=Path, default=DEFAULT)
    parser.add_argument("--profile", default="cpu", choices=["cpu", "tiny"])
    args = parser.parse_args()
    cfg = PipelineConfig()
    table = Table("clip", "tracking", "anchors", "mean IoU t,t+1", "area drift", "area CV", "empty", "s",
                  title=f"BAIT vs single-anchor ({args.profile} grounder and tracker)")
    for clip in args.clips:
        r = measure(clip, args.profile, cfg)
        for kind, n, secs in (("BAIT", r["anchors"], r["bait_s"]), ("single (frame 0)", 1, r["single_s"])):
            m = r["bait" if kind == "BAIT" else "single"]
            table.add_row(r["clip"], kind, str(n), f"{m['mean_consecutive_iou']:.4f}", f"{m['area_drift']:.4f}",
                          f"{m['area_cv']:.4f}", str(m["empty_frames"]), f"{secs:.1f}")
        ratio = r["bait"]["mean_consecutive_iou"] / max(r["single"]["mean_consecutive_iou"], 1e-9)
        table.add_row(r["clip"], "ratio BAIT/single", "", f"{ratio:.3f}x", "", "", "", "")
    Console().print(table)


if __name__ == "__main__":
    main()
