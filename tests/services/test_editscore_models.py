"""EditScore ``real``/``tiny`` backends: EditScore's prompts, parser and formula through a scripted test-double
VLM; the tiny Qwen2.5-VL over HTTP on the real clips; the real loader on a saved tiny checkpoint; errors."""

from __future__ import annotations

import math
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest
from fastapi.testclient import TestClient

from sparkle.artifacts import ArtifactIO
from sparkle.backends import FrameScore, ImageScore, SampleContext
from sparkle.config import ConformConfig
from sparkle.errors import ConfigError
from sparkle.media import conform, read_video
from sparkle.services.editscore.app import ScoreFramesResponse, ScoreImageResponse
from sparkle.serving import ServeSettings, build_app
from sparkle.services.editscore import real, tiny
from sparkle.services.editscore.app import API
from sparkle.store import LocalStore

from ..conftest import JUGGLE, PEDESTRIANS

INSTRUCTION = "Replace the background with a snowy mountain village at dusk"
REMOVAL = "Remove the people walking on the pavement, leaving an empty street"
FRAMES = [1, 6, 11, 16]


def sc_answer(success: float, overediting: float, why: str = "The background was replaced.") -> str:
    """An answer in EditScore's output format (the prompts' ``{"reasoning": ..., "score": [...]}``)."""
    return '{\n"reasoning" : "%s",\n"score" : [%s, %s]\n}' % (why, success, overediting)


class ScriptedVLM:
    """TEST DOUBLE for :class:`real.QwenVLJudge`: answers each prompt with the next scripted text.

    Records every ``generate`` call's requests (``(images, prompt)``) so that tests can check what EditScore's
    prompts and image order look like.
    """

    def __init__(self, answers: list[str]):
        self.answers = list(answers)
        self.calls: list[list[tuple[list[np.ndarray], str]]] = []
        self.seeds: list[int | None] = []
        self.setups = 0

    def setup(self) -> None:
        self.setups += 1

    def generate(self, requests, seed=None):
        self.calls.append(requests)
        self.seeds.append(seed)
        out, self.answers = self.answers[:len(requests)], self.answers[len(requests):]
        assert len(out) == len(requests), "script ran out of answers"
        return out


@pytest.fixture(scope="module")
def clip():
    """The pedestrians clip (4:3) conformed to 17 frames of 144x112 (``(17, 112, 144, 3) uint8``)."""
    return conform(read_video(PEDESTRIANS, max_frames=17),
                   ConformConfig(max_frames=17, max_long_side=208, max_short_side=112))


@pytest.fixture(scope="module")
def tiny_backend():
    backend = tiny.make_backend()
    backend.setup()
    return backend


def ctx_of(video) -> SampleContext:
    return SampleContext("Sparkle_location_000000", INSTRUCTION, video)


# --- EditScore's prompts, parser and formula (scripted test-double VLM) ----------------------------------------

def test_prompts_and_template_are_editscores():
    sc, pq = real.editscore_prompts()
    from editscore import vie_prompts

    assert sc.startswith(vie_prompts._context_no_delimit_reasoning_first)
    assert "From scale 0 to 25" in sc and "From scale 0 to 10" not in sc and "<instruction>" in sc
    assert "score = [score1, score2]" in sc and "[naturalness, artifacts]" in pq and "From scale 0 to 25" in pq
    assert "editscore" not in sys.path  # the package's relative sys.path entry was removed


