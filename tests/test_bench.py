"""``sparkle bench infer`` and ``sparkle bench eval`` on a small Sparkle-Bench built from the real clips, with the
judge played by a loopback OpenAI-compatible test double (FastAPI under uvicorn in a thread)."""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from typer.testing import CliRunner

from sparkle.orchestrator import bench
from sparkle.orchestrator.bench import (DIMENSIONS, BenchSample, bench_app, cap_scores, conform_reference, load_bench,
                           parse_scores, read_records, reference_size, score_file, summarize)
from sparkle.media import Video, read_video, write_png, write_video

from .conftest import JUGGLE, PEDESTRIANS, REFERENCE
from .loopback import LoopbackServer

JUDGE = "test/judge-vl"  # a hub-style name: its "/" must not split the score file's name
FRAMES = 17

# id -> (theme, clip, prompt, chosen_keyword)
SAMPLES = {
    "Sparkle_location_000001": ("location", PEDESTRIANS, "Replace the background with a rooftop overlooking a "
                                "skyline at dusk.", "urban: rooftop overlooking skyline"),
    "Sparkle_location_000002": ("location", JUGGLE, "Replace the background with a calm alpine lake.",
                                "nature: alpine lake"),
    "Sparkle_season_000001": ("season", PEDESTRIANS, "Make it a snowy winter street with falling snow.",
                              "winter: snowy street"),
}
PROMPT_TO_ID = {v[2]: k for k, v in SAMPLES.items()}


def cli() -> typer.Typer:
    """A local app holding the sub-app the way ``sparkle`` will: ``app.add_typer(bench_app, name="bench")``."""
    app = typer.Typer()
    app.add_typer(bench_app, name="bench")
    return app


def invoke(*args) -> "object":
    return CliRunner().invoke(cli(), [str(a) for a in args])


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    """Two themes, three samples: the clips' first 17 frames re-encoded, CSV + metadata + one ref image."""
    root = tmp_path_factory.mktemp("bench")
    clips = {}
    for sid, (theme, clip, prompt, kw) in SAMPLES.items():
        if clip not in clips:
            clips[clip] = read_video(clip, max_frames=FRAMES)
        rel = f"source_videos/{theme}/{sid}.mp4"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_video(root / rel, clips[clip].frames, clips[clip].fps)
        new = not (root / f"{theme}_bench.csv").exists()
        with (root / f"{theme}_bench.csv").open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["edited_type", "prompt", "original_video"])
            w.writerow([theme, prompt, rel])
        with (root / f"{theme}_metadata.jsonl").open("a") as f:
            f.write(json.dumps({"id": sid, "prompt": prompt, "metadata": {"edit_type": theme,
                                                                          "chosen_keyword": kw}}) + "\n")
    (root / "ref_images" / "season").mkdir(parents=True)
    write_png(root / "ref_images" / "season" / "Sparkle_season_000001.png", np.full((64, 64, 3), 200, np.uint8))
    return root


def expected_path(save_dir: Path, sid: str) -> Path:
    theme, _, _, kw = SAMPLES[sid]
    subtheme, scene = kw.split(": ")
    return save_dir / theme / f"{subtheme}---{scene.replace(' ', '_')}" / f"{sid}_edited.mp4"


COPY = f"{sys.executable} -c \"import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])\" {{input}} {{output}}"


@pytest.fixture(scope="module")
def cpu_ckpt(bench_dir, tmp_path_factory) -> tuple[Path, float]:
    """``bench infer --profile cpu --use-ref-images`` over the whole benchmark: (save_dir, seconds). The cpu
    profile cannot paint a location from words, so this copy of the benchmark has a reference image for
    every sample (without one a location sample fails: see the test below)."""
    save = tmp_path_factory.mktemp("ckpt_cpu")
    root = tmp_path_factory.mktemp("bench_with_refs")
    shutil.copytree(bench_dir, root, dirs_exist_ok=True)
    for sid, (theme, clip, _, _) in SAMPLES.items():
        ref = root / "ref_images" / theme / f"{sid}.png"
        if not ref.exists():
            ref.parent.mkdir(parents=True, exist_ok=True)
            write_png(ref, read_video(PEDESTRIANS, max_frames=1).frames[0])
    started = time.perf_counter()
    result = invoke("bench", "infer", root, "--save-dir", save, "--profile", "cpu", "--use-ref-images")
    assert result.exit_code == 0, result.output
    assert "done 3, skipped 0, failed 0" in result.stdout
    return save, time.perf_counter() - started


