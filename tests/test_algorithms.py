"""The backend-independent algorithms on real clips and on constructed cases."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from sparkle.algorithms.bait import anchors_from_round2, majority_vote, run_bait
from sparkle.algorithms.camera import check_fixed_camera
from sparkle.algorithms.control import canny, decoupled_canny
from sparkle.backends import Anchor, GroundedObject, SampleContext
from sparkle.config import CameraFilterConfig, ConformConfig
from sparkle.media import Video, conform, read_video

from .conftest import HANDHELD, JUGGLE, PEDESTRIANS


@pytest.mark.parametrize("clip", [JUGGLE, PEDESTRIANS])
def test_fixed_camera_clips_pass_stage1(clip):
    v = conform(read_video(clip), ConformConfig())
    d = check_fixed_camera(v.frames, v.fps, CameraFilterConfig())
    assert d.accepted, d.reason
    assert d.corner_px < 0.2 and d.border_px < 0.2  # SOURCES.md measured <= 0.05 px
    assert d.pairs >= 10


def test_handheld_clip_is_refused():
    v = conform(read_video(HANDHELD), ConformConfig())
    d = check_fixed_camera(v.frames, v.fps, CameraFilterConfig())
    assert not d.accepted
    assert "camera moves" in d.reason
    assert d.corner_px > 3.0  # SOURCES.md measured >= 6.6 px at 640 px width


def test_a_synthetic_pan_is_refused_and_a_still_is_accepted():
    rng = np.random.default_rng(1)
    texture = (rng.random((300, 700, 3)) * 255).astype(np.uint8)
    texture = np.repeat(np.repeat(texture, 2, 0), 2, 1)  # blocky texture with strong corners
    pan = np.stack([texture[:464, 4 * t:4 * t + 640] for t in range(21)])  # 4 px per frame at 10 fps
    assert not check_fixed_camera(pan, 10.0, CameraFilterConfig()).accepted
    still = np.repeat(texture[None, :464, :640], 21, axis=0)
    assert check_fixed_camera(still, 10.0, CameraFilterConfig()).accepted


def test_majority_vote_and_tie_rule():
    votes = np.array([[[0, 1, 2, 3, 4]]])
    assert majority_vote(votes, 4, tie_is_foreground=True).tolist() == [[[False, False, True, True, True]]]
    assert majority_vote(votes, 4, tie_is_foreground=False).tolist() == [[[False, False, False, True, True]]]


class ScriptedTracker:
    """Test double: returns pre-made pass masks, so the vote can be checked exactly."""

    name = "scripted-test-double"

    def __init__(self, passes):
        self.passes = passes
        self.seen = []

    def setup(self):
        pass

    def track(self, ctx, frames, anchors):
        self.seen = [a.frame_index for a in anchors]
        yield from self.passes


def test_bait_votes_over_passes_and_skips_failed_anchors():
    t, h, w = 3, 4, 4
    frames = np.zeros((t, h, w, 3), np.uint8)
    objs = [[GroundedObject(bbox_2d=[0, 0, 500, 500], label="a")],
            [GroundedObject(bbox_2d=[], label="a")],
            [GroundedObject(bbox_2d=[500, 500, 1000, 1000], label="a")]]
    anchors, skipped = anchors_from_round2([0, 1, 2], objs, w, h)
    assert [a.frame_index for a in anchors] == [0, 2] and skipped == [1]
    assert anchors[0].boxes == [("a", (0, 0, 2, 2))]
    p1 = np.zeros((t, h, w), bool); p1[:, 0, 0] = True; p1[:, 1, 1] = True
    p2 = np.zeros((t, h, w), bool); p2[:, 0, 0] = True
    p3 = np.zeros((t, h, w), bool); p3[:, 0, 0] = True; p3[:, 3, 3] = True
    ctx = SampleContext("s", "p", Video(frames, 1.0))
    three = [Anchor(0, [("a", (0, 0, 2, 2))]), Anchor(1, [("a", (0, 0, 2, 2))]), Anchor(2, [("a", (0, 0, 2, 2))])]
    mask = run_bait(ScriptedTracker([p1, p2, p3]), ctx, frames, three, tie_is_foreground=True)
    assert mask[:, 0, 0].all() and not mask[:, 1, 1].any() and not mask[:, 3, 3].any()
    with pytest.raises(ValueError, match="no anchor"):
        run_bait(ScriptedTracker([]), ctx, frames, [])
    with pytest.raises(ValueError, match="passes"):
        run_bait(ScriptedTracker([p1]), ctx, frames, three)


def test_decoupled_canny_takes_source_edges_inside_and_background_edges_outside():
    v = conform(read_video(PEDESTRIANS, max_frames=5), ConformConfig())
    src = v.frames
    bg = np.ascontiguousarray(src[:, ::-1])  # a different structure: mirrored
    mask = np.zeros(src.shape[:3], bool)
    mask[:, :, : src.shape[2] // 2] = True
    out = decoupled_canny(src, bg, mask)
    assert out.shape == src.shape and out.dtype == np.uint8
    for t in range(len(src)):
        e = out[t, ..., 0]
        np.testing.assert_array_equal(e[mask[t]], canny(src[t], 100, 200)[mask[t]])
        np.testing.assert_array_equal(e[~mask[t]], canny(bg[t], 100, 200)[~mask[t]])
    with pytest.raises(ValueError):
        decoupled_canny(src, bg[:-1], mask)


def test_judged_frames_are_spread_like_sparkles():
    from sparkle.algorithms.gates import reason_kind, spread_frame_indices

    assert spread_frame_indices(81) == [1, 26, 51, 76]
    assert spread_frame_indices(57) == [1, 18, 35, 52]
    assert spread_frame_indices(17) == [1, 5, 8, 12]
    for t in range(1, 120):
        idx = spread_frame_indices(t)
        assert idx == sorted(set(idx)) and all(0 <= i < t for i in idx) and 1 <= len(idx) <= 4
    assert reason_kind("EditScore overall 7.53 < 8.0") == reason_kind("EditScore overall 6.1 < 8.0")


def test_control_variants():
    from sparkle.algorithms.control import canny, control_video

    rng = np.random.default_rng(3)
    src = (rng.random((3, 32, 48, 3)) * 255).astype(np.uint8)
    bg = (rng.random((3, 32, 48, 3)) * 255).astype(np.uint8)
    mask = np.zeros((3, 32, 48), bool)
    mask[:, 8:24, 10:30] = True
    fg_only = control_video("foreground_only", src, bg, mask)
    assert not fg_only[~mask].any()
    np.testing.assert_array_equal(fg_only[0, ..., 0][mask[0]], canny(src[0], 100, 200)[mask[0]])
    paste = control_video("copy_paste", src, bg, mask)
    np.testing.assert_array_equal(paste[mask], src[mask])
    np.testing.assert_array_equal(paste[~mask], bg[~mask])
    assert control_video("decoupled", src, bg, mask)[~mask].any()  # background edges outside
    with pytest.raises(ValueError, match="unknown control mode"):
        control_video("sketch", src, bg, mask)


def test_temporal_stability_separates_a_steady_mask_from_a_drifting_one():
    from sparkle.algorithms.bait import temporal_stability

    steady = np.zeros((20, 40, 40), bool)
    steady[:, 10:30, 10:30] = True
    s = temporal_stability(steady)
    assert s["mean_consecutive_iou"] == 1.0 and s["area_drift"] == 0.0 and s["empty_frames"] == 0
    growing = np.zeros((20, 40, 40), bool)
    for t in range(20):
        growing[t, 10:12 + t, 10:30] = True
    g = temporal_stability(growing)
    assert g["mean_consecutive_iou"] < 0.95 and g["area_drift"] > 0.5
    flicker = steady.copy()
    flicker[::2] = False
    f = temporal_stability(flicker)
    assert f["empty_frames"] == 10 and f["mean_consecutive_iou"] == 0.0


def test_cpu_fine_filter_sees_a_slow_drift_that_the_coarse_filter_lets_through():
    from sparkle.backends import load_backend

    grounder = load_backend("grounding", "cpu")
    v = conform(read_video(JUGGLE), ConformConfig())
    idx = list(range(0, len(v.frames), 8))
    ctx = SampleContext("still", "p", v)
    moves, reason = grounder.check_camera_motion(ctx, v.frames[idx])
    assert not moves, reason
    # 0.6 px per pair (under the coarse filter's 1 px) adds up to 6 px over the clip: a slow pan
    shifts = [np.float32([[1, 0, 0.6 * k], [0, 1, 0]]) for k in range(len(idx))]
    h, w = v.frames.shape[1:3]
    drifting = np.stack([cv2.warpAffine(v.frames[i], m, (w, h), borderMode=cv2.BORDER_REFLECT) for i, m in zip(idx, shifts)])
    pan = Video(np.repeat(drifting, 8, axis=0)[:len(v.frames)], v.fps)
    assert check_fixed_camera(pan.frames, pan.fps, CameraFilterConfig()).accepted  # coarse: fine per pair
    moves, reason = grounder.check_camera_motion(SampleContext("pan", "p", pan), pan.frames[idx])
    assert moves and "residual camera drift" in reason
