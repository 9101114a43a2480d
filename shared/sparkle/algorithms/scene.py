"""Classical scene analysis of a fixed-camera clip, shared by the ``cpu`` backends.

- Temporal background model: the per-pixel median of the frames, refined once by the median of the
  pixels *not* flagged as foreground (a subject that stands still in most frames otherwise leaves a ghost
  in a plain median).
- Foreground (motion) masks: max-channel distance to the background model above ``diff_threshold``
  grey levels, opened/closed and hole-filled.
- Clean plate: the masked temporal median (median over the frames where a pixel is not foreground), and
  Telea inpainting (OpenCV) where the background was never seen.

Work happens at ``work_short_side`` px (short side) for speed; boxes and masks are returned at full size.
"""

from __future__ import annotations

import cv2
import numpy as np



def masked_median(frames: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel median of ``frames`` ``(T, H, W, 3) uint8`` over the frames where ``masks`` ``(T, H, W)`` is False.

    Returns ``(plate (H, W, 3) uint8, never_seen (H, W) bool)``; never-seen pixels hold the plain median.
    Only pixels masked in some frame go through the (slow) NaN median.
    """
    plate = np.median(frames, axis=0).astype(np.uint8)
    some = masks.any(axis=0)
    never = masks.all(axis=0)
    fix = some & ~never
    if fix.any():
        cols = frames[:, fix].astype(np.float32)  # (T, N, 3)
        cols[masks[:, fix]] = np.nan
        plate[fix] = np.nanmedian(cols, axis=0).round().astype(np.uint8)
    return plate, never


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a ``(H, W)`` bool mask (regions not connected to the border)."""
    m = mask.astype(np.uint8)
    h, w = m.shape
    flood = np.pad(m, 1).copy()
    cv2.floodFill(flood, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1)
    return mask | (flood[1:-1, 1:-1] == 0)


class SceneModel:
    """Background model and motion masks of ``frames`` ``(T, H, W, 3) uint8`` from a fixed camera."""

    def __init__(self, frames: np.ndarray, work_short_side: int = 240, diff_threshold: int = 28):
        self.full_shape = frames.shape[:3]
        t, h, w = self.full_shape
        self.scale = min(1.0, work_short_side / min(h, w))
        self.size = (max(16, round(w * self.scale)), max(16, round(h * self.scale)))  # (w, h) at work scale
        self.small = np.stack([cv2.resize(f, self.size, interpolation=cv2.INTER_AREA) for f in frames])
        self.diff_threshold = diff_threshold
        k = max(3, round(0.012 * min(self.size)) | 1)
        self._open = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
        self._close = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
        background = np.median(self.small, axis=0).astype(np.uint8)
        fg = self._motion(background)
        self.background, _ = masked_median(self.small, fg)
        self.fg = self._motion(self.background)  # (T, h, w) bool at work scale

    def _motion(self, background: np.ndarray) -> np.ndarray:
        out = np.empty(self.small.shape[:3], bool)
        for i, f in enumerate(self.small):
            d = np.abs(f.astype(np.int16) - background.astype(np.int16)).max(axis=-1).astype(np.uint8)
            m = cv2.GaussianBlur(d, (5, 5), 0) > self.diff_threshold
            m = cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_OPEN, self._open)
            m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, self._close)
            out[i] = fill_holes(m.astype(bool))
        return out

    def to_full(self, mask_small: np.ndarray) -> np.ndarray:
        """Upsample a work-scale ``(h, w)`` bool mask to full size ``(H, W)`` bool (bilinear, 0.5 threshold)."""
        _, h, w = self.full_shape
        return cv2.resize(mask_small.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) > 0.5

    def foreground_full(self, t: int) -> np.ndarray:
        """Motion foreground of frame ``t`` at full size, ``(H, W)`` bool."""
        return self.to_full(self.fg[t])

    def boxes(self, t: int, min_area_frac: float = 0.002, max_objects: int = 8) -> list[tuple[int, int, int, int]]:
        """Pixel boxes (full size) of the motion components of frame ``t``, largest first.

        Components closer than ~3 % of the short side are merged (limbs, a held object).
        """
        m = self.fg[t].astype(np.uint8)
        r = max(2, round(0.03 * min(self.size)))
        merged = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
        n, labels, stats, _ = cv2.connectedComponentsWithStats(merged, connectivity=8)
        _, h, w = self.full_shape
        min_area = min_area_frac * m.size
        found = []
        for i in range(1, n):
            comp = (labels == i) & (m > 0)
            area = int(comp.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(comp)
            box = (xs.min() / self.scale, ys.min() / self.scale, (xs.max() + 1) / self.scale, (ys.max() + 1) / self.scale)
            found.append((area, (max(0, int(box[0])), max(0, int(box[1])), min(w, int(np.ceil(box[2]))),
                                 min(h, int(np.ceil(box[3]))))))
        found.sort(key=lambda a: -a[0])
        return [b for _, b in found[:max_objects]]

    def clean_plate(self, frames: np.ndarray, masks: np.ndarray | None = None, dilate_px: int = 9) -> np.ndarray:
        """Clean plate ``(H, W, 3) uint8`` of ``frames`` (full size): masked temporal median + inpainting.

        ``masks`` ``(T, H, W) bool`` (e.g. the BAIT mask) default to this model's motion masks; they are
        dilated by ``dilate_px`` so that soft edges and shadows' rims do not leak into the plate.
        """
        t, h, w = frames.shape[:3]
        if masks is None:
            masks = np.stack([self.foreground_full(i) for i in range(t)])
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1))
        masks = np.stack([cv2.dilate(m.astype(np.uint8), kernel) > 0 for m in masks])
        plate, never = masked_median(frames, masks)
        if never.any():
            plate = cv2.inpaint(plate, never.astype(np.uint8) * 255, 5, cv2.INPAINT_TELEA)
        return plate


def scene_of(ctx) -> SceneModel:
    """The sample's :class:`SceneModel`, built once per process and kept in ``ctx.cache``."""
    if "scene" not in ctx.cache:
        ctx.cache["scene"] = SceneModel(ctx.video.frames)
    return ctx.cache["scene"]


def frame0_foreground(ctx) -> np.ndarray:
    """Frame 0's foreground ``(H, W)`` bool: the BAIT mask once known, else the motion mask."""
    if ctx.mask is not None:
        return ctx.mask[0]
    return scene_of(ctx).foreground_full(0)


__all__ = ["SceneModel", "masked_median", "fill_holes", "scene_of", "frame0_foreground"]