@pytest.fixture(scope="module")
def copy_ckpt(bench_dir, tmp_path_factory) -> Path:
    """A second checkpoint made with ``--command`` (the conformed source copied as the 'edit')."""
    save = tmp_path_factory.mktemp("ckpt_copy")
    result = invoke("bench", "infer", bench_dir, "-o", save, "--command", COPY)
    assert result.exit_code == 0, result.output
    return save


# --- benchmark reading and reference conventions ------------------------------------------------------------

def test_load_bench_reads_csv_metadata_and_ref_images(bench_dir):
    samples = load_bench(bench_dir)
    assert [s.id for s in samples] == list(SAMPLES)
    s = samples[0]
    assert (s.edit_type, s.subtheme, s.scene, s.group) == ("location", "urban", "rooftop overlooking skyline",
                                                           "urban---rooftop_overlooking_skyline")
    assert s.source == bench_dir / "source_videos/location/Sparkle_location_000001.mp4"
    assert samples[2].ref_image is not None and samples[0].ref_image is None
    assert [s.id for s in load_bench(bench_dir, ["season"])] == ["Sparkle_season_000001"]


def test_reference_conventions_area_multiples_of_32_and_4k_plus_1():
    assert reference_size(1920, 1080) == (1280, 704)       # area scaled to <= 720*1280, floored to 32
    assert reference_size(480, 360) == (480, 352)          # never upscaled, only floored
    assert reference_size(720, 1280) == (704, 1280)
    w, h = reference_size(3000, 1000)
    assert w * h <= 720 * 1280 and w % 32 == 0 and h % 32 == 0
    v = conform_reference(Video(np.zeros((90, 100, 150, 3), np.uint8), 24.0))
    assert v.shape == (81, 96, 128) and v.fps == 24.0
    assert conform_reference(Video(np.zeros((20, 64, 64, 3), np.uint8), 10.0)).shape[0] == 17


def test_reference_framing_crops_the_centre_as_diffsynths_videodata():
    """Sparkle's inference script frames a source with diffsynth's ``VideoData`` (``crop_and_resize``): the
    832x468 juggle clip becomes 832x448 by cropping 10 rows off top and bottom, not by a 4.3 % squash; a
    1920x1080-shaped frame is cropped to 1280:704 and resized. Compared with diffsynth's own function."""
    from diffsynth.utils.data import crop_and_resize
    from PIL import Image

    clip = read_video(JUGGLE, max_frames=5)
    assert clip.shape[1:] == (468, 832)
    v = conform_reference(clip)
    assert v.shape == (5, 448, 832)
    np.testing.assert_array_equal(v.frames, clip.frames[:, 10:458])  # the centre rows, untouched
    rng = np.random.default_rng(0)
    for h, w in ((1080, 1920), (700, 1500), (1280, 720)):
        frames = rng.integers(0, 256, (5, h, w, 3), dtype=np.uint8)
        ow, oh = reference_size(w, h)
        ours = conform_reference(Video(frames, 16.0)).frames
        theirs = np.stack([np.asarray(crop_and_resize(Image.fromarray(f), oh, ow)) for f in frames])
        np.testing.assert_array_equal(ours, theirs)


# --- bench infer --------------------------------------------------------------------------------------------

