"""The tracking service on the SAM3 tracker code (``tiny`` random weights, and ``real`` loading a saved tiny).

A 17-frame conformed cut of the juggle clip (192 x 112); hand-written pixel boxes around the juggler and his
ball on the 2-FPS anchor frames 0, 8 and 16 (read off the conformed frames). A random tiny model gives
meaningless masks, so the tests check what is deterministic: shapes, dtypes, pass count and order, that every
pass propagates forward and backward from its anchor, that passes are independent (session reset), that the
image encoder runs once per frame for all passes, that the HTTP answer is the BAIT vote of the passes, and
that the real loader reproduces the tiny backend exactly.
"""

from __future__ import annotations

import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from sparkle.algorithms.bait import run_bait  # noqa: E402
from sparkle.artifacts import ArtifactIO  # noqa: E402
from sparkle.backends import Anchor  # noqa: E402
from sparkle.config import ConformConfig  # noqa: E402
from sparkle.errors import ConfigError, InputError  # noqa: E402
from sparkle.media import conform, read_video  # noqa: E402
from sparkle.services.tracking.app import MaskResponse  # noqa: E402
from sparkle.serving import ServeSettings, build_app  # noqa: E402
from sparkle.services.tracking import real, tiny  # noqa: E402
from sparkle.services.tracking.app import API  # noqa: E402
from sparkle.store import LocalStore  # noqa: E402

VIDEOS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "videos"
JUGGLE = VIDEOS / "static_01_juggle.mp4"
T, H, W = 17, 112, 192

