"""The control service with model backends: ``tiny`` over HTTP, the ``real`` loader on a tiny checkpoint.

Everything runs on CPU with tiny random-weight Wan2.2-Fun-A14B-Control components built in code (no download:
HF_HUB_OFFLINE). A random model's pixels mean nothing, so the tests check what must hold whatever the
weights: shapes, dtypes, frame counts, determinism, that the edited frame 0 really conditions the output
(diffsynth 2.1.12 silently drops it; ``real.FunControlUnit`` fixes that), the real sampler settings, the
checkpoint layout and the error mapping.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffsynth.configs.model_configs import MODEL_CONFIGS  # noqa: E402
from diffsynth.pipelines.wan_video import WanVideoUnit_FunControl  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from sparkle.algorithms.control import decoupled_canny  # noqa: E402
from sparkle.artifacts import ArtifactIO  # noqa: E402
from sparkle.backends import SampleContext  # noqa: E402
from sparkle.config import ConformConfig  # noqa: E402
from sparkle.errors import ConfigError, InputError  # noqa: E402
from sparkle.media import Video, conform, read_video  # noqa: E402
from sparkle.services.control.app import VideoResponse  # noqa: E402
from sparkle.serving import ServeSettings, build_app  # noqa: E402
from sparkle.services.control import real, tiny  # noqa: E402
from sparkle.services.control.app import API  # noqa: E402
from sparkle.store import LocalStore  # noqa: E402

VIDEOS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "videos"
PROMPT = "Replace the background with a snowy mountain village at dusk"
HTTP_SIZE = ConformConfig(max_frames=17, max_long_side=208, max_short_side=112)
"""17 frames, 112x192 for the 16:9 juggle clip."""
SMALL_SIZE = ConformConfig(max_frames=5, max_long_side=112, max_short_side=64)
"""5 frames, 48x112: the direct calls that only compare outputs."""


def clip(name: str, cfg: ConformConfig) -> Video:
    return conform(read_video(VIDEOS / name, max_frames=cfg.max_frames), cfg)


def box_mask(t: int, h: int, w: int) -> np.ndarray:
    """``(T, H, W) bool``: a centred box covering the middle half of each side."""
    mask = np.zeros((t, h, w), bool)
    mask[:, h // 4:3 * h // 4, w // 4:3 * w // 4] = True
    return mask


def inputs(video: Video) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(control, background, mask)`` for a clip: its own frames as background, box mask, decoupled Canny."""
    source = video.frames
    mask = box_mask(*source.shape[:3])
    return decoupled_canny(source, source, mask), source, mask


@pytest.fixture(scope="module")
def backend():
    b = tiny.make_backend()
    b.setup()
    return b


@pytest.fixture(scope="module")
def small_call(backend):
    """One direct call on the small juggle clip: ``(ctx, control, background, mask, first_frame, output)``."""
    video = clip("static_01_juggle.mp4", SMALL_SIZE)
    control, background, mask = inputs(video)
    ctx = SampleContext("small", PROMPT, video, mask=mask)
    out = backend.synthesize(ctx, control, background, video.frames[0], mask, PROMPT)
    return ctx, control, background, mask, video.frames[0], out


@pytest.fixture()
def served(backend, tmp_path):
    """``(client, io)``: the control app on the tiny backend over a local store."""
    store = LocalStore(tmp_path / "store")
    app = build_app(API(backend, store), ServeSettings(load_in_background=False))
    with TestClient(app) as client:
        yield client, ArtifactIO(store)


