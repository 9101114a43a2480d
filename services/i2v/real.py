"""``real`` I2V backend: Wan2.2-I2V-A14B (diffusers) with LightX2V's 4-step distillation.

The model is diffusers' ``WanImageToVideoPipeline`` loaded from a local copy of
``Wan-AI/Wan2.2-I2V-A14B-Diffusers``: two ``WanTransformer3DModel`` experts, ``transformer`` for high noise
and ``transformer_2`` for low noise, switched at ``boundary_ratio = 0.9`` (timestep 900 of 1000), a
``UMT5EncoderModel`` text encoder, ``AutoencoderKLWan`` (4x temporal, 8x spatial) and no CLIP image
encoder. LightX2V's step/CFG distillation makes it a 4-step sampler without guidance, either as two LoRAs
(``lightx2v/Wan2.2-Distill-Loras``: the high-noise one into ``transformer``, the low-noise one into
``transformer_2`` with ``load_into_transformer_2=True``) or as distilled experts already in
``transformer/`` and ``transformer_2/``.

LightX2V's sampler (``Wan22StepDistillScheduler`` with ``configs/wan22/wan_moe_i2v_distill*.json``):
``denoising_step_list = [1000, 750, 500, 250]``, i.e. raw sigmas ``[1, 0.75, 0.5, 0.25]``, shifted with
``sample_shift = 5.0`` (``sigma' = 5 s / (1 + 4 s)``: ``[1, 0.9375, 0.8333, 0.625]``, timesteps
``[1000, 937.5, 833.3, 625]``), flow-matching Euler steps down to sigma 0, ``guidance 1`` (CFG off),
``boundary_step_index = 2``: steps 0-1 on the high-noise expert, 2-3 on the low-noise one, which is exactly
what diffusers' ``boundary_ratio = 0.9`` selects for these timesteps.

The installed ``WanImageToVideoPipeline.__call__`` (diffusers 0.42.1) takes neither ``sigmas`` nor
``timesteps``: it calls ``scheduler.set_timesteps(num_inference_steps, device=device)``. So the schedule
is given through the scheduler: :class:`LightX2VEulerScheduler`, a ``FlowMatchEulerDiscreteScheduler``
whose default ``set_timesteps`` passes LightX2V's raw sigmas to the stock method (which applies the shift).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
from PIL import Image

from sparkle.backends import SampleContext
from sparkle.errors import ConfigError, InputError

log = logging.getLogger("sparkle.i2v")

HUB_MODEL = "Wan-AI/Wan2.2-I2V-A14B-Diffusers"
"""The diffusers checkpoint the ``--model-dir`` is a local copy of."""

HUB_LORAS = "lightx2v/Wan2.2-Distill-Loras"
"""LightX2V's distillation LoRAs, e.g. ``wan2.2_i2v_A14b_{high,low}_noise_lora_rank64_lightx2v_4step_1022``."""

LIGHTX2V_RAW_SIGMAS = (1.0, 0.75, 0.5, 0.25)
"""LightX2V ``denoising_step_list = [1000, 750, 500, 250]`` / 1000, before the shift (4 steps)."""

FLOW_SHIFT = 5.0
"""LightX2V ``sample_shift`` for Wan2.2-I2V-A14B distilled (``wan_moe_i2v_distill.json``)."""

GUIDANCE_SCALE = 1.0
"""LightX2V ``enable_cfg: false``: the distilled experts run without classifier-free guidance."""

BOUNDARY_RATIO = 0.9
"""Wan2.2-I2V-A14B expert switch (``model_index.json`` of the hub checkpoint): high noise for t >= 900."""

NUM_INFERENCE_STEPS = len(LIGHTX2V_RAW_SIGMAS)

MAX_SEQUENCE_LENGTH = 512
"""Wan's ``text_len``: the UMT5 prompt embedding is padded to 512 tokens (pipeline default)."""

MODEL_SUBFOLDERS = ("text_encoder", "tokenizer", "transformer", "transformer_2", "vae")
"""Components ``make_backend`` requires under ``model_dir`` (besides ``model_index.json``)."""

