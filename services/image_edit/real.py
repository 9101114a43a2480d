"""``real`` image-editing backend: FLUX.2 [klein] 9B through diffusers' ``Flux2KleinPipeline``.

Checkpoint: ``black-forest-labs/FLUX.2-klein-9B`` (diffusers layout: ``model_index.json`` plus the
``transformer`` (:class:`~diffusers.Flux2Transformer2DModel`), ``vae`` (:class:`~diffusers.AutoencoderKLFlux2`),
``text_encoder`` (``transformers.Qwen3ForCausalLM``, Qwen3-8B), ``tokenizer`` (``Qwen2TokenizerFast``, which is
``Qwen2Tokenizer`` in transformers 5) and ``scheduler`` (:class:`~diffusers.FlowMatchEulerDiscreteScheduler`)
folders), loaded from a local directory only (``local_files_only=True``; nothing is downloaded).

Both operations are single-reference edits: the input image is passed as the pipeline's ``image`` (the
conditioning image, encoded by the VAE and appended to the transformer's tokens), the prompt says what to
change, and the output has the conditioning image's size.

- ``edit_background``: prompt = the user's instruction + :data:`KEEP_FOREGROUND` (keep the subject unchanged).
- ``remove_foreground``: prompt = :data:`REMOVAL_PROMPT` over the labels of the grounded objects that have a box.

Sampling parameters (:data:`NUM_INFERENCE_STEPS` = 4, :data:`GUIDANCE_SCALE` = 1.0) are those of the model
card of the step-distilled FLUX.2-klein-9B; the pipeline's own defaults (50 steps, guidance 4.0) are for the
``-base`` checkpoints. Images are resized to multiples of :data:`SIZE_MULTIPLE` px for the model and back to
the input size afterwards (no resize happens for conformed frames, whose sides are already multiples of 16).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from sparkle.backends import GroundedObject, SampleContext
from sparkle.boxes import to_pixels
from sparkle.errors import ConfigError, InputError

HUB_ID = "black-forest-labs/FLUX.2-klein-9B"
"""The production checkpoint (Hugging Face hub name); ``--model-dir`` is a local copy of it."""

NUM_INFERENCE_STEPS = 4
"""Denoising steps: FLUX.2-klein-9B is step-distilled to 4 steps (model card)."""

GUIDANCE_SCALE = 1.0
"""Guidance 1.0 (model card): no classifier-free guidance pass (``Flux2KleinPipeline.do_classifier_free_guidance``
is ``guidance_scale > 1 and not is_distilled``)."""

SIZE_MULTIPLE = 16
"""Model sides are multiples of 16 px: VAE downsampling 8 (``2 ** (len(block_out_channels) - 1)``) times the 2x2
latent patchify (``Flux2KleinPipeline.image_processor`` uses ``vae_scale_factor * 2``)."""

MIN_SIDE = 64
"""``Flux2ImageProcessor.check_image_input`` refuses conditioning images with a side under 64 px."""

MAX_ASPECT = 8.0
"""``Flux2ImageProcessor.check_image_input`` refuses aspect ratios beyond 8:1."""

MAX_AREA = 1024 * 1024
"""The pipeline shrinks conditioning images above 1024 x 1024 px of area; we shrink before it does."""

KEEP_FOREGROUND = (" Keep the foreground subjects exactly as they are (same identity, pose, position, size and"
                   " appearance); change only the background.")
"""Appended to the user's instruction in ``edit_background`` (the pipeline's stage 2 keeps the foreground)."""

REMOVAL_PROMPT = ("Remove {labels} from the image, leaving only the background. Fill the erased areas with the"
                  " surrounding scene so that no trace of them remains; change nothing else.")
"""``remove_foreground`` prompt; its first sentence is the orchestrator's ``REMOVAL_INSTRUCTION`` (the one
EditScore judges the clean plate against)."""

DEFAULT_SEED = 0
"""Seed of the initial latent noise, so that one (image, prompt) pair always gives the same edit."""


def model_size(width: int, height: int) -> tuple[int, int]:
    """The ``(width, height)`` in pixels the model runs at for a ``width x height`` input.

    Area capped at :data:`MAX_AREA` (aspect kept), each side rounded to the nearest multiple of
    :data:`SIZE_MULTIPLE` and at least :data:`MIN_SIDE`. Raises InputError for aspect ratios beyond
    :data:`MAX_ASPECT`, which the pipeline refuses.
    """
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise InputError(f"image {width}x{height} is more elongated than {MAX_ASPECT:g}:1, which FLUX.2 refuses")
    scale = min(1.0, math.sqrt(MAX_AREA / (width * height)))

    def side(v: int) -> int:
        return max(MIN_SIDE, int(round(v * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE)

    return side(width), side(height)


def removal_prompt(objects: list[GroundedObject], width: int, height: int) -> str | None:
    """:data:`REMOVAL_PROMPT` over the distinct labels of ``objects`` whose 0..1000 box is valid; None if none."""
    labels = []
    for o in objects:
        if to_pixels(o.bbox_2d, width, height) is not None and o.label.strip() and o.label.strip() not in labels:
            labels.append(o.label.strip())
    if not labels:
        return None
    return REMOVAL_PROMPT.format(labels=", ".join(labels))


class Flux2KleinEditor:
    """:class:`~sparkle.backends.ImageEditor` on a ``Flux2KleinPipeline``.

    ``load_pipeline(device)`` returns the pipeline placed on ``device`` (called once by ``setup``). Images in and
    out are ``(H, W, 3) uint8`` RGB of the same size.
    """

    def __init__(self, load_pipeline: Callable[[str], object], device: str, name: str = "flux2-klein-9b",
                 seed: int = DEFAULT_SEED):
        self.name = name
        self.device = device
        self.seed = seed
        self._load_pipeline = load_pipeline
        self.pipe = None

    def setup(self) -> None:
        """Load the pipeline onto ``self.device`` (once)."""
        if self.pipe is None:
            self.pipe = self._load_pipeline(self.device)
            self.pipe.set_progress_bar_config(disable=True)

    def edit(self, image: np.ndarray, prompt: str) -> np.ndarray:
        """Run the pipeline on ``(H, W, 3) uint8`` ``image`` with ``prompt``; returns ``(H, W, 3) uint8``.

        The image is resized to :func:`model_size` (bicubic) and passed as the conditioning ``image``; the output
        (``output_type="np"``: floats in 0..1) is quantised to uint8 and resized back to ``W x H`` if needed.
        """
        import torch

        if self.pipe is None:
            raise RuntimeError("setup() was not called")
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        h, w = image.shape[:2]
        mw, mh = model_size(w, h)
        reference = Image.fromarray(image)
        if (mw, mh) != (w, h):
            reference = reference.resize((mw, mh), Image.Resampling.BICUBIC)
        generator = torch.Generator("cpu").manual_seed(self.seed)
        out = self.pipe(
            image=reference,
            prompt=prompt,
            height=mh,
            width=mw,
            num_inference_steps=NUM_INFERENCE_STEPS,
            guidance_scale=GUIDANCE_SCALE,
            generator=generator,
            output_type="np",
        ).images[0]
        edited = (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        if edited.shape[:2] != (h, w):
            edited = np.asarray(Image.fromarray(edited).resize((w, h), Image.Resampling.BICUBIC))
        return np.ascontiguousarray(edited)

    def edit_background(self, ctx: SampleContext, image: np.ndarray, instruction: str) -> np.ndarray:
        """Replace the background of ``(H, W, 3) uint8`` ``image`` as instructed; same size out."""
        return self.edit(image, instruction.strip() + KEEP_FOREGROUND)

    def remove_foreground(self, ctx: SampleContext, image: np.ndarray,
                          objects: list[GroundedObject]) -> np.ndarray:
        """Erase ``objects`` (labels, 0..1000 boxes) from ``image``: the clean plate ``(H, W, 3) uint8``.

        The model takes no boxes: the labels of the objects with a valid box go into the prompt. With no such
        object there is nothing to erase and a copy of ``image`` is returned.
        """
        prompt = removal_prompt(objects, image.shape[1], image.shape[0])
        if prompt is None:
            return image.copy()
        return self.edit(image, prompt)


def default_device() -> str:
    """``"cuda"`` when available, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_model_dir(model_dir) -> Path:
    """The checkpoint directory as a Path; ConfigError naming what is missing (dir, model_index.json, subfolders)."""
    if model_dir is None or str(model_dir).strip() == "":
        raise ConfigError(f"image_edit real backend needs --model-dir: a local copy of {HUB_ID} (diffusers layout)")
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise ConfigError(f"image_edit model directory not found: {path} (expected a local copy of {HUB_ID})")
    index = path / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"image_edit model directory has no model_index.json: {index} "
                          f"(expected the diffusers layout of {HUB_ID})")
    try:
        components = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"unreadable {index}: {exc}") from exc
    if components.get("_class_name") != "Flux2KleinPipeline":
        raise ConfigError(f"{index} is for {components.get('_class_name')!r}, not Flux2KleinPipeline")
    missing = [str(path / k) for k, v in components.items()
               if not k.startswith("_") and isinstance(v, list) and v[0] is not None and not (path / k).is_dir()]
    if missing:
        raise ConfigError(f"image_edit model directory is incomplete, missing: {', '.join(missing)}")
    return path


