"""``tiny`` EditScore backend: the ``real`` backend's classes on a random-weight Qwen2.5-VL built in code.

Same model class (``Qwen2_5_VLForConditionalGeneration``), processor (``Qwen2_5_VLProcessor`` with
``Qwen2VLImageProcessor``, ``Qwen2VLVideoProcessor`` and a ``Qwen2Tokenizer``), prompts, template, parser and
formula as :mod:`sparkle.services.editscore.real`; only the sizes are tiny (text: 2 layers, width 32;
vision: 2 blocks, width 32; images resized to at most 6272 pixels = 8 merged tokens), the tokenizer's
merges are learnt in code from EditScore's prompts (:func:`build_tiny_tokenizer`), and the weights are
seeded with :data:`SEED`.

Random weights write random tokens, so answers are garbage: the parser then finds no valid pair of scores
and the score is the documented fallback (0 with ``[unparsable EditScore output: ...]`` in the reasoning);
by chance a garbage answer may hold exactly 2 numbers in 0..25, which are then scored as EditScore would.
``max_new_tokens`` is 32 instead of EditScore's 512 (random weights rarely end an answer, and 512 sampling
steps would make every test call take seconds); the other sampling parameters are EditScore's.

:func:`save_tiny_checkpoint` writes the real layout (``base/`` + ``lora/``) for ``real.make_backend``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .real import EditScoreScorer, QwenVLJudge, Sampling, default_device

SEED = 0
NAME = "editscore-tiny-random"
MAX_NEW_TOKENS = 32
"""Tiny answers' length (EditScore: 512); see the module docstring."""

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
"""Qwen2.5-VL's special tokens used by EditScore's template and the processor (added after the BPE vocabulary)."""

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2.5-VL-Instruct's chat template (images only); EditScore itself formats prompts with its own template."""


def build_tiny_tokenizer():
    """A ``Qwen2Tokenizer`` (Qwen's pre-tokenizer and byte-level BPE) with merges learnt in code.

    ``tokenizers``' ``BpeTrainer`` (deterministic) learns up to 768 tokens from EditScore's two prompts and
    the template's system line, so a prompt is about 300 tokens instead of 1,500 bytes (fast tests); any
    text still encodes (the 256 byte tokens are the initial alphabet). Then :data:`SPECIAL_TOKENS`.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from .real import editscore_prompts

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=768, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<img1>: "
    bpe.train_from_iterator([*editscore_prompts(), system], trainer=trainer)
    learnt = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=learnt["vocab"], merges=[tuple(m) for m in learnt["merges"]])
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer


def build_tiny_processor():
    """``Qwen2_5_VLProcessor``: :func:`build_tiny_tokenizer` + ``Qwen2VLImageProcessor`` (784..6272 pixels)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=2 * 56 * 56)
    video_processor = Qwen2VLVideoProcessor(min_pixels=28 * 28, max_pixels=2 * 56 * 56)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=build_tiny_tokenizer(),
                               video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def build_tiny_model(processor, seed: int = SEED, head_dim: int = 8):
    """A random ``Qwen2_5_VLForConditionalGeneration`` (about 0.15 M parameters) matching ``processor``.

    Text: 2 layers of 4 heads of ``head_dim`` (hidden ``4 x head_dim``), M-RoPE ``mrope_section``
    [head_dim/4, head_dim/8, head_dim/8]. ``head_dim=32`` (hidden 128) is what vLLM's CPU attention runs:
    the model ``make test-vllm`` serves.
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = processor.tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(processor.tokenizer), hidden_size=4 * head_dim, intermediate_size=8 * head_dim,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]},
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=4 * head_dim,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def make_backend(device=None, **options) -> EditScoreScorer:
    """The ``real`` backend's :class:`EditScoreScorer` on the tiny model, built in ``setup()`` on ``device``
    (default: CPU). Options as ``real.make_backend`` (sampling, ``name``, ``score_range``, ``max_batch``)."""
    dev = default_device(device or "cpu")
    sampling = Sampling(**{"max_new_tokens": MAX_NEW_TOKENS,
                           **{k: options.pop(k) for k in list(options) if k in Sampling.__dataclass_fields__}})

    def load():
        processor = build_tiny_processor()
        return build_tiny_model(processor).to(dev), processor

    return EditScoreScorer(QwenVLJudge(load, dev, sampling), **{"name": NAME, **options})


def save_tiny_checkpoint(path, lora: bool = True, head_dim: int = 8, merged: bool = False) -> Path:
    """Write the tiny model in ``real.make_backend(model_dir=path)``'s layout and return ``path``.

    ``path/base``: ``save_pretrained`` of the model and the processor; ``path/lora`` (if ``lora``): a peft LoRA
    (rank 4 on the text ``q_proj``/``v_proj``, random non-zero weights so merging changes the model).
    ``merged``: also write ``path/merged``, the LoRA merged in (``merge_and_unload``) with the processor: what
    ``vllm serve`` loads (``make test-vllm``, with ``head_dim=32``).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    path = Path(path)
    processor = build_tiny_processor()
    model = build_tiny_model(processor, head_dim=head_dim)
    model.save_pretrained(path / "base")
    processor.save_pretrained(path / "base")
    if lora:
        torch.manual_seed(SEED + 1)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        peft_model.save_pretrained(path / "lora")
        if merged:
            peft_model.merge_and_unload().save_pretrained(path / "merged")
            processor.save_pretrained(path / "merged")
    return path
