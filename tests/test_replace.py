"""End to end: ``sparkle replace`` on the real clips, through the console command, in the Sparkle layout."""

from __future__ import annotations

import csv
import json
import os

import cv2
import numpy as np
import pytest

from sparkle import layout
from sparkle.backends import load_backends
from sparkle.config import PipelineConfig
from sparkle.errors import InputError
from sparkle.masks import unpack_mask
from sparkle.media import fit_to, read_image, read_video
from sparkle.orchestrator.local import replace_one
from sparkle.orchestrator.pipeline import summary as task_summary

from .conftest import BG_IMAGE, DEMO_PROMPT, HANDHELD, JUGGLE, PEDESTRIANS, SNOW_PROMPT, VIDEOS, sparkle

# Bounds of the pair check, in mean absolute RGB difference (grey levels, 0..255) per frame.
# Inside the mask (eroded 3 px, away from the 1.5 px feather) the cpu compositor only harmonises colour
# (Lab mean moved 10-20 % towards the background) and H.264 re-encodes: 12 allows that and no more.
# Outside (beyond a 7 px dilation) the background must clearly change: 25 is ~10 % of the range.
INSIDE_MAX, OUTSIDE_MIN = 12.0, 25.0


def dataset_files(root):
    """Files of the Sparkle layout under ``root`` (our reports, sample-id counters and lock files excluded)."""
    if not root.exists():
        return []
    return [p for p in root.rglob("*") if p.is_file()
            and p.relative_to(root).parts[0] not in ("reports", "jobs", ".locks")]


def region_differences(src, edited, mask):
    k_in = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    k_out = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15))
    inside, outside = [], []
    for s, e, m in zip(src.astype(np.int16), edited.astype(np.int16), mask.astype(np.uint8)):
        d = np.abs(s - e)
        inside.append(d[cv2.erode(m, k_in) > 0].mean())
        outside.append(d[~(cv2.dilate(m, k_out) > 0)].mean())
    return np.array(inside), np.array(outside)


