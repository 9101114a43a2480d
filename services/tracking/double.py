"""TEST DOUBLE of the tracking model backend (``--backend double``): see :mod:`sparkle.doubles`."""

from __future__ import annotations

import numpy as np

from sparkle.doubles import Double


class DoubleTracker(Double):
    def track(self, ctx, frames, anchors):
        self.sleep("tracking.track")
        t, h, w = frames.shape[:3]
        for anchor in anchors:
            mask = np.zeros((t, h, w), bool)
            for _, (x1, y1, x2, y2) in anchor.boxes:
                mask[:, y1:y2, x1:x2] = True
            yield mask


def make_backend(scale: float = 0.0, delay_s: float = 0.0, **_ignored) -> DoubleTracker:
    """The test double (``scale``, ``delay_s``: see :mod:`sparkle.doubles`)."""
    return DoubleTracker("tracking", scale, delay_s)