LORA_SUBFOLDER = "lightx2v"
"""Where the two LightX2V LoRAs are looked for when ``lora_dir`` is not given: ``<model_dir>/lightx2v``."""

LORA_DIR_ENV = "SPARKLE_I2V_LORA_DIR"
"""The LoRA folder when ``lora_dir`` is not passed (``sparkle serve`` passes only ``model_dir`` and ``device``)."""

CPU_OFFLOAD_ENV = "SPARKLE_I2V_CPU_OFFLOAD"
"""``1``/``0`` forces model CPU offload on/off when ``cpu_offload`` is not passed; unset: automatic."""

OFFLOAD_BELOW_BYTES = 96 * 2**30
"""Automatic offload below 96 GiB of GPU memory: the bf16 weights alone take ~69 GB (2 x 14B experts
~57 GB, UMT5-XXL encoder ~11 GB, VAE 0.5 GB), which leaves too little of an 80 GB card for the activations
and the VAE decode of 81 frames at 832x480."""


class I2VInputError(InputError, ValueError):
    """A request the model cannot take (frame count not 4k+1, sides not multiples of 16): HTTP 400."""


class LightX2VEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching Euler whose default schedule is LightX2V's 4 steps.

    ``set_timesteps(4)`` (what ``WanImageToVideoPipeline`` calls) becomes ``set_timesteps(sigmas=[1, .75,
    .5, .25])`` of the stock scheduler, which shifts them by ``config.shift`` (5.0): sigmas ``[1, 0.9375,
    0.8333, 0.625, 0]``, timesteps ``[1000, 937.5, 833.3, 625]`` (0..1000). Explicit ``sigmas`` or
    ``timesteps`` are passed through unchanged.
    """

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        if sigmas is None and timesteps is None:
            if num_inference_steps not in (None, NUM_INFERENCE_STEPS):
                raise ValueError(f"LightX2V distillation runs {NUM_INFERENCE_STEPS} steps, "
                                 f"not {num_inference_steps}")
            num_inference_steps, sigmas = NUM_INFERENCE_STEPS, list(LIGHTX2V_RAW_SIGMAS)
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)


def make_scheduler() -> LightX2VEulerScheduler:
    """The LightX2V 4-step sampler: Euler flow matching, 1000 train timesteps, shift 5.0."""
    return LightX2VEulerScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class WanI2V:
    """Wan2.2-I2V-A14B + LightX2V as a :class:`sparkle.backends.VideoGenerator`.

    ``load()`` builds the ``WanImageToVideoPipeline`` (on CPU); ``setup()`` calls it once, installs the
    LightX2V scheduler and the 0.9 boundary, and moves the pipeline to ``device``, or enables diffusers'
    model CPU offload (one component on the GPU at a time) when ``cpu_offload`` is True, or None on a CUDA
    device with less than :data:`OFFLOAD_BELOW_BYTES`. ``seed`` fixes the initial noise (a CPU
    ``torch.Generator``, so results do not depend on the device's RNG).
    """

    def __init__(self, load: Callable[[], WanImageToVideoPipeline], name: str, device: str | None = None,
                 seed: int = 0, cpu_offload: bool | None = None):
        self.name = name
        self._load = load
        self.device = device or default_device()
        self.seed = seed
        self.cpu_offload = cpu_offload
        self.pipe: WanImageToVideoPipeline | None = None

    def setup(self) -> None:
        """Load the pipeline once and put it on the device."""
        if self.pipe is not None:
            return
        pipe = self._load()
        if pipe.transformer is None or pipe.transformer_2 is None:
            raise ConfigError("Wan2.2-I2V-A14B needs both experts: transformer (high noise) and transformer_2 "
                              "(low noise)")
        pipe.scheduler = make_scheduler()
        pipe.register_to_config(boundary_ratio=BOUNDARY_RATIO)
        if self.cpu_offload is None:
            self.cpu_offload = (self.device.startswith("cuda") and
                                torch.cuda.get_device_properties(torch.device(self.device)).total_memory
                                < OFFLOAD_BELOW_BYTES)
            log.info("i2v model CPU offload: %s", self.cpu_offload)
        if self.cpu_offload:
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe

    def animate(self, ctx: SampleContext, image: np.ndarray, prompt: str, num_frames: int,
                fps: float) -> np.ndarray:
        """Animate the plate ``image`` ``(H, W, 3) uint8`` into ``(num_frames, H, W, 3) uint8``.

        ``num_frames`` must be 4k+1 (Wan's VAE compresses 4 frames into one latent after the first) and
        ``H``, ``W`` multiples of 16 (VAE stride 8 x patch 2); the orchestrator conforms the source to both,
        anything else raises :class:`I2VInputError` (HTTP 400). 4 steps, guidance 1.0, LightX2V sigmas.
        Frame 0 of the result is ``image`` itself (the model's frame 0 is its VAE reconstruction);
        ``fps`` does not enter the model (Wan2.2-A14B is trained at 16 fps).
        """
        if self.pipe is None:
            raise RuntimeError("setup() has not been called")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise I2VInputError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        h, w = image.shape[:2]
        if h % 16 or w % 16:
            raise I2VInputError(f"Wan needs sides that are multiples of 16, got {w}x{h}")
        if num_frames < 1 or (num_frames - 1) % 4:
            raise I2VInputError(f"Wan needs 4k+1 frames (1, 5, ..., 81), got {num_frames}")
        generator = torch.Generator("cpu").manual_seed(self.seed)
        out = self.pipe(image=Image.fromarray(image), prompt=prompt, height=h, width=w, num_frames=num_frames,
                        num_inference_steps=NUM_INFERENCE_STEPS, guidance_scale=GUIDANCE_SCALE,
                        guidance_scale_2=GUIDANCE_SCALE, generator=generator, output_type="np",
                        max_sequence_length=MAX_SEQUENCE_LENGTH).frames[0]
        video = (np.clip(out, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        if video.shape != (num_frames, h, w, 3):
            raise RuntimeError(f"Wan returned {video.shape}, expected {(num_frames, h, w, 3)}")
        video[0] = image
        return video


def find_loras(lora_dir: Path) -> tuple[Path, Path]:
    """The ``(high_noise, low_noise)`` LoRA files in ``lora_dir``: one ``*high_noise*.safetensors`` and one
    ``*low_noise*.safetensors`` (LightX2V's names). Raises ConfigError naming what is missing."""
    if not lora_dir.is_dir():
        raise ConfigError(f"i2v LoRA directory not found: {lora_dir}")
    found = []
    for kind in ("high_noise", "low_noise"):
        files = sorted(lora_dir.glob(f"*{kind}*.safetensors"))
        if len(files) != 1:
            raise ConfigError(f"i2v LoRA directory {lora_dir} must hold exactly one *{kind}*.safetensors "
                              f"(from {HUB_LORAS}), found {[f.name for f in files]}")
        found.append(files[0])
    return found[0], found[1]


# --- LightX2V's full-tensor deltas -------------------------------------------------------------------------

DIFF_TARGETS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"blocks\.(\d+)\.self_attn\.norm_q\.diff"), r"blocks.\1.attn1.norm_q.weight"),
    (re.compile(r"blocks\.(\d+)\.self_attn\.norm_k\.diff"), r"blocks.\1.attn1.norm_k.weight"),
    (re.compile(r"blocks\.(\d+)\.cross_attn\.norm_q\.diff"), r"blocks.\1.attn2.norm_q.weight"),
    (re.compile(r"blocks\.(\d+)\.cross_attn\.norm_k\.diff"), r"blocks.\1.attn2.norm_k.weight"),
    (re.compile(r"blocks\.(\d+)\.norm3\.diff"), r"blocks.\1.norm2.weight"),
    (re.compile(r"blocks\.(\d+)\.norm3\.diff_b"), r"blocks.\1.norm2.bias"),
    (re.compile(r"blocks\.(\d+)\.modulation\.diff"), r"blocks.\1.scale_shift_table"),
    (re.compile(r"head\.modulation\.diff"), "scale_shift_table"),
    (re.compile(r"blocks\.(\d+)\.self_attn\.([qkv])\.diff"), r"blocks.\1.attn1.to_\2.weight"),
    (re.compile(r"blocks\.(\d+)\.self_attn\.o\.diff"), r"blocks.\1.attn1.to_out.0.weight"),
    (re.compile(r"blocks\.(\d+)\.cross_attn\.([qkv])\.diff"), r"blocks.\1.attn2.to_\2.weight"),
    (re.compile(r"blocks\.(\d+)\.cross_attn\.o\.diff"), r"blocks.\1.attn2.to_out.0.weight"),
    (re.compile(r"blocks\.(\d+)\.ffn\.0\.diff"), r"blocks.\1.ffn.net.0.proj.weight"),
    (re.compile(r"blocks\.(\d+)\.ffn\.2\.diff"), r"blocks.\1.ffn.net.2.weight"),
]
"""Wan-format ``.diff`` / ``.diff_b`` keys (full-tensor deltas, ``diffusion_model.`` prefix removed) that
diffusers' ``_convert_non_diffusers_wan_lora_to_diffusers`` drops (norm deltas: removed with a DEBUG log;
modulation and linear-weight ``.diff``: left over, INFO "not handled yet") and LightX2V's loader adds to the
weights, with the ``WanTransformer3DModel`` parameter each one adds to (Wan's ``norm3`` is diffusers'
``norm2``, ``modulation`` its ``scale_shift_table``)."""


def lora_diffs(lora_file: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The deltas of ``lora_file`` that diffusers would drop: ``({diffusers parameter: delta}, unmapped)``.

    Reads the safetensors keys (and only the ``.diff``/``.diff_b`` tensors). An all-zero delta changes nothing
    and is skipped (diffusers' reason for dropping norm deltas); ``unmapped`` names the non-zero ``.diff``
    keys neither diffusers nor :data:`DIFF_TARGETS` handles. Linear ``.diff_b`` (LoRA biases) and
    ``head.head.diff`` are diffusers' to convert and are left to it.
    """
    from safetensors import safe_open

    deltas: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    with safe_open(str(lora_file), framework="pt") as f:
        for key in f.keys():
            name = key.removeprefix("diffusion_model.")
            if not name.endswith((".diff", ".diff_b")) or "lora" in name or name.startswith("head.head"):
                continue
            target = next((rx.sub(to, name) for rx, to in DIFF_TARGETS if rx.fullmatch(name)), None)
            if target is None and name.endswith(".diff_b") and "norm" not in name:
                continue  # a linear layer's bias delta: diffusers loads it as lora_B.bias
            tensor = f.get_tensor(key)
            if not torch.count_nonzero(tensor):
                continue
            if target is None:
                unmapped.append(key)
            else:
                deltas[target] = tensor
    return deltas, unmapped


def apply_lora_diffs(transformer, lora_file: Path) -> int:
    """Add ``lora_file``'s full-tensor deltas that diffusers drops to ``transformer``'s weights (as LightX2V
    merges them); returns how many. Raises ConfigError naming the keys that would be lost (non-zero deltas of
    no known parameter) or whose shape does not match, before any weight changes."""
    deltas, unmapped = lora_diffs(lora_file)
    params = dict(transformer.named_parameters())
    wrong = [f"{name} {tuple(d.shape)} vs {tuple(params[name].shape) if name in params else 'missing'}"
             for name, d in deltas.items() if name not in params or params[name].shape != d.shape]
    if unmapped or wrong:
        raise ConfigError(f"LoRA {lora_file.name}: diffusers would drop non-zero deltas this loader cannot place "
                          f"({', '.join(unmapped + wrong)}); use LightX2V's distilled experts instead")
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].add_(delta.to(params[name].dtype, copy=False).to(params[name].device))
    if deltas:
        log.info("%s: added %d full-tensor deltas diffusers' LoRA loader drops", lora_file.name, len(deltas))
    return len(deltas)


def load_pipeline(model_dir: Path, loras: tuple[Path, Path] | None, dtype: torch.dtype) -> WanImageToVideoPipeline:
    """``WanImageToVideoPipeline`` from the local ``model_dir`` (never downloads), LoRAs applied: first the
    full-tensor deltas diffusers' converter drops (:func:`apply_lora_diffs`, ConfigError if one cannot be
    placed), then the low-rank parts through ``load_lora_weights``.

    Transformers and text encoder in ``dtype``, the VAE in float32 (as in diffusers' Wan examples).
    """
    pipe = WanImageToVideoPipeline.from_pretrained(
        model_dir, local_files_only=True, dtype={"default": dtype, "vae": torch.float32},
        scheduler=make_scheduler(), boundary_ratio=BOUNDARY_RATIO)
    if loras is not None:
        high, low = loras
        apply_lora_diffs(pipe.transformer, high)  # what diffusers' converter would drop, checked first
        apply_lora_diffs(pipe.transformer_2, low)
        pipe.load_lora_weights(str(high), adapter_name="lightx2v_high_noise", local_files_only=True)
        pipe.load_lora_weights(str(low), adapter_name="lightx2v_low_noise", load_into_transformer_2=True,
                               local_files_only=True)
    return pipe


def make_backend(model_dir: str | Path | None = None, device: str | None = None, lora_dir: str | Path | None = None,
                 seed: int = 0, cpu_offload: bool | None = None, **options) -> WanI2V:
    """The production backend (not loaded yet: ``setup()`` loads it).

    ``model_dir``: a local copy of ``Wan-AI/Wan2.2-I2V-A14B-Diffusers`` (``model_index.json``,
    ``text_encoder/``, ``tokenizer/``, ``transformer/``, ``transformer_2/``, ``vae/``). ``lora_dir``: a folder
    with LightX2V's ``*high_noise*.safetensors`` and ``*low_noise*.safetensors``; when None, the
    ``SPARKLE_I2V_LORA_DIR`` variable, else ``<model_dir>/lightx2v`` if it exists, else no LoRA: the experts
    in ``model_dir`` must then be the distilled ones. ``cpu_offload``: diffusers model offload; None: the
    ``SPARKLE_I2V_CPU_OFFLOAD`` variable, else automatic (see :class:`WanI2V`). Raises ConfigError naming
    any missing path, before anything is loaded.
    """
    if options:
        raise ConfigError(f"unknown i2v option(s): {', '.join(sorted(options))}")
    if model_dir is None:
        raise ConfigError(f"the real i2v backend needs --model-dir: a local copy of {HUB_MODEL}")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"i2v model directory not found: {model_dir}")
    missing = [str(model_dir / p) for p in ("model_index.json", *MODEL_SUBFOLDERS) if not (model_dir / p).exists()]
    if missing:
        raise ConfigError(f"i2v model directory {model_dir} is incomplete ({HUB_MODEL} layout); missing: "
                          f"{', '.join(missing)}")
    if lora_dir is None:
        lora_dir = os.environ.get(LORA_DIR_ENV) or None
    if lora_dir is None and (model_dir / LORA_SUBFOLDER).is_dir():
        lora_dir = model_dir / LORA_SUBFOLDER
    if cpu_offload is None and os.environ.get(CPU_OFFLOAD_ENV, "").strip():
        cpu_offload = os.environ[CPU_OFFLOAD_ENV].strip().lower() in ("1", "true", "yes")
    loras = find_loras(Path(lora_dir)) if lora_dir is not None else None
    device = device or default_device()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    name = "wan2.2-i2v-a14b-lightx2v" + ("-lora" if loras else "")
    return WanI2V(lambda: load_pipeline(model_dir, loras, dtype), name=name, device=device, seed=seed,
                  cpu_offload=cpu_offload)
