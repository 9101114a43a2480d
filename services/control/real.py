"""``real`` control-synthesis backend: Wan2.2-Fun-A14B-Control on diffsynth (DiffSynth-Studio 2.1.12).

diffusers has no Wan-Fun-Control pipeline; diffsynth's ``WanVideoPipeline`` runs ``PAI/Wan2.2-Fun-A14B-Control``
(the checkpoint Kiwi-Edit's tooling is built on): two ``WanModel`` experts, ``dit`` for high noise and ``dit2``
for low noise, switched at ``switch_DiT_boundary`` (timestep 900 of 1000), a ``WanTextEncoder`` (UMT5-XXL),
``WanVideoVAE`` (Wan2.1 VAE: 4x temporal, 8x spatial, 16 latent channels) and no CLIP image encoder
(``require_clip_embedding=False``). The DiT takes 52 input channels: 16 noisy latents + 16 control-video
latents + 4 first-frame mask channels + 16 first-frame latents; it also has the reference conv
(``has_ref_conv=True``): with no reference image this backend feeds it zero latents, as VideoX-Fun does
(:class:`FunControlUnit`), so the DiT sees the sequence it was trained on.

One call: the decoupled Canny video (``control``) is ``control_video``, the edited frame 0 is ``input_image``
(frame 0 known, the rest generated), ``prompt`` the text. The background video and the BAIT mask reach the
model through the control video (source edges inside the mask, background edges outside), so they are not
separate inputs.

diffsynth 2.1.12 bug, worked around here: ``WanVideoUnit_FunControl.process`` replaces ``y`` (the VAE-encoded
``input_image`` with its mask, made by ``WanVideoUnit_ImageEmbedderVAE``) with zeros whenever
``clip_feature`` is None. A Wan2.2-Fun DiT takes no CLIP feature, so ``clip_feature`` is always None and
``input_image`` was silently ignored (outputs bit-identical for any frame 0). :class:`FunControlUnit`
replaces that unit in the pipeline: it keeps ``y`` and makes a zero CLIP feature only for DiTs that take one.

Local layout of ``--model-dir`` (that of the hub repository, plus the tokenizer)::

    high_noise_model/diffusion_pytorch_model*.safetensors   high-noise expert (6 bf16 shards on the hub)
    low_noise_model/diffusion_pytorch_model*.safetensors    low-noise expert
    Wan2.1_VAE.pth                                          VAE
    models_t5_umt5-xxl-enc-bf16.pth                         UMT5-XXL text encoder
    google/umt5-xxl/                                        tokenizer (tokenizer.json or spiece.model)
    sparkle_architecture.json                               optional: model sizes other than the A14B's

Sampling (VideoX-Fun ``examples/wan2.2_fun/predict_v2v_control.py``, the inference script the model card
points to): 50 steps, guidance 6.0, flow shift 5, expert boundary 0.900 (VideoX-Fun ``config/wan2.2`` and DiffSynth's own
training script for Wan2.2-Fun-A14B-Control; diffsynth's call default 0.875 would run 3 of the 50 steps, timesteps
875-900, on the high-noise expert that VideoX-Fun hands to the low-noise one), Wan's standard negative prompt.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffsynth.models.model_loader import ModelPool
from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer
from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE
from diffsynth.pipelines.wan_video import WanVideoPipeline, WanVideoUnit_FunControl
from PIL import Image

from sparkle.backends import SampleContext
from sparkle.errors import ConfigError, InputError

log = logging.getLogger("sparkle.control")

HUB_MODEL = "PAI/Wan2.2-Fun-A14B-Control"
"""ModelScope id (``alibaba-pai/Wan2.2-Fun-A14B-Control`` on Hugging Face) of the checkpoint ``--model-dir`` copies."""

HIGH_NOISE_DIT = "high_noise_model/diffusion_pytorch_model*.safetensors"
LOW_NOISE_DIT = "low_noise_model/diffusion_pytorch_model*.safetensors"
VAE_FILE = "Wan2.1_VAE.pth"
TEXT_ENCODER_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
"""File names of the hub repository (diffsynth's ``ModelConfig(model_id=HUB_MODEL, origin_file_pattern=...)``
examples). The hub repository may lack the tokenizer: copy ``google/umt5-xxl/`` from ``Wan-AI/Wan2.1-T2V-1.3B``."""

ARCHITECTURE_FILE = "sparkle_architecture.json"
"""Optional ``{"dit": {...}, "vae": {...}, "text_encoder": {...}}`` overriding :data:`ARCHITECTURE` (the tiny
checkpoint of ``tiny.save_tiny_checkpoint`` has one; the hub checkpoint does not need it)."""

ARCHITECTURE = {
    # diffsynth/configs/model_configs.py, entry "PAI/Wan2.2-Fun-A14B-Control" (model_hash 2267d489...).
    "dit": {"has_image_input": False, "patch_size": [1, 2, 2], "in_dim": 52, "dim": 5120, "ffn_dim": 13824,
            "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 40, "num_layers": 40, "eps": 1e-06,
            "has_ref_conv": True, "require_clip_embedding": False},
    # WanVideoVAE(z_dim=16) builds VideoVAE_(dim=96): the Wan2.1 VAE.
    "vae": {"z_dim": 16, "dim": 96},
    # WanTextEncoder's defaults: UMT5-XXL encoder.
    "text_encoder": {"vocab": 256384, "dim": 4096, "dim_attn": 4096, "dim_ffn": 10240, "num_heads": 64,
                     "num_layers": 24, "num_buckets": 32, "shared_pos": False},
}
"""Constructor arguments of the three diffsynth models of Wan2.2-Fun-A14B-Control."""

NUM_INFERENCE_STEPS = 50
"""``num_inference_steps = 50``: VideoX-Fun ``examples/wan2.2_fun/predict_v2v_control.py``."""

CFG_SCALE = 6.0
"""``guidance_scale = 6.0``: same script."""

SIGMA_SHIFT = 5.0
"""``shift = 5``: same script (diffsynth's ``sigma_shift`` default is 5.0 too)."""

SWITCH_BOUNDARY = 0.900
"""High-noise expert for timesteps >= 900: VideoX-Fun ``config/wan2.2`` ``boundary: 0.900`` (not diffsynth's call
default 0.875). With 50 steps at shift 5 that is 18 high-noise steps, not 21."""

SEED = 43
"""Fixed seed (``seed = 43`` of the same script); noise is drawn on the CPU, so it is device-independent."""

NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
"""Wan's standard negative prompt, as in the same script."""

TOKENIZER_SEQ_LEN = 512
"""Wan ``text_len``: prompts are padded/truncated to 512 tokens (diffsynth ``from_pretrained``)."""

CPU_OFFLOAD_ENV = "SPARKLE_CONTROL_CPU_OFFLOAD"
"""``1``/``0`` forces CPU offload on/off when ``cpu_offload`` is not passed; unset: automatic."""

OFFLOAD_BELOW_BYTES = 96 * 2**30
"""Automatic offload below 96 GiB of GPU memory: the bf16 weights take ~69 GB (2 x 14B experts ~57 GB,
UMT5-XXL ~11 GB, VAE 0.25 GB), too much of an 80 GB card to leave room for 81 frames at 832x480."""


def wan_video_vae(z_dim: int = 16, dim: int = 96) -> WanVideoVAE:
    """diffsynth's ``WanVideoVAE`` with a ``VideoVAE_`` of width ``dim`` (96: the Wan2.1 VAE; smaller: tests).

    ``WanVideoVAE.__init__`` takes only ``z_dim``; this factory is the ``model_class`` given to diffsynth's
    loader so that the tiny checkpoint loads through the same code as the real one.
    """
    vae = WanVideoVAE(z_dim=z_dim)
    if dim != vae.model.dim:
        vae.model = VideoVAE_(dim=dim, z_dim=z_dim).eval().requires_grad_(False)
    return vae


class FunControlUnit(WanVideoUnit_FunControl):
    """diffsynth's Fun-Control unit without the bug that drops ``input_image`` (see the module docstring), and
    with the reference tokens VideoX-Fun always gives the DiT.

    Output ``y``: ``(1, in_dim - 16, T', H/8, W/8)`` = control latents (16) then the first-frame mask (4)
    and latents (16) of ``WanVideoUnit_ImageEmbedderVAE`` (zeros when there is no ``input_image``).
    Output ``reference_latents`` (a DiT with ``has_ref_conv`` and no reference image): zeros ``(1, 16, 1, H/8,
    W/8)``. VideoX-Fun's Wan2.2-Fun pipelines feed zero reference latents when no reference image is given,
    so ``ref_conv``'s tokens (its bias, over ``H/16 x W/16`` positions) are always prepended to the sequence and
    the rotary frame index of every video token is shifted by one; diffsynth leaves them out, and the DiT then
    sees a sequence it was not trained on.
    """

    def __init__(self):
        super().__init__()
        self.input_params = (*self.input_params, "reference_latents")
        self.output_params = (*self.output_params, "reference_latents")

    def process(self, pipe, control_video, num_frames, height, width, tiled, tile_size, tile_stride,
                clip_feature, y, latents, reference_latents=None):
        if control_video is None:
            return {}
        pipe.load_models_to_device(self.onload_model_names)
        control_video = pipe.preprocess_video(control_video)
        control_latents = pipe.vae.encode(control_video, device=pipe.device, tiled=tiled, tile_size=tile_size,
                                          tile_stride=tile_stride).to(dtype=pipe.torch_dtype, device=pipe.device)
        y_dim = pipe.dit.in_dim - control_latents.shape[1] - latents.shape[1]
        if y is None:
            y = torch.zeros((1, y_dim, *control_latents.shape[2:]), dtype=pipe.torch_dtype, device=pipe.device)
        else:
            y = y[:, -y_dim:]
        out = {"y": torch.concat([control_latents, y], dim=1)}
        if clip_feature is None and pipe.dit.require_clip_embedding:
            out["clip_feature"] = torch.zeros((1, 257, 1280), dtype=pipe.torch_dtype, device=pipe.device)
        if reference_latents is None and getattr(pipe.dit, "has_ref_conv", False):
            out["reference_latents"] = torch.zeros_like(latents[:, :, :1])
        return out


def use_fun_control_unit(pipe: WanVideoPipeline) -> WanVideoPipeline:
    """Replace diffsynth's ``WanVideoUnit_FunControl`` in ``pipe.units`` by :class:`FunControlUnit` (in place)."""
    found = [i for i, unit in enumerate(pipe.units) if type(unit) is WanVideoUnit_FunControl]
    if len(found) != 1:
        raise RuntimeError(f"expected one WanVideoUnit_FunControl in the pipeline, found {len(found)}")
    pipe.units[found[0]] = FunControlUnit()
    return pipe


class FunControlSynthesizer:
    """``ControlSynthesizer`` on a diffsynth ``WanVideoPipeline`` made by ``load`` (called once, in ``setup``)."""

    def __init__(self, load: Callable[[], WanVideoPipeline], name: str = "real-wan2.2-fun-a14b-control",
                 num_inference_steps: int = NUM_INFERENCE_STEPS, cfg_scale: float = CFG_SCALE, seed: int = SEED):
        self.name = name
        self.num_inference_steps = num_inference_steps
        self.cfg_scale = cfg_scale
        self.seed = seed
        self._load = load
        self.pipe: WanVideoPipeline | None = None

    def setup(self) -> None:
        """Load the pipeline once and install :class:`FunControlUnit`."""
        if self.pipe is None:
            self.pipe = use_fun_control_unit(self._load())

    def synthesize(self, ctx: SampleContext, control: np.ndarray, background: np.ndarray,
                   first_frame: np.ndarray, mask: np.ndarray, prompt: str) -> np.ndarray:
        """Edited video ``(T, H, W, 3) uint8`` RGB, same ``T, H, W`` as ``control``.

        ``control`` ``(T, H, W, 3) uint8`` (T = 4k+1, H and W multiples of 16: the VAE strides and the 2x2
        patch), ``first_frame`` ``(H, W, 3) uint8`` (the edited frame 0; resized to ``W x H`` if it differs).
        ``background`` ``(T, H, W, 3)`` and ``mask`` ``(T, H, W) bool`` are already in the control video.
        """
        if self.pipe is None:
            raise RuntimeError("setup() has not been called")
        if control.ndim != 4 or control.shape[-1] != 3 or control.dtype != np.uint8:
            raise InputError(f"control must be (T, H, W, 3) uint8, got {control.shape} {control.dtype}")
        t, h, w = control.shape[:3]
        if t % 4 != 1 or h % 16 or w % 16:
            raise InputError(f"Wan needs T = 4k+1 frames and sides that are multiples of 16, got {t}x{h}x{w}")
        if first_frame.ndim != 3 or first_frame.shape[-1] != 3:
            raise InputError(f"first_frame must be (H, W, 3), got {first_frame.shape}")
        frames = self.pipe(
            prompt=prompt,
            negative_prompt=NEGATIVE_PROMPT,
            input_image=Image.fromarray(np.asarray(first_frame, np.uint8)),
            control_video=[Image.fromarray(f) for f in control],
            num_frames=t, height=h, width=w,
            num_inference_steps=self.num_inference_steps,
            cfg_scale=self.cfg_scale,
            sigma_shift=SIGMA_SHIFT,
            switch_DiT_boundary=SWITCH_BOUNDARY,
            seed=self.seed,
            progress_bar_cmd=lambda steps: steps,
        )
        video = np.stack([np.asarray(f.convert("RGB")) for f in frames])
        if video.shape != (t, h, w, 3):
            raise RuntimeError(f"pipeline returned {video.shape}, expected {(t, h, w, 3)}")
        return video


def checkpoint_files(model_dir: str | os.PathLike | None) -> dict[str, list[Path] | Path]:
    """The checkpoint's files under ``model_dir`` by component; ConfigError naming every missing path."""
    if model_dir is None:
        raise ConfigError(f"the real control backend needs --model-dir: a local copy of {HUB_MODEL}")
    root = Path(model_dir)
    if not root.is_dir():
        raise ConfigError(f"control model directory not found: {root}")
    found: dict[str, list[Path] | Path] = {}
    missing = []
    for key, pattern in (("high_noise_model", HIGH_NOISE_DIT), ("low_noise_model", LOW_NOISE_DIT)):
        shards = sorted(root.glob(pattern))
        if shards:
            found[key] = shards
        else:
            missing.append(root / pattern)
    for key, name in (("vae", VAE_FILE), ("text_encoder", TEXT_ENCODER_FILE)):
        if (root / name).is_file():
            found[key] = root / name
        else:
            missing.append(root / name)
    tokenizer = root / TOKENIZER_DIR
    if (tokenizer / "tokenizer.json").is_file() or (tokenizer / "spiece.model").is_file():
        found["tokenizer"] = tokenizer
    else:
        missing.append(tokenizer / "tokenizer.json")
    if missing:
        raise ConfigError(f"incomplete {HUB_MODEL} checkpoint in {root}; missing: "
                          + ", ".join(str(p) for p in missing))
    return found


def architecture(model_dir: str | os.PathLike) -> dict[str, dict]:
    """:data:`ARCHITECTURE`, updated per model from ``model_dir/sparkle_architecture.json`` when present."""
    arch = {k: dict(v) for k, v in ARCHITECTURE.items()}
    path = Path(model_dir) / ARCHITECTURE_FILE
    if path.is_file():
        try:
            override = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"unreadable {path}: {exc}") from exc
        unknown = set(override) - set(arch)
        if unknown:
            raise ConfigError(f"{path}: unknown models {sorted(unknown)}; expected {sorted(arch)}")
        for key, kwargs in override.items():
            arch[key].update(kwargs)
    return arch