def test_score_image_formula_prompts_and_mapping(clip):
    src, edited = clip.frames[0], clip.frames[0][:, ::-1].copy()
    vlm = ScriptedVLM([sc_answer(20, 15), '{"reasoning": "Natural light, no artifacts.", "score": [22, 18]}'])
    scorer = real.EditScoreScorer(vlm, name="scripted", num_pass=1)
    scorer.setup()
    s = scorer.score_image(ctx_of(clip), src, edited, INSTRUCTION, "edit_background")
    assert isinstance(s, ImageScore) and vlm.setups == 1
    # criteria / (25 / 10); SC = min; PQ = min; O = sqrt(SC * PQ)
    assert (s.prompt_following, s.consistency) == pytest.approx((8.0, 6.0))
    assert s.perceptual_quality == pytest.approx(18 / 2.5)
    assert s.overall == pytest.approx(math.sqrt(6.0 * 7.2))
    assert s.SC_reasoning == "The background was replaced." and s.PQ_reasoning == "Natural light, no artifacts."
    # one generate: SC on [source, edited] with the instruction, then PQ on the edited image only
    (requests,) = vlm.calls
    (sc_images, sc_prompt), (pq_images, pq_prompt) = requests
    assert len(sc_images) == 2 and sc_images[0] is src and sc_images[1] is edited
    assert len(pq_images) == 1 and pq_images[0] is edited
    assert sc_prompt == scorer.sc_prompt.replace("<instruction>", INSTRUCTION)
    assert sc_prompt.rstrip().endswith(f"Editing instruction: {INSTRUCTION}") and pq_prompt == scorer.pq_prompt
    with pytest.raises(ValueError, match="unknown task"):
        scorer.score_image(ctx_of(clip), src, edited, INSTRUCTION, "relight")


def test_score_frames_batches_all_frames_and_keeps_raw_outputs(clip):
    src = clip.frames
    edited = (255 - src).astype(np.uint8)
    sc = [sc_answer(25, 25 - i, f"frame {i}") for i in range(4)]
    pq = ["{'reasoning': 'ok %d', 'score': [%d, 20]}" % (i, 10 + i) for i in range(4)]  # single quotes: repaired
    vlm = ScriptedVLM(sc + pq)
    scores = real.EditScoreScorer(vlm, num_pass=1).score_frames(ctx_of(clip), src, edited, FRAMES, INSTRUCTION)
    assert len(vlm.calls) == 1 and len(vlm.calls[0]) == 8  # 4 frames x (SC, PQ) in one batched generate
    for k, i in enumerate(FRAMES):
        images, _ = vlm.calls[0][k]
        assert np.array_equal(images[0], src[i]) and np.array_equal(images[1], edited[i])
        assert np.array_equal(vlm.calls[0][4 + k][0][0], edited[i])
    assert [type(s) for s in scores] == [FrameScore] * 4
    for k, s in enumerate(scores):
        assert s.SC_score == pytest.approx((25 - k) / 2.5) and s.PQ_score == pytest.approx((10 + k) / 2.5)
        assert s.O_score == pytest.approx(math.sqrt(s.SC_score * s.PQ_score))
        assert s.SC_raw_output == sc[k] and s.PQ_raw_output == pq[k]
        assert s.SC_score_reasoning == f"frame {k}" and s.PQ_score_reasoning == f"ok {k}"


def test_concurrent_requests_are_judged_in_one_batched_generate(clip, tmp_path):
    """Two score_image requests reach the service at once: the shell gathers them into one call of the batched
    operation, and the real scorer generates all four prompts (2 x SC, 2 x PQ) together, each SC prompt with
    its own request's instruction."""
    from concurrent.futures import ThreadPoolExecutor

    store = LocalStore(tmp_path)
    io = ArtifactIO(store)
    io.put_video("s/source.mp4", clip.frames, clip.fps)
    io.put_image("s/a.png", clip.frames[0])
    io.put_image("s/b.png", clip.frames[0][:, ::-1].copy())
    ref = {"sample_id": "Sparkle_location_000000", "prompt": INSTRUCTION, "source_video": "s/source.mp4"}
    vlm = ScriptedVLM([sc_answer(20, 15), sc_answer(10, 5), '{"reasoning": "a", "score": [22, 18]}',
                       '{"reasoning": "b", "score": [12, 8]}'])
    settings = ServeSettings(load_in_background=False, max_batch_size=4, batch_timeout_s=0.5)
    with TestClient(build_app(API(real.EditScoreScorer(vlm, num_pass=1), store), settings)) as client, \
            ThreadPoolExecutor(2) as pool:
        bodies = [{"sample": ref, "source": "s/a.png", "edited": "s/b.png", "instruction": text,
                   "task": "edit_background"} for text in ("first instruction", "second instruction")]
        futures = [pool.submit(client.post, "/v1/score_image", json=b) for b in bodies]
        answers = [f.result().json() for f in futures]
    assert len(vlm.calls) == 1 and len(vlm.calls[0]) == 4  # one batched generate for both requests
    sc_prompts = [prompt for _, prompt in vlm.calls[0][:2]]
    assert sorted(p.rstrip().rsplit(": ", 1)[1] for p in sc_prompts) == ["first instruction", "second instruction"]
    assert sorted(a["score"]["prompt_following"] for a in answers) == pytest.approx([4.0, 8.0])