def put_request(io: ArtifactIO, video: Video, sid: str, with_mask: bool = True,
                background: np.ndarray | None = None) -> dict:
    """Store a sample's artifacts (source, control, background, frame 0, mask); return the request body."""
    control, own_background, mask = inputs(video)
    background = own_background if background is None else background
    io.put_video(f"{sid}/source.mp4", video.frames, video.fps)
    io.put_video(f"{sid}/canny.mp4", control, video.fps)
    io.put_video(f"{sid}/background.mp4", background, video.fps)
    io.put_image(f"{sid}/edited_frame0.png", video.frames[0])
    sample = {"sample_id": sid, "prompt": PROMPT, "source_video": f"{sid}/source.mp4"}
    if with_mask:
        sample["mask"] = io.put_mask(f"{sid}/mask.npz", mask)
    return {"sample": sample, "control_video": f"{sid}/canny.mp4", "background_video": f"{sid}/background.mp4",
            "first_frame": f"{sid}/edited_frame0.png", "prompt": PROMPT, "output": f"staging/{sid}/edited.mp4"}


def test_synthesize_over_http(served):
    client, io = served
    video = clip("static_01_juggle.mp4", HTTP_SIZE)
    assert video.frames.shape == (17, 112, 192, 3)
    body = put_request(io, video, "juggle")

    health = client.get("/readyz").json()
    assert health["backend"] == "tiny-wan2.2-fun-control" and health["status"] == "ready"
    r = client.post("/v1/synthesize", json=body)
    assert r.status_code == 200, r.text
    resp = VideoResponse.model_validate(r.json())
    assert (resp.video, resp.num_frames, resp.height, resp.width) == (body["output"], 17, 112, 192)
    assert {"queue", "run", "total"} <= resp.timings.keys()

    edited = io.load_video(resp.video)
    assert edited.frames.shape == video.frames.shape and edited.frames.dtype == np.uint8
    assert edited.fps == pytest.approx(video.fps)
    assert edited.frames.std() > 1.0  # a decoded video, not a constant fill
    assert not np.array_equal(edited.frames, video.frames)  # synthesised, not a copy of the source


def test_output_shape_dtype_and_determinism(backend, small_call):
    ctx, control, background, mask, first, out = small_call
    assert out.shape == control.shape == (5, 48, 112, 3) and out.dtype == np.uint8
    again = backend.synthesize(ctx, control, background, first, mask, PROMPT)
    np.testing.assert_array_equal(again, out)  # fixed seed: same inputs, same video


def test_edited_frame0_conditions_the_output(backend, small_call):
    """Same control video and seed, another frame 0: another video (diffsynth alone would ignore it)."""
    ctx, control, background, mask, first, out = small_call
    other = clip("static_03_pedestrians_vtest.mp4", SMALL_SIZE).frames[0]
    other = cv2.resize(other, (first.shape[1], first.shape[0]), interpolation=cv2.INTER_AREA)
    changed = backend.synthesize(ctx, control, background, other, mask, PROMPT)
    assert changed.shape == out.shape
    assert np.abs(changed.astype(np.int16) - out).mean() > 0.05


def test_fun_control_unit_keeps_the_image_latents(backend):
    """The cause: diffsynth's unit zeroes ``y`` without a CLIP feature; ``FunControlUnit`` keeps it."""
    pipe = backend.pipe
    assert any(type(u) is real.FunControlUnit for u in pipe.units)
    assert not any(type(u) is WanVideoUnit_FunControl for u in pipe.units)
    control = [Image.fromarray(np.zeros((48, 112, 3), np.uint8))] * 5
    latents = torch.zeros(1, 16, 2, 6, 14)
    y = torch.randn(1, 20, 2, 6, 14)  # 4 mask + 16 image-latent channels, as ImageEmbedderVAE makes
    args = dict(pipe=pipe, control_video=control, num_frames=5, height=48, width=112, tiled=False,
                tile_size=None, tile_stride=None, clip_feature=None, y=y, latents=latents)
    stock = WanVideoUnit_FunControl().process(**args)
    fixed = real.FunControlUnit().process(**args)
    assert stock["y"].shape == fixed["y"].shape == (1, 36, 2, 6, 14)  # 16 + 36 = in_dim 52
    assert torch.count_nonzero(stock["y"][:, 16:]) == 0  # the bug: image latents dropped
    torch.testing.assert_close(fixed["y"][:, 16:], y)
    torch.testing.assert_close(fixed["y"][:, :16], stock["y"][:, :16])  # same control latents
    assert "clip_feature" not in fixed  # Wan2.2-Fun takes none


