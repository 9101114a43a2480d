"""Video and image I/O (PyAV, Pillow) and the conform step that makes a pair match exactly.

Frames are ``(T, H, W, 3) uint8`` RGB arrays throughout the project; images ``(H, W, 3) uint8`` RGB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import cv2
import numpy as np
from PIL import Image

from .config import ConformConfig
from .errors import InputError, TooLarge

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class Video:
    """Decoded frames ``(T, H, W, 3) uint8`` RGB and their rate in frames per second."""

    frames: np.ndarray
    fps: float

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(T, H, W)``."""
        t, h, w, _ = self.frames.shape
        return t, h, w


def check_input_file(path: str | os.PathLike, what: str = "video") -> Path:
    """Raise :class:`InputError` if ``path`` is missing, not a file or empty; return it as a Path."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found: {p}")
    if not p.is_file():
        raise InputError(f"{what} is not a file: {p}")
    if p.stat().st_size == 0:
        raise InputError(f"{what} is empty (0 bytes): {p}")
    return p


MIN_SIDE_PX = 32
MAX_SIDE_PX = 8192
"""Accepted source sides, pixels: below 32 px nothing survives conforming to 16-px multiples; above 8192 px
(8K is 7680 x 4320) a single frame is larger than anything the pipeline produces (1280 x 720 at most)."""


MAX_FRAME_PIXELS = 3840 * 2160
"""Pixels of one frame or image decoded at most (4K UHD, 8.3 MP, 25 MB as RGB): larger is refused from the
container's or file header's size, before anything is decoded (TooLarge, HTTP 413). A 16 KB H.264 file can
declare 8192x4320 frames that cost 106 MB each once decoded; a 140 KB PNG 12000x12000, 432 MB."""

Image.MAX_IMAGE_PIXELS = 2 * MAX_FRAME_PIXELS  # Pillow's own bomb check, past ours (its error is mapped too)


def check_frame_pixels(width: int, height: int, what: str) -> None:
    """TooLarge unless ``width x height`` is at most :data:`MAX_FRAME_PIXELS`."""
    if width * height > MAX_FRAME_PIXELS:
        raise TooLarge(f"{what} is {width}x{height}: frames over {MAX_FRAME_PIXELS:,} pixels (3840x2160) are not "
                       "decoded")


def _check_declared_size(p: Path) -> None:
    """TooLarge if a video stream of ``p`` declares frames over :data:`MAX_FRAME_PIXELS`, read with FFmpeg's
    stream probe told not to decode (``skip_frame=all``): the probe of a plain open decodes a frame first,
    90 MB for the issue's 16 KB 8192x4320 clip. A container that names its streams only once they are probed
    (MPEG-TS, an MP4 without tracks) cannot take per-stream options: its size is checked after the plain
    probe, as every stream was before. Raises av errors for an unreadable file."""
    try:
        container = av.open(str(p), stream_options=[{"skip_frame": "all"}] * 16)
    except ValueError as exc:
        if "stream_options" in str(exc):
            return
        raise
    with container:
        for stream in container.streams.video:
            ctx = stream.codec_context
            if ctx is not None and ctx.width and ctx.height:
                check_frame_pixels(ctx.width, ctx.height, f"video {p.name}")


def check_resolution(height: int, width: int, what: str = "video") -> None:
    """Raise :class:`InputError` unless both sides lie within ``MIN_SIDE_PX..MAX_SIDE_PX`` pixels."""
    if not (MIN_SIDE_PX <= width <= MAX_SIDE_PX and MIN_SIDE_PX <= height <= MAX_SIDE_PX):
        raise InputError(f"{what} is {width}x{height}: each side must lie within {MIN_SIDE_PX}..{MAX_SIDE_PX} px")


def display_rotation(stream, frame) -> int:
    """Display rotation in degrees counter-clockwise (0, 90, 180, 270) from the frame's display matrix
    (PyAV ``VideoFrame.rotation``) or, failing that, the stream's legacy ``rotate`` tag (clockwise)."""
    rot = 0
    try:
        rot = int(round(frame.rotation or 0))
    except (AttributeError, TypeError, ValueError):
        rot = 0
    if not rot:
        tag = (stream.metadata or {}).get("rotate")
        try:
            rot = -int(float(tag)) if tag else 0
        except ValueError:
            rot = 0
    return int(round(rot / 90.0)) * 90 % 360


def resample_times(times: list[float] | np.ndarray, end_s: float, fps: float) -> list[int]:
    """Which source frame each output frame at ``fps`` shows: output frame ``k`` (time ``k / fps``) is the
    source frame on screen then, the last one whose presentation time is ``<= k / fps``.

    ``times``: presentation times of the source frames (seconds from the first frame, increasing); ``end_s``:
    when the last one leaves the screen (its time + one source frame period). Returns the source index of each
    output frame, ``k / fps < end_s``: the output covers the same seconds (30 fps -> frames dropped, 10 fps ->
    frames repeated; variable frame rates follow their timestamps).
    """
    times = np.asarray(times, dtype=np.float64)
    n = int(np.ceil(end_s * fps - 1e-6))
    at = np.arange(n) / fps + 1e-6  # a frame stamped exactly at k / fps is shown at k / fps
    return [int(i) for i in np.maximum(np.searchsorted(times, at, side="right") - 1, 0)]