# Sparkle's README example records (edited_frame0_score.jsonl, edited_video_score.jsonl) and, for each, EditScore
# answers on the 0..25 scale for passes 0-3 that give exactly those numbers under num_pass=4, average_last
# (found by enumerating every 4-pass combination of integer answers; a single pass cannot give SC 9.0, PQ 8.5,
# O 8.71996, since sqrt(9.0 * 8.5) = 8.746).
README_FRAME0 = {"prompt_following": 9.7, "consistency": 8.8, "perceptual_quality": 8.5, "overall": 8.62887857991077}
FRAME0_PASSES = [(24, 20, 23), (25, 23, 18), (23, 22, 21), (25, 23, 23)]  # SC [success, overediting], min PQ
README_FRAMES = [(9.0, 8.5, 8.719958110896453), (8.3, 8.5, 8.388302424289282), (9.1, 7.4, 8.143194240945185),
                 (8.9, 7.8, 8.318623075017307)]  # (SC_score, PQ_score, O_score) at frame_indices [1, 26, 51, 76]
FRAME_PASSES = [[(23, 23), (23, 17), (24, 22), (20, 23)], [(20, 21), (20, 21), (20, 23), (23, 20)],
                [(22, 23), (23, 12), (23, 18), (23, 21)], [(22, 18), (22, 19), (22, 23), (23, 18)]]  # (min SC, min PQ)


class PassVLM(ScriptedVLM):
    """TEST DOUBLE: answers pass ``seed - 42`` of every request from ``answers[pass]`` (one list per pass)."""

    def __init__(self, per_pass: list[list[str]]):
        super().__init__([])
        self.per_pass = per_pass

    def generate(self, requests, seed=None):
        self.calls.append(requests)
        self.seeds.append(seed)
        answers = self.per_pass[seed - 42]
        assert len(answers) == len(requests)
        return answers


def test_four_passes_reproduce_sparkles_readme_records_exactly(clip):
    """Sparkle's records are EditScore 4-pass averages (average_last): the default scorer samples pass i with
    seed 42 + i and reproduces the README's five example records bit for bit; one pass cannot."""
    assert real.NUM_PASS == 4
    vlm = PassVLM([[sc_answer(a, b, f"SC pass {i}"), '{"reasoning": "PQ pass %d", "score": [%d, 25]}' % (i, c)]
                   for i, (a, b, c) in enumerate(FRAME0_PASSES)])
    scorer = real.EditScoreScorer(vlm)
    s = scorer.score_image(ctx_of(clip), clip.frames[0], clip.frames[1], INSTRUCTION, "edit_background")
    assert vlm.seeds == [42, 43, 44, 45]
    assert s.model_dump(exclude={"passes", "SC_reasoning", "PQ_reasoning"}) == README_FRAME0  # exact floats
    assert (s.SC_reasoning, s.PQ_reasoning) == ("SC pass 3", "PQ pass 3")  # evaluate: the last pass's
    assert [p["perceptual_quality"] for p in s.passes] == [c / 2.5 for _, _, c in FRAME0_PASSES]

    per_pass = [[sc_answer(FRAME_PASSES[f][i][0], 25, f"frame {f} pass {i}") for f in range(4)]
                + ['{"reasoning": "PQ", "score": [25, %d]}' % FRAME_PASSES[f][i][1] for f in range(4)]
                for i in range(4)]
    vlm = PassVLM(per_pass)
    frames = real.EditScoreScorer(vlm).score_frames(ctx_of(clip), clip.frames, clip.frames, [1, 6, 11, 16],
                                                    INSTRUCTION)
    assert [(f.SC_score, f.PQ_score, f.O_score) for f in frames] == README_FRAMES  # exact floats
    assert [f.SC_score_reasoning for f in frames] == [f"frame {f} pass 0" for f in range(4)]  # batch_evaluate
    assert frames[0].SC_raw_output == per_pass[0][0]
    # one pass (the old behaviour) gives pass 0's values, not the README's
    single = real.EditScoreScorer(PassVLM(per_pass), num_pass=1).score_frames(
        ctx_of(clip), clip.frames, clip.frames, [1, 6, 11, 16], INSTRUCTION)
    assert [(f.SC_score, f.PQ_score, f.O_score) for f in single] != README_FRAMES
    # average_first takes O from the averaged sub-scores
    first = real.EditScoreScorer(PassVLM([[p[0], p[4]] for p in per_pass]), reduction="average_first").score_frames(
        ctx_of(clip), clip.frames, clip.frames, [1], INSTRUCTION)
    assert first[0].O_score == pytest.approx(math.sqrt(9.0 * 8.5))
    with pytest.raises(ValueError, match="num_pass"):
        real.EditScoreScorer(vlm, num_pass=0)
    with pytest.raises(ValueError, match="reduction"):
        real.EditScoreScorer(vlm, reduction="median")


