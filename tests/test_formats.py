"""Unit tests of the format contract: mask files, boxes, sample ids, conform sizes, store semantics."""

from __future__ import annotations

import numpy as np
import pytest

from sparkle import layout
from sparkle.boxes import to_normalised, to_pixels
from sparkle.config import ConformConfig
from sparkle.masks import pack_mask, unpack_mask
from sparkle.media import conformed_size, sample_indices, trimmed_length


@pytest.mark.parametrize("shape", [(1, 1, 1), (81, 7, 13), (5, 64, 48)])
def test_mask_roundtrip_matches_the_released_reader(shape, tmp_path):
    rng = np.random.default_rng(sum(shape))
    mask = rng.random(shape) > 0.5
    path = tmp_path / "m.npz"
    path.write_bytes(pack_mask(mask))
    with np.load(path) as z:  # the reader documented in formats.md, verbatim
        t, h, w = z["shape"]
        back = np.unpackbits(z["mask"])[: t * h * w].reshape(t, h, w).astype(bool)
        assert z["mask"].dtype == np.uint8 and z["mask"].size == -(-mask.size // 8)
    np.testing.assert_array_equal(back, mask)
    np.testing.assert_array_equal(unpack_mask(path.read_bytes()), mask)


def test_box_to_pixels_follows_formats_md():
    # int(v / 1000 * W), clamped, corners ordered
    assert to_pixels([100, 200, 500, 900], 832, 464) == (83, 92, 416, 417)
    assert to_pixels([500, 900, 100, 200], 832, 464) == (83, 92, 416, 417)
    assert to_pixels([-50, 0, 1200, 1000], 100, 50) == (0, 0, 100, 50)
    assert to_pixels([], 100, 100) is None
    assert to_pixels([1, 2, 3], 100, 100) is None
    assert to_pixels(["a", 2, 3, 4], 100, 100) is None
    assert to_pixels([10, 10, 10, 50], 100, 100) is None  # zero width


def test_normalised_box_covers_the_pixel_box():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = rng.integers(16, 2000, size=2)
        x1, x2 = sorted(rng.integers(0, w, size=2))
        y1, y2 = sorted(rng.integers(0, h, size=2))
        if x2 == x1 or y2 == y1:
            continue
        n = to_normalised((x1, y1, x2, y2), w, h)
        assert all(0 <= v <= 1000 for v in n)
        px = to_pixels(n, w, h)
        assert px[0] <= x1 and px[1] <= y1 and px[2] >= x2 - 1 and px[3] >= y2 - 1


def test_sample_ids():
    assert layout.sample_id("location", 0) == "Sparkle_location_000000"
    assert layout.parse_sample_id("Sparkle_season_000123") == ("season", 123)
    with pytest.raises(ValueError):
        layout.sample_id("weather", 1)


def test_conform_sizes_and_lengths():
    cfg = ConformConfig()
    assert conformed_size(832, 468, cfg)[2:] == (832, 464)
    assert conformed_size(480, 360, cfg)[2:] == (480, 352)
    assert conformed_size(1920, 1080, cfg)[2:] == (832, 464)  # 832x468 after scaling, cropped to 16s
    assert conformed_size(1080, 1920, cfg)[2:] == (464, 832)  # portrait: long side vertical
    big = ConformConfig(max_long_side=1280, max_short_side=720)
    assert conformed_size(1920, 1080, big)[2:] == (1280, 720)
    assert [trimmed_length(t, 81) for t in (1, 4, 5, 60, 81, 200)] == [1, 1, 5, 57, 81, 81]
    assert sample_indices(81, 16, 2) == list(range(0, 81, 8))
    assert sample_indices(57, 10, 2) == list(range(0, 57, 5))


def _numbered_clip(path, fps: float, n: int):
    """``n`` frames at ``fps`` that carry their index in two flat halves, coarse enough for H.264 to keep:
    left = 25 x (index % 10), right = 10 x (index // 10) (index < 250)."""
    from sparkle.media import write_video

    frames = np.zeros((n, 64, 96, 3), np.uint8)
    for i in range(n):
        frames[i, :, :48], frames[i, :, 48:] = 25 * (i % 10), 10 * (i // 10)
    return write_video(path, frames, fps)


def _source_index(frames: np.ndarray) -> list[int]:
    w = frames.shape[2]
    return [int(round(float(f[:, 4:w // 2 - 4].mean()) / 25)) + 10 * int(round(float(f[:, w // 2 + 4:-4].mean()) / 10))
            for f in frames]


@pytest.mark.parametrize("src_fps", [30, 10, 16])
def test_conform_resamples_to_16_fps_by_timestamp_covering_the_same_seconds(tmp_path, src_fps):
    """A 30 fps and a 10 fps source become 16 fps samples over the same seconds (frames dropped or repeated by
    time), at most 81 frames (4k+1); a 16 fps source is unchanged. Decoding with ``fps`` and resampling a
    decoded video in memory agree."""
    from sparkle.media import conform, read_video

    n = int(4 * src_fps)  # 4 s: 4 * 16 = 64 output frames, trimmed to 61 (4k+1)
    path = _numbered_clip(tmp_path / f"c{src_fps}.mp4", src_fps, n)
    cfg = ConformConfig(max_long_side=96, max_short_side=64)
    assert cfg.fps == 16.0
    video = conform(read_video(path, max_frames=cfg.max_frames, fps=cfg.fps), cfg)
    assert video.fps == 16.0 and video.shape == (61, 64, 96)
    expected = [int(np.floor(k / 16 * src_fps + 1e-6)) for k in range(61)]  # the frame on screen at k / 16 s
    assert _source_index(video.frames) == expected
    assert _source_index(conform(read_video(path), cfg).frames) == expected  # in memory, the same frames
    # a long clip is decoded for max_frames / 16 seconds only: 81 frames = 5.06 s at 16 fps
    long = _numbered_clip(tmp_path / "long.mp4", src_fps, int(8 * src_fps))
    out = read_video(long, max_frames=81, fps=16)
    assert out.shape[0] == 81 and _source_index(out.frames)[-1] == int(np.floor(80 / 16 * src_fps + 1e-6))
    kept = conform(read_video(path, max_frames=81), ConformConfig(max_long_side=96, max_short_side=64, fps=None))
    assert kept.fps == src_fps and kept.shape[0] == trimmed_length(n, 81)  # fps=None keeps the source's rate


def test_resampling_follows_variable_frame_rate_timestamps():
    from sparkle.media import resample_times

    times = [0.0, 0.1, 0.15, 0.5, 0.55]  # a stall between 0.15 s and 0.5 s
    assert resample_times(times, 0.6, 10) == [0, 1, 2, 2, 2, 3]
    assert resample_times([0.0, 1 / 16, 2 / 16], 3 / 16, 16) == [0, 1, 2]  # exact stamps keep their slots


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u0085", "\x0b", "\x1c"])
def test_jsonl_and_csv_survive_line_breaks_that_json_keeps_raw(char, tmp_path):
    """A prompt holding U+2028 (or another break str.splitlines knows), a quote, a comma and a newline is
    published (record document), materialised into the layout, merged into again by a later publish, exported,
    and read back: by pandas as Kiwi-Edit reads the CSV, by csv.DictReader and by the JSONL readers; every line
    after it is still its own record."""
    import csv
    import json

    import pandas as pd

    from sparkle.export import export_dataset
    from sparkle.published import materialise_layout, published_documents
    from sparkle.store import LocalStore
    from tests.test_published import publish_synthetic

    store = LocalStore(tmp_path / "store")
    prompt = f"Replace the background with a beach{char}at dusk, \"golden\"\nhour"
    publish_synthetic(store, "location", 0, prompt)
    publish_synthetic(store, "location", 2)
    materialise_layout(store)
    publish_synthetic(store, "location", 1, f"second{char}one")  # merged between the two existing lines
    materialise_layout(store)
    export_dataset(store, tmp_path / "export")
    prompts = [prompt, f"second{char}one"]
    for root in (store.root, tmp_path / "export"):
        key, csv_key = root / layout.prompts_metadata("location"), root / layout.prompts_csv("location")
        raw = key.read_text(encoding="utf-8")
        assert (char in raw) == (ord(char) >= 0x20)  # JSON escapes C0 controls; the others are written raw
        metadata = [json.loads(line) for line in raw.split("\n") if line]
        assert [m["prompt"] for m in metadata][:2] == prompts and len(metadata) == 3
        assert [r["prompt"] for r in LocalStore(root).read_jsonl(layout.prompts_metadata("location"))][:2] == prompts
        for name in layout.RECORD_NAMES:
            lines = [json.loads(line) for line in (root / layout.record("location", name)).read_bytes().split(b"\n")
                     if line]
            assert [r["id"] for r in lines] == [layout.sample_id("location", i) for i in range(3)], name
        frame = pd.read_csv(csv_key)
        assert list(frame["prompt"])[:2] == prompts
        assert list(frame["task"]) == [layout.sample_id("location", i) for i in range(3)]
        with open(csv_key, newline="", encoding="utf-8") as f:
            assert [r["prompt"] for r in csv.DictReader(f)][:2] == prompts
    assert [d["row"]["prompt"] for d in published_documents(store, "location")][:2] == prompts


def test_a_manifest_line_may_hold_u2028():
    import json

    from sparkle.orchestrator.datasets import parse_manifest

    prompt = "Replace the background with a beach\u2028at dusk"
    text = "\n".join(json.dumps({"video": f"{i}.mp4", "prompt": prompt}, ensure_ascii=False) for i in range(2))
    assert [e.prompt for e in parse_manifest(text + "\n")] == [prompt, prompt]


def test_frames_over_the_pixel_budget_are_refused_before_decoding(tmp_path):
    """A few-KB H.264 file declaring 4096x2304 frames (over 3840x2160) and a 4000x4000 palette PNG of a few KB
    are refused from their headers in well under a second with TooLarge (HTTP 413), nothing decoded; a
    20000x20000 PNG trips Pillow's own bomb check, which is a TooLarge too (it was an HTTP 500)."""
    import time

    from PIL import Image

    from sparkle.errors import TooLarge
    from sparkle.media import MAX_FRAME_PIXELS, read_image, read_video, write_video

    bomb = write_video(tmp_path / "bomb.mp4", np.zeros((2, 2304, 4096, 3), np.uint8), 16)
    assert bomb.stat().st_size < 64_000 and 4096 * 2304 > MAX_FRAME_PIXELS
    started = time.perf_counter()
    with pytest.raises(TooLarge, match="4096x2304"):
        read_video(bomb)
    assert time.perf_counter() - started < 1.0
    png = tmp_path / "bomb.png"
    Image.new("P", (4000, 4000)).save(png, optimize=True)  # over our budget, under Pillow's own limit
    assert png.stat().st_size < 200_000
    started = time.perf_counter()
    with pytest.raises(TooLarge, match="4000x4000"):
        read_image(png)
    assert time.perf_counter() - started < 1.0
    huge = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(huge)  # past Pillow's own bomb limit too
    with pytest.raises(TooLarge):
        read_image(huge)


def test_conforming_a_file_frame_by_frame_gives_the_same_frames():
    from sparkle.media import conform, conform_file, read_video

    from .conftest import PEDESTRIANS

    cfg = ConformConfig(max_long_side=320, max_short_side=192, max_frames=33)
    a = conform_file(PEDESTRIANS, cfg)
    b = conform(read_video(PEDESTRIANS, max_frames=33, fps=16), cfg)
    assert a.fps == b.fps == 16.0 and np.array_equal(a.frames, b.frames)


def test_the_16_kb_8k_bomb_is_refused_in_under_a_second_and_200_mb(tmp_path):
    """The issue's bomb: a ~16 KB video of 8192x4320 frames was accepted and cost 2.58 GB at 9 frames. Its
    refusal, in a fresh process as the gateway or a worker meets it, takes < 1 s and peaks < 200 MB, and adds
    under 20 MB to what the imports took (FFmpeg's stream probe decoded one frame, +90 MB, until it was told
    to skip frames for the header check)."""
    import subprocess
    import sys

    from sparkle.media import write_video

    bomb = write_video(tmp_path / "bomb.mp4", np.zeros((2, 4320, 8192, 3), np.uint8), 16)
    assert bomb.stat().st_size < 20_000
    # VmHWM (this process image's peak RSS), not ru_maxrss, which keeps the forking parent's across exec.
    probe = ("import sys, time\n"
             "from sparkle.config import ConformConfig\n"
             "from sparkle.errors import TooLarge\n"
             "from sparkle.media import conform_file\n"
             "def hwm():\n    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
             "base = hwm()\n"
             "t = time.perf_counter()\n"
             "try:\n    conform_file(sys.argv[1], ConformConfig())\nexcept TooLarge as exc:\n    print('refused', exc)\n"
             "print(time.perf_counter() - t, hwm() / 1024, (hwm() - base) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", probe, str(bomb)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    refused, figures = out.stdout.strip().splitlines()
    seconds, peak_mb, added_mb = map(float, figures.split())
    assert refused.startswith("refused") and "8192x4320" in refused
    assert seconds < 1.0 and peak_mb < 200 and added_mb < 20, (seconds, peak_mb, added_mb)


def test_a_container_that_names_its_streams_only_when_probed_is_still_checked(tmp_path):
    """MPEG-TS takes no per-stream probe options (PyAV raises ValueError): the budget is then checked after the
    plain probe, and an oversized TS stream is still a TooLarge, not an 'undecodable' 400."""
    import av

    from sparkle.errors import TooLarge
    from sparkle.media import read_video

    path = tmp_path / "bomb.ts"
    with av.open(str(path), mode="w", format="mpegts") as c:
        s = c.add_stream("libx264", rate=16)
        s.width, s.height, s.pix_fmt = 4096, 2304, "yuv420p"
        for _ in range(2):
            for packet in s.encode(av.VideoFrame.from_ndarray(np.zeros((2304, 4096, 3), np.uint8), format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    with pytest.raises(TooLarge, match="4096x2304"):
        read_video(path)
