"""``tiny`` image-editing backend: the ``real`` editor on a random-weight, few-kilobyte ``Flux2KleinPipeline``.

Same classes as FLUX.2-klein-9B (``Flux2Transformer2DModel``, ``AutoencoderKLFlux2``, ``Qwen3ForCausalLM``,
``Qwen2Tokenizer`` with a Qwen3 chat template, ``FlowMatchEulerDiscreteScheduler``), built in code from tiny
configs with seed :data:`SEED`, on CPU by default. What the tiny pipeline keeps from the real one, so that the
real call path runs unchanged:

- the VAE has 4 blocks, so pixels map to latents by 8 and model sides are multiples of 16, as in the real VAE;
- the text encoder has :data:`TEXT_LAYERS` layers so that the pipeline's default hidden-state layers
  ``(9, 18, 27)`` exist, and the transformer's ``joint_attention_dim`` is 3 x its hidden size (the 3 stacked
  layers); prompts are padded to the pipeline's 512 tokens;
- the tokenizer applies a chat template that renders one user message like Qwen3's with
  ``enable_thinking=False`` (``<|im_start|>user ... <|im_end|> <|im_start|>assistant <think></think>``);
- ``is_distilled=True``, like the step-distilled klein checkpoints, and the scheduler uses dynamic shifting
  (the pipeline passes ``mu`` from ``compute_empirical_mu``).

The tokenizer is byte-level BPE with no merges (one token per UTF-8 byte), so any text is encodable and
different prompts give different token ids. Outputs are meaningless pixels of the right shape and dtype.
"""

from __future__ import annotations

from pathlib import Path

from sparkle.errors import ConfigError

from .real import DEFAULT_SEED, Flux2KleinEditor

SEED = 0
"""Seed of every tiny weight (``torch.manual_seed`` before each component)."""

TEXT_LAYERS = 28
"""Tiny Qwen3 layers: index 27 of ``hidden_states`` (embeddings + one per layer) must exist."""

TEXT_HIDDEN = 16
"""Tiny Qwen3 hidden size; the transformer's ``joint_attention_dim`` is ``3 * TEXT_HIDDEN``."""

QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
"""Renders plain messages as Qwen3's template does (the pipeline calls it with ``enable_thinking=False``)."""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def tiny_tokenizer():
    """A ``Qwen2Tokenizer`` (= ``Qwen2TokenizerFast``): byte-level BPE over the 256 byte symbols, no merges."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {"<|endoftext|>": 0}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], chat_template=QWEN3_CHAT_TEMPLATE,
                               model_max_length=512)
    tokenizer.add_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS[1:]])
    return tokenizer


def tiny_pipeline():
    """A ``Flux2KleinPipeline`` of tiny random-weight components (float32, CPU), deterministic for :data:`SEED`."""
    import torch
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=32,
        num_hidden_layers=TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=512, pad_token_id=0, eos_token_id=0,
    )).eval()
    torch.manual_seed(SEED)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=64,
    ).eval()
    torch.manual_seed(SEED)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * 4,  # latent_channels x the 2x2 patchify
        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * TEXT_HIDDEN, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=True)


def make_backend(device: str | None = None, seed: int = DEFAULT_SEED, **options) -> Flux2KleinEditor:
    """The ``real`` editor class on :func:`tiny_pipeline` (CPU by default; ``seed``: the latent-noise seed).

    Raises ConfigError for other options (the tiny backend has no checkpoint: no ``model_dir``).
    """
    if options:
        raise ConfigError(f"unknown image_edit tiny option(s): {', '.join(sorted(options))}")
    device = device or "cpu"

    def load(device: str):
        return tiny_pipeline().to(device)

    return Flux2KleinEditor(load, device, name="flux2-klein-tiny", seed=seed)


def save_tiny_checkpoint(path) -> Path:
    """Write :func:`tiny_pipeline` with ``save_pretrained`` (the diffusers layout ``real.make_backend`` loads)."""
    path = Path(path)
    tiny_pipeline().save_pretrained(path)
    return path


__all__ = ["make_backend", "save_tiny_checkpoint", "tiny_pipeline", "tiny_tokenizer"]
