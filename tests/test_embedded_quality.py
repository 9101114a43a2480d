"""The embedded default (``cpu`` profile) judged on real clips: masks against what Sparkle itself kept, subjects
never dropped, ghost-free clean plates, honest instruction handling, and gates that refuse broken output."""

from __future__ import annotations

import json
import cv2
import numpy as np
import pytest

from sparkle import layout
from sparkle.algorithms.bait import anchors_from_round2, run_bait
from sparkle.algorithms.gates import spread_frame_indices
from sparkle.algorithms.person import ModelsMissing, PersonSegmenter, models_present
from sparkle.algorithms.scene import SceneModel, fill_holes
from sparkle.backends import SampleContext, load_backends
from sparkle.config import PipelineConfig
from sparkle.masks import unpack_mask
from sparkle.media import Video, read_video, sample_indices, write_video
from sparkle.services.editscore.cpu import SCORER, CpuProxyScorer
from sparkle.services.grounding.cpu import CpuGrounder
from sparkle.services.i2v.cpu import ping_pong
from sparkle.services.image_edit.cpu import background_layer
from sparkle.services.tracking.cpu import CpuGrabCutTracker

from .conftest import JUGGLE, PEDESTRIANS, RELEASED, sparkle
from .test_replace import FrozenSynthesis

PAIRS = ["season_000029", "time_000367", "location_000223", "style_000737"]
EVAL_SIZE = (320, 180)


def _released(name: str) -> tuple[np.ndarray, np.ndarray]:
    src = read_video(RELEASED / f"Sparkle_{name}_source.mp4").frames
    out = read_video(RELEASED / f"Sparkle_{name}_edited.mp4").frames
    return src, out


def pseudo_ground_truth(source: np.ndarray, edited: np.ndarray, band: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """What Sparkle's own edited video kept of the source, ``(gt, care)``, both ``(T, 180, 320) bool``.

    Sparkle preserves the foreground and re-lights it; the background becomes another scene. So a pixel is
    kept where the *structure* survived: local normalised cross-correlation of grey (9x9 windows, at 320x180)
    between source and edited > 0.5 where both are textured (variance > 4 grey levels^2); that seed is
    opened (3x3), closed (15 px disc), its holes filled, opened (9 px disc), and components under 1 % of the
    frame dropped. Structure cannot be judged on flat pixels, and the boundary is only known to a few pixels,
    so IoU counts only ``care`` pixels: textured in the source and outside a ``band``-px band around the
    pseudo ground truth's boundary (12 px at 1280x720).
    """
    gts, cares = [], []
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    for fs, fe in zip(source, edited):
        a = cv2.cvtColor(cv2.resize(fs, EVAL_SIZE, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY).astype(np.float32)
        b = cv2.cvtColor(cv2.resize(fe, EVAL_SIZE, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY).astype(np.float32)

        def box(x):
            return cv2.boxFilter(x, -1, (9, 9))

        ma, mb = box(a), box(b)
        va, vb = box(a * a) - ma * ma, box(b * b) - mb * mb
        ncc = (box(a * b) - ma * mb) / np.sqrt(np.maximum(va, 1e-3) * np.maximum(vb, 1e-3))
        m = ((va > 4) & (vb > 4) & (ncc > 0.5)).astype(np.uint8)
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15)))
        m = fill_holes(m > 0).astype(np.uint8)
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m)
        keep = stats[:, cv2.CC_STAT_AREA] > 0.01 * m.size
        keep[0] = False
        gt = keep[labels]
        edge = (cv2.dilate(gt.astype(np.uint8), disc) > 0) & ~(cv2.erode(gt.astype(np.uint8), disc) > 0)
        gts.append(gt)
        cares.append((va > 4) & ~edge)
    return np.stack(gts), np.stack(cares)


def care_iou(pred: np.ndarray, gt: np.ndarray, care: np.ndarray) -> float:
    return float((pred & gt & care).sum() / max(1, ((pred | gt) & care).sum()))