def test_infer_cpu_profile_writes_the_layout_at_15_fps_and_skips_on_rerun(bench_dir, cpu_ckpt):
    save, seconds = cpu_ckpt
    sizes = {"Sparkle_location_000001": (352, 480), "Sparkle_location_000002": (448, 832),
             "Sparkle_season_000001": (352, 480)}
    for sid in SAMPLES:
        out = expected_path(save, sid)
        assert out.is_file(), out
        v = read_video(out)
        assert v.shape == (FRAMES, *sizes[sid]) and abs(v.fps - 15.0) < 1e-6
    assert not list(save.rglob("*.tmp.mp4"))
    log = [json.loads(line) for line in (save / "bench_infer_log.rank0-of-1.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in log) == sorted(SAMPLES) and all(r["status"] == "done" for r in log)
    before = {sid: expected_path(save, sid).stat().st_mtime_ns for sid in SAMPLES}
    again = invoke("bench", "infer", bench_dir, "--save-dir", save, "--profile", "cpu")
    assert again.exit_code == 0 and "done 0, skipped 3, failed 0" in again.stdout
    assert {sid: expected_path(save, sid).stat().st_mtime_ns for sid in SAMPLES} == before
    print(f"bench infer --profile cpu, 3 clips of {FRAMES} frames: {seconds:.1f} s")


def test_infer_cpu_profile_fails_a_location_sample_without_a_reference_image(bench_dir, tmp_path):
    """The cpu profile refuses to fake a location edit (it would only re-grade the source): the sample is
    counted as failed with the reason, and the season sample is still done."""
    result = invoke("bench", "infer", bench_dir, "--save-dir", tmp_path / "ckpt", "--profile", "cpu",
                    "--theme", "location")
    assert result.exit_code == 3 and "done 0, skipped 0, failed 2" in result.stdout, result.output
    assert "location edit asks for another place" in result.output and "--use-ref-images" in result.output


def test_infer_command_shards_by_rank_and_passes_placeholders(bench_dir, tmp_path):
    seen = tmp_path / "seen.jsonl"
    script = tmp_path / "model.py"
    script.write_text(
        "import json, shutil, sys\n"
        "inp, out, prompt, sid = sys.argv[1:5]\n"
        f"open({str(seen)!r}, 'a').write(json.dumps([sid, prompt]) + '\\n')\n"
        "shutil.copy(inp, out)\n")
    template = f"{sys.executable} {script} {{input}} {{output}} {{prompt}} {{id}}"
    save = tmp_path / "ckpt"
    for rank in (0, 1):
        r = invoke("bench", "infer", bench_dir, "-o", save, "--command", template, "--rank", rank, "--world-size", 2)
        assert r.exit_code == 0, r.output
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    assert sorted(c[0] for c in calls) == sorted(SAMPLES)   # disjoint shards covering everything, once each
    assert all(SAMPLES[sid][2] == prompt for sid, prompt in calls)  # a prompt is one argument, unquoted
    for sid in SAMPLES:
        v = read_video(expected_path(save, sid))
        assert v.shape[0] == FRAMES and abs(v.fps - 15.0) < 1e-6  # re-encoded at 15 fps (source is 10/16 fps)


def test_infer_failures_are_counted_and_leave_no_partial_output(bench_dir, tmp_path):
    script = tmp_path / "flaky.py"
    script.write_text(
        "import shutil, sys\n"
        "inp, out, sid = sys.argv[1:4]\n"
        "open(out, 'wb').write(b'half-written')\n"
        "if sid.endswith('000002'):\n"
        "    sys.exit('model crashed')\n"
        "shutil.copy(inp, out)\n")
    save = tmp_path / "ckpt"
    r = invoke("bench", "infer", bench_dir, "-o", save, "--command", f"{sys.executable} {script} {{input}} {{output}} {{id}}")
    assert r.exit_code == bench.EXIT_FAILURES
    assert "done 2, skipped 0, failed 1" in r.stdout and "model crashed" in r.stdout
    assert not expected_path(save, "Sparkle_location_000002").exists()
    assert not list(save.rglob(".*"))  # the half-written temporary file is gone
    log = {x["id"]: x for x in map(json.loads, (save / "bench_infer_log.rank0-of-1.jsonl").read_text().splitlines())}
    assert log["Sparkle_location_000002"]["status"] == "failed" and "model crashed" in log["Sparkle_location_000002"]["error"]
    assert invoke("bench", "infer", bench_dir, "-o", save, "--profile", "cpu", "--command", "x").exit_code == 1


# --- the judge: parsing and cap -----------------------------------------------------------------------------

def reply(scores, preface="The new background matches the instruction well; the subjects are intact.") -> str:
    return preface + "\n\n" + "\n".join(f"{name}: {v}" for name, v in zip(DIMENSIONS, scores))


def test_parse_and_cap():
    assert parse_scores(reply([4, 5, 3, 5, 2, 4])) == [4, 5, 3, 5, 2, 4]
    md = "**Instruction Compliance**: 3\n- Overall Visual Quality: **5**\n" + "\n".join(
        f"{n}: 4/5" for n in DIMENSIONS[2:])
    assert parse_scores(md) == [3, 5, 4, 4, 4, 4]
    # the last line of a dimension wins, prose mentioning a dimension is not a score
    assert parse_scores("Instruction Compliance: the sky is right.\n" + reply([2, 2, 2, 2, 2, 2]) + "\n"
                        + reply([5, 5, 5, 5, 5, 5], preface="Final:"))[0] == 5
    for bad in (reply([6, 5, 5, 5, 5, 5]), reply([0, 1, 1, 1, 1, 1]), reply([3, 2.5, 3, 3, 3, 3]),
                reply([3, 3, 3, 3, 3, 3]).rsplit("\n", 1)[0], "I like it."):
        with pytest.raises(bench.JudgeReplyError):
            parse_scores(bad)
    assert cap_scores([2, 5, 1, 3, 2, 4]) == [2, 2, 1, 2, 2, 2]


# --- the judge: loopback test double ------------------------------------------------------------------------

class FakeJudgeServer(LoopbackServer):
    """TEST DOUBLE of an OpenAI-compatible judge (``vllm serve Qwen/Qwen3-VL-...``): ``POST /v1/chat/completions``
    on 127.0.0.1, uvicorn in a thread, and Azure OpenAI's ``POST /openai/deployments/{model}/chat/completions``.
    ``script[(checkpoint, id)]`` is a list of steps consumed one per request: ``("text", reply)``,
    ``("slow", seconds, reply)`` or ``("status", code)``; the sample is recognised by its instruction in the
    rubric (the first part) and the checkpoint by the edited video's bytes (the third part; ``videos``:
    sha256 -> name). Each request is recorded with its path, query and headers."""

    def __init__(self):
        self.script: dict[tuple[str, str], list] = {}
        self.videos: dict[str, str] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        app = FastAPI()

        @app.post("/v1/chat/completions")
        @app.post("/openai/deployments/{deployment}/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            content = body["messages"][0]["content"]
            rubric = content[0]["text"]
            sid = next(i for p, i in PROMPT_TO_ID.items() if p in rubric)
            part = content[2]["type"]
            edited = base64.b64decode(content[2][part]["url"].split(",", 1)[1])
            ckpt = self.videos.get(hashlib.sha256(edited).hexdigest(), "?")
            with self.lock:
                self.requests.append({"body": body, "id": sid, "checkpoint": ckpt, "path": request.url.path,
                                      "query": dict(request.query_params), "headers": dict(request.headers)})
                steps = self.script.get((ckpt, sid)) or [("status", 404)]
                step = steps.pop(0) if len(steps) > 1 else steps[0]
            if step[0] == "status":
                return JSONResponse({"error": {"message": "scripted failure"}}, status_code=step[1])
            if step[0] == "slow":
                await asyncio.sleep(step[1])
            return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": step[-1]}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

        self.serve(app)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def register(self, name: str, save_dir: Path) -> None:
        for sid in SAMPLES:
            self.videos[hashlib.sha256(expected_path(save_dir, sid).read_bytes()).hexdigest()] = name



def eval_args(judge, bench_dir, *dirs, extra=()):
    return ["bench", "eval", "--video-paths", *dirs, "--bench-dir", bench_dir, "--judge-url", judge.url,
            "--judge-model", JUDGE, "--timeout", "1.5", "--retries", "2", "--backoff", "0.01", "--concurrency", "3",
            *extra]


def test_eval_parses_caps_retries_accounts_failures_aggregates_and_resumes(bench_dir, cpu_ckpt, copy_ckpt, tmp_path):
    cpu, _ = cpu_ckpt
    L1, L2, S1 = SAMPLES
    partial = reply([4, 4, 4, 4, 4, 4]).rsplit("\n", 1)[0]  # Background Visual Quality missing
    with FakeJudgeServer() as judge:
        judge.register("cpu", cpu)
        judge.register("copy", copy_ckpt)
        judge.script = {
            ("cpu", L1): [("text", reply([3, 5, 4, 5, 2, 5]))],                         # good, capped at 3
            ("cpu", L2): [("text", "Looks fine to me."), ("text", reply([7, 4, 4, 4, 4, 4])),
                          ("text", reply([5, 4, 5, 4, 3, 4]))],                          # malformed, out of range, good
            ("cpu", S1): [("text", partial)],                                            # partial every time: fails
            ("copy", L1): [("slow", 3.5, reply([1, 1, 1, 1, 1, 1])), ("text", reply([1, 4, 5, 5, 1, 3]))],
            ("copy", L2): [("status", 500), ("text", reply([2, 2, 3, 3, 1, 2]))],
            ("copy", S1): [("text", reply([4, 4, 5, 5, 3, 4]))],
        }
        plot = tmp_path / "plots" / "bench.png"
        started = time.perf_counter()
        r = CliRunner().invoke(cli(), [str(a) for a in eval_args(judge, bench_dir, cpu, copy_ckpt,
                                                                extra=("--plot", plot, "--json"))])
        first = time.perf_counter() - started
        assert r.exit_code == bench.EXIT_FAILURES, r.output
        summary = json.loads(r.stdout)
        n_first = len(judge.requests)

        # request format (Sparkle's order): one user message, the rubric with the instruction, then the source
        # and the edited video as data URLs
        body = judge.requests[0]["body"]
        assert body["model"] == JUDGE and body["temperature"] == 0 and body["seed"] == 42
        kinds = [p["type"] for p in body["messages"][0]["content"]]
        assert kinds == ["text", "video_url", "video_url"]
        sid = judge.requests[0]["id"]
        theme = SAMPLES[sid][0]
        src = base64.b64decode(body["messages"][0]["content"][1]["video_url"]["url"].split(",", 1)[1])
        assert body["messages"][0]["content"][1]["video_url"]["url"].startswith("data:video/mp4;base64,")
        assert src == (bench_dir / f"source_videos/{theme}/{sid}.mp4").read_bytes()
        assert "{instruction}" not in body["messages"][0]["content"][0]["text"]

        # per-sample records, in each checkpoint directory, named after the (sanitised) judge model
        f_loc, f_sea = score_file(cpu, "location", JUDGE), score_file(cpu, "season", JUDGE)
        assert f_loc.name == "location_test_judge-vl_sparkle_score.jsonl" and f_sea.is_file()
        loc = read_records(f_loc)
        assert loc[L1]["scores"] == [3, 3, 3, 3, 2, 3] and loc[L1]["uncapped_scores"] == [3, 5, 4, 5, 2, 5]
        assert loc[L1]["subtheme"] == "urban" and loc[L1]["scene"] == "rooftop overlooking skyline"
        assert loc[L1]["prompt"] == SAMPLES[L1][2] and loc[L1]["edit_type"] == "location"
        assert loc[L1]["result"].startswith("The new background")
        assert loc[L2]["scores"] == [5, 4, 5, 4, 3, 4] and loc[L2]["attempts"] == 3
        sea = read_records(f_sea)[S1]
        assert sea["scores"] is None and sea["attempts"] == 3 and "Background Visual Quality" in sea["error"]
        assert sea["result"] == partial
        copy_loc = read_records(score_file(copy_ckpt, "location", JUDGE))
        assert copy_loc[L1]["scores"] == [1, 1, 1, 1, 1, 1] and copy_loc[L1]["attempts"] == 2   # timed out once
        assert copy_loc[L2]["scores"] == [2, 2, 2, 2, 1, 2] and copy_loc[L2]["attempts"] == 2   # 500 once

        # aggregation: per theme, MACRO = unweighted mean over themes with scored samples
        cs = summary["checkpoints"][cpu.name]
        assert cs["themes"]["location"]["n"] == 2 and cs["themes"]["season"] == {
            **{k: None for k in ("Ins", "Vis", "FgIn", "FgMo", "BgDy", "BgVi", "overall")}, "n": 0, "failures": 1}
        assert cs["themes"]["location"]["Ins"] == pytest.approx(4.0)
        assert cs["themes"]["location"]["overall"] == pytest.approx((17 / 6 + 25 / 6) / 2)
        assert cs["MACRO"]["n"] == 2 and cs["MACRO"]["failures"] == 1
        assert cs["MACRO"]["BgDy"] == pytest.approx(2.5)
        ks = summary["checkpoints"][copy_ckpt.name]
        assert ks["themes"]["location"]["Ins"] == pytest.approx(1.5)
        assert ks["themes"]["season"]["Ins"] == pytest.approx(4.0)
        assert ks["MACRO"]["Ins"] == pytest.approx((1.5 + 4.0) / 2)  # not (1 + 2 + 4) / 3
        assert ks["MACRO"]["overall"] == pytest.approx(((6 / 6 + 11 / 6) / 2 + 23 / 6) / 2)  # season capped to [4, 4, 4, 4, 3, 4]
        assert ks["MACRO"]["failures"] == 0
        assert plot.is_file() and plot.stat().st_size > 1000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # resume: only the failed sample is sent again; one record per sample in the end
        judge.script[("cpu", S1)] = [("text", reply([4, 3, 4, 4, 5, 4]))]
        with f_loc.open("a") as f:
            f.write('{"id": "Sparkle_location_000001", "scores": [1, 1')  # a line cut by a crash
        r2 = CliRunner().invoke(cli(), [str(a) for a in eval_args(judge, bench_dir, cpu, copy_ckpt)])
        assert r2.exit_code == 0, r2.output
        assert [q["id"] for q in judge.requests[n_first:]] == [S1]
        assert "MACRO" in r2.stdout
        for d in (cpu, copy_ckpt):
            for theme in ("location", "season"):
                lines = score_file(d, theme, JUDGE).read_text().splitlines()
                ids = [json.loads(x)["id"] for x in lines]
                assert ids == [s for s in SAMPLES if SAMPLES[s][0] == theme]
        assert read_records(f_sea)[S1]["scores"] == [4, 3, 4, 4, 4, 4]
        final = summarize({t: score_file(cpu, t, JUDGE) for t in ("location", "season")})
        assert final["MACRO"]["failures"] == 0 and final["MACRO"]["n"] == 3
        assert final["MACRO"]["Ins"] == pytest.approx((4.0 + 4.0) / 2)
    print(f"bench eval, 2 checkpoints x 3 samples with scripted faults: {first:.1f} s")


def test_eval_missing_edited_video_is_a_counted_failure(bench_dir, tmp_path):
    empty = tmp_path / "empty_ckpt"
    empty.mkdir()
    with FakeJudgeServer() as judge:
        r = CliRunner().invoke(cli(), [str(a) for a in eval_args(judge, bench_dir, empty, extra=("--theme", "season"))])
        assert r.exit_code == bench.EXIT_FAILURES
        assert judge.requests == []
    rec = read_records(score_file(empty, "season", JUDGE))["Sparkle_season_000001"]
    assert rec["scores"] is None and "edited video not found" in rec["error"]


def test_custom_rubric_needs_the_instruction_placeholder(tmp_path):
    p = tmp_path / "rubric.txt"
    p.write_text("Rate it.")
    with pytest.raises(bench.InputError):
        bench.load_rubric(p)
    p.write_text("Judge {instruction} with {braces} kept.")
    req = bench.build_judge_request("m", bench.load_rubric(p), "a lake", __file__, __file__)
    assert req["messages"][0]["content"][0]["text"] == "Judge a lake with {braces} kept."


SPARKLE_EVAL = REFERENCE / "eval_sparkle_bench_gemini.py"


def sparkle_rubric() -> str:
    """``BACKGROUND_REPLACEMENT`` as Sparkle's own module defines it: the script imported (its module level
    builds an Azure client from two environment variables, which is all it needs; nothing is sent)."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("sparkle_eval_reference", SPARKLE_EVAL)
    module = importlib.util.module_from_spec(spec)
    saved = {k: os.environ.get(k) for k in ("AZURE_ENDPOINT", "GEMINI_API_KEY")}
    os.environ.update(AZURE_ENDPOINT="https://example.invalid", GEMINI_API_KEY="unused")
    try:
        spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return module.BACKGROUND_REPLACEMENT


def test_rubric_from_sparkles_script_azure_transport_and_sparkles_option_spellings(bench_dir, cpu_ckpt):
    """``--rubric-from`` sends exactly ``BACKGROUND_REPLACEMENT.format(edit_prompt=prompt)`` (the script parsed,
    not run), followed by the source and the edited video as ``image_url`` parts holding ``data:video/mp4``
    (``--video-part image_url``), to an Azure OpenAI endpoint (``api-key`` header, ``api-version``), all
    given with Sparkle's own option spellings (``--video_paths``, ``--bench_root``, ``--model_id``,
    ``--edit_types`` with several themes after it)."""
    cpu, _ = cpu_ckpt
    template = sparkle_rubric()
    with FakeJudgeServer() as judge:
        judge.register("cpu", cpu)
        judge.script = {("cpu", sid): [("text", reply([4, 4, 4, 4, 4, 4]))] for sid in SAMPLES}
        model = "gemini-2.5-pro"  # Sparkle's judge (its own score files: the cpu checkpoint has others' already)
        args = ["bench", "eval", "--video_paths", cpu, "--bench_root", bench_dir, "--model_id", model,
                "--azure-endpoint", f"http://127.0.0.1:{judge.port}", "--api-key", "secret-key",
                "--rubric-from", SPARKLE_EVAL, "--video-part", "image_url", "--edit_types", "location", "season",
                "--retries", "0", "--json"]
        r = CliRunner().invoke(cli(), [str(a) for a in args])
        assert r.exit_code == 0, r.output
        assert sorted(q["id"] for q in judge.requests) == sorted(SAMPLES)  # both themes, one checkpoint
        for q in judge.requests:
            content = q["body"]["messages"][0]["content"]
            assert content[0] == {"type": "text", "text": template.format(edit_prompt=SAMPLES[q["id"]][2])}
            assert [p["type"] for p in content] == ["text", "image_url", "image_url"]
            assert content[1]["image_url"]["url"].startswith("data:video/mp4;base64,")
            assert q["path"] == f"/openai/deployments/{model}/chat/completions"
            assert q["query"]["api-version"] == "2024-03-01-preview" and q["headers"]["api-key"] == "secret-key"
    assert json.loads(r.stdout)["checkpoints"][cpu.name]["MACRO"]["n"] == len(SAMPLES)


def test_rubric_from_refuses_a_script_without_the_rubric(tmp_path):
    bad = tmp_path / "eval.py"
    bad.write_text("RUBRIC = 'x'\n")
    with pytest.raises(bench.InputError, match="BACKGROUND_REPLACEMENT"):
        bench.rubric_from_script(bad)
    bad.write_text("BACKGROUND_REPLACEMENT = 'rate {video}'\n")
    with pytest.raises(bench.InputError, match="edit_prompt"):
        bench.rubric_from_script(bad)
    bad.write_text("BACKGROUND_REPLACEMENT = 'Instruction: {edit_prompt}. Keep {{braces}}.'\nimport os; os._exit(9)\n")
    assert bench.rubric_from_script(bad).replace("{instruction}", "x") == "Instruction: x. Keep {braces}."


def test_default_rubric_scales_follow_sparkles():
    """The packaged rubric's levels mean what Sparkle's mean: a still background for an instruction that
    implies motion is a 1 for Background Dynamics (it was a 3), and a faithfully still one for a static
    instruction is a 5; foreground damage sinks Instruction Compliance; every dimension has levels 1-5."""
    text = bench.load_rubric()
    dynamics = text.split("Background Dynamics\n", 1)[1].split("Background Visual Quality\n", 1)[0]
    assert "1. The motion contradicts the instruction: a fully still background" in dynamics
    assert "still background scores 5" in dynamics
    compliance = text.split("Instruction Compliance\n", 1)[1].split("Overall Visual Quality\n", 1)[0]
    assert "foreground was replaced" in compliance.split("\n2.")[0]
    for name in DIMENSIONS:
        block = text.split(f"\n{name}\n", 1)[1]
        assert all(f"\n{k}. " in "\n" + block for k in range(1, 6)), name
