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


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u0085", "\x0b", "\x1c"])
def test_jsonl_and_csv_survive_line_breaks_that_json_keeps_raw(char, tmp_path):
    """A prompt holding U+2028 (or another break str.splitlines knows) round-trips through the JSONL and CSV
    of the layout; the line after it is still its own record, and pandas reads the CSV as Kiwi-Edit does."""
    import pandas as pd

    from sparkle.store import LocalStore

    store = LocalStore(tmp_path)
    prompt = f"Replace the background with a beach{char}at dusk, \"golden\"\nhour"
    key, csv_key = layout.prompts_metadata("location"), layout.prompts_csv("location")
    rows = [{"id": "Sparkle_location_000000", "prompt": prompt}, {"id": "Sparkle_location_000001", "prompt": "x"}]
    store.upsert_jsonl(key, rows)
    raw = store.get_bytes(key).decode()
    assert (char in raw) == (ord(char) >= 0x20)  # JSON escapes C0 controls; the others are written raw
    assert store.read_jsonl(key) == rows
    store.upsert_jsonl(key, [{"id": "Sparkle_location_000001", "prompt": "y"}])  # a later read-modify-write
    assert [r["prompt"] for r in store.read_jsonl(key)] == [prompt, "y"]
    csv_rows = [{"prompt": prompt, "src_video": "a.mp4", "tgt_video": "b.mp4", "task": "Sparkle_location_000000"},
                {"prompt": "x", "src_video": "c.mp4", "tgt_video": "d.mp4", "task": "Sparkle_location_000001"}]
    store.upsert_csv(csv_key, layout.CSV_COLUMNS, csv_rows, "task")
    assert store.read_csv(csv_key) == csv_rows
    frame = pd.read_csv(store.path(csv_key))
    assert list(frame["prompt"]) == [prompt, "x"] and list(frame["task"]) == [r["task"] for r in csv_rows]


def test_a_manifest_line_may_hold_u2028():
    import json

    from sparkle.orchestrator.datasets import parse_manifest

    prompt = "Replace the background with a beach\u2028at dusk"
    text = "\n".join(json.dumps({"video": f"{i}.mp4", "prompt": prompt}, ensure_ascii=False) for i in range(2))
    assert [e.prompt for e in parse_manifest(text + "\n")] == [prompt, prompt]