def cpu_bait(frames: np.ndarray, fps: float = 16.0) -> tuple[np.ndarray, list[str]]:
    """Stages 3-4 of the cpu profile on ``frames``: round-1 labels, round 2 at 2 FPS, BAIT vote."""
    ctx = SampleContext(sample_id="t", prompt="p", video=Video(frames, fps))
    grounder = CpuGrounder()
    labels = [o.label for o in grounder.ground_round1(ctx, frames[0], frames[0])]
    indices = sample_indices(len(frames), fps, 2.0)
    r2 = grounder.ground_round2(ctx, frames[indices], indices, labels)
    anchors, _ = anchors_from_round2(indices, r2, frames.shape[2], frames.shape[1])
    return run_bait(CpuGrabCutTracker(), ctx, frames, anchors), labels


@pytest.fixture(scope="module")
def released_masks():
    out = {}
    for name in PAIRS:
        src, edited = _released(name)
        mask, labels = cpu_bait(src)
        out[name] = (src, edited, mask, labels)
    return out


def test_bait_masks_match_what_sparkle_kept_on_the_talking_heads(released_masks):
    """IoU >= 0.8 with no frame below 0.7 (a frozen or floating face costs a frame far more) on the two
    talking heads whose subject Sparkle kept as a whole. Before (motion only): 0.21 and 0.38. The other two
    pairs are printed: Sparkle also kept the desk of ``location_000223`` (a person mask cannot know it is
    wanted), and re-rendered the subject of ``style_000737`` so that its structure is no longer measurable."""
    for name in PAIRS:
        src, edited, mask, labels = released_masks[name]
        gt, care = pseudo_ground_truth(src, edited)
        pred = np.stack([cv2.resize(m.astype(np.uint8), EVAL_SIZE, interpolation=cv2.INTER_AREA) > 0 for m in mask])
        per_frame = [care_iou(p, g, c) for p, g, c in zip(pred, gt, care)]
        print(f"{name}: IoU {care_iou(pred, gt, care):.3f}, worst frame {min(per_frame):.3f}, labels {labels}")
        if name in ("season_000029", "time_000367"):
            assert any(lb.startswith("person") for lb in labels)
            assert care_iou(pred, gt, care) >= 0.8, name
            assert min(per_frame) >= 0.7, name


def test_every_round1_subject_is_kept_pedestrians_and_juggle():
    """Every subject found in round 1 stays in the mask: on the 2-FPS frames where round 2 re-locates it, the
    share of the source's own evidence inside its box (motion or confident person pixels of the scene model)
    that is in the BAIT mask is >= 0.9 on frame 0 and >= 0.7 on average (a pedestrian who walks out and
    whose label is then re-found on a newcomer costs a frame: the newcomer is seen by too few anchors to win
    the vote). The pedestrians are too small for the person network and come from the motion
    path; the juggler is a person and his ball a moving object."""
    for clip in (PEDESTRIANS, JUGGLE):
        v = read_video(clip)
        frames = v.frames
        ctx = SampleContext(sample_id="t", prompt="p", video=Video(frames, v.fps))
        grounder = CpuGrounder()
        labels = [o.label for o in grounder.ground_round1(ctx, frames[0], frames[0])]
        indices = sample_indices(len(frames), v.fps, 2.0)
        r2 = grounder.ground_round2(ctx, frames[indices], indices, labels)
        anchors, _ = anchors_from_round2(indices, r2, frames.shape[2], frames.shape[1])
        mask = run_bait(CpuGrabCutTracker(), ctx, frames, anchors)
        scene = ctx.cache["scene"]
        coverage: dict[str, list[float]] = {lb: [] for lb in labels}
        for anchor in anchors:
            t = anchor.frame_index
            for label, box in anchor.boxes:
                x1, y1, x2, y2 = scene.small_box(box)
                evidence = np.zeros(scene.fg.shape[1:], bool)
                evidence[y1:y2, x1:x2] = scene.fg[t, y1:y2, x1:x2] | scene.person[t, y1:y2, x1:x2]
                full = scene.to_full(evidence)
                if full.sum() >= 50:
                    coverage[label].append((full & mask[t]).sum() / full.sum())
        print(f"{clip.name}: " + ", ".join(f"{lb}: first {c[0]:.2f}, mean {np.mean(c):.2f} over {len(c)} of "
                                           f"{len(indices)} frames" for lb, c in coverage.items()))
        assert len(labels) >= (3 if clip == PEDESTRIANS else 2)
        for label, c in coverage.items():
            assert c and c[0] >= 0.9 and np.mean(c) >= 0.7, (clip.name, label, c)
        if clip == JUGGLE:
            assert labels[0] == "person 1" and len(coverage["person 1"]) == len(indices)


