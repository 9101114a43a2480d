"""``sparkle replace --profile tiny``: the whole journey through the six services' tiny model backends."""

from __future__ import annotations

import json

import numpy as np

from sparkle import layout
from sparkle.masks import unpack_mask
from sparkle.media import read_image, read_video

from .conftest import PEDESTRIANS, sparkle


def test_profile_tiny_runs_every_service_and_writes_the_layout(tmp_path):
    proc = sparkle("replace", PEDESTRIANS, "Replace the background with a rainy harbour at night", "-o", tmp_path,
                   "--profile", "tiny", "--no-gates", "--max-size", "208x112", "--max-frames", "17", "--json",
                   env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(proc.stdout)
    assert s["status"] == "accepted"
    assert [d["name"] for d in s["stages"]][-1] == "synthesis"  # every stage ran
    assert set(s["backends"]) == {"grounding", "image_edit", "i2v", "tracking", "control", "editscore"}
    assert not any(name.startswith("cpu") for name in s["backends"].values()), s["backends"]
    t, h, w = s["shape"]
    assert (t, h, w) == (17, 112, 144)
    sid, et = s["id"], "location"
    src = read_video(tmp_path / layout.source_video(et, sid))
    edited = read_video(tmp_path / layout.edited_video(et, sid))
    background = read_video(tmp_path / layout.background_video(et, sid))
    assert src.shape == edited.shape == background.shape == (t, h, w)
    for key in (layout.edited_frame0(et, sid), layout.clean_plate(et, sid)):
        assert read_image(tmp_path / key).shape == (h, w, 3)
    assert unpack_mask((tmp_path / layout.mask(et, sid)).read_bytes()).shape == (t, h, w)
    score = json.loads((tmp_path / layout.record(et, "edited_video_score")).read_text().splitlines()[0])
    assert score["scorer"] == s["backends"]["editscore"] and score["frame_indices"] == [1, 5, 8, 12]  # spread over 17 frames
    assert all(0 <= e["O_score"] <= 10 for e in score["editscore"])
    assert not np.array_equal(edited.frames, src.frames)  # the synthesis produced new pixels
