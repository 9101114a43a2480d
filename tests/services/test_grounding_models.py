"""Grounding ``real`` and ``tiny`` backends: answer parser, tiny Qwen3-VL through the service, checkpoint loading,
the vLLM adapter against a loopback OpenAI-compatible test double, and errors."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastapi.testclient import TestClient  # noqa: E402

from sparkle.artifacts import ArtifactIO  # noqa: E402
from sparkle.backends import GroundedObject, SampleContext  # noqa: E402
from sparkle.config import ConformConfig  # noqa: E402
from sparkle.errors import ConfigError  # noqa: E402
from sparkle.media import conform, read_video, sample_indices  # noqa: E402
from sparkle.services.grounding.app import DescribeResponse, FrameObjectsResponse, ObjectsResponse  # noqa: E402
from sparkle.serving import ServeSettings, build_app  # noqa: E402
from sparkle.services.grounding import real, tiny  # noqa: E402
from sparkle.services.grounding.app import API  # noqa: E402
from sparkle.store import LocalStore  # noqa: E402
from ..conftest import REPO
from ..loopback import FakeOpenAIServer

VIDEOS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "videos"
JUGGLE = VIDEOS / "static_01_juggle.mp4"
SETTINGS = ServeSettings(load_in_background=False)
LABELS = ["person", "ball"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model is latency-bound: one intra-op thread avoids OpenMP contention on shared CPUs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_server_env(monkeypatch):
    for var in (real.ENV_URL, real.ENV_MODEL, real.ENV_API_KEY):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The juggle clip conformed to 17 frames of 208x112, frame 0 and an "edited" frame 0 in a local store."""
    store = LocalStore(tmp_path_factory.mktemp("store"))
    aio = ArtifactIO(store)
    video = conform(read_video(JUGGLE, max_frames=17), ConformConfig(max_frames=17, max_long_side=208,
                                                                      max_short_side=112))
    aio.put_video("s/source.mp4", video.frames, video.fps)
    video = aio.load_video("s/source.mp4")  # as the service decodes it
    edited = video.frames[0].copy()
    edited[: edited.shape[0] // 2] = (40, 90, 200)  # a new "sky": the edited frame differs from the source
    aio.put_image("s/frame0.png", video.frames[0])
    aio.put_image("s/edited0.png", edited)
    ref = {"sample_id": "Sparkle_location_000000", "prompt": "Replace the background with a snowy village",
           "source_video": "s/source.mp4"}
    return store, ref, video, edited


@pytest.fixture(scope="module")
def tiny_backend():
    backend = tiny.make_backend()
    backend.setup()
    return backend


def ctx_of(video) -> SampleContext:
    return SampleContext("s", "p", video)


def assert_box(box: list[int]) -> None:
    assert box == [] or (len(box) == 4 and all(isinstance(v, int) and 0 <= v <= 1000 for v in box)
                         and box[0] < box[2] and box[1] < box[3]), box


# --- the answer parser ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    # the Qwen3-VL convention, fenced
    ('```json\n[{"bbox_2d": [100, 200, 300, 400], "label": "person"}]\n```', [("person", [100, 200, 300, 400])]),
    # prose around it, no fence
    ('Sure! Here they are: [{"bbox_2d": [1, 2, 30, 40], "label": "dog"}] Hope it helps [really].',
     [("dog", [1, 2, 30, 40])]),
    # trailing commas and an unclosed fence
    ('```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "a",}, {"bbox_2d": [5, 5, 9, 9], "label": "b",},]',
     [("a", [10, 20, 30, 40]), ("b", [5, 5, 9, 9])]),
    # truncated mid-list (max_tokens reached)
    ('```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "a"}, {"bbox_2d": [50, 60,', [("a", [10, 20, 30, 40])]),
    # single quotes (Python repr)
    ("[{'bbox_2d': [10, 20, 30, 40], 'label': 'cat'}]", [("cat", [10, 20, 30, 40])]),
    # out of range and swapped corners: clamped to 0..1000, then ordered
    ('[{"bbox_2d": [1200, -5, 300, 400.6], "label": "x"}]', [("x", [300, 0, 1000, 401])]),
    # wrong length, non-numbers, empty, degenerate, boolean: no box
    ('[{"bbox_2d": [1, 2, 3], "label": "a"}, {"bbox_2d": ["left", 2, 3, 4], "label": "b"},'
     ' {"bbox_2d": [], "label": "c"}, {"bbox_2d": [5, 5, 5, 9], "label": "d"},'
     ' {"bbox_2d": [true, 1, 2, 3], "label": "e"}]',
     [("a", []), ("b", []), ("c", []), ("d", []), ("e", [])]),
    # numeric strings, a string box, nested corners, "bbox" for "bbox_2d"
    ('[{"bbox_2d": ["10", "20", "30", "40"], "label": "a"}, {"bbox_2d": "[1, 2, 3, 4]", "label": "b"},'
     ' {"bbox_2d": [[5, 6], [7, 8]], "label": "c"}, {"bbox": [9, 9, 19, 19], "label": "d"}]',
     [("a", [10, 20, 30, 40]), ("b", [1, 2, 3, 4]), ("c", [5, 6, 7, 8]), ("d", [9, 9, 19, 19])]),
    # missing or empty labels, "name" for "label"
    ('[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [1, 2, 3, 4], "label": "  "}, {"bbox_2d": [1, 2, 3, 4], "name": "kid"}]',
     [(None, [1, 2, 3, 4]), (None, [1, 2, 3, 4]), ("kid", [1, 2, 3, 4])]),
    # a dict instead of a list; a dict wrapping the list; a label -> box dict
    ('{"bbox_2d": [1, 2, 3, 4], "label": "solo"}', [("solo", [1, 2, 3, 4])]),
    ('```json\n{"objects": [{"bbox_2d": [1, 2, 3, 4], "label": "w"}]}\n```', [("w", [1, 2, 3, 4])]),
    ('{"man": [1, 2, 3, 4], "hat": [5, 6, 7, 8]}', [("man", [1, 2, 3, 4]), ("hat", [5, 6, 7, 8])]),
    # one object per line (JSON lines)
    ('{"bbox_2d": [1, 2, 3, 4], "label": "a"}\n{"bbox_2d": [5, 6, 7, 8], "label": "b"}',
     [("a", [1, 2, 3, 4]), ("b", [5, 6, 7, 8])]),
    # nothing usable
    ("```json\n[]\n```", []),
    ("I cannot see any foreground subject.", []),
    ("", []),
    ("Z2ar\x01@ \"\x13 {label\x134 [", []),
    ("[1, 2, 3, 4]", []),
])
def test_parse_objects(text, expected):
    assert real.parse_objects(text) == expected


