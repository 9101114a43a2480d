"""TEST DOUBLE of the i2v model backend (``--backend double``): see :mod:`sparkle.doubles`."""

from __future__ import annotations

import numpy as np

from sparkle.doubles import Double


class DoubleVideoGenerator(Double):
    def animate(self, ctx, image, prompt, num_frames, fps):
        self.sleep("i2v.animate")
        return np.repeat(image[None], num_frames, axis=0)


def make_backend(scale: float = 0.0, delay_s: float = 0.0, **_ignored) -> DoubleVideoGenerator:
    """The test double (``scale``, ``delay_s``: see :mod:`sparkle.doubles`)."""
    return DoubleVideoGenerator("i2v", scale, delay_s)
