"""``cpu`` tracking backend: box-seeded GrabCut, propagated frame by frame from each anchor.

One pass per anchor (BAIT). At the anchor, each label's box seeds GrabCut (inside the box: probable
foreground; around it: probable background; the window's border: background), see
:meth:`sparkle.algorithms.scene.SceneModel.segment`. Each next frame, forward and then backward from the
anchor, is segmented in a window around the previous mask (grown by 25 %, at least 6 px) with the previous
mask (grown by ``max_step``) and the moving pixels as probable foreground. The new mask may only grow by
``max_step`` px per frame outside moving pixels (limits drift into look-alike background), and an object
whose mask collapses below 15 % of its anchor area is dropped for the rest of that direction. A pass's
mask is the union over labels. Work happens at the scene model's scale (short side 180 px); masks are
upsampled at the end. Passes run in a thread pool (OpenCV releases the GIL) and are yielded in order.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import cv2
import numpy as np

from sparkle.algorithms.scene import SceneModel, grabcut, overlapping_components, scene_of, window_mask
from sparkle.backends import Anchor, SampleContext
from sparkle.boxes import expand, mask_box


class CpuGrabCutTracker:
    name = "cpu-grabcut-propagation"

    def __init__(self, window_margin: float = 0.25, max_step_frac: float = 0.02, workers: int | None = None):
        self.window_margin = window_margin
        self.max_step_frac = max_step_frac
        self.workers = workers or min(4, os.cpu_count() or 1)

    def setup(self) -> None:
        """Nothing to load."""

    def _propagate(self, scene: SceneModel, t: int, prev: np.ndarray, grow: np.ndarray) -> np.ndarray:
        h, w = prev.shape
        window = expand(mask_box(prev), self.window_margin, 6, w, h)
        prior = cv2.dilate(prev.astype(np.uint8), grow) > 0
        moving = scene.fg[t] & window_mask((h, w), window)
        m = grabcut(scene.small[t], window, prior | moving, iterations=1)
        return overlapping_components((m & prior) | moving, prior)

    def _pass(self, scene: SceneModel, anchor: Anchor) -> np.ndarray:
        t_total, h, w = scene.fg.shape
        step = max(1, round(self.max_step_frac * min(h, w)))
        grow = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * step + 1, 2 * step + 1))
        small = np.zeros((t_total, h, w), bool)
        for _label, box in anchor.boxes:
            m0 = scene.segment(anchor.frame_index, [box])
            small[anchor.frame_index] |= m0
            min_area = 0.15 * max(1, int(m0.sum()))
            for direction in (1, -1):
                prev, t = m0, anchor.frame_index + direction
                while 0 <= t < t_total and prev.any():
                    m = self._propagate(scene, t, prev, grow)
                    if m.sum() < min_area:
                        break
                    small[t] |= m
                    prev, t = m, t + direction
        return np.stack([scene.to_full(m) for m in small])

    def track(self, ctx: SampleContext, frames: np.ndarray, anchors: list[Anchor]) -> Iterator[np.ndarray]:
        """Yield one ``(T, H, W) bool`` mask per anchor (union over that anchor's labels), in anchor order."""
        scene = scene_of(ctx)
        with ThreadPoolExecutor(self.workers) as pool:
            futures = [pool.submit(self._pass, scene, a) for a in anchors]
            for f in futures:
                yield f.result()


def make_backend(**options) -> CpuGrabCutTracker:
    return CpuGrabCutTracker()