def test_parse_round1_keeps_boxed_objects_with_unique_labels():
    text = ('Objects:\n```json\n[{"bbox_2d": [10, 20, 300, 900], "label": "person"},'
            ' {"bbox_2d": [400, 20, 600, 900], "label": "Person"}, {"bbox_2d": [], "label": "ghost"},'
            ' {"bbox_2d": [1, 1, 50, 50]}, {"bbox_2d": [700, 700, 800, 800], "label": "person"},]\n```')
    objects = real.parse_round1(text)
    assert [o.label for o in objects] == ["person", "Person 2", "object", "person 3"]
    assert objects[0] == GroundedObject(bbox_2d=[10, 20, 300, 900], label="person")
    assert real.parse_round1("no idea") == []
    clash = '[{"bbox_2d": [1, 1, 9, 9], "label": "dog 2"}, {"bbox_2d": [1, 1, 9, 9], "label": "dog"},' \
            ' {"bbox_2d": [1, 1, 9, 9], "label": "dog"}]'
    assert [o.label for o in real.parse_round1(clash)] == ["dog 2", "dog", "dog 3"]


@pytest.mark.parametrize("text, expected", [
    # out of order, different case, an unknown label, a duplicate: one object per label, in label order
    ('[{"bbox_2d": [5, 6, 70, 80], "label": "Ball"}, {"bbox_2d": [1, 2, 3, 4], "label": "tree"},'
     ' {"bbox_2d": [10, 20, 30, 40], "label": " person "}, {"bbox_2d": [11, 21, 31, 41], "label": "person"}]',
     [[10, 20, 30, 40], [5, 6, 70, 80]]),
    # a label reported as not found, another missing from the answer
    ('```json\n[{"bbox_2d": [], "label": "person"}]\n```', [[], []]),
    # an invalid first box does not hide a valid second one of the same label
    ('[{"bbox_2d": [1, 2], "label": "ball"}, {"bbox_2d": [9, 9, 99, 99], "label": "ball"}]', [[], [9, 9, 99, 99]]),
    # entries without labels fill the unmatched labels in order
    ('[{"bbox_2d": [1, 2, 3, 4], "label": "ball"}, {"bbox_2d": [7, 7, 70, 70]}]', [[7, 7, 70, 70], [1, 2, 3, 4]]),
    # garbage
    ("Z2ar\x01@ \"\x13", [[], []]),
])
def test_parse_round2_one_object_per_label(text, expected):
    objects = real.parse_round2(text, LABELS)
    assert [o.label for o in objects] == LABELS
    assert [o.bbox_2d for o in objects] == expected