@pytest.mark.parametrize("bad, why", [
    ("", "0 scores"),
    ("I'm sorry, but I can't assist with that request.", "0 scores"),
    ('{"reasoning": "fine", "score": ["high", 3]}', "ValueError"),  # the package's parser raises here
    ('{"reasoning": "too good", "score": [30, 20]}', "outside 0..25"),
    ('{"reasoning": "three", "score": [10, 20, 15]}', "3 scores"),
    ('{"reasoning": "nan", "score": ["nan", 5]}', "outside 0..25"),
])
def test_malformed_answers_score_zero_with_a_reason(clip, bad, why):
    vlm = ScriptedVLM([bad, sc_answer(20, 20)] * 2)
    scorer = real.EditScoreScorer(vlm, num_pass=1)
    s = scorer.score_image(ctx_of(clip), clip.frames[0], clip.frames[1], INSTRUCTION, "remove_foreground")
    assert s.prompt_following == s.consistency == s.overall == 0.0 and s.perceptual_quality == 8.0
    assert s.SC_reasoning.startswith("[unparsable EditScore output") and why in s.SC_reasoning
    (f,) = scorer.score_frames(ctx_of(clip), clip.frames, clip.frames, [3], INSTRUCTION)
    assert (f.SC_score, f.PQ_score, f.O_score) == (0.0, 8.0, 0.0) and f.SC_raw_output == bad


# --- the tiny Qwen2.5-VL over HTTP ------------------------------------------------------------------------------