def test_main_job_publishes_every_artifact_in_the_sparkle_layout(juggle_run):
    summary, out = juggle_run
    sid, et = summary["id"], "location"
    assert summary["status"] == "accepted" and sid == "Sparkle_location_000000"
    expected = [layout.source_video(et, sid), layout.edited_video(et, sid), layout.source_frame0(et, sid),
                layout.edited_frame0(et, sid), layout.clean_plate(et, sid), layout.background_video(et, sid),
                layout.mask(et, sid), layout.canny_video(et, sid), layout.prompts_csv(et), layout.prompts_metadata(et)]
    expected += [layout.record(et, name) for name in layout.RECORD_NAMES]
    for key in expected:
        assert (out / key).is_file(), key
    assert not (out / "staging").exists()

    src = read_video(out / layout.source_video(et, sid))
    edited = read_video(out / layout.edited_video(et, sid))
    background = read_video(out / layout.background_video(et, sid))
    canny = read_video(out / layout.canny_video(et, sid))
    t, h, w = src.shape
    assert (t, h, w) == (81, 464, 832) and (t - 1) % 4 == 0 and h % 16 == 0 and w % 16 == 0
    assert edited.shape == src.shape == background.shape == canny.shape  # Kiwi-Edit drops mismatched pairs
    assert edited.fps == src.fps == 16
    for key in (layout.source_frame0(et, sid), layout.edited_frame0(et, sid), layout.clean_plate(et, sid)):
        assert read_image(out / key).shape == (h, w, 3)
    np.testing.assert_allclose(read_image(out / layout.source_frame0(et, sid)).astype(float), src.frames[0], atol=40)

    mask = unpack_mask((out / layout.mask(et, sid)).read_bytes())
    assert mask.shape == (t, h, w) and mask.dtype == bool
    assert 0.02 < mask.mean() < 0.4  # one person and a ball, not nothing and not everything
    assert mask.reshape(t, -1).any(axis=1).all()  # the juggler is in every frame

    with open(out / layout.prompts_csv(et), newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["prompt", "src_video", "tgt_video", "task"]
    assert rows == [{"prompt": DEMO_PROMPT, "src_video": f"location/source_video/{sid}.mp4",
                     "tgt_video": f"location/edited_video/{sid}.mp4", "task": sid}]
    meta = [json.loads(line) for line in (out / layout.prompts_metadata(et)).read_text().splitlines()]
    assert meta[0]["id"] == sid and meta[0]["prompt"] == DEMO_PROMPT
    assert set(meta[0]["metadata"]) == {"edit_type", "chosen_keyword", "original_scene"}
    subtheme, scene = meta[0]["metadata"]["chosen_keyword"].split(": ")
    assert subtheme and scene and meta[0]["metadata"]["original_scene"]


def test_the_five_records_follow_the_sparkle_schema(juggle_run):
    summary, out = juggle_run
    sid, et = summary["id"], "location"

    def one(name):
        lines = (out / layout.record(et, name)).read_text().splitlines()
        assert len(lines) == 1
        return json.loads(lines[0])

    image_keys = {"prompt_following", "consistency", "perceptual_quality", "overall", "SC_reasoning", "PQ_reasoning"}
    for name, threshold in (("edited_frame0_score", 8.0), ("edited_frame0_foreground_removed_score", 8.5)):
        r = one(name)
        assert r["id"] == sid and r["prompt"] == DEMO_PROMPT and r["scorer"] == "cpu-proxy-v2"
        assert set(r["editscore"]) == image_keys
        assert r["editscore"]["prompt_following"] is None  # not measured by the cpu proxy, not claimed
        assert "instruction following not measured" in r["editscore"]["SC_reasoning"]
        assert all(0 <= r["editscore"][k] <= 10 for k in image_keys - {"prompt_following"}
                   if not k.endswith("reasoning"))
        assert r["editscore"]["overall"] >= threshold  # it was accepted, so it passed its gate

    r1, r2 = one("foreground_grounding_r1"), one("foreground_grounding_r2")
    assert set(r1) == {"id", "prompt", "edit_type", "round1_labels", "round1_objects"}
    assert r1["edit_type"] == et and r1["round1_labels"] == [o["label"] for o in r1["round1_objects"]]
    assert r1["round1_objects"] and all(len(o["bbox_2d"]) == 4 for o in r1["round1_objects"])
    assert {k: r2[k] for k in r1} == r1
    assert len(r2["frame_objects"]) == 11  # 81 frames at 16 fps, sampled at 2 FPS: 0, 8, ..., 80
    for objects in r2["frame_objects"]:
        assert [o["label"] for o in objects] == r1["round1_labels"]
        for o in objects:
            b = o["bbox_2d"]
            assert b == [] or (len(b) == 4 and all(0 <= v <= 1000 for v in b) and b[0] < b[2] and b[1] < b[3])

    v = one("edited_video_score")
    assert v["frame_indices"] == [1, 26, 51, 76] and len(v["editscore"]) == 4
    for s in v["editscore"]:
        assert set(s) == {"SC_score", "PQ_score", "O_score", "SC_score_reasoning", "PQ_score_reasoning",
                          "SC_raw_output", "PQ_raw_output"}
        assert s["O_score"] == pytest.approx(np.sqrt(s["SC_score"] * s["PQ_score"]), abs=0.01)
        json.loads(s["SC_raw_output"])
    assert np.mean([s["O_score"] for s in v["editscore"]]) >= 8.0


def test_foreground_stays_and_background_changes(juggle_run):
    summary, out = juggle_run
    sid, et = summary["id"], "location"
    src = read_video(out / layout.source_video(et, sid)).frames
    edited = read_video(out / layout.edited_video(et, sid)).frames
    mask = unpack_mask((out / layout.mask(et, sid)).read_bytes())
    inside, outside = region_differences(src, edited, mask)
    assert inside.max() <= INSIDE_MAX, inside.max()
    assert outside.min() >= OUTSIDE_MIN, outside.min()


def test_json_summary_reports_every_stage(juggle_run):
    summary, out = juggle_run
    stages = {s["name"]: s for s in summary["stages"]}
    assert [s["name"] for s in summary["stages"]] == ["ingest", "camera_filter", "camera_filter_fine", "instruction",
                                                      "frame0_edit", "background_video", "bait", "synthesis"]
    assert all(s["accepted"] for s in summary["stages"])
    assert stages["camera_filter"]["scores"]["corner_px"] < 1.0
    assert "no residual camera motion" in stages["camera_filter_fine"]["reason"]
    assert stages["instruction"]["reason"] == "given by the user"
    assert stages["synthesis"]["scores"]["mean_O_score"] >= 8.0
    assert set(summary["timings"]) >= {"ingest", "bait", "synthesis", "total", "wall"}
    for path in summary["artifacts"].values():
        assert os.path.isfile(path)
    report = json.loads((out / layout.report("location", summary["id"])).read_text())
    assert report["status"] == "accepted" and len(report["stages"]) == 8


def test_handheld_clip_is_refused_with_a_clear_message(tmp_path):
    proc = sparkle("replace", HANDHELD, "Replace the background with a beach", "--background", BG_IMAGE, "-o", tmp_path)
    assert proc.returncode == 3
    assert "camera moves" in proc.stdout and "--force" in proc.stdout
    assert dataset_files(tmp_path) == []
    report = json.loads(next((tmp_path / "reports" / "location").glob("*.json")).read_text())
    assert report["status"] == "rejected" and report["stages"][-1]["name"] == "camera_filter"


def _strict(constant: str):
    raise AssertionError(f"{constant} is not JSON (RFC 8259)")


def test_json_summary_is_strict_json_even_with_unmeasured_metrics(tmp_path):
    """The refused handheld clip's camera metrics hold an unmeasurable value (NaN in Python): ``--json``
    prints it as null, which every JSON parser reads (``NaN`` is refused by strict ones: jq, JavaScript)."""
    proc = sparkle("replace", HANDHELD, "Replace the background with a beach", "--background", BG_IMAGE, "-o", tmp_path, "--json")
    assert proc.returncode == 3
    summary = json.loads(proc.stdout, parse_constant=_strict)
    camera = summary["stages"][1]
    assert camera["name"] == "camera_filter" and None in camera["scores"].values()


def test_force_keeps_a_handheld_clip(tmp_path):
    proc = sparkle("replace", HANDHELD, "Replace the background with a beach", "--background", BG_IMAGE, "-o", tmp_path, "--force",
                   "--max-size", "416x240", "--max-frames", "17", "--json")
    summary = json.loads(proc.stdout)
    camera, fine = summary["stages"][1], summary["stages"][2]
    assert camera["accepted"] and camera["reason"].startswith("forced: camera moves")
    assert fine["name"] == "camera_filter_fine" and fine["reason"].startswith("forced: residual camera drift")
    assert summary["shape"] == [17, 224, 416]  # 416x234 after scaling, cropped to multiples of 16
    assert len(summary["stages"]) > 2  # the journey went on past stage 1


@pytest.mark.parametrize("case", ["text_as_mp4", "empty_file", "missing", "empty_prompt", "bad_theme", "bad_background"])
def test_bad_input_gives_a_clear_error_and_leaves_nothing(tmp_path, case):
    video, prompt, extra = JUGGLE, SNOW_PROMPT, []
    if case == "text_as_mp4":
        video = tmp_path / "notes.mp4"
        video.write_text("this is not a video\n" * 50)
    elif case == "empty_file":
        video = tmp_path / "empty.mp4"
        video.touch()
    elif case == "missing":
        video = tmp_path / "nope.mp4"
    elif case == "empty_prompt":
        prompt = "   "
    elif case == "bad_theme":
        extra = ["--theme", "weather"]
    elif case == "bad_background":
        bad = tmp_path / "bg.png"
        bad.write_text("not an image")
        extra = ["--background", bad]
    out = tmp_path / "out"
    proc = sparkle("replace", video, prompt, "-o", out, *extra)
    assert proc.returncode == 1
    message = {"text_as_mp4": "not a decodable video", "empty_file": "empty", "missing": "not found",
               "empty_prompt": "prompt is empty", "bad_theme": "unknown edit_type",
               "bad_background": "not a decodable image"}[case]
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


class ExplodingTracker:
    """Test double: a tracking backend that fails mid-journey (after stages 1-3 staged artifacts)."""

    name = "exploding-test-double"

    def setup(self):
        pass

    def track(self, ctx, frames, anchors):
        raise RuntimeError("tracker crashed")
        yield


def test_a_failure_mid_journey_publishes_nothing(tmp_path):
    backends = load_backends("cpu")
    backends.tracking = ExplodingTracker()
    with pytest.raises(RuntimeError, match="tracker crashed"):
        replace_one(PEDESTRIANS, "Replace the background with a beach", tmp_path, backends=backends,
                    background=BG_IMAGE)
    assert dataset_files(tmp_path) == []
    assert not (tmp_path / "reports").exists()


def test_gates_reject_and_no_gates_keeps(tmp_path):
    """A flat grey background is a broken edit: the frame-0 gate refuses it (no detail where the background
    was); with --no-gates the sample is kept and the refusals are recorded as not enforced."""
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), np.full((240, 416, 3), 128, np.uint8))
    args = ["replace", JUGGLE, "Replace the background with a grey studio wall", "--background", grey,
            "--max-size", "416x240", "-o", tmp_path / "out", "--json"]
    strict = sparkle(*args)
    assert strict.returncode == 3
    s = json.loads(strict.stdout)
    assert s["status"] == "rejected" and "stage 2 (frame0_edit)" in s["reason"] and "< 8.0" in s["reason"]
    assert "background detail" in s["records"]["edited_frame0_score"]["editscore"]["PQ_reasoning"]
    assert dataset_files(tmp_path / "out") == []
    lenient = sparkle(*args, "--no-gates")
    assert lenient.returncode == 0, lenient.stderr
    s = json.loads(lenient.stdout)
    assert s["id"] == "Sparkle_location_000001"  # the rejected sample kept its id
    edit = next(d for d in s["stages"] if d["name"] == "frame0_edit")
    assert not edit["accepted"] and "not enforced" in edit["reason"]
    assert len(dataset_files(tmp_path / "out")) > 10


