"""The i2v service with model backends: ``tiny`` over HTTP, the ``real`` loader on a tiny checkpoint.

Everything runs on CPU with tiny random-weight Wan2.2-I2V-A14B components (no download: HF_HUB_OFFLINE).
Pixels of a random model mean nothing, so the tests check what must hold whatever the weights: shapes,
dtypes, frame counts, frame 0 being the plate, the LightX2V 4-step schedule, guidance 1 and the expert
switch at boundary 0.9, and the error mapping.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import numpy as np
import torch  # noqa: E402
import pytest  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from sparkle.artifacts import ArtifactIO  # noqa: E402
from sparkle.backends import SampleContext  # noqa: E402
from sparkle.config import ConformConfig  # noqa: E402
from sparkle.errors import ConfigError  # noqa: E402
from sparkle.media import Video, conform, read_video  # noqa: E402
from sparkle.services.i2v.app import VideoResponse  # noqa: E402
from sparkle.serving import ServeSettings, build_app  # noqa: E402
from sparkle.services.i2v import real, tiny  # noqa: E402
from sparkle.services.i2v.app import API  # noqa: E402
from sparkle.store import LocalStore  # noqa: E402

VIDEOS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "videos"
PROMPT = "A snowy mountain village at dusk, softly falling snow"
SMALL = ConformConfig(max_frames=17, max_long_side=208, max_short_side=112)


def small_clip(name: str, frames: int = 17) -> Video:
    """A real clip conformed small: ``frames`` (4k+1) frames, sides multiples of 16 within 208x112."""
    return conform(read_video(VIDEOS / name, max_frames=frames), SMALL.model_copy(update={"max_frames": frames}))


@pytest.fixture(scope="module")
def backend():
    b = tiny.make_backend()
    b.setup()
    return b


@pytest.fixture()
def served(backend, tmp_path):
    """``(client, io)``: the i2v app on the tiny backend over a local store."""
    store = LocalStore(tmp_path / "store")
    app = build_app(API(backend, store), ServeSettings(load_in_background=False))
    with TestClient(app) as client:
        yield client, ArtifactIO(store)


def put_sample(io: ArtifactIO, name: str, frames: int) -> tuple[Video, dict]:
    """Store a conformed clip and its frame 0 (the plate); return the clip and the request's ``sample``."""
    clip = small_clip(name, frames)
    sid = Path(name).stem
    io.put_video(f"{sid}/source.mp4", clip.frames, clip.fps)
    io.put_image(f"{sid}/plate.png", clip.frames[0])
    return clip, {"sample_id": sid, "prompt": PROMPT, "source_video": f"{sid}/source.mp4"}


def animate_body(sample: dict, num_frames: int, fps: float, **changes) -> dict:
    sid = sample["sample_id"]
    return {"sample": sample, "image": f"{sid}/plate.png", "prompt": PROMPT, "num_frames": num_frames,
            "fps": fps, "output": f"staging/{sid}/background.mp4", **changes}


# --- HTTP: /v1/animate on real clips ---------------------------------------------------------------------

@pytest.mark.parametrize("name, frames", [("static_01_juggle.mp4", 17), ("static_03_pedestrians_vtest.mp4", 5)])
def test_animate_over_http(served, name, frames):
    client, io = served
    assert client.get("/readyz").json()["backend"] == "tiny-wan2.2-i2v-a14b-lightx2v"
    clip, sample = put_sample(io, name, frames)
    t, h, w = clip.shape
    assert (t, h % 16, w % 16) == (frames, 0, 0)

    r = client.post("/v1/animate", json=animate_body(sample, t, clip.fps))
    assert r.status_code == 200, r.text
    resp = VideoResponse.model_validate(r.json())
    assert (resp.video, resp.num_frames, resp.width, resp.height) == (f"staging/{sample['sample_id']}/background.mp4", t, w, h)
    assert {"queue", "run", "total"} <= set(resp.timings)

    video = io.load_video(resp.video)  # decodes the stored H.264 MP4
    assert video.frames.shape == (t, h, w, 3) and video.frames.dtype == np.uint8
    assert video.fps == pytest.approx(clip.fps, rel=1e-3)
    plate = clip.frames[0].astype(np.int16)
    first, last = (np.abs(video.frames[i].astype(np.int16) - plate).mean() for i in (0, -1))
    assert first < 8  # frame 0 is the plate, up to H.264 loss
    assert last > 3 * first  # the other frames are the model's, not the plate held still


# --- what the pipeline runs: LightX2V 4 steps, guidance 1, two experts split at 0.9 -----------------------

class ExpertCallSpy:
    """Test double (a spy): records ``(expert, timestep)`` for every forward of the two Wan experts."""

    def __init__(self, pipe):
        self.calls: list[tuple[str, float]] = []
        self.handles = [module.register_forward_pre_hook(self._hook(label), with_kwargs=True)
                        for label, module in (("high", pipe.transformer), ("low", pipe.transformer_2))]

    def _hook(self, label):
        def record(module, args, kwargs):
            self.calls.append((label, float(kwargs["timestep"].flatten()[0])))
        return record

    def remove(self):
        for h in self.handles:
            h.remove()


