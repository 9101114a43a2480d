"""``real`` tracking backend: SAM3's tracker (transformers ``Sam3TrackerVideoModel`` + ``Sam3TrackerVideoProcessor``).

One BAIT pass per anchor, in anchor order. A pass seeds every box of the anchor (one SAM3 object id per
box; round-2 grounding gives one box per label) on ``anchor.frame_index`` with
``Sam3TrackerVideoProcessor.add_inputs_to_inference_session(input_boxes=...)``, then runs
``Sam3TrackerVideoModel.propagate_in_video_iterator`` forward from the anchor to the last frame and with
``reverse=True`` from the anchor back to frame 0. Each frame's mask logits are resized to the video's
``(H, W)`` by ``post_process_masks`` and thresholded at 0 (the processor's default ``mask_threshold``);
the pass mask is the union over the anchor's objects.

The video is preprocessed once per ``track`` call (``init_video_session``) and the inference session is
reset between passes with ``reset_tracking_data()``, which drops the objects, prompts and memories but
keeps the processed frames and the vision-feature cache, so that with ``cache_vision_features=True`` the
image encoder runs once per frame for all passes instead of once per frame and pass.

Pixel normalisation is the checkpoint's processor config (``processor_config.json``). For
``facebook/sam3`` the conversion script (transformers ``convert_sam3_to_hf.py``) writes a
``Sam2VideoVideoProcessor`` resizing every frame (no aspect-ratio preservation, no padding) to
1008 x 1008 bilinear, rescaling by 1/255 and normalising with mean 0.5 / std 0.5 (values in [-1, 1]),
the same as ``Sam3ImageProcessor``'s defaults (``IMAGENET_STANDARD_MEAN/STD``). Boxes are given in
pixels of the original video and scaled by the processor to its ``target_size`` (1008).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from sparkle.backends import Anchor, SampleContext
from sparkle.errors import ConfigError, InputError

HUB_ID = "facebook/sam3"
"""The checkpoint ``--model-dir`` holds: ``config.json`` (model_type ``sam3_video``; the model reads its
``tracker_config``), ``model.safetensors`` (the ViT is stored under the detector and renamed on load by
transformers' ``conversion_mapping``; the rest of the detector is skipped) and ``processor_config.json``."""

MASK_THRESHOLD = 0.0
"""Mask logits above this are foreground: ``post_process_masks``' default ``mask_threshold``."""

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def default_device() -> str:
    """``"cuda"`` if a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``None``: bfloat16 on CUDA (the transformers SAM3 tracker-video example), float32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype {dtype!r} is not one of float32, bfloat16, float16")
    return getattr(torch, dtype)


class Sam3Tracker:
    """The SAM3 tracker as a :class:`sparkle.backends.Tracker`.

    ``load`` returns ``(Sam3TrackerVideoModel, Sam3TrackerVideoProcessor)``; it runs once, in ``setup()``,
    and the model is then moved to ``device`` in ``dtype``. ``cache_vision_features``: keep every frame's
    image features during a ``track`` call (about 66 MB per frame in bfloat16 at 1008 px: 5.3 M feature
    values plus 27.9 M position-encoding values), so the image encoder runs once per frame rather than
    once per frame and pass; ``False`` keeps one frame (the transformers default).
    """

    def __init__(self, load: Callable[[], tuple], device: str | None = None, dtype: str | torch.dtype | None = None,
                 cache_vision_features: bool = True, name: str = "sam3-tracker-video"):
        self.name = name
        self._load = load
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.cache_vision_features = cache_vision_features
        self.model = None
        self.processor = None

    def setup(self) -> None:
        """Load the model and processor once and move the model to ``device`` / ``dtype`` in eval mode."""
        if self.model is not None:
            return
        model, processor = self._load()
        self.model = model.to(self.device, dtype=self.dtype).eval()
        self.processor = processor

    def track(self, ctx: SampleContext, frames: np.ndarray, anchors: list[Anchor]) -> Iterator[np.ndarray]:
        """Yield one ``(T, H, W) bool`` mask per anchor, in anchor order (union over the anchor's boxes).

        ``frames``: ``(T, H, W, 3) uint8`` RGB. Boxes are ``(x1, y1, x2, y2)`` pixels of ``frames``.
        Raises InputError for an anchor frame outside ``0..T-1`` or an anchor without a box.
        """
        if self.model is None:
            raise RuntimeError(f"{self.name}: setup() was not called")
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise InputError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
        t = frames.shape[0]
        for a in anchors:
            if not 0 <= a.frame_index < t:
                raise InputError(f"anchor frame {a.frame_index} outside 0..{t - 1}")
            if not a.boxes:
                raise InputError(f"anchor frame {a.frame_index} has no box")
        return self._passes(frames, anchors)

    def _passes(self, frames: np.ndarray, anchors: list[Anchor]) -> Iterator[np.ndarray]:
        session = self.processor.init_video_session(
            video=frames, inference_device=self.device, dtype=self.dtype,
            max_vision_features_cache_size=len(frames) if self.cache_vision_features else 1)
        for anchor in anchors:
            session.reset_tracking_data()  # objects, prompts and memories; keeps frames and feature cache
            yield self._pass(session, anchor, frames.shape[:3])

    @torch.inference_mode()
    def _pass(self, session, anchor: Anchor, shape: tuple[int, int, int]) -> np.ndarray:
        t, h, w = shape
        boxes = [[float(v) for v in box] for _label, box in anchor.boxes]
        self.processor.add_inputs_to_inference_session(
            inference_session=session, frame_idx=anchor.frame_index,
            obj_ids=list(range(1, len(boxes) + 1)), input_boxes=[boxes])
        mask = torch.zeros((t, h, w), dtype=torch.bool)
        for reverse in (False, True):
            for out in self.model.propagate_in_video_iterator(
                    session, start_frame_idx=anchor.frame_index, reverse=reverse):
                mask[out.frame_idx] = self._union(out.pred_masks, h, w)
        return mask.numpy()

    def _union(self, pred_masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``(objects, 1, h', w')`` low-resolution logits to the ``(h, w) bool`` union over objects."""
        masks = self.processor.post_process_masks(
            [pred_masks.float()], original_sizes=[[h, w]], mask_threshold=MASK_THRESHOLD, binarize=True)[0]
        return masks.any(dim=0)[0].cpu()


def check_model_dir(model_dir: str | Path | None) -> Path:
    """Raise ConfigError naming what is missing unless ``model_dir`` holds a saved model and processor."""
    if model_dir is None:
        raise ConfigError(f"tracking real backend needs --model-dir: a local copy of {HUB_ID} (see the README)")
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"tracking model directory not found: {root}")
    if not (root / CONFIG_FILE).is_file():
        raise ConfigError(f"tracking model config missing: {root / CONFIG_FILE}")
    for names, what in ((WEIGHT_FILES, "weights"), (PROCESSOR_FILES, "processor config")):
        if not any((root / n).is_file() for n in names):
            raise ConfigError(f"tracking model {what} missing: {' or '.join(str(root / n) for n in names)}")
    return root


def has_video_processor(model_dir: Path) -> bool:
    """Whether ``model_dir`` configures a video processor: a ``video_processor`` block in
    ``processor_config.json``/``preprocessor_config.json``, or a ``video_preprocessor_config.json``."""
    import json

    if (model_dir / "video_preprocessor_config.json").is_file():
        return True
    for name in PROCESSOR_FILES:
        path = model_dir / name
        if path.is_file():
            try:
                if "video_processor" in json.loads(path.read_text(encoding="utf-8")):
                    return True
            except (ValueError, OSError):
                return False
    return False


def check_processor(model, processor, model_dir: Path) -> None:
    """ConfigError unless the video processor resizes frames to the model's ``image_size`` (1008 for
    facebook/sam3): a processor built from defaults resizes to 1024 px with ImageNet normalisation, and the
    tracker would run on inputs it was not trained on without any error."""
    size = dict(processor.video_processor.size or {})
    expected = int(model.config.image_size)
    if (size.get("height"), size.get("width")) != (expected, expected):
        raise ConfigError(f"tracking processor in {model_dir} resizes frames to {size}, but the model expects "
                          f"{expected}x{expected}: its processor config is not the checkpoint's")


def load_pretrained(model_dir: Path, dtype: torch.dtype) -> tuple:
    """``(Sam3TrackerVideoModel, Sam3TrackerVideoProcessor)`` from a local directory (never downloads).

    Reads both layouts: ``save_pretrained``'s (model_type ``sam3_tracker_video``) and the hub's
    ``facebook/sam3`` (model_type ``sam3_video``: the tracker's config under ``tracker_config``, weights under
    ``detector_model.vision_encoder.backbone.*``, ``tracker_neck.*`` and ``tracker_model.*``, renamed by
    transformers' conversion mapping; the rest of the detector is skipped). Raises ConfigError when the
    processor config has no video processor block or does not match the model's image size.
    """
    from transformers import Sam3TrackerVideoModel, Sam3TrackerVideoProcessor

    if not has_video_processor(model_dir):
        raise ConfigError(f"tracking processor config in {model_dir} has no video processor (a 'video_processor' "
                          f"block in {' or '.join(PROCESSOR_FILES)}, or video_preprocessor_config.json): the "
                          f"tracker would run at 1024 px with ImageNet normalisation instead of {HUB_ID}'s")
    model = Sam3TrackerVideoModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    processor = Sam3TrackerVideoProcessor.from_pretrained(model_dir, local_files_only=True)
    check_processor(model, processor, model_dir)
    return model, processor


def make_backend(model_dir: str | Path | None = None, device: str | None = None, dtype: str | None = None,
                 cache_vision_features: bool = True, **options) -> Sam3Tracker:
    """The SAM3 tracker loading from ``model_dir`` (checked here, loaded in ``setup()``).

    ``device``: default ``"cuda"`` if available else ``"cpu"``; ``dtype``: default bfloat16 on CUDA,
    float32 on CPU. Raises ConfigError naming the missing path, or for an unknown option.
    """
    if options:
        raise ConfigError(f"unknown tracking option(s): {', '.join(sorted(options))}")
    root = check_model_dir(model_dir)
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    return Sam3Tracker(lambda: load_pretrained(root, torch_dtype), device=device, dtype=torch_dtype,
                       cache_vision_features=cache_vision_features)