def test_user_background_image_and_video(tmp_path):
    image = VIDEOS / "static_01_juggle_frame0.png"
    task, store = replace_one(PEDESTRIANS, "Replace the background with this park", tmp_path, edit_type="location",
                              background=image)
    assert task.status == "accepted", task.reason
    et, sid = "location", task.id
    src = read_video(store.path(layout.source_video(et, sid))).frames
    edited = read_video(store.path(layout.edited_video(et, sid))).frames
    mask = unpack_mask(store.path(layout.mask(et, sid)).read_bytes())
    expected = fit_to(read_image(image), src.shape[2], src.shape[1]).astype(np.int16)
    outside = ~mask[10] & ~(cv2.dilate(mask[10].astype(np.uint8), np.ones((15, 15), np.uint8)) > 0)
    assert np.abs(edited[10].astype(np.int16) - expected)[outside].mean() < 8  # the given image, not a re-grade
    inside, _ = region_differences(src, edited, mask)
    assert inside.max() <= INSIDE_MAX

    task2, store = replace_one(PEDESTRIANS, "Replace the background with a bedroom", tmp_path, background=HANDHELD)
    assert task2.id == "Sparkle_location_000001"
    bg = read_video(store.path(layout.background_video(et, task2.id))).frames
    assert bg.shape[0] == src.shape[0]
    assert np.abs(bg[40].astype(np.int16) - bg[0]).mean() > 5  # a looped video, not a held image
    rows = store.read_csv(layout.prompts_csv(et))
    assert [r["task"] for r in rows] == ["Sparkle_location_000000", "Sparkle_location_000001"]


