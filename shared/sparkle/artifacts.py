"""Artifact I/O over a store: decode/encode videos, images and masks by key, and build sample contexts.

Used by the orchestrator's stages and by every service, so that both read and write artifacts the same
way. Decoded videos are cached per process (bounded), since consecutive stages and requests of one sample
read the same source.
"""

from __future__ import annotations

import tempfile
from collections import OrderedDict
from pathlib import Path, PurePosixPath

import numpy as np

from .backends import SampleContext
from .errors import ArtifactMissing, TooLarge
from .masks import pack_mask, unpack_mask
from .media import IMAGE_SUFFIXES, Video, read_image, read_video, write_png, write_video
from .store import ArtifactStore


class ArtifactIO:
    """Typed access to a store. ``max_frames``/``max_pixels`` bound what may be decoded (TooLarge, 413)."""

    def __init__(self, store: ArtifactStore, cache_size: int = 8, max_frames: int = 81,
                 max_pixels: int = 1280 * 720):
        self.store = store
        self.max_frames = max_frames
        self.max_pixels = max_pixels
        self._videos: OrderedDict[str, Video] = OrderedDict()
        self._contexts: OrderedDict[str, SampleContext] = OrderedDict()
        self._origins: OrderedDict[int, tuple[np.ndarray, str]] = OrderedDict()
        self._cache_size = cache_size

    def _remember(self, array: np.ndarray, key: str) -> np.ndarray:
        """Note that ``array`` (this very object) is stored at ``key`` (see :meth:`origin`)."""
        self._origins[id(array)] = (array, key)  # holding the array keeps its id from being reused
        while len(self._origins) > 4 * self._cache_size:
            self._origins.popitem(last=False)
        return array

    def origin(self, array: np.ndarray) -> str | None:
        """The key ``array`` was loaded from or stored at by this object, if it is that very array object.

        Lets a caller that holds only arrays (a backend) send references instead of pixels.
        """
        found = self._origins.get(id(array))
        return found[1] if found is not None and found[0] is array else None

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

    def load_video(self, key: str) -> Video:
        """Decode ``key`` (``(T, H, W, 3) uint8``), once per process while it stays in the cache."""
        if key in self._videos:
            self._videos.move_to_end(key)
            return self._videos[key]
        with tempfile.TemporaryDirectory() as tmp:
            video = read_video(self._fetch(key, tmp), max_frames=self.max_frames + 1)
        self._check_size(key, *video.shape)
        self._remember(video.frames, key)
        self._videos[key] = video
        while len(self._videos) > self._cache_size:
            self._videos.popitem(last=False)
        return video

    def load_image(self, key: str) -> np.ndarray:
        """``(H, W, 3) uint8`` RGB."""
        with tempfile.TemporaryDirectory() as tmp:
            image = read_image(self._fetch(key, tmp))
        self._check_size(key, 1, *image.shape[:2])
        return self._remember(image, key)

    def load_mask(self, key: str) -> np.ndarray:
        """``(T, H, W) bool`` from a bit-packed ``.npz``."""
        if not self.store.exists(key):
            raise ArtifactMissing(f"artifact not found: {key}")
        return self._remember(unpack_mask(self.store.get_bytes(key)), key)

    def put_video(self, key: str, frames: np.ndarray, fps: float) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            self.store.put_file(key, write_video(Path(tmp) / "v.mp4", frames, fps))
        self._videos.pop(key, None)
        self._remember(frames, key)
        return key

    def put_image(self, key: str, image: np.ndarray) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            self.store.put_file(key, write_png(Path(tmp) / "i.png", image))
        self._remember(image, key)
        return key

    def put_mask(self, key: str, mask: np.ndarray) -> str:
        self.store.put_bytes(key, pack_mask(mask))
        self._remember(mask, key)
        return key

    def copy(self, src: str, dst: str, array: np.ndarray | None = None) -> str:
        """Copy artifact ``src`` to ``dst`` in the store (bytes unchanged); ``array``, the decoded content, is
        remembered as stored at ``dst`` from now on. Returns ``dst``."""
        try:
            self.store.copy(src, dst)
        except KeyError as exc:
            raise ArtifactMissing(f"artifact not found: {src}") from exc
        if src in self._videos:
            self._videos[dst] = self._videos[src]
        if array is not None:
            self._remember(array, dst)
        return dst

    def context(self, sample_id: str, prompt: str, source_video: str, background: str | None = None,
                mask: str | None = None) -> SampleContext:
        """The sample's :class:`SampleContext`, built from stored artifacts once per process."""
        ctx = self._contexts.get(sample_id)
        if ctx is None or ctx.video is not self.load_video(source_video):
            bg = None
            if background:
                if PurePosixPath(background).suffix.lower() in IMAGE_SUFFIXES:
                    bg = Video(self.load_image(background)[None], 0.0)
                else:
                    bg = self.load_video(background)
            ctx = SampleContext(sample_id, prompt, self.load_video(source_video), bg)
            self._contexts[sample_id] = ctx
            while len(self._contexts) > self._cache_size:
                self._contexts.popitem(last=False)
        ctx.prompt = prompt
        if mask and ctx.mask is None:
            ctx.mask = self.load_mask(mask)
        ctx.cache["refs"] = {"source_video": source_video, "background": background, "mask": mask}
        return ctx

    def forget(self, sample_id: str) -> None:
        """Drop what is cached for a sample (its journey in this process is over)."""
        self._contexts.pop(sample_id, None)
        for key in [k for k in self._videos if sample_id in k]:
            del self._videos[key]
