"""Model backend interfaces: one per model service, implemented by ``cpu``, ``tiny`` and ``real`` in each
service folder, and the registry that loads one by name.

A model backend is what a service's operations (``services/<name>/app.py``) run: it loads once in ``setup()``
and is then called with decoded arrays and a :class:`SampleContext` holding what the sample is (its conformed
source video, prompt, optional user background, and the BAIT mask once stage 4 has run). Model backends use
only what their model takes; the ``cpu`` backends, which are classical algorithms, may read the source video in
the context (e.g. motion against a temporal background model). The pipeline's stages never call a model
backend directly: they call the service's operations through its client, with artifact handles.

A backend may declare ``max_concurrency`` (requests it serves at once; default 1).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Iterator, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, Field

from .captions import Captions
from .errors import ConfigError
from .media import Video


class GroundedObject(BaseModel):
    """One Qwen3-VL grounding: ``bbox_2d`` = ``[x1, y1, x2, y2]`` in 0..1000, or ``[]`` when not found."""

    bbox_2d: list[int] = Field(default_factory=list)
    label: str


class ImageScore(BaseModel):
    """EditScore on one (source, edited) image pair; sub-scores 0..10, ``overall = sqrt(SC * PQ)``.

    ``prompt_following`` is ``None`` when the scorer does not measure instruction following (the ``cpu``
    profile's ``cpu-proxy-v2``); the reasoning then says so."""

    prompt_following: float | None
    consistency: float
    perceptual_quality: float
    overall: float
    SC_reasoning: str
    PQ_reasoning: str
    passes: list[dict] | None = None
    """Each pass's four scores when the scorer self-ensembles (EditScore ``num_pass``); not part of the
    released record (``edited_frame0_score.jsonl`` keeps the averages), kept in the sample's report."""


class FrameScore(BaseModel):
    """EditScore on one frame of the edited video (``edited_video_score.jsonl`` entry)."""

    SC_score: float
    PQ_score: float
    O_score: float
    SC_score_reasoning: str
    PQ_score_reasoning: str
    SC_raw_output: str
    PQ_raw_output: str
    passes: list[dict] | None = None
    """Each pass's ``SC_score``, ``PQ_score``, ``O_score`` when the scorer self-ensembles; not part of the
    released record, kept in the sample's report."""


@dataclass
class Anchor:
    """A BAIT anchor: frame index and the pixel boxes ``(label, (x1, y1, x2, y2))`` found on it."""

    frame_index: int
    boxes: list[tuple[str, tuple[int, int, int, int]]]


@dataclass
class SampleContext:
    """The sample a backend call belongs to.

    ``video``: the conformed source, frames ``(T, H, W, 3) uint8``. ``background``: the user-supplied
    background (an image is a 1-frame video) or None. ``mask``: the BAIT mask ``(T, H, W) bool`` once
    stage 4 has run. ``cache``: per-sample scratch space shared by backends of one process.
    """

    sample_id: str
    prompt: str
    video: Video
    background: Video | None = None
    mask: np.ndarray | None = None
    cache: dict = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    name: str

    def setup(self) -> None:
        """Load weights / build state once per process."""


MAX_LABEL_CHARS = 100
"""Characters of a grounding label at most, in requests and in a model's answer (longer ones are cut)."""

MAX_KEYWORD_CHARS = 200
"""Characters of a ``chosen_keyword`` ("subtheme: scene") at most (metadata; a request past it is refused)."""

GROUNDING_MAX_IMAGES = 16
"""Images in one grounding request at most: vLLM's ``--limit-mm-per-prompt '{"image": 16}'`` (larger frame sets
are subsampled or split by the backend)."""

GROUNDING_MAX_IMAGE_PIXELS = 1280 * 720
"""Pixels of one image the grounding model sees at most (Qwen3-VL's image processor ``max_pixels``; vLLM's
``--mm-processor-kwargs '{"max_pixels": 921600}'``): Sparkle's frame size, 900 visual tokens of 32x32 px
(patch 16, merge 2). 16 images are then at most 14 400 tokens, inside ``--max-model-len 16384`` with the
question, so the 32B model's memory is known before the first request instead of Qwen3-VL's default of up to
16 384 tokens per image."""


class Grounder(Backend, Protocol):
    """Grounding service (Qwen3-VL served by vLLM)."""

    def describe_scene(self, ctx: SampleContext, image: np.ndarray) -> str:
        """One sentence describing the image (metadata ``original_scene``)."""

    def ground_round1(self, ctx: SampleContext, source_frame0: np.ndarray,
                      edited_frame0: np.ndarray) -> list[GroundedObject]:
        """Foreground objects to preserve, found on source frame 0 (valid for edited frame 0 too)."""

    def ground_round2(self, ctx: SampleContext, frames: np.ndarray, frame_indices: list[int],
                      labels: list[str]) -> list[list[GroundedObject]]:
        """Re-locate every label on each of ``frames`` ``(N, H, W, 3)``: N lists, one object per label."""

    def check_camera_motion(self, ctx: SampleContext, frames: np.ndarray, sample_fps: float = 2.0) -> tuple[bool, str]:
        """Stage 1's fine filter on ``frames`` ``(N, H, W, 3)`` sampled at ``sample_fps``: ``(camera_moves, reason)``."""

    def write_instruction(self, ctx: SampleContext, frame0: np.ndarray, edit_type: str,
                          chosen_keyword: str | None) -> str:
        """A background-replacement instruction for theme ``edit_type`` and ``"subtheme: scene"`` keyword."""

    def caption(self, ctx: SampleContext, instruction: str, labels: list[str]) -> Captions:
        """The generators' prompts from the editing ``instruction`` and the round-1 ``labels``: the new
        background alone with its motion (I2V), the subjects in front of it (Fun-Control); see
        :mod:`sparkle.captions`."""


class ImageEditor(Backend, Protocol):
    """Image editing service (FLUX.2-klein)."""

    def edit_background(self, ctx: SampleContext, image: np.ndarray, instruction: str) -> np.ndarray:
        """Replace the background of ``(H, W, 3) uint8`` ``image`` as instructed; same size out."""

    def remove_foreground(self, ctx: SampleContext, image: np.ndarray,
                          objects: list[GroundedObject]) -> np.ndarray:
        """Erase ``objects`` from ``image``, giving the clean plate ``(H, W, 3) uint8``."""


class VideoGenerator(Backend, Protocol):
    """I2V service (Wan2.2-I2V-A14B + LightX2V 4-step)."""

    def animate(self, ctx: SampleContext, image: np.ndarray, prompt: str, num_frames: int,
                fps: float) -> np.ndarray:
        """Background video ``(num_frames, H, W, 3) uint8`` whose frame 0 is ``image``."""


class Tracker(Backend, Protocol):
    """Tracking service (SAM3). The service's ``bait`` operation runs the passes and the majority vote."""

    def track(self, ctx: SampleContext, frames: np.ndarray, anchors: list[Anchor]) -> Iterator[np.ndarray]:
        """One pass per anchor, propagated forward and backward: yields ``(T, H, W) bool`` unions over labels."""


class ControlSynthesizer(Backend, Protocol):
    """Control synthesis service (Wan2.2-Fun-A14B-Control)."""

    def synthesize(self, ctx: SampleContext, control: np.ndarray, background: np.ndarray,
                   first_frame: np.ndarray, mask: np.ndarray, prompt: str) -> np.ndarray:
        """Edited video ``(T, H, W, 3) uint8`` from the control video, the background video and frame 0."""


class Scorer(Backend, Protocol):
    """EditScore service."""

    def score_image(self, ctx: SampleContext, source: np.ndarray, edited: np.ndarray,
                    instruction: str, task: str) -> ImageScore:
        """Score one image edit; ``task`` is ``"edit_background"`` or ``"remove_foreground"``."""

    def score_frames(self, ctx: SampleContext, source: np.ndarray, edited: np.ndarray,
                     frame_indices: list[int], instruction: str) -> list[FrameScore]:
        """Score frames ``frame_indices`` of the edited video ``(T, H, W, 3)`` against the source."""


SERVICES = ("grounding", "image_edit", "i2v", "tracking", "control", "editscore")
"""The six model services, in pipeline order of first use."""


@dataclass
class Backends:
    """The six model backends of one profile (in-process runs: the embedded default, ``--backend`` workers)."""

    grounding: Grounder
    image_edit: ImageEditor
    i2v: VideoGenerator
    tracking: Tracker
    control: ControlSynthesizer
    editscore: Scorer

    def names(self) -> dict[str, str]:
        return {s: getattr(self, s).name for s in SERVICES}


def load_backend(service: str, name: str, **options) -> Backend:
    """Instantiate (not set up) backend ``name`` of ``service``: ``sparkle.services.<service>.<name>.make_backend``,
    or, for ``name = "module:factory"``, ``factory(service, **options)`` (test doubles, custom backends).

    ``options`` (e.g. ``model_dir``, ``device``) go to ``make_backend``; a real backend checks its paths there
    and raises ConfigError naming what is missing. Raises ConfigError for an unknown service or backend.
    """
    if service not in SERVICES:
        raise ConfigError(f"unknown service {service!r}; expected one of {', '.join(SERVICES)}")
    if ":" in name:  # "package.module:factory" -> factory(service, **options), e.g. the test doubles
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"backend factory {name!r} not found: {exc}") from exc
        return factory(service, **options)
    try:
        module = importlib.import_module(f"sparkle.services.{service}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("sparkle.services"):
            raise ConfigError(f"service {service!r} has no {name!r} backend") from exc
        raise ConfigError(f"backend {name!r} of {service!r} needs a missing package: {exc.name} "
                          f"(pip install 'sparkle-factory[models]')") from exc
    return module.make_backend(**options)


def options_from_env(environ=None) -> dict[str, dict]:
    """Per-service backend options from the environment.

    ``SPARKLE_MODEL_DIR_<SERVICE>`` (e.g. ``SPARKLE_MODEL_DIR_IMAGE_EDIT``) gives ``model_dir``;
    ``SPARKLE_DEVICE`` gives every service's ``device``.
    """
    import os

    environ = os.environ if environ is None else environ
    out: dict[str, dict] = {}
    for service in SERVICES:
        opts = {}
        if model_dir := environ.get(f"SPARKLE_MODEL_DIR_{service.upper()}"):
            opts["model_dir"] = model_dir
        if device := environ.get("SPARKLE_DEVICE"):
            opts["device"] = device
        out[service] = opts
    return out


def load_backends(profile: str = "cpu", options: dict[str, dict] | None = None) -> Backends:
    """Instantiate and ``setup()`` the six backends of ``profile``.

    ``options[service]`` go to each backend's ``make_backend``; by default they come from
    :func:`options_from_env`.
    """
    options = options_from_env() if options is None else options
    made = {}
    for service in SERVICES:
        backend = load_backend(service, profile, **(options or {}).get(service, {}))
        backend.setup()
        made[service] = backend
    return Backends(**made)
