"""Artifacts by reference: handles (a store key plus a lazily decoded array) and typed I/O over a store.

The pipeline's stages and the service clients pass handles, never bare arrays:

- :class:`ImageRef`  ``(H, W, 3) uint8`` RGB, a PNG in the store;
- :class:`VideoRef`  ``(T, H, W, 3) uint8``, an H.264 MP4; ``video.at(indices)`` is a slice that remembers its
  ``frame_indices`` (its ``array`` is ``(N, H, W, 3)``);
- :class:`MaskRef`   ``(T, H, W) bool``, a bit-packed ``.npz``.

Code that needs pixels reads ``.array`` (decoded once per process by :class:`ArtifactIO`); a remote call sends
``.key`` (and ``frame_indices``), so an artifact a service wrote comes back as a handle on its key without
being decoded. :class:`ArtifactIO` caches decoded artifacts by key (bounded, least recently used): a miss only
costs a decode, never correctness.
"""

from __future__ import annotations

import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np

from .backends import SampleContext
from .errors import ArtifactMissing, TooLarge
from .masks import pack_mask, unpack_mask
from .media import IMAGE_SUFFIXES, Video, read_image, read_video, write_png, write_video
from .store import ArtifactStore


@dataclass(frozen=True, eq=False)
class ArtifactRef:
    """An artifact in the store: its ``key`` and the :class:`ArtifactIO` that decodes it (``array``)."""

    key: str
    io: ArtifactIO = field(repr=False)


class ImageRef(ArtifactRef):
    """An image artifact; ``array`` ``(H, W, 3) uint8`` RGB, decoded on first use."""

    @property
    def array(self) -> np.ndarray:
        return self.io.load_image(self.key)


@dataclass(frozen=True, eq=False)
class VideoRef(ArtifactRef):
    """A video artifact, or a slice of one (``frame_indices``, as sampled at 2 FPS for grounding).

    ``array``: ``(T, H, W, 3) uint8``, or ``(len(frame_indices), H, W, 3)`` for a slice.
    """

    frame_indices: tuple[int, ...] | None = None

    def at(self, indices) -> VideoRef:
        """The slice of frames ``indices`` (of the whole video)."""
        return replace(self, frame_indices=tuple(int(i) for i in indices))

    @property
    def decoded(self) -> Video:
        """The whole decoded video (frames and fps)."""
        return self.io.load_video(self.key)

    @property
    def array(self) -> np.ndarray:
        frames = self.decoded.frames
        return frames if self.frame_indices is None else frames[list(self.frame_indices)]


class MaskRef(ArtifactRef):
    """A mask artifact: ``key`` of a bit-packed ``.npz``; ``array`` ``(T, H, W) bool``."""

    @property
    def array(self) -> np.ndarray:
        return self.io.load_mask(self.key)