def read_video(path: str | os.PathLike, max_frames: int | None = None, fps: float | None = None,
               transform: Callable[[np.ndarray], np.ndarray] | None = None) -> Video:
    """Decode frames from t=0, upright (display rotation applied): up to ``max_frames`` (all if None).

    ``fps``: resample to this rate by timestamp while decoding (:func:`resample_times`): up to ``max_frames``
    frames at ``fps`` are returned, covering the same seconds as the source (a 30 fps clip is decoded for
    ``max_frames / fps`` seconds); None keeps the source's frames and rate. Memory holds the returned frames
    and one more. ``transform``: applied to each kept frame as it is decoded (e.g. :func:`conform_file`'s
    resize), so only transformed frames are held.

    Frames are checked before they are decoded: the stream's declared size against :data:`MAX_FRAME_PIXELS`
    (TooLarge), and every frame against the first one's size (a stream that changes size mid-way is refused).

    Raises InputError for a missing, empty or undecodable file, one without a video stream/frames, or frames of
    changing size; TooLarge for frames over the pixel budget.
    """
    p = check_input_file(path)
    try:
        _check_declared_size(p)
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise InputError(f"no video stream in {p}")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            src_fps = float(rate) if rate else 0.0
            if not src_fps or not np.isfinite(src_fps) or src_fps <= 0:
                raise InputError(f"cannot tell the frame rate of {p}")
            ctx = stream.codec_context  # None for a codec no decoder knows (decoding then fails: InputError)
            if ctx is not None and ctx.width and ctx.height:
                check_frame_pixels(ctx.width, ctx.height, f"video {p.name}")
            frames: list[np.ndarray] = []
            rot, size = None, None

            def rgb(frame) -> np.ndarray:
                arr = frame.to_ndarray(format="rgb24")
                arr = np.ascontiguousarray(np.rot90(arr, k=rot // 90)) if rot else arr
                return transform(arr) if transform is not None else arr

            def full() -> bool:
                return max_frames is not None and len(frames) >= max_frames

            # (fps) the frame on screen (converted only if an output slot shows it), its time, the next slot
            t0, held, held_arr, held_t, k = None, None, None, 0.0, 0
            for n, frame in enumerate(container.decode(stream)):
                if size is None:
                    size = (frame.width, frame.height)
                    check_frame_pixels(*size, f"video {p.name}")
                elif (frame.width, frame.height) != size:
                    raise InputError(f"video {p.name}: frame {n} is {frame.width}x{frame.height}, frame 0 was "
                                     f"{size[0]}x{size[1]}; a source must keep one size")
                if rot is None:
                    rot = display_rotation(stream, frame)
                if fps is None:
                    frames.append(rgb(frame))
                    if full():
                        break
                    continue
                t = frame.time if frame.time is not None else n / src_fps
                t0 = t if t0 is None else t0
                t = max(t - t0, held_t)  # seconds from the first frame, never backwards
                while held is not None and k / fps + 1e-6 < t and not full():  # slots before this frame
                    held_arr = rgb(held) if held_arr is None else held_arr
                    frames.append(held_arr)
                    k += 1
                if full():
                    break
                held, held_arr, held_t = frame, None, t
            if fps is not None and held is not None:  # the last frame stays on screen for one source period
                while k / fps + 1e-6 < held_t + 1.0 / src_fps and not full():
                    held_arr = rgb(held) if held_arr is None else held_arr
                    frames.append(held_arr)
                    k += 1
    except InputError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"not a decodable video: {p} ({exc.__class__.__name__}: {exc})") from exc
    if not frames:
        raise InputError(f"no decodable frames in {p}")
    return Video(np.stack(frames), float(fps) if fps is not None else src_fps)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, crf: int = 18) -> Path:
    """Encode ``(T, H, W, 3) uint8`` RGB as H.264 yuv420p MP4 (even sides required), faststart."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even sides, got {w}x{h}")
    path = Path(path)
    with av.open(str(path), mode="w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Load an image as ``(H, W, 3) uint8`` RGB. Raises InputError if missing or undecodable, TooLarge over
    :data:`MAX_FRAME_PIXELS` (read from the header, before decoding)."""
    p = check_input_file(path, "image")
    try:
        with Image.open(p) as im:
            check_frame_pixels(*im.size, f"image {p.name}")  # from the header: nothing decoded yet
            return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"image {p.name}: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise InputError(f"not a decodable image: {p} ({exc})") from exc


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Save ``(H, W, 3) uint8`` RGB as PNG."""
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path, format="PNG")
    return Path(path)


def trimmed_length(t: int, max_frames: int) -> int:
    """Frames kept: at most ``max_frames`` from t=0, trimmed to 4k+1 (Wan's temporal VAE stride is 4)."""
    t = min(t, max_frames)
    return ((t - 1) // 4) * 4 + 1 if t >= 1 else 0


def conformed_size(w: int, h: int, cfg: ConformConfig) -> tuple[int, int, int, int]:
    """Scaled size and crop for a ``w x h`` source: returns ``(scaled_w, scaled_h, out_w, out_h)``.

    The long side is scaled to at most ``max_long_side`` and the short side to at most ``max_short_side``
    (orientation-aware, never upscaled, aspect kept); then the centre is cropped to multiples of
    ``cfg.multiple``, so at most ``multiple - 1`` px are lost per side pair (832x468 -> 832x464).
    """
    long_, short = max(w, h), min(w, h)
    scale = min(1.0, cfg.max_long_side / long_, cfg.max_short_side / short)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    ow, oh = (sw // cfg.multiple) * cfg.multiple, (sh // cfg.multiple) * cfg.multiple
    if ow == 0 or oh == 0:
        raise InputError(f"video too small: {w}x{h} gives no {cfg.multiple}-px multiple")
    return sw, sh, ow, oh


def resize_crop(image: np.ndarray, scaled: tuple[int, int], out: tuple[int, int]) -> np.ndarray:
    """Resize ``(H, W, C)`` to ``scaled`` (w, h) with area interpolation, then centre-crop to ``out`` (w, h)."""
    sw, sh = scaled
    ow, oh = out
    if image.shape[1] != sw or image.shape[0] != sh:
        image = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
    y0, x0 = (sh - oh) // 2, (sw - ow) // 2
    return np.ascontiguousarray(image[y0:y0 + oh, x0:x0 + ow])


def conform(video: Video, cfg: ConformConfig) -> Video:
    """The source as the pipeline uses it: at ``cfg.fps`` (16, Wan2.2's rate, unless None), frames trimmed to
    4k+1 (<= max_frames), sides multiples of 16.

    A video not yet at ``cfg.fps`` is resampled by time (:func:`resample_times`, frames evenly spaced at its
    own rate); decode with ``read_video(path, fps=cfg.fps)`` to follow the file's own timestamps and to decode
    only the seconds that are kept. Raises InputError when fewer than 5 frames remain (one 4-frame latent
    step is the least Wan handles).
    """
    if cfg.fps is not None and abs(video.fps - cfg.fps) > 1e-6:
        t_src = video.shape[0]
        index = resample_times(np.arange(t_src) / video.fps, t_src / video.fps, cfg.fps)
        video = Video(video.frames[index[:cfg.max_frames]], float(cfg.fps))
    t_in, h, w = video.shape
    t = trimmed_length(t_in, cfg.max_frames)
    if t < 5:
        raise InputError(f"video too short: {t_in} frame(s); at least 5 are needed")
    sw, sh, ow, oh = conformed_size(w, h, cfg)
    frames = np.stack([resize_crop(f, (sw, sh), (ow, oh)) for f in video.frames[:t]])
    return Video(frames, video.fps)


def conform_file(path: str | os.PathLike, cfg: ConformConfig) -> Video:
    """:func:`conform` of a file, frame by frame: each frame is resized and cropped as it is decoded, so memory
    holds the conformed frames (81 at 1280x720: 224 MB) and one source frame, not 81 source frames (a 4K source:
    2 GB). The same frames as ``conform(read_video(path, cfg.max_frames, cfg.fps), cfg)``. Raises InputError,
    TooLarge (see :func:`read_video`)."""
    sizes: dict[str, tuple[int, int, int, int]] = {}

    def resize(frame: np.ndarray) -> np.ndarray:
        if "size" not in sizes:
            sizes["size"] = conformed_size(frame.shape[1], frame.shape[0], cfg)
        sw, sh, ow, oh = sizes["size"]
        return resize_crop(frame, (sw, sh), (ow, oh))

    video = read_video(path, max_frames=cfg.max_frames, fps=cfg.fps, transform=resize)
    t = trimmed_length(video.shape[0], cfg.max_frames)
    if t < 5:
        raise InputError(f"video too short: {video.shape[0]} frame(s); at least 5 are needed")
    return Video(np.ascontiguousarray(video.frames[:t]), video.fps)


def fit_to(image: np.ndarray, w: int, h: int) -> np.ndarray:
    """Scale ``image`` to cover ``w x h`` (aspect kept) and centre-crop it to exactly that size."""
    ih, iw = image.shape[:2]
    scale = max(w / iw, h / ih)
    sw, sh = max(w, round(iw * scale)), max(h, round(ih * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return resize_crop(cv2.resize(image, (sw, sh), interpolation=interp), (sw, sh), (w, h))


def sample_indices(t: int, fps: float, sample_fps: float) -> list[int]:
    """Frame indices sampled at ``sample_fps`` from t=0: ``round(k * fps / sample_fps)`` while < t.

    e.g. t=81 at 16 fps, 2 FPS -> [0, 8, 16, ..., 80]. At least frame 0 is returned.
    """
    step = fps / sample_fps
    out, k = [], 0
    while True:
        i = int(round(k * step))
        if i >= t:
            break
        if not out or i != out[-1]:
            out.append(i)
        k += 1
    return out or [0]