def test_zero_reference_latents_are_fed_as_videox_fun_does(backend, small_call):
    """VideoX-Fun gives Wan2.2-Fun's ``ref_conv`` zero latents when there is no reference image: the DiT's
    sequence starts with those reference tokens. ``FunControlUnit`` outputs them (one latent frame of zeros),
    ``ref_conv`` runs on them at every DiT pass, and the video differs from diffsynth's stock sequence."""
    pipe = backend.pipe
    assert pipe.dit.has_ref_conv
    unit = next(u for u in pipe.units if type(u) is real.FunControlUnit)
    assert "reference_latents" in unit.output_params
    control = [Image.fromarray(np.zeros((48, 112, 3), np.uint8))] * 5
    latents = torch.randn(1, 16, 2, 6, 14)
    out = unit.process(pipe=pipe, control_video=control, num_frames=5, height=48, width=112, tiled=False,
                       tile_size=None, tile_stride=None, clip_feature=None, y=None, latents=latents)
    assert out["reference_latents"].shape == (1, 16, 1, 6, 14) and not out["reference_latents"].any()
    given = torch.ones(1, 16, 1, 6, 14)
    assert "reference_latents" not in unit.process(pipe=pipe, control_video=control, num_frames=5, height=48,
                                                   width=112, tiled=False, tile_size=None, tile_stride=None,
                                                   clip_feature=None, y=None, latents=latents,
                                                   reference_latents=given)  # a real reference is kept

    seen = []
    hooks = [dit.ref_conv.register_forward_hook(lambda m, i, o: seen.append((i[0].abs().max().item(), o.shape[-2:])))
             for dit in (pipe.dit, pipe.dit2)]
    ctx, control_video, background, mask, first, reference_out = small_call
    try:
        backend.synthesize(ctx, control_video, background, first, mask, PROMPT)
    finally:
        for h in hooks:
            h.remove()
    assert seen and all(m == 0.0 and tuple(s) == (48 // 16, 112 // 16) for m, s in seen)  # zeros, H/16 x W/16
    # without the tokens (diffsynth's stock sequence), the same call gives another video
    stock = list(pipe.units)
    try:
        pipe.units = [_NoRefUnit() if type(u) is real.FunControlUnit else u for u in stock]
        without = backend.synthesize(ctx, control_video, background, first, mask, PROMPT)
    finally:
        pipe.units = stock
    assert np.abs(without.astype(np.int16) - reference_out).mean() > 0.05


class _NoRefUnit(real.FunControlUnit):
    """The fixed unit minus the reference tokens (diffsynth's sequence, ``input_image`` kept)."""

    def process(self, *args, **kwargs):
        out = super().process(*args, **kwargs)
        out.pop("reference_latents", None)
        return out


def test_real_settings_and_architecture():
    backend = tiny.make_backend()
    assert (backend.num_inference_steps, backend.cfg_scale, backend.seed) == (50, 6.0, 43)
    assert (real.SIGMA_SHIFT, real.SWITCH_BOUNDARY) == (5.0, 0.900)
    hub = [c for c in MODEL_CONFIGS if c["model_hash"] == "2267d489f0ceb9f21836532952852ee5"]
    assert len(hub) == 1 and hub[0]["extra_kwargs"] == real.ARCHITECTURE["dit"]
    dit = tiny.TINY_ARCHITECTURE["dit"]
    assert dit["in_dim"] == 52 and dit["has_ref_conv"] and not dit["require_clip_embedding"]


def test_the_high_noise_expert_runs_the_steps_videox_fun_gives_it():
    """VideoX-Fun's Wan2.2 config switches experts at 0.900: of 50 steps at shift 5, the 18 with timestep >= 900
    run on the high-noise expert (diffsynth's call default 0.875 gave it 21)."""
    from diffsynth.diffusion import FlowMatchScheduler

    scheduler = FlowMatchScheduler("Wan")
    scheduler.set_timesteps(50, denoising_strength=1.0, shift=real.SIGMA_SHIFT)
    high = [float(t) for t in scheduler.timesteps if not float(t) < real.SWITCH_BOUNDARY * 1000]  # diffsynth's test
    assert len(high) == 18 and min(high) > 900


def test_real_loader_on_tiny_checkpoint(tmp_path, small_call):
    root = tiny.save_tiny_checkpoint(tmp_path / "ckpt")
    for rel in ("high_noise_model/diffusion_pytorch_model.safetensors",
                "low_noise_model/diffusion_pytorch_model.safetensors", real.VAE_FILE, real.TEXT_ENCODER_FILE,
                f"{real.TOKENIZER_DIR}/tokenizer.json", real.ARCHITECTURE_FILE):
        assert (root / rel).is_file(), rel
    loaded = real.make_backend(model_dir=root, device="cpu")
    assert loaded.name == "real-wan2.2-fun-a14b-control"
    loaded.setup()
    assert loaded.pipe.dit is not loaded.pipe.dit2 and loaded.pipe.dit.in_dim == 52
    ctx, control, background, mask, first, out = small_call
    result = loaded.synthesize(ctx, control, background, first, mask, PROMPT)
    assert result.shape == control.shape and result.dtype == np.uint8
    np.testing.assert_array_equal(result, out)  # same float32 weights, same seed: the same video


def test_real_loader_with_cpu_offload(tmp_path, small_call, monkeypatch):
    """diffsynth's VRAM management (experts and text encoder kept off the device, moved in when used).

    It is meant for CUDA: it calls ``torch.<device>.empty_cache``, which ``torch.cpu`` lacks, so a no-op
    stand-in is set for this CPU run.
    """
    monkeypatch.setattr(torch.cpu, "empty_cache", lambda: None, raising=False)
    loaded = real.make_backend(model_dir=tiny.save_tiny_checkpoint(tmp_path / "ckpt"), device="cpu",
                               cpu_offload=True)
    loaded.setup()
    assert loaded.pipe.vram_management_enabled and loaded.pipe.dit.vram_management_enabled
    assert not getattr(loaded.pipe.vae, "vram_management_enabled", False)  # the VAE stays resident
    ctx, control, background, mask, first, out = small_call
    np.testing.assert_array_equal(loaded.synthesize(ctx, control, background, first, mask, PROMPT), out)


def test_missing_or_incomplete_model_dir(tmp_path):
    with pytest.raises(ConfigError, match="--model-dir"):
        real.make_backend(model_dir=None)
    with pytest.raises(ConfigError, match=str(tmp_path / "nowhere")):
        real.make_backend(model_dir=tmp_path / "nowhere")
    root = tiny.save_tiny_checkpoint(tmp_path / "ckpt")
    (root / real.VAE_FILE).unlink()
    with pytest.raises(ConfigError, match="Wan2.1_VAE.pth"):
        real.make_backend(model_dir=root)


def test_bad_frame_count_is_an_input_error(backend, small_call):
    ctx, control, background, mask, first, _ = small_call
    with pytest.raises(InputError, match="4k\\+1"):
        backend.synthesize(ctx, control[:4], background[:4], first, mask[:4], PROMPT)


def test_http_errors(served):
    client, io = served
    video = clip("static_01_juggle.mp4", SMALL_SIZE)

    body = put_request(io, video, "nomask", with_mask=False)
    r = client.post("/v1/synthesize", json=body)
    assert r.status_code == 400 and "mask" in r.json()["detail"]

    body = put_request(io, video, "mismatch", background=video.frames[:1].repeat(9, axis=0))
    r = client.post("/v1/synthesize", json=body)
    assert r.status_code == 400 and "same shape" in r.json()["detail"]

    body = put_request(io, video, "ok")
    assert client.post("/v1/synthesize", json={**body, "steps": 4}).status_code == 422
    r = client.post("/v1/synthesize", json={**body, "control_video": "ok/absent.mp4"})
    assert r.status_code == 404 and "ok/absent.mp4" in r.json()["detail"]
    assert not io.store.exists(body["output"])