@pytest.mark.parametrize("text, expected", [
    ('```json\n{"camera_motion": "no", "reason": "Tripod shot."}\n```', (False, "Tripod shot.")),
    ('{"camera_motion": "Yes", "reason": "slow pan right"}', (True, "slow pan right")),
    ('{"camera_motion": false, "reason": "static"}', (False, "static")),
    ('[{"camera_motion": "no", "reason": "static"}]', (False, "static")),
    ("No. The background does not move.", (False, "The background does not move.")),
    ("yes - the camera shakes", (True, "the camera shakes")),
])
def test_parse_camera_motion(text, expected):
    assert real.parse_camera_motion(text) == expected


def test_parse_camera_motion_unreadable_counts_as_motion():
    moving, reason = real.parse_camera_motion("Z2ar\x01@")
    assert moving is True and "unreadable" in reason


def test_parse_captions_reads_the_vlms_two_captions_or_falls_back_to_the_rules():
    from sparkle.captions import captions_from_instruction

    instruction = "Replace the background with a windy beach at dusk; keep the man unchanged"
    answer = ('Here you go:\n```json\n{"background": "A windy beach at dusk, waves rolling in.",\n'
              '"video": "A man stands on a windy beach at dusk as waves roll in."}\n```')
    c = real.parse_captions(answer, instruction, ["man"])
    assert (c.background, c.video, c.source) == ("A windy beach at dusk, waves rolling in.",
                                                 "A man stands on a windy beach at dusk as waves roll in.", "vlm")
    for bad in ("Z2ar\x01@", '{"background": "only one"}', '{"background": "", "video": "x"}'):
        assert real.parse_captions(bad, instruction, ["man"]) == captions_from_instruction(instruction, ["man"])
    prompt = real.CAPTION_PROMPT.format(instruction=instruction, labels="man")
    assert instruction in prompt and '{"background": "...", "video": "..."}' in prompt


def test_text_helpers():
    assert real.clean_text('Instruction: "Replace the background with a beach.\n"') == \
        "Replace the background with a beach."
    assert real.clean_text("```\nA man juggles\n in a park.\n```") == "A man juggles in a park."
    assert real.split_keyword("urban: rooftop overlooking skyline") == ("urban", "rooftop overlooking skyline")
    assert real.split_keyword("beach") == ("", "beach")
    assert real.split_keyword(None) == ("", "")


# --- tiny: the in-process path on a random tiny Qwen3-VL --------------------------------------------------

def test_tiny_model_is_a_small_deterministic_qwen3_vl():
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    (m1, p1), (m2, p2) = tiny.build_tiny(), tiny.build_tiny()
    assert isinstance(m1, Qwen3VLForConditionalGeneration) and isinstance(p1, Qwen3VLProcessor)
    assert sum(p.numel() for p in m1.parameters()) < 1_000_000
    assert p1.tokenizer.get_vocab() == p2.tokenizer.get_vocab()
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all((s1[k] == s2[k]).all() for k in s1)
    assert m1.config.image_token_id == p1.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert p1.image_processor.patch_size == m1.config.vision_config.patch_size == 16