def _parting_pair_clip(t_total: int = 41, h: int = 160, w: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A woman-and-dog case: two textured subjects that touch on frame 0 and part (one walks right, the other
    down-left) over a textured still background. Returns ``(frames, big_masks, small_masks)``."""
    rng = np.random.default_rng(7)
    bg = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (0, 0), 3)
    tex_a = rng.integers(120, 255, (50, 24, 3), dtype=np.uint8)
    tex_b = rng.integers(0, 110, (20, 28, 3), dtype=np.uint8)
    frames, big, small = [], [], []
    for t in range(t_total):
        f = bg.copy()
        ma, mb = np.zeros((h, w), bool), np.zeros((h, w), bool)
        ax, ay = 100 + t, 40 + (t % 4)
        bx, by = 126 - t, 70 + t // 2
        f[ay:ay + 50, ax:ax + 24] = tex_a
        ma[ay:ay + 50, ax:ax + 24] = True
        f[by:by + 20, bx:bx + 28] = tex_b
        mb[by:by + 20, bx:bx + 28] = True
        frames.append(f)
        big.append(ma)
        small.append(mb & ~ma)
    return np.stack(frames), np.stack(big), np.stack(small)


def test_subjects_that_part_stay_tracked_dog_case():
    """Round 1 boxes the touching pair as one subject; when they part, the other one joins the label's box in
    round 2 instead of vanishing (before: the dog was missing from frame 16 to 72)."""
    frames, big, small = _parting_pair_clip()
    mask, labels = cpu_bait(frames, 8.0)
    for name, truth in (("walker", big), ("dog", small)):
        covered = [(mask[t] & truth[t]).sum() / truth[t].sum() for t in range(len(frames)) if truth[t].sum() > 50]
        print(f"{name}: least covered frame {min(covered):.2f}; labels {labels}")
        assert min(covered) >= 0.8, name


def test_clean_plate_has_no_ghost_of_the_still_subject():
    """The clean plate under a talking head comes from frames where the background was seen, and inpainting
    where it never was: the subject's colours do not stay. Measured as the fraction of frame 0's person pixels
    (eroded 3 px) that the plate keeps within 20 grey levels: before 0.90 and 0.72 on these two clips."""
    for name in ("season_000029", "time_000367"):
        src, _ = _released(name)
        src = np.stack([cv2.resize(f, (640, 360), interpolation=cv2.INTER_AREA) for f in src])
        ctx = SampleContext(sample_id="t", prompt="Change the time of day to night", video=Video(src, 16.0))
        scene = SceneModel(src)
        ctx.cache["scene"] = scene
        plate = scene.clean_plate(src)
        person = cv2.erode(scene.to_full(scene.person[0]).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        same = (np.abs(plate.astype(int) - src[0].astype(int)).max(-1) < 20)[person].mean()
        print(f"{name}: plate keeps {same:.2f} of the subject's pixels")
        assert same <= 0.3, name
        assert background_layer(ctx).shape == src[0].shape


# --- gates that refuse broken output ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_pair(tmp_path_factory):
    """A real replacement by the cpu profile (the demo: the juggler over the pedestrians clip, played back and
    forth), with its BAIT mask and background video: ``(source, edited, background, mask, out_dir)``."""
    out = tmp_path_factory.mktemp("good")
    proc = sparkle("replace", JUGGLE, "Replace the background with a busy town square", "--background",
                   PEDESTRIANS, "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    sid = json.loads(proc.stdout)["id"]
    et = "location"
    src = read_video(out / layout.source_video(et, sid)).frames
    edited = read_video(out / layout.edited_video(et, sid)).frames
    bg = read_video(out / layout.background_video(et, sid)).frames
    mask = unpack_mask((out / layout.mask(et, sid)).read_bytes())
    return src, edited, bg, mask, out


def broken_outputs(src, edited, bg, mask) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The issue's broken outputs, each ``(edited video, mask it was made with)``."""
    rng = np.random.default_rng(0)
    m = mask[..., None]
    torso = mask.copy()
    for t in range(len(torso)):  # a mask that misses the still head: only the lower 70 % of the subject
        ys = np.nonzero(torso[t].any(axis=1))[0]
        if len(ys):
            torso[t, : ys.min() + int(0.3 * (ys.max() - ys.min()))] = False
    return {
        "source copied": (src.copy(), mask),
        "background only dimmed": (np.where(m, src, (src * 0.6).astype(np.uint8)), mask),
        "flat grey background": (np.where(m, src, np.uint8(128)), mask),
        "noise background": (np.where(m, src, rng.integers(0, 256, src.shape, dtype=np.uint8)), mask),
        "frozen video": (np.repeat(edited[:1], len(edited), axis=0), mask),
        "subject missing": (bg.copy(), mask),
        "mask misses the still head": (np.where(torso[..., None], src, bg), torso),
    }


def _mean_o(src, edited, mask) -> tuple[float, list]:
    ctx = SampleContext(sample_id="t", prompt="p", video=Video(src, 16.0), mask=mask)
    indices = spread_frame_indices(len(src), [1, 26, 51, 76])
    scores = CpuProxyScorer().score_frames(ctx, src, edited, indices, "p")
    return float(np.mean([s.O_score for s in scores])), scores


def test_the_video_gate_accepts_the_real_replacement_and_refuses_every_broken_output(good_pair):
    src, edited, bg, mask, _ = good_pair
    good, scores = _mean_o(src, edited, mask)
    print(f"real replacement: mean O_score {good:.2f}")
    assert good >= 8.0
    assert all("instruction following not measured" in s.SC_score_reasoning for s in scores)
    assert json.loads(scores[0].SC_raw_output)["instruction_following"] is None
    for name, (broken, used_mask) in broken_outputs(src, edited, bg, mask).items():
        o, _ = _mean_o(src, broken, used_mask)
        print(f"{name}: mean O_score {o:.2f}")
        assert o < 8.0, name


def test_sparkle_score_refuses_broken_pairs_and_prints_the_record(good_pair, tmp_path):
    """``sparkle score`` is the stage-5 gate on an existing pair: the record schema on stdout with --json,
    exit 0 when accepted and 3 when refused."""
    src, edited, bg, mask, out = good_pair
    et = "location"
    src_path = next((out / et / "source_video").glob("*.mp4"))
    edited_path = next((out / et / "edited_video").glob("*.mp4"))
    mask_path = next((out / "intermediate_data" / et / "source_video_mask").glob("*.npz"))
    ok = sparkle("score", src_path, edited_path, "--prompt", "a town square", "--mask", mask_path, "--json")
    assert ok.returncode == 0, ok.stderr
    record = json.loads(ok.stdout)
    assert set(record) == {"id", "prompt", "frame_indices", "editscore", "scorer"}
    assert record["frame_indices"] == [1, 26, 51, 76] and record["scorer"] == SCORER
    assert set(record["editscore"][0]) == {"SC_score", "PQ_score", "O_score", "SC_score_reasoning",
                                           "PQ_score_reasoning", "SC_raw_output", "PQ_raw_output"}
    for name in ("source copied", "frozen video", "flat grey background"):
        broken, _ = broken_outputs(src, edited, bg, mask)[name]
        path = tmp_path / f"{name.replace(' ', '_')}.mp4"
        write_video(path, broken, 16.0)
        proc = sparkle("score", src_path, path, "--json")
        assert proc.returncode == 3, (name, proc.stderr[-500:])
        assert "refused" in proc.stderr
        assert np.mean([s["O_score"] for s in json.loads(proc.stdout)["editscore"]]) < 8.0
    bad = sparkle("score", src_path, JUGGLE)  # another size (conformed 464 rows vs the raw clip's 468)
    assert bad.returncode == 1 and "must match" in bad.stderr


def test_the_stage5_gate_refuses_a_frozen_synthesis(tmp_path):
    """Through the whole journey: a control backend that freezes frame 0 is refused at stage 5."""
    from sparkle.orchestrator.local import replace_one

    backends = load_backends("cpu")
    backends.control = FrozenSynthesis(backends.control)
    task, _ = replace_one(JUGGLE, "Replace the background with a town square", tmp_path, background=PEDESTRIANS,
                          backends=backends, config=PipelineConfig(conform={"max_long_side": 416,
                                                                           "max_short_side": 240}))
    assert task.status == "rejected" and task.decisions[-1].name == "synthesis", task.reason
    assert "mean O_score" in task.reason


# --- honest instruction handling ----------------------------------------------------------------------------

def test_a_location_edit_without_a_background_is_refused_on_cpu(tmp_path):
    out = tmp_path / "out"
    proc = sparkle("replace", JUGGLE, "Replace the background with a snowy mountain village at dusk", "-o", out)
    assert proc.returncode == 1
    assert "--background" in proc.stderr and "location" in proc.stderr
    assert not out.exists()
    proc = sparkle("replace", JUGGLE, "Make it look like an underwater coral reef", "--theme", "style", "-o", out)
    assert proc.returncode == 1 and "no re-grade" in proc.stderr and not out.exists()


def test_a_background_video_is_played_back_and_forth():
    assert [ping_pong(i, 4) for i in range(10)] == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert [ping_pong(i, 2) for i in range(4)] == [0, 1, 0, 1]


def test_person_models_are_checked_and_a_missing_model_names_the_command(tmp_path):
    assert models_present()
    with pytest.raises(ModelsMissing, match="sparkle fetch-models"):
        PersonSegmenter(tmp_path)
    (tmp_path / "selfie_segmentation.tflite").write_bytes(b"not a model")
    assert not models_present(tmp_path)


def test_the_contact_sheet_shows_the_four_rows(good_pair):
    src, edited, bg, mask, out = good_pair
    proc = sparkle("contact-sheet", out)
    assert proc.returncode == 0, proc.stderr
    path = out / "contact_sheets" / (next((out / "location" / "edited_video").glob("*.mp4")).stem + ".jpg")
    assert proc.stdout.strip() == str(path)
    sheet = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    th = round(320 * src.shape[1] / src.shape[2])
    assert sheet.shape == (4 * th, 5 * 320, 3)
    overlay = sheet[3 * th:4 * th, :320].astype(int)
    m = cv2.resize(mask[0].astype(np.uint8), (320, th), interpolation=cv2.INTER_NEAREST) > 0
    inner = cv2.erode(m.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    greener = overlay[..., 1] - overlay[..., [0, 2]].mean(-1)
    assert greener[inner].mean() > greener[~m].mean() + 40  # the mask is tinted where it is


def test_the_install_is_clean_with_one_opencv():
    """The person segmenter's runtime (ai-edge-litert) brings no second OpenCV and breaks no requirement:
    mediapipe's own wheel would have pulled opencv-contrib-python next to opencv-python-headless."""
    import subprocess
    import sys
    from importlib.metadata import distributions

    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    opencvs = sorted({d.metadata["Name"].lower() for d in distributions() if "opencv" in d.metadata["Name"].lower()})
    assert opencvs == ["opencv-python-headless"]
    assert not any(d.metadata["Name"].lower().startswith("mediapipe") for d in distributions())
