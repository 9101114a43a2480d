"""``tiny`` I2V backend: the ``real`` backend's class on tiny random-weight Wan2.2-I2V-A14B components.

The same ``WanImageToVideoPipeline`` layout as ``Wan-AI/Wan2.2-I2V-A14B-Diffusers`` (two experts with
``boundary_ratio = 0.9``, a UMT5 text encoder, no CLIP image encoder), each component built in code with the
sizes of diffusers' own fast test of that layout (``tests/pipelines/wan/test_wan_22_image_to_video.py``:
2 heads x 12 dims, 2 layers, ``in_channels = 36`` = 16 noise + 4 mask + 16 image latent channels, VAE
``base_dim = 3``, ``z_dim = 16``), seeded with 0. The tokenizer is a T5 Unigram tokenizer over a small
letter vocabulary, made with ``tokenizers`` (none can be downloaded). The pixels mean nothing; shapes,
dtypes, the schedule and the expert switch are the real ones. CPU by default: 17 frames at 112x208 take
well under a second.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

from .real import BOUNDARY_RATIO, WanI2V, make_scheduler

SEED = 0
TEXT_DIM = 32
"""Width of the tiny UMT5 encoder's output = the transformer's ``text_dim`` (4096 for umt5-xxl)."""


def make_tokenizer() -> T5Tokenizer:
    """A T5 (Unigram, SentencePiece-style ``▁`` word starts) tokenizer: specials, ``▁``, letters, digits."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,'-"]
    pieces += [("▁" + c, -2.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def make_transformer() -> WanTransformer3DModel:
    """One tiny expert (the diffusers fast-test config); ``image_dim=None`` as in Wan2.2 (no CLIP)."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def make_pipeline() -> WanImageToVideoPipeline:
    """The tiny two-expert pipeline on CPU in float32, deterministic (seed 0 before each component)."""
    tokenizer = make_tokenizer()
    torch.manual_seed(SEED)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(SEED)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0))
    torch.manual_seed(SEED)
    transformer = make_transformer()
    torch.manual_seed(SEED + 1)
    transformer_2 = make_transformer()
    return WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(), scheduler=make_scheduler(),
        transformer=transformer.eval(), transformer_2=transformer_2.eval(), image_encoder=None,
        image_processor=None, boundary_ratio=BOUNDARY_RATIO)


def make_backend(device: str | None = None, seed: int = 0, **options) -> WanI2V:
    """The ``real`` backend class on the tiny pipeline; CPU unless ``device`` says otherwise.

    Other ``options`` (e.g. a ``model_dir`` given to every backend) are ignored: nothing is read from disk.
    """
    return WanI2V(make_pipeline, name="tiny-wan2.2-i2v-a14b-lightx2v", device=device or "cpu", seed=seed,
                  cpu_offload=False)


def save_tiny_checkpoint(path: str | Path) -> Path:
    """Write the tiny pipeline in the hub layout ``real.make_backend(model_dir=path)`` loads.

    ``model_index.json``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``, ``transformer/``,
    ``transformer_2/``, ``vae/`` (safetensors). The scheduler is saved as the stock
    ``FlowMatchEulerDiscreteScheduler`` (the real loader installs its own anyway).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = Path(path)
    pipe = make_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(path)
    return path


def save_tiny_loras(path: str | Path, rank: int = 2) -> Path:
    """Write two tiny random LoRAs for the tiny experts, named like LightX2V's, into ``path``.

    ``wan2.2_i2v_A14b_high_noise_lora_rank{rank}_lightx2v_4step.safetensors`` and ``..._low_noise_...``,
    in diffusers' Wan LoRA format (``transformer.blocks.N.attn1.to_q.lora_A.weight``...), so that the real
    loader's ``load_lora_weights`` path (``load_into_transformer_2=True`` for the low-noise one) runs offline.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for i, kind in enumerate(("high_noise", "low_noise")):
        torch.manual_seed(SEED + 10 + i)
        transformer = make_transformer()
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        WanImageToVideoPipeline.save_lora_weights(
            path, transformer_lora_layers=get_peft_model_state_dict(transformer),
            weight_name=f"wan2.2_i2v_A14b_{kind}_lora_rank{rank}_lightx2v_4step.safetensors")
    return path


def save_tiny_lightx2v_lora(path: str | Path, kind: str = "high_noise", rank: int = 2,
                            extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a tiny LoRA for :func:`make_transformer` in LightX2V's own (Wan) key format and return its file.

    Keys as in ``lightx2v/Wan2.2-Distill-Loras``: ``diffusion_model.blocks.N.{self_attn,cross_attn}.{q,k,v,o}``
    ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` and ``.diff_b`` (bias deltas), plus the
    full-tensor deltas diffusers' converter drops: ``blocks.N.norm3.diff`` / ``.diff_b`` (non-zero),
    ``blocks.N.self_attn.norm_q.diff`` (all zero, as most of them are), ``blocks.N.modulation.diff`` and
    ``head.modulation.diff``. ``extra``: more keys (without the ``diffusion_model.`` prefix). Seeded.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(SEED + 20)
    dim = 2 * 12  # num_attention_heads x attention_head_dim of make_transformer()
    tensors: dict[str, torch.Tensor] = {}
    for i in range(2):
        for attn in ("self_attn", "cross_attn"):
            for o in "qkvo":
                base = f"blocks.{i}.{attn}.{o}"
                tensors[f"{base}.lora_down.weight"] = torch.randn(rank, dim, generator=g) * 0.1
                tensors[f"{base}.lora_up.weight"] = torch.randn(dim, rank, generator=g) * 0.1
                tensors[f"{base}.alpha"] = torch.tensor(float(rank))
                tensors[f"{base}.diff_b"] = torch.randn(dim, generator=g) * 0.01
        tensors[f"blocks.{i}.norm3.diff"] = torch.randn(dim, generator=g) * 0.05
        tensors[f"blocks.{i}.norm3.diff_b"] = torch.randn(dim, generator=g) * 0.05
        tensors[f"blocks.{i}.self_attn.norm_q.diff"] = torch.zeros(dim)
        tensors[f"blocks.{i}.modulation.diff"] = torch.randn(1, 6, dim, generator=g) * 0.05
    tensors["head.modulation.diff"] = torch.randn(1, 2, dim, generator=g) * 0.05
    tensors.update(extra or {})
    out = path / f"wan2.2_i2v_A14b_{kind}_lora_rank{rank}_lightx2v_4step_1022.safetensors"
    save_file({f"diffusion_model.{k}": v.contiguous() for k, v in tensors.items()}, str(out))
    return out