def test_tiny_prompt_carries_both_images(tiny_backend, sample):
    _, _, video, edited = sample
    proc = tiny_backend.engine.processor
    content = [{"type": "image", "image": Image.fromarray(video.frames[0])},
               {"type": "image", "image": Image.fromarray(edited)}, {"type": "text", "text": real.ROUND1_PROMPT}]
    inputs = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True, return_tensors="pt")
    grid = inputs["image_grid_thw"]
    assert grid.shape == (2, 3)
    n_image_tokens = int((inputs["input_ids"] == proc.image_token_id).sum())
    assert n_image_tokens == int(grid.prod(-1).sum()) // 4 > 0  # merge 2x2
    assert inputs["pixel_values"].shape[0] == int(grid.prod(-1).sum())


def test_tiny_answers_are_deterministic_garbage_parsed_safely(tiny_backend, sample):
    _, _, video, edited = sample
    raw = tiny_backend.engine.complete([video.frames[0], edited, real.ROUND1_PROMPT], 1024)
    assert isinstance(raw, str) and raw
    assert raw == tiny_backend.engine.complete([video.frames[0], edited, real.ROUND1_PROMPT], 1024)
    assert len(tiny_backend.engine.processor.tokenizer(raw)["input_ids"]) <= tiny.MAX_NEW_TOKENS + 4
    assert real.parse_round1(raw) == tiny_backend.ground_round1(ctx_of(video), video.frames[0], edited)
    moving, reason = tiny_backend.check_camera_motion(ctx_of(video), video.frames[[0, 8, 16]])
    assert isinstance(moving, bool) and isinstance(reason, str) and reason
    instruction = tiny_backend.write_instruction(ctx_of(video), video.frames[0], "location",
                                                 "urban: rooftop overlooking skyline")
    assert isinstance(instruction, str) and "\n" not in instruction
    captions = tiny_backend.caption(ctx_of(video), "Replace the background with a beach", ["person"])
    assert captions.source == "rules" and captions.background.startswith("A beach")  # garbage: the rules


def test_tiny_service_answers_every_operation(tiny_backend, sample):
    store, ref, video, _ = sample
    t, h, w = video.shape
    indices = sample_indices(t, video.fps, 2.0)
    assert len(indices) >= 2
    with TestClient(build_app(API(tiny_backend, store), SETTINGS)) as client:
        assert client.get("/readyz").json()["backend"] == "tiny-qwen3-vl"

        r = client.post("/v1/describe", json={"sample": ref, "image": "s/frame0.png"})
        assert r.status_code == 200, r.text
        d = DescribeResponse.model_validate(r.json())
        assert isinstance(d.text, str) and "\n" not in d.text and d.timings["total"] > 0

        r = client.post("/v1/ground_round1", json={"sample": ref, "source_frame0": "s/frame0.png",
                                                    "edited_frame0": "s/edited0.png"})
        assert r.status_code == 200, r.text
        objects = ObjectsResponse.model_validate(r.json()).objects
        assert objects == []  # random weights: no readable box, and no crash

        r = client.post("/v1/ground_round2", json={"sample": ref, "frame_indices": indices, "labels": LABELS})
        assert r.status_code == 200, r.text
        frames = FrameObjectsResponse.model_validate(r.json()).frame_objects
        assert len(frames) == len(indices)
        for objs in frames:
            assert [o.label for o in objs] == LABELS
            assert all(o.bbox_2d == [] for o in objs)

        r = client.post("/v1/ground_round2", json={"sample": ref, "frame_indices": [0, 4], "labels": []})
        assert r.json()["frame_objects"] == [[], []]


def test_tiny_service_rejects_bad_requests(tiny_backend, sample):
    store, ref, video, _ = sample
    t = video.shape[0]
    with TestClient(build_app(API(tiny_backend, store), SETTINGS)) as client:
        r = client.post("/v1/describe", json={"sample": ref, "image": "s/frame0.png", "colour": "red"})
        assert r.status_code == 422
        r = client.post("/v1/describe", json={"sample": ref, "image": "s/missing.png"})
        assert r.status_code == 404 and "s/missing.png" in r.json()["detail"]
        r = client.post("/v1/ground_round2", json={"sample": ref, "frame_indices": [0, t], "labels": LABELS})
        assert r.status_code == 400 and f"0..{t - 1}" in r.json()["detail"]
        r = client.post("/v1/ground_round1", json={"sample": {**ref, "source_video": "s/nope.mp4"},
                                                    "source_frame0": "s/frame0.png", "edited_frame0": "s/edited0.png"})
        assert r.status_code == 404