CPU_OFFLOAD_ENV = "SPARKLE_IMAGE_EDIT_CPU_OFFLOAD"
"""Set to ``1`` to enable model CPU offload when ``cpu_offload`` is not passed (``sparkle serve`` passes only
``model_dir`` and ``device``)."""


def make_backend(model_dir=None, device: str | None = None, cpu_offload: bool | None = None,
                 seed: int = DEFAULT_SEED, **options) -> Flux2KleinEditor:
    """The production editor on the local checkpoint ``model_dir`` (checked now, loaded in ``setup``).

    Weights load in bfloat16 on CUDA and float32 on CPU. ``cpu_offload=True`` (default: the
    :data:`CPU_OFFLOAD_ENV` variable) keeps only the running component on the GPU
    (``enable_model_cpu_offload``), for GPUs under ~40 GB. Raises ConfigError for a missing or incomplete
    ``model_dir`` or unknown options.
    """
    if options:
        raise ConfigError(f"unknown image_edit real option(s): {', '.join(sorted(options))}")
    path = check_model_dir(model_dir)
    device = device or default_device()
    if cpu_offload is None:
        cpu_offload = os.environ.get(CPU_OFFLOAD_ENV, "").strip().lower() in ("1", "true", "yes")

    def load(device: str):
        import torch
        from diffusers import Flux2KleinPipeline

        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        # ``dtype`` (diffusers 0.42 renamed ``torch_dtype``, which still works with a deprecation warning)
        pipe = Flux2KleinPipeline.from_pretrained(path, local_files_only=True, dtype=dtype)
        if cpu_offload and str(device).startswith("cuda"):
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        return pipe

    return Flux2KleinEditor(load, device, name="flux2-klein-9b", seed=seed)
