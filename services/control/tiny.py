"""``tiny`` control-synthesis backend: the ``real`` backend on random-weight miniatures of the same classes.

Same diffsynth ``WanVideoPipeline``, ``WanModel`` experts (Fun-Control structure: 52 input channels, reference
conv, no CLIP), ``WanVideoVAE``, ``WanTextEncoder`` and ``T5Tokenizer`` (wrapped by diffsynth's
``HuggingfaceTokenizer``), built in code from tiny configs with a fixed seed: no download, deterministic, on
the CPU by default. The sampler is the real one (50 steps, guidance 6.0, shift 5, boundary 0.900, seed 43,
the Wan negative prompt); the pixels mean nothing, the shapes and the conditioning paths are the real ones.

:func:`save_tiny_checkpoint` writes these weights in the layout ``real.make_backend(model_dir=...)`` loads
(with a ``sparkle_architecture.json`` giving the tiny sizes), so the production loader is tested offline.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffsynth.models.wan_video_dit import WanModel
from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer, WanTextEncoder
from diffsynth.pipelines.wan_video import WanVideoPipeline
from safetensors.torch import save_file
from transformers import T5Tokenizer

from . import real

SEED = 0
"""``torch.manual_seed`` before the models are built: the tiny weights are the same in every process."""

TINY_WORDS = ("a person man woman child walking juggling standing street park city beach snow mountain village "
              "forest night sunset background replace with the in on of and at dusk").split()
"""The tiny tokenizer's words; anything else falls back to single letters or ``<unk>``."""

TINY_VOCAB = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
              + [("▁" + w, -3.0) for w in TINY_WORDS] + [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz"])
"""Unigram vocabulary ``(piece, log-probability)`` in T5's order: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2."""

TINY_ARCHITECTURE = {
    # Fun-Control structure (in_dim 52 = 16 noise + 16 control + 4 mask + 16 image, ref conv, no CLIP);
    # head_dim 32 splits into the 3D RoPE as 12 + 10 + 10 (Wan needs head_dim - 2 * (head_dim // 3) even).
    "dit": {"has_image_input": False, "patch_size": [1, 2, 2], "in_dim": 52, "dim": 64, "ffn_dim": 128,
            "freq_dim": 256, "text_dim": 32, "out_dim": 16, "num_heads": 2, "num_layers": 2, "eps": 1e-06,
            "has_ref_conv": True, "require_clip_embedding": False},
    "vae": {"z_dim": 16, "dim": 8},
    "text_encoder": {"vocab": len(TINY_VOCAB), "dim": 32, "dim_attn": 32, "dim_ffn": 64, "num_heads": 2,
                     "num_layers": 2, "num_buckets": 32, "shared_pos": False},
}
"""Constructor arguments of the tiny models (``real.ARCHITECTURE`` has the A14B's)."""


def tiny_tokenizer() -> T5Tokenizer:
    """A T5 (Unigram) tokenizer over :data:`TINY_VOCAB`, like UMT5's but with a few dozen pieces and no sentinel ids."""
    return T5Tokenizer(vocab=list(TINY_VOCAB), extra_ids=0)


def tiny_models() -> dict[str, torch.nn.Module]:
    """``high_noise_model``, ``low_noise_model`` (``WanModel``), ``vae`` (``WanVideoVAE``) and ``text_encoder``
    (``WanTextEncoder``), float32, random weights from seed :data:`SEED`."""
    torch.manual_seed(SEED)
    arch = TINY_ARCHITECTURE
    return {
        "high_noise_model": WanModel(**arch["dit"]).eval(),
        "low_noise_model": WanModel(**arch["dit"]).eval(),
        "vae": real.wan_video_vae(**arch["vae"]).eval(),
        "text_encoder": WanTextEncoder(**arch["text_encoder"]).eval(),
    }


_tokenizer_folder: Path | None = None


def _tokenizer_dir() -> Path:
    """The tiny tokenizer saved once per process (diffsynth's ``HuggingfaceTokenizer`` loads from a folder)."""
    global _tokenizer_folder
    if _tokenizer_folder is None:
        _tokenizer_folder = Path(tempfile.mkdtemp(prefix="sparkle-control-tiny-tokenizer-"))
        tiny_tokenizer().save_pretrained(_tokenizer_folder)
    return _tokenizer_folder


def build_pipeline(device: str = "cpu") -> WanVideoPipeline:
    """The tiny ``WanVideoPipeline`` (float32) on ``device``, wired like ``real.load_pipeline``."""
    models = tiny_models()
    pipe = WanVideoPipeline(device=device, torch_dtype=torch.float32)
    pipe.dit = models["high_noise_model"].to(device)
    pipe.dit2 = models["low_noise_model"].to(device)
    pipe.vae = models["vae"].to(device)
    pipe.text_encoder = models["text_encoder"].to(device)
    pipe.tokenizer = HuggingfaceTokenizer(name=str(_tokenizer_dir()), seq_len=real.TOKENIZER_SEQ_LEN,
                                          clean="whitespace")
    pipe.height_division_factor = pipe.width_division_factor = pipe.vae.upsampling_factor * 2
    return pipe


def make_backend(device: str | None = None, **options) -> real.FunControlSynthesizer:
    """The ``real`` backend class on the tiny pipeline (CPU unless ``device`` says otherwise)."""
    device = device or "cpu"
    return real.FunControlSynthesizer(lambda: build_pipeline(device), name="tiny-wan2.2-fun-control", **options)


def save_tiny_checkpoint(path: str | Path) -> Path:
    """Write the tiny weights in the ``--model-dir`` layout of ``real`` (float32); returns ``path``.

    ``{high,low}_noise_model/diffusion_pytorch_model.safetensors``, ``Wan2.1_VAE.pth`` (``VideoVAE_`` keys,
    as in the hub file), ``models_t5_umt5-xxl-enc-bf16.pth``, ``google/umt5-xxl/`` and
    ``sparkle_architecture.json`` (the tiny sizes).
    """
    root = Path(path)
    models = tiny_models()
    for name in ("high_noise_model", "low_noise_model"):
        (root / name).mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in models[name].state_dict().items()}
        save_file(state, str(root / name / "diffusion_pytorch_model.safetensors"))
    torch.save(models["vae"].model.state_dict(), root / real.VAE_FILE)
    torch.save(models["text_encoder"].state_dict(), root / real.TEXT_ENCODER_FILE)
    tiny_tokenizer().save_pretrained(root / real.TOKENIZER_DIR)
    (root / real.ARCHITECTURE_FILE).write_text(json.dumps(TINY_ARCHITECTURE, indent=2))
    return root
