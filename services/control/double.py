"""TEST DOUBLE of the control model backend (``--backend double``): see :mod:`sparkle.doubles`."""

from __future__ import annotations

import numpy as np

from sparkle.doubles import Double


class DoubleControlSynthesizer(Double):
    def synthesize(self, ctx, control, background, first_frame, mask, prompt):
        self.sleep("control.synthesize")
        return np.where(mask[..., None], ctx.video.frames, background)


def make_backend(scale: float = 0.0, delay_s: float = 0.0, **_ignored) -> DoubleControlSynthesizer:
    """The test double (``scale``, ``delay_s``: see :mod:`sparkle.doubles`)."""
    return DoubleControlSynthesizer("control", scale, delay_s)
