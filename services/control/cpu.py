"""``cpu`` control-synthesis backend: feathered compositing with colour harmonisation.

The source foreground (the sample's conformed video inside the BAIT mask) is composited over the background
video with a Gaussian-feathered alpha (1.5 px). Harmonisation moves the foreground's mean Lab colour a
fraction (L 10 %, a/b 20 %) towards the background's, per frame, so the subject takes on the new light
without losing its identity. The control video is accepted for interface parity with the model backend;
a compositor needs no edges (it is stored by the pipeline all the same).
"""

from __future__ import annotations

import cv2
import numpy as np

from sparkle.backends import SampleContext

HARMONISE = np.array([0.10, 0.20, 0.20], np.float32)  # fraction of the Lab mean shift applied (L, a, b)


def harmonise(fg: np.ndarray, bg: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shift ``fg`` ``(H, W, 3) uint8`` towards ``bg``'s mean Lab colour (inside ``mask`` vs outside it)."""
    if mask.sum() < 16 or (~mask).sum() < 16:
        return fg
    lab_fg = cv2.cvtColor(fg, cv2.COLOR_RGB2LAB).astype(np.float32)
    lab_bg = cv2.cvtColor(bg, cv2.COLOR_RGB2LAB).astype(np.float32)
    shift = (lab_bg[~mask].mean(axis=0) - lab_fg[mask].mean(axis=0)) * HARMONISE
    return cv2.cvtColor(np.clip(lab_fg + shift, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


class CpuCompositor:
    name = "cpu-feathered-compositor"

    def setup(self) -> None:
        """Nothing to load."""

    def synthesize(self, ctx: SampleContext, control: np.ndarray, background: np.ndarray,
                   first_frame: np.ndarray, mask: np.ndarray, prompt: str) -> np.ndarray:
        """``(T, H, W, 3) uint8``: source foreground over ``background`` inside ``mask`` ``(T, H, W) bool``."""
        source = ctx.video.frames
        out = np.empty_like(source)
        for t in range(len(source)):
            fg = harmonise(source[t], background[t], mask[t])
            alpha = cv2.GaussianBlur(mask[t].astype(np.float32), (0, 0), 1.5)[..., None]
            out[t] = (fg * alpha + background[t] * (1 - alpha) + 0.5).astype(np.uint8)
        return out


def make_backend(**options) -> CpuCompositor:
    return CpuCompositor()
