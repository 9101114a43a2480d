"""``cpu`` tracking backend: box-seeded GrabCut, propagated frame by frame from each anchor.

One pass per anchor (BAIT). At the anchor, each label's box seeds GrabCut (inside the box: probable
foreground; a ring around it: probable background; the window's border: background). Each next frame,
forward and then backward from the anchor, is segmented in a window around the previous mask (grown by
25 %, at least 6 px) with the previous mask and the motion mask as probable foreground. The new mask may
only grow by ``max_step`` px per frame outside moving pixels (limits drift into look-alike background),
and an object whose mask collapses below 15 % of its anchor area is dropped for the rest of that direction.
A pass's mask is the union over labels. Work happens at the scene model's scale (short side 240 px) and
masks are upsampled at the end.
"""

from __future__ import annotations

from typing import Iterator

import cv2
import numpy as np

from sparkle.algorithms.scene import scene_of
from sparkle.backends import Anchor, SampleContext
from sparkle.boxes import expand, mask_box


def _grabcut(frame: np.ndarray, window, probable_fg: np.ndarray, iterations: int = 2) -> np.ndarray:
    """Segment ``frame`` ``(h, w, 3)`` inside ``window``; returns an ``(h, w)`` bool mask (False outside)."""
    x1, y1, x2, y2 = window
    out = np.zeros(frame.shape[:2], bool)
    if x2 - x1 < 8 or y2 - y1 < 8:
        return out
    crop = np.ascontiguousarray(frame[y1:y2, x1:x2])
    gc = np.where(probable_fg[y1:y2, x1:x2], cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    gc[:2], gc[-2:], gc[:, :2], gc[:, -2:] = cv2.GC_BGD, cv2.GC_BGD, cv2.GC_BGD, cv2.GC_BGD
    if not (gc == cv2.GC_PR_FGD).any():
        return out
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(crop, gc, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error:  # degenerate colour model (e.g. a flat crop): keep the prior
        return probable_fg & _window_mask(frame.shape[:2], window)
    out[y1:y2, x1:x2] = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    return out


def _window_mask(shape, window):
    m = np.zeros(shape, bool)
    x1, y1, x2, y2 = window
    m[y1:y2, x1:x2] = True
    return m


def _largest_overlapping(mask: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Keep the connected components of ``mask`` that overlap ``prior``."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[np.unique(labels[prior & mask])] = True
    keep[0] = False
    return keep[labels]


class CpuGrabCutTracker:
    name = "cpu-grabcut-propagation"

    def __init__(self, window_margin: float = 0.25, max_step_frac: float = 0.02):
        self.window_margin = window_margin
        self.max_step_frac = max_step_frac

    def setup(self) -> None:
        """Nothing to load."""

    def track(self, ctx: SampleContext, frames: np.ndarray, anchors: list[Anchor]) -> Iterator[np.ndarray]:
        """Yield one ``(T, H, W) bool`` mask per anchor (union over that anchor's labels)."""
        scene = scene_of(ctx)
        t_total = len(frames)
        h, w = scene.small.shape[1:3]
        step = max(1, round(self.max_step_frac * min(h, w)))
        grow = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * step + 1, 2 * step + 1))
        for anchor in anchors:
            small = np.zeros((t_total, h, w), bool)
            for _label, box in anchor.boxes:
                b = tuple(int(round(v * scene.scale)) for v in box)
                seed = _window_mask((h, w), b)
                m0 = _grabcut(scene.small[anchor.frame_index], expand(b, 0.15, 4, w, h), seed)
                m0 = _largest_overlapping(m0, seed) if m0.any() else seed & scene.fg[anchor.frame_index]
                small[anchor.frame_index] |= m0
                min_area = 0.15 * max(1, int(m0.sum()))
                for direction in (1, -1):
                    prev = m0
                    t = anchor.frame_index + direction
                    while 0 <= t < t_total and prev.any():
                        window = expand(mask_box(prev), self.window_margin, 6, w, h)
                        moving = scene.fg[t] & _window_mask((h, w), window)
                        prior = cv2.dilate(prev.astype(np.uint8), grow) > 0
                        m = _grabcut(scene.small[t], window, prior | moving)
                        m &= prior | moving
                        m = _largest_overlapping(m, prior)
                        if m.sum() < min_area:
                            break
                        small[t] |= m
                        prev = m
                        t += direction
            yield np.stack([scene.to_full(m) for m in small])


def make_backend() -> CpuGrabCutTracker:
    return CpuGrabCutTracker()