def test_lightx2v_schedule_guidance_and_experts(backend):
    plate = small_clip("static_01_juggle.mp4", 5).frames[0][:32, :48]
    ctx = SampleContext("spy", PROMPT, Video(plate[None].repeat(5, 0), 16.0))
    spy = ExpertCallSpy(backend.pipe)
    try:
        out = backend.animate(ctx, plate, PROMPT, 5, 16.0)
    finally:
        spy.remove()
    assert out.shape == (5, 32, 48, 3) and out.dtype == np.uint8
    assert np.array_equal(out[0], plate)

    pipe = backend.pipe
    assert isinstance(pipe.scheduler, real.LightX2VEulerScheduler)
    assert pipe.scheduler.config.shift == 5.0
    # raw sigmas [1, .75, .5, .25] shifted by 5: s' = 5s / (1 + 4s), then the terminal 0
    np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(), [1.0, 0.9375, 5 / 6, 0.625, 0.0], atol=1e-6)
    np.testing.assert_allclose(pipe.scheduler.timesteps.numpy(), [1000.0, 937.5, 2500 / 3, 625.0], atol=1e-3)
    assert pipe.config.boundary_ratio == 0.9
    assert pipe.guidance_scale == 1.0 and not pipe.do_classifier_free_guidance
    # one forward per step (no unconditional pass), high-noise expert while t >= 900, then the low-noise one
    assert [label for label, _ in spy.calls] == ["high", "high", "low", "low"]
    np.testing.assert_allclose([t for _, t in spy.calls], [1000.0, 937.5, 2500 / 3, 625.0], atol=1e-3)


def test_scheduler_refuses_other_step_counts():
    with pytest.raises(ValueError, match="4 steps"):
        real.make_scheduler().set_timesteps(50)


# --- the real loader on a tiny checkpoint ----------------------------------------------------------------

def test_real_loader_round_trip(backend, tmp_path):
    ckpt = tiny.save_tiny_checkpoint(tmp_path / "ckpt")
    for sub in ("model_index.json", *real.MODEL_SUBFOLDERS):
        assert (ckpt / sub).exists(), sub
    plate = small_clip("static_01_juggle.mp4", 5).frames[0][:32, :48]
    h, w = plate.shape[:2]
    ctx = SampleContext("rt", PROMPT, Video(plate[None].repeat(5, 0), 16.0))
    expected = backend.animate(ctx, plate, PROMPT, 5, 16.0)

    plain = real.make_backend(model_dir=ckpt, device="cpu")
    plain.setup()
    assert plain.name == "wan2.2-i2v-a14b-lightx2v"
    assert isinstance(plain.pipe.scheduler, real.LightX2VEulerScheduler)
    assert plain.pipe.config.boundary_ratio == 0.9
    out = plain.animate(ctx, plate, PROMPT, 5, 16.0)
    assert out.shape == (5, h, w, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)  # same weights after save/load, same seed: same video

    tiny.save_tiny_loras(ckpt / real.LORA_SUBFOLDER)  # found at <model_dir>/lightx2v
    lora = real.make_backend(model_dir=ckpt, device="cpu")
    lora.setup()
    assert lora.name == "wan2.2-i2v-a14b-lightx2v-lora"
    assert set(lora.pipe.transformer.peft_config) == {"lightx2v_high_noise"}
    assert set(lora.pipe.transformer_2.peft_config) == {"lightx2v_low_noise"}
    out_lora = lora.animate(ctx, plate, PROMPT, 5, 16.0)
    assert out_lora.shape == (5, h, w, 3) and out_lora.dtype == np.uint8
    assert not np.array_equal(out_lora[1:], expected[1:])  # the LoRAs change the experts


def test_lightx2v_lora_deltas_that_diffusers_drops_are_applied_or_refused(tmp_path):
    """A LoRA in LightX2V's own key format: diffusers' converter loads its low-rank parts and bias deltas but
    drops the norm and modulation ``.diff`` tensors (a DEBUG/INFO log). The loader adds them to the weights, as
    LightX2V's does, and refuses a LoRA holding a non-zero delta it cannot place, naming it."""
    ckpt = tiny.save_tiny_checkpoint(tmp_path / "ckpt")
    high = tiny.save_tiny_lightx2v_lora(tmp_path / "loras", "high_noise")
    low = tiny.save_tiny_lightx2v_lora(tmp_path / "loras", "low_noise")
    base = real.load_pipeline(ckpt, None, torch.float32)
    before = {n: p.detach().clone() for n, p in base.transformer.named_parameters()}

    diffusers_only = real.load_pipeline(ckpt, None, torch.float32)
    diffusers_only.load_lora_weights(str(high), adapter_name="x", local_files_only=True)
    assert torch.equal(diffusers_only.transformer.blocks[0].norm2.weight, before["blocks.0.norm2.weight"])  # dropped

    from safetensors.torch import load_file

    raw = load_file(str(high))
    pipe = real.load_pipeline(ckpt, (high, low), torch.float32)
    t = pipe.transformer
    for name, key in (("blocks.0.norm2.weight", "blocks.0.norm3.diff"), ("blocks.1.norm2.bias", "blocks.1.norm3.diff_b"),
                      ("blocks.0.scale_shift_table", "blocks.0.modulation.diff"),
                      ("scale_shift_table", "head.modulation.diff")):
        torch.testing.assert_close(dict(t.named_parameters())[name].detach(),
                                   before[name] + raw[f"diffusion_model.{key}"])
    torch.testing.assert_close(t.blocks[0].attn1.norm_q.weight.detach(), before["blocks.0.attn1.norm_q.weight"])  # zero
    assert set(t.peft_config) == {"lightx2v_high_noise"} and set(pipe.transformer_2.peft_config) == {"lightx2v_low_noise"}
    assert real.lora_diffs(high)[1] == [] and len(real.lora_diffs(high)[0]) == 7  # 2 blocks x 3 + the head

    odd = tiny.save_tiny_lightx2v_lora(tmp_path / "odd", "high_noise",
                                       extra={"blocks.0.norm_added.diff": torch.ones(24)})
    with pytest.raises(ConfigError, match="blocks.0.norm_added.diff"):
        real.load_pipeline(ckpt, (odd, low), torch.float32)


