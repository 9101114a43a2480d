"""``tiny`` tracking backend: the ``real`` SAM3 tracker code on a tiny random-weight ``Sam3TrackerVideoModel``.

Same classes as production (``Sam3TrackerVideoModel``, ``Sam3TrackerVideoProcessor`` with a
``Sam3ImageProcessor`` and a ``Sam2VideoVideoProcessor``), built in code from a tiny config with a fixed
seed: 224 px input (patch 14, so a 16 x 16 token grid), a 2-layer ViT of width 64, hidden size 128 for
the FPN, prompt encoder, mask decoder, memory attention, memory encoder, mask downsampler and memory
fuser, 64 memory channels: about 1.95 M parameters. The masks it gives are meaningless; their shapes,
dtypes, count and the forward + backward propagation are those of the real backend. Runs on CPU.

``save_tiny_checkpoint(path)`` writes the tiny model and processor with ``save_pretrained`` (``config.json``,
``model.safetensors``, ``processor_config.json``): the layout ``real.make_backend(model_dir=path)`` loads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sparkle.errors import ConfigError

from .real import Sam3Tracker

SEED = 0
IMAGE_SIZE = 224
"""Input side in pixels (SAM3: 1008); a multiple of the patch size 14."""
HIDDEN = 128
"""FPN / decoder / memory width (SAM3: 256)."""
MEMORY_CHANNELS = 64
"""Memory-encoder output channels (SAM3: 64, kept)."""
NORMALISATION = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
"""The video processor's normalisation in facebook/sam3 (transformers ``convert_sam3_to_hf.py``)."""


def tiny_config():
    """A tiny ``Sam3TrackerVideoConfig`` (see the module docstring for the sizes)."""
    from transformers import Sam3TrackerVideoConfig

    vit = dict(model_type="sam3_vit_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=2, window_size=8, global_attn_indexes=[1], image_size=IMAGE_SIZE,
               pretrain_image_size=IMAGE_SIZE)
    return Sam3TrackerVideoConfig(
        vision_config=dict(model_type="sam3_vision_model", fpn_hidden_size=HIDDEN, backbone_config=vit),
        prompt_encoder_config=dict(hidden_size=HIDDEN),
        mask_decoder_config=dict(hidden_size=HIDDEN, mlp_dim=2 * HIDDEN, num_attention_heads=2,
                                 iou_head_hidden_dim=HIDDEN),
        memory_attention_hidden_size=HIDDEN, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=2 * HIDDEN,
        memory_encoder_hidden_size=HIDDEN, memory_encoder_output_channels=MEMORY_CHANNELS,
        mask_downsampler_embed_dim=HIDDEN, memory_fuser_embed_dim=HIDDEN,
        memory_fuser_intermediate_dim=2 * HIDDEN, memory_fuser_num_layers=1,
        image_size=IMAGE_SIZE,
    )


def tiny_processor():
    """``Sam3TrackerVideoProcessor`` at 224 px, normalised as facebook/sam3's (mean 0.5, std 0.5)."""
    from transformers import Sam3ImageProcessor, Sam3TrackerVideoProcessor
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return Sam3TrackerVideoProcessor(image_processor=Sam3ImageProcessor(size=size, **NORMALISATION),
                                     video_processor=Sam2VideoVideoProcessor(size=size, **NORMALISATION))


def build_tiny() -> tuple:
    """``(Sam3TrackerVideoModel, Sam3TrackerVideoProcessor)`` with weights drawn from seed ``SEED``.

    The global torch RNG is left as it was.
    """
    from transformers import Sam3TrackerVideoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Sam3TrackerVideoModel(tiny_config()).eval()
    return model, tiny_processor()


def make_backend(device: str | None = None, cache_vision_features: bool = True, **options) -> Sam3Tracker:
    """The SAM3 tracker on the tiny model, on CPU unless ``device`` says otherwise (float32)."""
    if "model_dir" in options:
        raise ConfigError("the tiny tracking backend builds its model in code and takes no --model-dir")
    if options:
        raise ConfigError(f"unknown tracking option(s): {', '.join(sorted(options))}")
    return Sam3Tracker(build_tiny, device=device or "cpu", dtype=torch.float32,
                       cache_vision_features=cache_vision_features, name="sam3-tracker-video-tiny")


def save_tiny_checkpoint(path: str | Path) -> Path:
    """Write the tiny model and processor to ``path`` (``save_pretrained``) and return it."""
    path = Path(path)
    model, processor = build_tiny()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_tiny_hub_checkpoint(path: str | Path) -> Path:
    """Write the tiny tracker in ``facebook/sam3``'s hub layout and return ``path``.

    ``config.json``: a ``Sam3VideoConfig`` (model_type ``sam3_video``, the default detector config) whose
    ``tracker_config`` is :func:`tiny_config`; ``model.safetensors``: the tracker's weights under the hub's
    names (``detector_model.vision_encoder.backbone.*`` for the ViT the detector and tracker share,
    ``tracker_neck.*`` for the tracker's FPN neck, ``tracker_model.*`` for the rest) plus a detector-only
    tensor the tracker must skip; the processor config as ``save_pretrained`` writes it.
    """
    from safetensors.torch import save_file
    from transformers import Sam3VideoConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny()
    Sam3VideoConfig(tracker_config=tiny_config().to_dict()).save_pretrained(path)
    tensors = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision_encoder.backbone."):
            tensors[f"detector_model.{key}"] = value
        elif key.startswith("vision_encoder.neck."):
            tensors["tracker_neck." + key.removeprefix("vision_encoder.neck.")] = value
        else:
            tensors[f"tracker_model.{key}"] = value
    tensors["detector_model.detr_decoder.layers.0.self_attn.q_proj.weight"] = torch.zeros(4, 4)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    processor.save_pretrained(path)
    return path