def test_python_api_validates_like_the_cli(tmp_path):
    with pytest.raises(InputError, match="prompt is empty"):
        replace_one(JUGGLE, "", tmp_path / "o")
    assert not (tmp_path / "o").exists()


class FrozenSynthesis:
    """Test double: the cpu compositor's output with frame 0 held for the whole clip (a frozen video)."""

    name = "frozen-test-double"

    def __init__(self, inner):
        self.inner = inner

    def setup(self):
        pass

    def synthesize(self, ctx, control, background, first_frame, mask, prompt):
        out = self.inner.synthesize(ctx, control, background, first_frame, mask, prompt)
        return np.repeat(out[:1], len(out), axis=0)


def test_funnel_counts_every_stage_and_rejected_samples_keep_their_records(tmp_path):
    refused = sparkle("replace", HANDHELD, "Replace the background with a beach", "--background", BG_IMAGE, "-o", tmp_path)
    assert refused.returncode == 3
    backends = load_backends("cpu")
    backends.control = FrozenSynthesis(backends.control)  # a broken stage-5 output: the video gate refuses it
    task, _ = replace_one(PEDESTRIANS, "Replace the background with a beach", tmp_path, background=BG_IMAGE,
                          backends=backends)
    s = task_summary(task)
    assert task.status == "rejected" and "stage 5 (synthesis)" in s["reason"]
    assert set(s["records"]) == set(layout.RECORD_NAMES)  # every record survives the rejection...
    report = json.loads((tmp_path / layout.report("location", s["id"])).read_text())
    # the 6 s 10 fps clip is 81 frames at 16 fps: Sparkle's own indices
    assert report["records"]["edited_video_score"]["frame_indices"] == [1, 26, 51, 76]
    assert dataset_files(tmp_path) == []  # ...in the report, not in the dataset
    funnel = json.loads(sparkle("funnel", tmp_path, "--json", check=True).stdout)
    assert (funnel["samples"], funnel["accepted"], funnel["rejected"]) == (2, 0, 2)
    stages = {s["name"]: s for s in funnel["stages"]}
    assert (stages["camera_filter"]["in"], stages["camera_filter"]["out"]) == (2, 1)
    assert list(stages["camera_filter"]["refused"]) == ["camera moves: median corner motion N px > N px per pair"]
    assert (stages["synthesis"]["in"], stages["synthesis"]["out"]) == (1, 0)
    assert json.loads((tmp_path / "reports" / "funnel.json").read_text()) == funnel
    table = sparkle("funnel", tmp_path, check=True).stdout
    assert "2 samples: 0 accepted, 2 rejected" in table and "camera_filter" in table