def test_http_every_operation_on_tiny_qwen25vl(tmp_path, clip, tiny_backend):
    store = LocalStore(tmp_path)
    io = ArtifactIO(store)
    t, h, w = clip.shape
    assert (t, h, w) == (17, 112, 144) and clip.frames.dtype == np.uint8
    io.put_video("s/source.mp4", clip.frames, clip.fps)
    io.put_image("s/frame0.png", clip.frames[0])
    other = conform(read_video(JUGGLE, max_frames=5), ConformConfig(max_frames=5, max_long_side=208,
                                                                    max_short_side=112))
    io.put_image("s/edited0.png", other.frames[0])
    io.put_video("s/edited.mp4", (255 - clip.frames).astype(np.uint8), clip.fps)
    io.put_mask("s/mask.npz", np.zeros((t, h, w), bool))
    ref = {"sample_id": "Sparkle_location_000000", "prompt": INSTRUCTION, "source_video": "s/source.mp4",
           "mask": "s/mask.npz"}
    app = build_app(API(tiny_backend, store), ServeSettings(load_in_background=False))
    with TestClient(app) as c:
        assert c.get("/readyz").json()["backend"] == "editscore-tiny-random"
        for task, instruction in (("edit_background", INSTRUCTION), ("remove_foreground", REMOVAL)):
            r = c.post("/v1/score_image", json={"sample": ref, "source": "s/frame0.png", "edited": "s/edited0.png",
                                                 "instruction": instruction, "task": task})
            assert r.status_code == 200, r.text
            body = ScoreImageResponse.model_validate(r.json())
            s = body.score
            assert body.scorer == "editscore-tiny-random" and body.timings["total"] > 0
            values = (s.prompt_following, s.consistency, s.perceptual_quality, s.overall)
            assert all(0.0 <= v <= 10.0 for v in values)
            assert len(s.passes) == real.NUM_PASS  # average_last: overall is the mean of the per-pass overalls
            for p in s.passes:
                assert p["overall"] == pytest.approx(math.sqrt(min(p["prompt_following"], p["consistency"])
                                                               * p["perceptual_quality"]))
            assert s.overall == pytest.approx(np.mean([p["overall"] for p in s.passes]))
        r = c.post("/v1/score_frames", json={"sample": ref, "edited_video": "s/edited.mp4",
                                              "frame_indices": FRAMES, "instruction": INSTRUCTION})
        assert r.status_code == 200, r.text
        body = ScoreFramesResponse.model_validate(r.json())
        assert body.scorer == "editscore-tiny-random" and len(body.scores) == len(FRAMES)
        for f in body.scores:
            assert all(0.0 <= v <= 10.0 for v in (f.SC_score, f.PQ_score, f.O_score))
            assert len(f.passes) == real.NUM_PASS
            assert f.O_score == pytest.approx(np.mean([math.sqrt(p["SC_score"] * p["PQ_score"]) for p in f.passes]))
            # random weights: garbage text, scored exactly as EditScore's parser reads it (mostly the 0 fallback);
            # the raw outputs and reasonings are the first pass's (batch_evaluate)
            first = f.passes[0]
            for raw, score, reason in ((f.SC_raw_output, first["SC_score"], f.SC_score_reasoning),
                                       (f.PQ_raw_output, first["PQ_score"], f.PQ_score_reasoning)):
                criteria, expected_reason = real.parse_judgement(raw)
                assert score == pytest.approx(min(criteria) if criteria else 0.0) and reason == expected_reason
                assert criteria is not None or reason.startswith("[unparsable EditScore output")
        # errors: unknown field 422, missing artifact 404, frame outside the clip 400
        assert c.post("/v1/score_frames", json={"sample": ref, "edited_video": "s/edited.mp4", "frame_indices": [1],
                                                 "instruction": "x", "num_pass": 2}).status_code == 422
        assert c.post("/v1/score_image", json={"sample": ref, "source": "s/frame0.png", "edited": "s/nope.png",
                                                "instruction": "x", "task": "edit_background"}).status_code == 404
        assert c.post("/v1/score_frames", json={"sample": ref, "edited_video": "s/edited.mp4", "frame_indices": [17],
                                                 "instruction": "x"}).status_code == 400


def test_tiny_is_seeded_and_mostly_falls_back(clip, tiny_backend):
    src, edited = clip.frames, clip.frames[:, ::-1].copy()
    a = tiny_backend.score_frames(ctx_of(clip), src, edited, [0, 8], INSTRUCTION)
    b = tiny_backend.score_frames(ctx_of(clip), src, edited, [0, 8], INSTRUCTION)
    assert [s.model_dump() for s in a] == [s.model_dump() for s in b]
    assert tiny_backend.judge.sampling == real.Sampling(max_new_tokens=tiny.MAX_NEW_TOKENS)
    assert tiny_backend.judge.processor.tokenizer.padding_side == "left"
    reasons = [s.SC_score_reasoning for s in a] + [s.PQ_score_reasoning for s in a]
    assert any(r.startswith("[unparsable EditScore output") for r in reasons)


# --- the real loader on a saved tiny checkpoint ----------------------------------------------------------------

def test_real_loader_reads_saved_tiny_checkpoint(tmp_path, clip):
    import torch

    ckpt = tiny.save_tiny_checkpoint(tmp_path / "ckpt")
    assert (ckpt / "base" / "config.json").is_file() and (ckpt / "lora" / "adapter_config.json").is_file()
    backend = real.make_backend(model_dir=ckpt, device="cpu", max_new_tokens=8)
    assert backend.name == real.SCORER and backend.judge.model is None  # checked, not loaded
    backend.setup()
    model = backend.judge.model
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"  # LoRA merged and unloaded
    assert model.device.type == "cpu" and model.dtype == torch.float32
    base = tiny.build_tiny_model(tiny.build_tiny_processor())
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    merged, original = model.state_dict()[name], base.state_dict()[name]
    assert merged.shape == original.shape and not torch.allclose(merged, original)  # the LoRA changed it
    name = "model.language_model.layers.0.self_attn.k_proj.weight"  # not a LoRA target: saved as built
    assert torch.equal(model.state_dict()[name], base.state_dict()[name])
    scores = backend.score_frames(ctx_of(clip), clip.frames, clip.frames, [0, 16], INSTRUCTION)
    assert len(scores) == 2 and all(0 <= s.O_score <= 10 for s in scores)
    assert backend.judge.sampling == real.Sampling(max_new_tokens=8)
    assert "examples" not in sys.modules  # editscore's stray top-level `examples` package is never imported