# --- errors ----------------------------------------------------------------------------------------------

def test_make_backend_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="--model-dir"):
        real.make_backend(model_dir=None)
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=str(missing)):
        real.make_backend(model_dir=missing)
    partial = tmp_path / "partial"
    (partial / "transformer").mkdir(parents=True)
    (partial / "model_index.json").write_text("{}")
    with pytest.raises(ConfigError) as err:
        real.make_backend(model_dir=partial)
    listed = str(err.value).split("missing: ")[1].split(", ")
    assert listed == [str(partial / p) for p in ("text_encoder", "tokenizer", "transformer_2", "vae")]
    for sub in real.MODEL_SUBFOLDERS:
        (partial / sub).mkdir(exist_ok=True)
    (partial / "loras").mkdir()
    (partial / "loras" / "wan2.2_i2v_A14b_high_noise_lora.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="low_noise"):
        real.make_backend(model_dir=partial, lora_dir=partial / "loras")
    with pytest.raises(ConfigError, match=str(tmp_path / "no_loras")):
        real.make_backend(model_dir=partial, lora_dir=tmp_path / "no_loras")
    with pytest.raises(ConfigError, match="unknown i2v option"):
        real.make_backend(model_dir=partial, steps=8)


def test_make_backend_environment(tmp_path, monkeypatch):
    """``sparkle serve`` passes only model_dir and device: LoRA folder and offload come from the environment."""
    model_dir = tmp_path / "wan"
    for sub in real.MODEL_SUBFOLDERS:
        (model_dir / sub).mkdir(parents=True)
    (model_dir / "model_index.json").write_text("{}")
    assert real.make_backend(model_dir=model_dir, device="cpu").name == "wan2.2-i2v-a14b-lightx2v"
    monkeypatch.setenv(real.LORA_DIR_ENV, str(tmp_path / "env_loras"))
    with pytest.raises(ConfigError, match=str(tmp_path / "env_loras")):
        real.make_backend(model_dir=model_dir)
    monkeypatch.delenv(real.LORA_DIR_ENV)
    monkeypatch.setenv(real.CPU_OFFLOAD_ENV, "1")
    assert real.make_backend(model_dir=model_dir, device="cuda").cpu_offload is True
    monkeypatch.setenv(real.CPU_OFFLOAD_ENV, "0")
    assert real.make_backend(model_dir=model_dir, device="cuda").cpu_offload is False
    assert real.make_backend(model_dir=model_dir, device="cuda", cpu_offload=True).cpu_offload is True


def test_bad_requests(served):
    client, io = served
    clip, sample = put_sample(io, "static_01_juggle.mp4", 5)
    ok = animate_body(sample, 5, clip.fps)

    r = client.post("/v1/animate", json={**ok, "guidance": 5.0})
    assert r.status_code == 422
    r = client.post("/v1/animate", json={**ok, "image": "static_01_juggle/missing.png"})
    assert r.status_code == 404 and "missing.png" in r.json()["detail"]
    r = client.post("/v1/animate", json={**ok, "num_frames": 16})
    assert r.status_code == 400 and "4k+1" in r.json()["detail"]
    io.put_image("static_01_juggle/odd.png", clip.frames[0][:100, :150])
    r = client.post("/v1/animate", json={**ok, "image": "static_01_juggle/odd.png"})
    assert r.status_code == 400 and "multiples of 16" in r.json()["detail"]
    assert not io.store.exists("staging/static_01_juggle/background.mp4")


def test_animate_input_errors_are_value_errors(backend):
    plate = np.zeros((32, 48, 3), np.uint8)
    ctx = SampleContext("e", "", Video(plate[None], 16.0))
    with pytest.raises(ValueError, match="4k\\+1"):
        backend.animate(ctx, plate, "", 8, 16.0)
    with pytest.raises(ValueError, match="uint8"):
        backend.animate(ctx, plate.astype(np.float32), "", 5, 16.0)