# --- real: the production loader on a saved tiny checkpoint ------------------------------------------------

def test_real_loads_a_saved_checkpoint(tmp_path, tiny_backend, sample):
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    _, _, video, _ = sample
    ckpt = tiny.save_tiny_checkpoint(tmp_path / "ckpt")
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
    backend = real.make_backend(model_dir=ckpt, device="cpu", max_new_tokens=tiny.MAX_NEW_TOKENS)
    backend.setup()
    assert isinstance(backend.engine.model, Qwen3VLForConditionalGeneration)
    assert isinstance(backend.engine.processor, Qwen3VLProcessor)
    assert backend.name == "qwen3-vl-transformers:ckpt"
    frames = video.frames[[0, 8]]
    out = backend.ground_round2(ctx_of(video), frames, [0, 8], LABELS)
    assert len(out) == 2 and all([o.label for o in objs] == LABELS for objs in out)
    for objs in out:
        for o in objs:
            assert_box(o.bbox_2d)
    # the saved weights, tokenizer and processor round-trip: the same answer as the in-code tiny model
    parts = [frames[0], backend.round2_prompt(LABELS)]
    assert backend.engine.complete(parts, 512) == tiny_backend.engine.complete(parts, 512)


def test_real_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=real.ENV_URL):
        real.make_backend()
    missing = tmp_path / "no_such_dir"
    with pytest.raises(ConfigError, match=str(missing)):
        real.make_backend(model_dir=missing)
    ckpt = tiny.save_tiny_checkpoint(tmp_path / "ckpt")
    partial = tmp_path / "partial"
    shutil.copytree(ckpt, partial)
    (partial / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=str(partial / "model.safetensors")):
        real.make_backend(model_dir=partial)
    (partial / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (partial / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="model-00002-of-00002.safetensors"):
        real.make_backend(model_dir=partial)
    (partial / "processor_config.json").unlink()
    with pytest.raises(ConfigError, match="preprocessor_config.json"):
        real.make_backend(model_dir=partial)


# --- real: the vLLM adapter against a loopback OpenAI-compatible test double -------------------------------

ROUND1_ANSWER = ('I found two subjects.\n```json\n[{"bbox_2d": [120, 80, 560, 1012], "label": "juggler"},'
                 ' {"bbox_2d": [700, 400, 620, 300], "label": "ball"},]\n```')
ROUND2_ANSWER = '```json\n[{"bbox_2d": [130, 90, 550, 990], "label": "juggler"}, {"bbox_2d": [], "label": "ball"}]\n```'


def scripted_answer(body: dict) -> str:
    """The test double's scripted completion, chosen by the question's template."""
    text = next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")
    if text == real.ROUND1_PROMPT:
        return ROUND1_ANSWER
    if text.startswith("Locate each of these objects"):
        return ROUND2_ANSWER
    if text == real.DESCRIBE_PROMPT:
        return "A man juggles three balls in a sunny park.\n"
    if text.startswith("These "):
        return '```json\n{"camera_motion": "no", "reason": "The background stays perfectly still."}\n```'
    if text.startswith("This image is the first frame"):
        return 'Instruction: "Replace the background with a rooftop overlooking a skyline at dusk."'
    return "unexpected question"


class FakeVLLMServer(FakeOpenAIServer):
    """TEST DOUBLE of ``vllm serve`` for Qwen3-VL: :class:`~tests.loopback.FakeOpenAIServer` answering with the
    scripted completions above."""

    def __init__(self, model: str = real.MODEL_ID, delay_s: float = 0.0):
        super().__init__(model, scripted_answer, delay_s)


@pytest.fixture(scope="module")
def fake_vllm():
    with FakeVLLMServer() as server:
        yield server


def images_of(body: dict) -> list[np.ndarray]:
    out = []
    for part in body["messages"][0]["content"]:
        if part["type"] == "image_url":
            url = part["image_url"]["url"]
            assert url.startswith("data:image/png;base64,")
            out.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")))
    return out


def text_of(body: dict) -> str:
    return "".join(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")


def test_real_http_adapter_through_the_service(fake_vllm, sample):
    store, ref, video, edited = sample
    t = video.shape[0]
    indices = sample_indices(t, video.fps, 2.0)
    backend = real.make_backend(url=fake_vllm.url, startup_timeout_s=5)
    assert backend.name == f"qwen3-vl-openai:{real.MODEL_ID}" and backend.engine.base_url.endswith("/v1")
    fake_vllm.requests.clear()
    with TestClient(build_app(API(backend, store), SETTINGS)) as client:
        d = client.post("/v1/describe", json={"sample": ref, "image": "s/frame0.png"}).json()
        assert d["text"] == "A man juggles three balls in a sunny park."

        r1 = client.post("/v1/ground_round1", json={"sample": ref, "source_frame0": "s/frame0.png",
                                                     "edited_frame0": "s/edited0.png"})
        assert r1.status_code == 200, r1.text
        assert r1.json()["objects"] == [{"bbox_2d": [120, 80, 560, 1000], "label": "juggler"},
                                        {"bbox_2d": [620, 300, 700, 400], "label": "ball"}]

        r2 = client.post("/v1/ground_round2", json={"sample": ref, "frame_indices": indices,
                                                     "labels": ["juggler", "ball"]})
        assert r2.status_code == 200, r2.text
        assert r2.json()["frame_objects"] == [[{"bbox_2d": [130, 90, 550, 990], "label": "juggler"},
                                               {"bbox_2d": [], "label": "ball"}]] * len(indices)

    reqs = fake_vllm.requests
    assert len(reqs) == 2 + len(indices)
    for body in reqs:
        assert body["model"] == real.MODEL_ID and body["temperature"] == 0
        assert len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
    describe, round1, *round2 = reqs
    assert text_of(describe) == real.DESCRIBE_PROMPT and describe["max_tokens"] == real.MAX_TOKENS["describe"]
    assert np.array_equal(images_of(describe)[0], video.frames[0])
    assert text_of(round1) == real.ROUND1_PROMPT
    src, ed = images_of(round1)
    assert np.array_equal(src, video.frames[0]) and np.array_equal(ed, edited)  # source first, then edited
    sent = [images_of(b)[0] for b in round2]  # concurrent requests: any order
    assert all(text_of(b) == backend.round2_prompt(["juggler", "ball"]) for b in round2)
    assert '["juggler", "ball"]' in text_of(round2[0])
    for idx in indices:
        assert any(np.array_equal(im, video.frames[idx]) for im in sent), idx


def test_concurrent_requests_reach_vllm_at_once(sample):
    """8 concurrent requests to the grounding service, against a server that takes 1 s per answer but answers
    many at once (as vLLM's continuous batching does): all done in under 2 s, not 8 s one after another."""
    store, ref, _, _ = sample
    with FakeVLLMServer(delay_s=1.0) as server:
        backend = real.make_backend(url=server.url, startup_timeout_s=5)
        assert backend.max_concurrency == 8
        with TestClient(build_app(API(backend, store), SETTINGS)) as client, ThreadPoolExecutor(8) as pool:
            client.post("/v1/describe", json={"sample": ref, "image": "s/frame0.png"})  # decode and connect once
            server.most_in_flight = 0
            started = time.perf_counter()
            answers = list(pool.map(lambda _: client.post("/v1/describe", json={"sample": ref, "image": "s/frame0.png"}),
                                    range(8)))
            elapsed = time.perf_counter() - started
    assert [a.status_code for a in answers] == [200] * 8
    assert server.most_in_flight == 8
    assert elapsed < 2.0, f"8 requests took {elapsed:.2f} s: they were served one after another"


def test_real_http_camera_check_and_instruction(fake_vllm, sample):
    _, _, video, _ = sample
    backend = real.make_backend(url=fake_vllm.url + "/v1/", startup_timeout_s=5)
    backend.setup()
    fake_vllm.requests.clear()
    frames = video.frames[[0, 8, 16]]
    assert backend.check_camera_motion(ctx_of(video), frames) == (False, "The background stays perfectly still.")
    body = fake_vllm.requests[-1]
    assert len(images_of(body)) == 3 and "3 frames" in text_of(body) and "2 frames per second" in text_of(body)
    text = backend.write_instruction(ctx_of(video), video.frames[0], "location", "urban: rooftop overlooking skyline")
    assert text == "Replace the background with a rooftop overlooking a skyline at dusk."
    body = fake_vllm.requests[-1]
    assert "Theme: location. Subtheme: urban. Scene: rooftop overlooking skyline." in text_of(body)
    assert len(images_of(body)) == 1 and body["temperature"] == 0
    assert backend.ground_round2(ctx_of(video), frames, [0, 8, 16], []) == [[], [], []]
    assert len(fake_vllm.requests) == 2  # no labels: no question asked


def test_image_tokens_and_images_per_request_are_bounded(fake_vllm, sample):
    """At most 16 images a request (a 15 s clip's 31 frames at 2 FPS are subsampled evenly, first and last kept,
    and the prompt gives their real rate), and at most 1280x720 pixels an image: the in-process processor's cap,
    and the vLLM command lines (compose, k8s) carry the same two numbers."""
    import yaml

    from sparkle.backends import GROUNDING_MAX_IMAGE_PIXELS, GROUNDING_MAX_IMAGES
    from sparkle.k8s_render import vllm_args

    _, _, video, _ = sample
    backend = real.make_backend(url=fake_vllm.url, startup_timeout_s=5)
    backend.setup()
    fake_vllm.requests.clear()
    frames = np.stack([video.frames[i % len(video.frames)] for i in range(31)])
    backend.check_camera_motion(ctx_of(video), frames, 2.0)
    body = fake_vllm.requests[-1]
    assert len(images_of(body)) == GROUNDING_MAX_IMAGES == 16
    assert "16 frames" in text_of(body) and "at 1 frames per second" in text_of(body)  # 30 s / 15 gaps
    assert real.evenly(31, 16)[0] == 0 and real.evenly(31, 16)[-1] == 30 and real.evenly(5, 16) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="at most 16"):
        backend.engine.complete([*frames[:17], "too many"], 8)

    from transformers import Qwen2VLImageProcessor

    processor = type("P", (), {"image_processor": Qwen2VLImageProcessor()})()
    assert processor.image_processor.size["longest_edge"] == 28 * 28 * 1280  # transformers' default: 1.0 MP
    real.bound_image_tokens(processor)
    assert processor.image_processor.size["longest_edge"] == GROUNDING_MAX_IMAGE_PIXELS == 921_600

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["vllm"]["command"]
    for args in (compose, vllm_args()):
        assert json.loads(args[args.index("--mm-processor-kwargs") + 1]) == {"max_pixels": GROUNDING_MAX_IMAGE_PIXELS}
        assert json.loads(args[args.index("--limit-mm-per-prompt") + 1])["image"] == GROUNDING_MAX_IMAGES


def test_real_http_settings_from_env(fake_vllm, monkeypatch):
    monkeypatch.setenv(real.ENV_URL, fake_vllm.url)
    backend = real.make_backend(model_dir=None)
    backend.setup()
    assert backend.engine.model == real.MODEL_ID
    monkeypatch.setenv(real.ENV_MODEL, "Qwen/Qwen3-VL-8B-Instruct")
    with pytest.raises(ConfigError, match="Qwen3-VL-8B-Instruct"):
        real.make_backend(startup_timeout_s=5).setup()


def test_real_http_adapter_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; from sparkle.services.grounding import real; real.make_backend(url='http://127.0.0.1:9');"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_real_http_unreachable_server_fails_setup():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = real.make_backend(url=f"http://127.0.0.1:{port}", startup_timeout_s=0.2, timeout_s=1)
    with pytest.raises(ConfigError, match="not reachable"):
        backend.setup()