def test_control_mode_is_selectable(tmp_path):
    task, store = replace_one(PEDESTRIANS, "Replace the background with a beach", tmp_path, background=BG_IMAGE,
                              config=PipelineConfig(control={"mode": "copy_paste"}))
    assert task.status == "accepted"
    control = read_video(store.path(layout.canny_video("location", task.id))).frames
    src = read_video(store.path(layout.source_video("location", task.id))).frames
    mask = unpack_mask(store.path(layout.mask("location", task.id)).read_bytes())
    inside = cv2.erode(mask[10].astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert np.abs(control[10].astype(int) - src[10])[inside].mean() < 8  # source pixels pasted, not edges


def test_without_a_prompt_the_instruction_comes_from_the_catalogue(tmp_path):
    from sparkle.catalogue import load_catalogue

    proc = sparkle("replace", PEDESTRIANS, "-o", tmp_path, "--theme", "time", "--json", check=True)
    s = json.loads(proc.stdout)
    keyword = s["chosen_keyword"]
    assert keyword in load_catalogue().keywords("time")
    assert keyword.split(": ")[1] in s["prompt"]  # the cpu writer fills the catalogue template
    assert next(d for d in s["stages"] if d["name"] == "instruction")["accepted"]
    meta = json.loads((tmp_path / layout.prompts_metadata("time")).read_text())
    assert meta["metadata"]["chosen_keyword"] == keyword and meta["prompt"] == s["prompt"]
    again = json.loads(sparkle("replace", PEDESTRIANS, "-o", tmp_path / "again", "--theme", "time", "--json",
                               check=True).stdout)
    assert again["chosen_keyword"] == keyword  # picked from the sample id: deterministic


def test_catalogue_command_is_balanced_and_deterministic():
    first = json.loads(sparkle("catalogue", "--theme", "season", "-n", "8", "--seed", "5", "--json", check=True).stdout)
    second = json.loads(sparkle("catalogue", "--theme", "season", "-n", "8", "--seed", "5", "--json", check=True).stdout)
    assert first == second
    subthemes = [c["chosen_keyword"].split(": ")[0] for c in first["choices"]]
    assert sorted(subthemes) == sorted(["spring", "summer", "autumn", "winter"] * 2)
    assert sparkle("catalogue", "--theme", "weather").returncode == 1


class RecordingPrompts:
    """TEST DOUBLE wrapper: records the ``prompt`` a backend is called with, then calls the real cpu backend."""

    def __init__(self, inner, method: str):
        self.inner, self.method, self.prompts = inner, method, []
        self.name = inner.name

    def setup(self):
        self.inner.setup()

    def __getattr__(self, name):
        if name != self.method:
            return getattr(self.inner, name)

        def call(*args):
            self.prompts.append(args[-1] if self.method == "synthesize" else args[2])
            return getattr(self.inner, name)(*args)
        return call


def test_i2v_gets_the_background_caption_and_control_the_video_caption(tmp_path):
    """Sparkle animates the clean plate from a caption of the new background, not from the editing instruction
    (which names subjects and invites Wan to paint them back); Fun-Control gets the final video's caption. Both
    come from the grounding service and are kept in the report."""
    prompt = "Replace the background with a snowy mountain village at dusk, with softly falling snow; keep every " \
             "foreground subject unchanged"
    backends = load_backends("cpu")
    backends.i2v = RecordingPrompts(backends.i2v, "animate")
    backends.control = RecordingPrompts(backends.control, "synthesize")
    config = PipelineConfig(conform={"max_long_side": 320, "max_short_side": 192, "max_frames": 17})
    task, _ = replace_one(PEDESTRIANS, prompt, tmp_path, enforce_gates=False, config=config, backends=backends,
                          background=BG_IMAGE)
    assert task.status == "accepted", task.reason
    labels = task.records["foreground_grounding_r1"]["round1_labels"]
    assert labels and task.captions["source"] == "rules"
    background, video = task.captions["background"], task.captions["video"]
    assert backends.i2v.prompts == [background] and backends.control.prompts == [video]
    assert background == "A snowy mountain village at dusk, with softly falling snow, seen from a fixed camera."
    assert "Replace" not in background and "keep" not in background and "foreground" not in video
    assert video.endswith("in front of a snowy mountain village at dusk, with softly falling snow, seen from a "
                          "fixed camera.")
    report = json.loads((tmp_path / layout.report("location", task.id)).read_text())
    assert report["captions"] == task.captions


def test_a_background_video_longer_than_the_clip_is_cut_not_refused(tmp_path):
    """--max-frames 17 with a 60-frame background video: the background's first frames are used (before, the
    in-process services refused it as 'more than 17 frames')."""
    proc = sparkle("replace", JUGGLE, "Replace the background with a town square", "--background", PEDESTRIANS,
                   "--max-frames", "17", "--max-size", "416x240", "-o", tmp_path, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads(proc.stdout)
    assert s["shape"] == [17, 224, 416]
    bg = read_video(s["artifacts"]["background_video"]).frames
    assert len(bg) == 17 and np.abs(bg[8].astype(int) - bg[1]).mean() > 1  # a playing video, not a held image