def _vram_config(device: str, dtype: torch.dtype, offload: bool) -> dict:
    """diffsynth's per-model ``vram_config``: resident on ``device``, or kept on the CPU and moved in when used."""
    return {"offload_dtype": dtype if offload else None, "offload_device": "cpu" if offload else None,
            "onload_dtype": dtype, "onload_device": device, "preparing_dtype": dtype, "preparing_device": device,
            "computation_dtype": dtype, "computation_device": device}


def load_pipeline(model_dir: str | os.PathLike, device: str, torch_dtype: torch.dtype,
                  cpu_offload: bool = False) -> WanVideoPipeline:
    """A ``WanVideoPipeline`` with the checkpoint in ``model_dir`` (local files only; nothing is downloaded).

    Each model is loaded by diffsynth's ``ModelPool.load_model_file`` (what ``WanVideoPipeline.from_pretrained``
    uses once it has recognised a file), with the constructor arguments of :func:`architecture`. With
    ``cpu_offload`` the experts and the text encoder stay on the CPU and move to ``device`` while in use.
    """
    files = checkpoint_files(model_dir)
    arch = architecture(model_dir)
    pool = ModelPool()
    resident = _vram_config(device, torch_dtype, offload=False)
    managed = _vram_config(device, torch_dtype, offload=cpu_offload)

    def load(model_class: str, path, kwargs: dict, vram: dict, converter: str | None = None):
        config = {"model_class": model_class, "extra_kwargs": kwargs}
        if converter:
            config["state_dict_converter"] = converter
        path = [str(p) for p in path] if isinstance(path, list) else str(path)
        return pool.load_model_file(config, path, vram)

    pipe = WanVideoPipeline(device=device, torch_dtype=torch_dtype)
    dit = "diffsynth.models.wan_video_dit.WanModel"
    pipe.dit = load(dit, files["high_noise_model"], arch["dit"], managed)
    pipe.dit2 = load(dit, files["low_noise_model"], arch["dit"], managed)
    pipe.vae = load(f"{__name__}.wan_video_vae", files["vae"], arch["vae"], resident,
                    "diffsynth.utils.state_dict_converters.wan_video_vae.WanVideoVAEStateDictConverter")
    pipe.text_encoder = load("diffsynth.models.wan_video_text_encoder.WanTextEncoder", files["text_encoder"],
                             arch["text_encoder"], managed)
    pipe.tokenizer = HuggingfaceTokenizer(name=str(files["tokenizer"]), seq_len=TOKENIZER_SEQ_LEN,
                                          clean="whitespace")
    pipe.height_division_factor = pipe.width_division_factor = pipe.vae.upsampling_factor * 2
    pipe.vram_management_enabled = pipe.check_vram_management_state()
    return pipe


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _want_offload(device: str, cpu_offload: bool | None) -> bool:
    """``cpu_offload`` if given, else :data:`CPU_OFFLOAD_ENV`, else on for CUDA cards under 96 GiB."""
    if cpu_offload is not None:
        return cpu_offload
    env = os.environ.get(CPU_OFFLOAD_ENV)
    if env is not None:
        return env.strip().lower() in ("1", "true", "yes", "on")
    if not device.startswith("cuda"):
        return False
    return torch.cuda.get_device_properties(torch.device(device)).total_memory < OFFLOAD_BELOW_BYTES


def make_backend(model_dir: str | os.PathLike | None = None, device: str | None = None,
                 cpu_offload: bool | None = None, **options) -> FunControlSynthesizer:
    """The Wan2.2-Fun-A14B-Control backend on ``model_dir`` (checked now, loaded in ``setup()``).

    ``device`` defaults to CUDA when available; weights are bf16 on CUDA and float32 on the CPU (bf16 3D
    convolutions are very slow there). ``cpu_offload`` (default: :data:`CPU_OFFLOAD_ENV`, else automatic)
    keeps the experts and the text encoder in host memory (~69 GB) and moves each to the GPU while it runs;
    it is meant for CUDA (diffsynth then calls ``torch.cuda.empty_cache``). ``options`` go to
    :class:`FunControlSynthesizer` (e.g. ``seed``).
    """
    checkpoint_files(model_dir)
    architecture(model_dir)
    device = device or _default_device()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32

    def load() -> WanVideoPipeline:
        offload = _want_offload(device, cpu_offload)
        log.info("loading %s from %s on %s (%s, cpu offload %s)", HUB_MODEL, model_dir, device, dtype, offload)
        return load_pipeline(model_dir, device, dtype, cpu_offload=offload)

    return FunControlSynthesizer(load, **options)