# (label, (x1, y1, x2, y2)) pixels of the conformed 192 x 112 frames, per anchor frame.
BOXES = {
    0: [("person", (90, 8, 128, 104)), ("ball", (91, 42, 106, 58))],
    8: [("person", (90, 8, 130, 106)), ("ball", (97, 46, 111, 62))],
    16: [("person", (90, 8, 130, 106))],
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core runner, 2 threads oversubscribe and run ~30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clip():
    v = conform(read_video(JUGGLE, max_frames=17), ConformConfig(max_frames=17, max_long_side=208, max_short_side=112))
    assert v.frames.shape == (T, H, W, 3) and v.frames.dtype == np.uint8
    return v


@pytest.fixture(scope="module")
def backend():
    b = tiny.make_backend()
    b.setup()
    return b


def anchor(i: int) -> Anchor:
    return Anchor(i, list(BOXES[i]))


class PropagationSpy:
    """Test spy: wraps the model's real ``propagate_in_video_iterator`` and records, per call, the start frame,
    the direction, the frames it yielded and the object ids of each output. Results pass through unchanged."""

    def __init__(self, model):
        self.real = model.propagate_in_video_iterator
        self.calls: list[dict] = []

    def __call__(self, session, start_frame_idx=None, reverse=False, **kwargs):
        call = {"start": start_frame_idx, "reverse": reverse, "frames": [], "object_ids": set()}
        self.calls.append(call)
        for out in self.real(session, start_frame_idx=start_frame_idx, reverse=reverse, **kwargs):
            call["frames"].append(out.frame_idx)
            call["object_ids"].add(tuple(out.object_ids))
            yield out


class CallCounter:
    """Test spy: counts calls of a wrapped function (here the image encoder) and passes them through."""

    def __init__(self, fn):
        self.fn, self.count = fn, 0

    def __call__(self, *args, **kwargs):
        self.count += 1
        return self.fn(*args, **kwargs)


def test_tiny_model_is_the_documented_size(backend):
    assert backend.name == "sam3-tracker-video-tiny"
    assert type(backend.model).__name__ == "Sam3TrackerVideoModel"
    assert type(backend.processor).__name__ == "Sam3TrackerVideoProcessor"
    n = sum(p.numel() for p in backend.model.parameters())
    assert 1_500_000 < n < 2_500_000
    assert backend.processor.target_size == tiny.IMAGE_SIZE == backend.model.config.image_size
    vp = backend.processor.video_processor
    assert list(vp.image_mean) == [0.5] * 3 and list(vp.image_std) == [0.5] * 3  # facebook/sam3's normalisation
    assert next(backend.model.parameters()).dtype == torch.float32 and not backend.model.training


def test_track_one_pass_per_anchor_forward_and_backward(clip, backend, monkeypatch):
    spy = PropagationSpy(backend.model)
    monkeypatch.setattr(backend.model, "propagate_in_video_iterator", spy)
    encoder = CallCounter(backend.model.get_image_features)
    monkeypatch.setattr(backend.model, "get_image_features", encoder)

    anchors = [anchor(8), anchor(0), anchor(16)]
    passes = list(backend.track(None, clip.frames, anchors))

    assert len(passes) == 3
    for m in passes:
        assert m.shape == (T, H, W) and m.dtype == np.bool_
    # Per anchor, in anchor order: forward from the anchor to the last frame, then backward to frame 0
    # (transformers skips the backward run from frame 0).
    assert [(c["start"], c["reverse"], c["frames"]) for c in spy.calls] == [
        (8, False, list(range(8, T))), (8, True, list(range(8, -1, -1))),
        (0, False, list(range(0, T))), (0, True, []),
        (16, False, [16]), (16, True, list(range(16, -1, -1))),
    ]
    # One object id per box, and the session reset between passes (the 1-box anchor tracks one object only).
    assert [c["object_ids"] for c in spy.calls if c["frames"]] == [{(1, 2)}] * 3 + [{(1,)}] * 2
    # The vision-feature cache survives the resets: the image encoder ran once per frame for all passes.
    assert encoder.count == T

    # Passes are independent: the second pass equals its anchor tracked alone.
    alone = list(backend.track(None, clip.frames, [anchor(0)]))
    assert len(alone) == 1 and np.array_equal(alone[0], passes[1])


def test_track_rejects_an_anchor_outside_the_video(clip, backend):
    with pytest.raises(InputError, match="outside"):
        backend.track(None, clip.frames, [Anchor(T, list(BOXES[0]))])


def bait_request(anchors: list[int], **extra) -> dict:
    return {
        "sample": {"sample_id": "juggle", "prompt": "snowy village", "source_video": "juggle/source.mp4"},
        "anchors": [{"frame_index": i, "boxes": [{"label": label, "box": list(box)} for label, box in BOXES[i]]}
                    for i in anchors],
        "output": "staging/juggle/mask.npz",
        **extra,
    }


def test_bait_over_http(tmp_path, clip, backend):
    store = LocalStore(tmp_path)
    io = ArtifactIO(store)
    io.put_video("juggle/source.mp4", clip.frames, clip.fps)
    app = build_app(API(backend, store), ServeSettings(load_in_background=False))
    with TestClient(app) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["backend"] == "sam3-tracker-video-tiny"

        r = client.post("/v1/bait", json=bait_request([0, 8, 16]))
        assert r.status_code == 200, r.text
        body = MaskResponse.model_validate(r.json())
        assert body.mask == "staging/juggle/mask.npz"
        assert body.shape == (T, H, W) and body.passes == 3
        assert {"queue", "run", "total"} <= set(body.timings)

        mask = io.load_mask(body.mask)
        assert mask.shape == (T, H, W) and mask.dtype == np.bool_
        assert body.foreground_fraction == round(float(mask.mean()), 6)
        # The stored mask is the BAIT majority vote over the three passes on the stored (decoded) source.
        ctx = io.context("juggle", "snowy village", "juggle/source.mp4")
        expected = run_bait(backend, ctx, ctx.video.frames, [anchor(i) for i in (0, 8, 16)], True)
        assert np.array_equal(mask, expected)

        # Errors: anchor after the last frame and a box outside the frame (400), missing source (404),
        # unknown field and no anchor (422).
        assert client.post("/v1/bait", json=bait_request([0]) | {"anchors": [
            {"frame_index": T, "boxes": [{"label": "person", "box": [90, 8, 128, 104]}]}]}).status_code == 400
        assert client.post("/v1/bait", json=bait_request([0]) | {"anchors": [
            {"frame_index": 0, "boxes": [{"label": "person", "box": [90, 8, W + 1, 104]}]}]}).status_code == 400
        missing = bait_request([0])
        missing["sample"]["source_video"] = "nobody/source.mp4"
        r = client.post("/v1/bait", json=missing)
        assert r.status_code == 404 and "nobody/source.mp4" in r.json()["detail"]
        assert client.post("/v1/bait", json=bait_request([0], num_passes=3)).status_code == 422
        assert client.post("/v1/bait", json=bait_request([])).status_code == 422


def test_real_loader_round_trip(tmp_path, clip, backend):
    ckpt = tiny.save_tiny_checkpoint(tmp_path / "ckpt")
    assert {"config.json", "model.safetensors", "processor_config.json"} <= {p.name for p in ckpt.iterdir()}
    loaded = real.make_backend(model_dir=ckpt, device="cpu")
    assert loaded.name == "sam3-tracker-video" and loaded.dtype == torch.float32
    loaded.setup()
    assert type(loaded.model).__name__ == "Sam3TrackerVideoModel"
    assert loaded.processor.target_size == tiny.IMAGE_SIZE
    for (k, a), (k2, b) in zip(loaded.model.state_dict().items(), backend.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    (mask,) = loaded.track(None, clip.frames, [anchor(8)])
    assert mask.shape == (T, H, W) and mask.dtype == np.bool_
    (same,) = backend.track(None, clip.frames, [anchor(8)])
    assert np.array_equal(mask, same)


def test_real_loader_reads_the_hub_layout_and_refuses_a_processor_without_its_video_block(tmp_path, clip, backend):
    """facebook/sam3 ships a ``sam3_video`` config (the tracker under ``tracker_config``) and weights named
    ``detector_model.*`` / ``tracker_neck.*`` / ``tracker_model.*``, not what ``save_pretrained`` writes. The
    loader reads that layout into exactly the same tracker (detector-only weights skipped). A processor config
    without its video block, or one that resizes to another size than the model's, is refused: transformers'
    defaults would be 1024 px with ImageNet normalisation."""
    import json

    from safetensors import safe_open

    hub = tiny.save_tiny_hub_checkpoint(tmp_path / "hub")
    assert json.loads((hub / "config.json").read_text())["model_type"] == "sam3_video"
    with safe_open(str(hub / "model.safetensors"), framework="pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"detector_model", "tracker_neck", "tracker_model"}
    loaded = real.make_backend(model_dir=hub, device="cpu")
    loaded.setup()
    ours = backend.model.state_dict()
    theirs = loaded.model.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    (mask,) = loaded.track(None, clip.frames, [anchor(8)])
    (same,) = backend.track(None, clip.frames, [anchor(8)])
    assert np.array_equal(mask, same)

    config = json.loads((hub / "processor_config.json").read_text())
    (hub / "processor_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "video_processor"}))
    with pytest.raises(ConfigError, match="no video processor"):
        real.make_backend(model_dir=hub, device="cpu").setup()
    config["video_processor"]["size"] = {"height": 1024, "width": 1024}
    (hub / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="expects 224x224"):
        real.make_backend(model_dir=hub, device="cpu").setup()


def test_real_backend_names_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="--model-dir"):
        real.make_backend()
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "nowhere"))):
        real.make_backend(model_dir=tmp_path / "nowhere")
    d = tmp_path / "partial"
    d.mkdir()
    with pytest.raises(ConfigError, match=re.escape(str(d / "config.json"))):
        real.make_backend(model_dir=d)
    (d / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=re.escape(str(d / "model.safetensors"))):
        real.make_backend(model_dir=d)
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=re.escape(str(d / "processor_config.json"))):
        real.make_backend(model_dir=d)
    (d / "processor_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="dtype"):
        real.make_backend(model_dir=d, dtype="int8")
    assert real.make_backend(model_dir=d, device="cpu").model is None  # complete: loading waits for setup()
    with pytest.raises(ConfigError, match="model-dir"):
        tiny.make_backend(model_dir=d)