# --- configuration errors ---------------------------------------------------------------------------------------

def test_config_errors_name_missing_paths(tmp_path):
    with pytest.raises(ConfigError, match="--model-dir"):
        real.make_backend()
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=str(missing)):
        real.make_backend(model_dir=missing)
    (tmp_path / "m" / "base").mkdir(parents=True)
    (tmp_path / "m" / "base" / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as err:
        real.make_backend(model_dir=tmp_path / "m")
    for f in ("*.safetensors", "preprocessor_config.json", "tokenizer.json"):
        assert str(tmp_path / "m" / "base" / f) in str(err.value)
    ckpt = tiny.save_tiny_checkpoint(tmp_path / "ckpt", lora=False)
    with pytest.raises(ConfigError, match=str(ckpt / "lora")):
        real.make_backend(model_dir=ckpt)
    merged = real.make_backend(base_dir=ckpt / "base", merged=True)  # a checkpoint with the LoRA merged in
    assert merged.judge.model is None
    with pytest.raises(ConfigError, match="unknown editscore options"):
        real.make_backend(base_dir=ckpt / "base", merged=True, batch=3)


# --- an OpenAI-compatible server (vLLM) as the judge: loopback test double ------------------------------------

def test_openai_judge_renders_editscores_template_and_samples_each_pass_with_its_seed(clip):
    """``--option url=...``: the same scorer over a vLLM server. Each request renders EditScore's own template
    (``<img1>: `` image ``<img2>: `` image, then the prompt), samples as EditScore's vLLM backend (0.7, 0.9,
    top_k 20, 512 tokens) with seed 42 + pass, and the four passes average as in-process."""
    import base64
    import io as _io

    from PIL import Image

    from ..loopback import FakeOpenAIServer

    def answer(body: dict) -> str:
        """By pass (the request's seed): the SC answer for the two-image prompt, the PQ answer for the other."""
        i = body["seed"] - 42
        if len([p for p in body["messages"][0]["content"] if p["type"] == "image_url"]) == 2:
            return sc_answer(*FRAME0_PASSES[i][:2])
        return '{"reasoning": "PQ", "score": [%d, 25]}' % FRAME0_PASSES[i][2]

    with FakeOpenAIServer(real.SCORER_SERVED, answer, delay_s=0.01) as server:
        scorer = real.make_backend(url=f"http://127.0.0.1:{server.port}")
        assert isinstance(scorer.judge, real.OpenAIJudge) and scorer.num_pass == 4
        scorer.setup()
        s = scorer.score_image(ctx_of(clip), clip.frames[0], clip.frames[1], INSTRUCTION, "edit_background")
        assert s.model_dump(exclude={"passes", "SC_reasoning", "PQ_reasoning"}) == README_FRAME0
        assert sorted(b["seed"] for b in server.requests) == [42, 42, 43, 43, 44, 44, 45, 45]
        body = next(b for b in server.requests if b["seed"] == 42 and len(b["messages"][0]["content"]) == 5)
        parts = body["messages"][0]["content"]
        assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
        assert (parts[0]["text"], parts[2]["text"]) == ("<img1>: ", "<img2>: ")
        assert parts[4]["text"] == scorer.sc_prompt.replace("<instruction>", INSTRUCTION)
        png = base64.b64decode(parts[3]["image_url"]["url"].split(",", 1)[1])
        assert np.array_equal(np.asarray(Image.open(_io.BytesIO(png)).convert("RGB")), clip.frames[1])
        assert (body["temperature"], body["top_p"], body["top_k"], body["max_tokens"]) == (0.7, 0.9, 20, 512)
        with pytest.raises(ConfigError, match="serves"):
            real.make_backend(url=f"http://127.0.0.1:{server.port}", model="other/model").setup()
