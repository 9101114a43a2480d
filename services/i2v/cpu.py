"""``cpu`` I2V backend: holds the clean plate, or plays the user's background video back and forth.

With a user background *video* in the context, its frames (fitted to the plate's size by cover-scaling and
centre-cropping) are played forward, then backward, then forward again (ping-pong: 0, 1, .., n-1, n-2, .., 1,
0, 1, ..), so a short background lives for the whole clip without a jump; frame 0 is replaced by the given
plate so that the background video starts exactly where the image edit ended. Otherwise the plate is held
still for every frame.
"""

from __future__ import annotations

import numpy as np

from sparkle.backends import SampleContext
from sparkle.media import fit_to


def ping_pong(i: int, n: int) -> int:
    """Index into ``n >= 2`` frames of output frame ``i`` when played forward and backward in turn."""
    period = 2 * (n - 1)
    k = i % period
    return k if k < n else period - k


class CpuHoldOrLoop:
    name = "cpu-hold-or-loop"

    def setup(self) -> None:
        """Nothing to load."""

    def animate(self, ctx: SampleContext, image: np.ndarray, prompt: str, num_frames: int, fps: float) -> np.ndarray:
        """``(num_frames, H, W, 3) uint8`` background video starting at ``image``."""
        h, w = image.shape[:2]
        bg = ctx.background
        if bg is None or len(bg.frames) < 2:
            return np.repeat(image[None], num_frames, axis=0)
        src = [fit_to(f, w, h) for f in bg.frames]
        out = np.stack([src[ping_pong(i, len(src))] for i in range(num_frames)])
        out[0] = image
        return out


def make_backend(**options) -> CpuHoldOrLoop:
    return CpuHoldOrLoop()
