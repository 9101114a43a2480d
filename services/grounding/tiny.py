"""``tiny`` grounding backend: the ``real`` backend's in-process path on a tiny random Qwen3-VL built in code.

Same classes as the real checkpoint (``Qwen3VLForConditionalGeneration``, ``Qwen3VLProcessor`` with
``Qwen2VLImageProcessor`` and ``Qwen3VLVideoProcessor``, a fast tokenizer with Qwen's special tokens and a
chat template), same prompt templates, same parser, greedy ``generate``. The weights are random (seed 0), so
the answers are meaningless text: the parser turns them into no round-1 objects and ``bbox_2d = []`` in
round 2, with the right shapes and labels. :func:`save_tiny_checkpoint` writes the model and processor with
``save_pretrained``, in the layout ``real.make_backend(model_dir=...)`` loads.
"""

from __future__ import annotations

from pathlib import Path

from .real import (CAMERA_MOTION_PROMPT, DESCRIBE_PROMPT, INSTRUCTION_PROMPT, ROUND1_PROMPT, ROUND2_PROMPT,
                   QwenGrounder, TransformersChat)

SEED = 0

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
"""Qwen2/Qwen3 control tokens; ``Qwen3VLProcessor`` looks up ``<|image_pad|>``, ``<|video_pad|>``,
``<|vision_start|>`` and ``<|vision_end|>`` (transformers ``processing_qwen3_vl.py``)."""

CHAT_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string %}{{ message['content'] }}{%- else %}"
    "{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif item['type'] == 'text' %}{{ item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
"""Qwen3-VL's ChatML layout (``<|im_start|>role\\n...<|im_end|>``, one ``<|image_pad|>`` per image that the
processor expands to the image's merged patch count), reduced to what the backend sends: user turns of
images and text."""

PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE = 16, 2, 2
"""Qwen3-VL's vision patching (``Qwen3VLVisionConfig`` defaults: patch 16, spatial merge 2, temporal 2)."""

IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 32 * 32, 128 * 128
"""Tiny resize bounds (the real processor allows up to 16.7 M pixels): a frame is at most 16 merged tokens."""

MAX_NEW_TOKENS = 12
"""Answer length of the tiny model (random text; a few tokens keep tests fast)."""


def _corpus() -> list[str]:
    """Text the tiny BPE tokenizer is trained on: the prompt templates and a grounding answer."""
    return [DESCRIBE_PROMPT, ROUND1_PROMPT, ROUND2_PROMPT, CAMERA_MOTION_PROMPT, INSTRUCTION_PROMPT,
            '```json\n[{"bbox_2d": [120, 48, 560, 990], "label": "person"}]\n```',
            '{"camera_motion": "no", "reason": "The background stays still."}']


def build_tiny_processor():
    """A ``Qwen3VLProcessor`` with a byte-level BPE tokenizer (about 400 tokens) trained in code, deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHAT_TEMPLATE)
    vision = dict(patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE,
                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                  size={"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS})
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**vision), tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(**vision), chat_template=CHAT_TEMPLATE)


def build_tiny_model(processor, head_dim: int = 16):
    """A random ``Qwen3VLForConditionalGeneration`` (about 0.15 M parameters, seed 0) matching ``processor``.

    Text: 2 layers, 2 heads (1 KV head) of ``head_dim`` (hidden ``2 x head_dim``), interleaved M-RoPE with
    ``mrope_section`` [head_dim/4, head_dim/8, head_dim/8] (halves of the head dim split over t, h, w as in
    Qwen3-VL's [24, 20, 20] for 128), theta 5e6. Vision: 2 blocks of 32, an 8x8 position grid, deepstack
    features from blocks 0 and 1. ``head_dim=32`` is the smallest vLLM's CPU attention runs (its kernels take
    32, 64, 80, ...): the model ``make test-vllm`` serves.
    """
    if head_dim % 8:
        raise ValueError(f"head_dim must be a multiple of 8, got {head_dim}")
    import torch
    from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = processor.tokenizer
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=2 * head_dim, intermediate_size=4 * head_dim,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim,
                         max_position_embeddings=32768,  # vLLM refuses a --max-model-len (16384) above it
                         rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                          "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH_SIZE,
                           spatial_merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE,
                           out_hidden_size=2 * head_dim, num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
        image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
        vision_start_token_id=processor.vision_start_token_id, vision_end_token_id=processor.vision_end_token_id)
    torch.manual_seed(SEED)
    model = Qwen3VLForConditionalGeneration(config).eval()
    # Sampling defaults as the Instruct checkpoints ship them, so that the backend's greedy override is exercised.
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.7, top_p=0.8, top_k=20, pad_token_id=tok.pad_token_id,
        eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id])
    return model


def build_tiny(head_dim: int = 16):
    """``(model, processor)``: the tiny Qwen3-VL (text heads of ``head_dim``) and its processor."""
    processor = build_tiny_processor()
    return build_tiny_model(processor, head_dim), processor


def make_backend(device: str | None = None, **options) -> QwenGrounder:
    """The real backend's in-process grounder on the tiny model (built in ``setup()``), CPU by default.

    ``max_new_tokens`` option: answer length (default 12).
    """
    engine = TransformersChat(build=build_tiny, device=device or "cpu",
                              max_new_tokens=int(options.get("max_new_tokens", MAX_NEW_TOKENS)))
    return QwenGrounder(engine, name="tiny-qwen3-vl")


def save_tiny_checkpoint(path: str | Path, head_dim: int = 16) -> Path:
    """Write the tiny model and processor to ``path`` (``save_pretrained``): ``config.json``,
    ``generation_config.json``, ``model.safetensors``, ``processor_config.json``, ``tokenizer.json``,
    ``tokenizer_config.json``, ``chat_template.jinja``. Returns ``path``. ``head_dim=32`` for vLLM's CPU build.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny(head_dim)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
