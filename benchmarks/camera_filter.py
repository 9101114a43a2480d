"""Benchmark: the Stage 1 camera filter on files against a decode-only pass over the same frames.

Run: ``.venv/bin/python benchmarks/camera_filter.py [--reps 7] [--threads 1] [--videos DIR]``

For each repetition and each real clip (``../shared/data/videos``: two fixed-camera clips, one handheld) it
times, with ``time.perf_counter``, (a) ``check_fixed_camera_file`` (decode the analysed span, keep and grey
the 2-FPS samples, measure) and (b) a decode-only pass that decodes every frame of the same analysed span
(the first ``analysis_max_frames`` = 81 frames) and does nothing else. The two alternate in order from one
repetition to the next (interleaved), and medians are reported. The target is filter / decode-only <= 1.3x.

``--threads 1`` (default) decodes single-threaded and sets ``cv2.setNumThreads(1)``, so one process uses one
core and "clips per second per core" is clips / filter seconds. ``--threads 0`` lets FFmpeg and OpenCV use
every core (per-core figures then divide by ``os.cpu_count()``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import av
import cv2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "shared"))

from sparkle.algorithms.camera import check_fixed_camera_file  # noqa: E402
from sparkle.config import CameraFilterConfig  # noqa: E402

CLIPS = ["static_01_juggle.mp4", "static_03_pedestrians_vtest.mp4", "moving_01_bedroom.mp4"]


def decode_only(path: Path, max_frames: int | None, threads: int) -> int:
    """Decode every frame of the analysed span (no conversion, no analysis); returns the frame count."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if threads == 1:
            stream.thread_type = "SLICE"
            stream.codec_context.thread_count = 1
        else:
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
        n = 0
        for _ in container.decode(stream):
            n += 1
            if max_frames is not None and n >= max_frames:
                break
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7, help="repetitions per clip (medians reported)")
    ap.add_argument("--threads", type=int, default=1, help="decoder/OpenCV threads: 1 = one core, 0 = all")
    ap.add_argument("--videos", type=Path, default=Path(os.environ.get(
        "SPARKLE_TEST_VIDEOS", REPO.parent / "shared" / "data" / "videos")))
    args = ap.parse_args()
    cv2.setNumThreads(args.threads if args.threads > 0 else -1)
    cfg = CameraFilterConfig()
    clips = [args.videos / c for c in CLIPS]
    missing = [c for c in clips if not c.is_file()]
    if missing:
        sys.exit(f"missing clips: {missing}")

    # warm-up (imports, codec init, swscale contexts) is not measured
    for c in clips:
        check_fixed_camera_file(c, cfg, threads=args.threads)
        decode_only(c, cfg.analysis_max_frames, args.threads)

    t_filter: dict[str, list[float]] = {c.name: [] for c in clips}
    t_decode: dict[str, list[float]] = {c.name: [] for c in clips}
    decisions = {}
    for rep in range(args.reps):
        for c in clips:
            order = ("filter", "decode") if rep % 2 == 0 else ("decode", "filter")
            for what in order:
                t0 = time.perf_counter()
                if what == "filter":
                    decisions[c.name] = check_fixed_camera_file(c, cfg, threads=args.threads)
                    t_filter[c.name].append(time.perf_counter() - t0)
                else:
                    decode_only(c, cfg.analysis_max_frames, args.threads)
                    t_decode[c.name].append(time.perf_counter() - t0)

    cores = 1 if args.threads == 1 else (os.cpu_count() or 1)
    print(f"camera filter benchmark: {args.reps} interleaved repetitions per clip, medians; "
          f"threads={args.threads} ({cores} core(s) counted); analysis {cfg.analysis_width} px, "
          f"{cfg.sample_fps:g} FPS, first {cfg.analysis_max_frames} frames\n")
    head = f"{'clip':34s} {'acc':>4s} {'corner':>7s} {'border':>7s} {'inl':>5s} {'pairs':>5s} {'frames':>6s} " \
           f"{'filter ms':>9s} {'decode ms':>9s} {'ratio':>6s}"
    print(head)
    print("-" * len(head))
    tot_f = tot_d = 0.0
    for c in clips:
        d = decisions[c.name]
        mf, md = statistics.median(t_filter[c.name]), statistics.median(t_decode[c.name])
        tot_f, tot_d = tot_f + mf, tot_d + md
        print(f"{c.name:34s} {'yes' if d.accepted else 'no':>4s} {d.corner_px:7.3f} {d.border_px:7.3f} "
              f"{d.inlier_ratio:5.2f} {d.pairs:5d} {d.frames_decoded:6d} {mf * 1e3:9.1f} {md * 1e3:9.1f} "
              f"{mf / md:6.2f}")
    print("-" * len(head))
    print(f"{'all three (sum of medians)':34s} {'':>4s} {'':>7s} {'':>7s} {'':>5s} {'':>5s} {'':>6s} "
          f"{tot_f * 1e3:9.1f} {tot_d * 1e3:9.1f} {tot_f / tot_d:6.2f}")
    print(f"\nfilter / decode-only: {tot_f / tot_d:.2f}x (target <= 1.3x)")
    print(f"throughput: {len(clips) / tot_f:.2f} clips/s in one process = "
          f"{len(clips) / tot_f / cores:.2f} clips/s per core (decode-only: {len(clips) / tot_d / cores:.2f})")


if __name__ == "__main__":
    main()