class _LRU(OrderedDict):
    """A bounded mapping, least recently used out first; safe to share between threads."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.guard = threading.Lock()

    def get_fresh(self, key):
        with self.guard:
            value = super().get(key)
            if value is not None:
                self.move_to_end(key)
            return value

    def put(self, key, value):
        with self.guard:
            self[key] = value
            self.move_to_end(key)
            while len(self) > self.size:
                self.popitem(last=False)
            return value

    def drop(self, key) -> None:
        with self.guard:
            self.pop(key, None)


class ArtifactIO:
    """Typed access to a store. ``max_frames``/``max_pixels`` bound what may be decoded (TooLarge, HTTP 413).

    Decoded artifacts are cached by key (``cache_size`` videos and masks, four times as many images); a video
    written here is not cached as written, since its stored (H.264) frames differ from the array given.
    """

    def __init__(self, store: ArtifactStore, cache_size: int = 8, max_frames: int = 81,
                 max_pixels: int = 1280 * 720):
        self.store = store
        self.max_frames = max_frames
        self.max_pixels = max_pixels
        self._videos = _LRU(cache_size)
        self._images = _LRU(4 * cache_size)
        self._masks = _LRU(cache_size)
        self._contexts = _LRU(cache_size)

    # --- handles -------------------------------------------------------------------------------------------

    def image(self, key: str) -> ImageRef:
        return ImageRef(key, self)

    def video(self, key: str) -> VideoRef:
        return VideoRef(key, self)

    def mask(self, key: str) -> MaskRef:
        return MaskRef(key, self)

    # --- decoding ------------------------------------------------------------------------------------------

    def _fetch(self, key: str, tmp: str) -> Path:
        try:
            return self.store.get_file(key, Path(tmp) / PurePosixPath(key).name)
        except KeyError as exc:
            raise ArtifactMissing(f"artifact not found: {key}") from exc

    def _check_size(self, key: str, t: int, h: int, w: int) -> None:
        if t > self.max_frames:
            raise TooLarge(f"{key}: more than {self.max_frames} frames")
        if h * w > self.max_pixels:
            raise TooLarge(f"{key}: {w}x{h} > {self.max_pixels} pixels")

    def load_video(self, key: str, first_frames: bool = False) -> Video:
        """Decode ``key``: frames ``(T, H, W, 3) uint8`` and fps. Raises ArtifactMissing, TooLarge (more than
        ``max_frames`` frames, unless ``first_frames``: then only the first ``max_frames`` are kept, as for a
        user's background video, which may be longer than the clip)."""
        if (video := self._videos.get_fresh(key)) is not None:
            return video
        with tempfile.TemporaryDirectory() as tmp:
            video = read_video(self._fetch(key, tmp), max_frames=self.max_frames + (0 if first_frames else 1))
        self._check_size(key, *video.shape)
        return self._videos.put(key, video)

    def load_image(self, key: str) -> np.ndarray:
        """``(H, W, 3) uint8`` RGB. Raises ArtifactMissing, TooLarge."""
        if (image := self._images.get_fresh(key)) is not None:
            return image
        with tempfile.TemporaryDirectory() as tmp:
            image = read_image(self._fetch(key, tmp))
        self._check_size(key, 1, *image.shape[:2])
        return self._images.put(key, image)

    def load_mask(self, key: str) -> np.ndarray:
        """``(T, H, W) bool`` from a bit-packed ``.npz``. Raises ArtifactMissing."""
        if (mask := self._masks.get_fresh(key)) is not None:
            return mask
        if not self.store.exists(key):
            raise ArtifactMissing(f"artifact not found: {key}")
        return self._masks.put(key, unpack_mask(self.store.get_bytes(key)))

    # --- encoding ------------------------------------------------------------------------------------------

    def put_video(self, key: str, frames: np.ndarray, fps: float) -> str:
        """Encode ``(T, H, W, 3) uint8`` ``frames`` as H.264 at ``fps`` under ``key``; returns ``key``."""
        with tempfile.TemporaryDirectory() as tmp:
            self.store.put_file(key, write_video(Path(tmp) / "v.mp4", frames, fps))
        self._videos.drop(key)  # the stored frames are the decoded H.264, not ``frames``
        return key

    def put_image(self, key: str, image: np.ndarray) -> str:
        """Write ``(H, W, 3) uint8`` ``image`` as PNG (lossless, so the array stays cached) under ``key``;
        returns ``key``."""
        with tempfile.TemporaryDirectory() as tmp:
            self.store.put_file(key, write_png(Path(tmp) / "i.png", image))
        self._images.put(key, image)
        return key

    def put_mask(self, key: str, mask: np.ndarray) -> str:
        """Write ``(T, H, W) bool`` ``mask`` bit-packed under ``key``; returns ``key``."""
        self.store.put_bytes(key, pack_mask(mask))
        self._masks.put(key, mask.astype(bool, copy=False))
        return key

    def copy(self, src: str, dst: str) -> str:
        """Copy artifact ``src`` to ``dst`` in the store (bytes unchanged); what is decoded of ``src`` is
        decoded of ``dst`` too. Raises ArtifactMissing. Returns ``dst``."""
        try:
            self.store.copy(src, dst)
        except KeyError as exc:
            raise ArtifactMissing(f"artifact not found: {src}") from exc
        for cache in (self._videos, self._images, self._masks):
            if (value := cache.get_fresh(src)) is not None:
                cache.put(dst, value)
            else:
                cache.drop(dst)
        return dst

    # --- sample contexts (services) --------------------------------------------------------------------------

    def context(self, sample_id: str, prompt: str, source_video: str, background: str | None = None,
                mask: str | None = None) -> SampleContext:
        """The sample's :class:`SampleContext`, built from stored artifacts once per process."""
        ctx = self._contexts.get_fresh(sample_id)
        if ctx is None or ctx.video is not self.load_video(source_video):
            bg = None
            if background:
                if PurePosixPath(background).suffix.lower() in IMAGE_SUFFIXES:
                    bg = Video(self.load_image(background)[None], 0.0)
                else:
                    bg = self.load_video(background, first_frames=True)
            ctx = self._contexts.put(sample_id, SampleContext(sample_id, prompt, self.load_video(source_video), bg))
        ctx.prompt = prompt
        if mask and ctx.mask is None:
            ctx.mask = self.load_mask(mask)
        return ctx

    def forget(self, sample_id: str) -> None:
        """Drop what is cached for a sample (its journey in this process is over)."""
        self._contexts.drop(sample_id)
        for cache in (self._videos, self._images, self._masks):
            for key in [k for k in list(cache) if sample_id in k]:
                cache.drop(key)
