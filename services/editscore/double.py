"""TEST DOUBLE of the editscore model backend (``--backend double``): see :mod:`sparkle.doubles`."""

from __future__ import annotations

from sparkle.backends import FrameScore, ImageScore
from sparkle.doubles import Double


class DoubleScorer(Double):
    def score_image(self, ctx, source, edited, instruction, task):
        self.sleep("editscore.score_image")
        return ImageScore(prompt_following=9, consistency=9, perceptual_quality=9, overall=9,
                          SC_reasoning="test double", PQ_reasoning="test double")

    def score_frames(self, ctx, source, edited, frame_indices, instruction):
        self.sleep("editscore.score_frames")
        return [FrameScore(SC_score=9, PQ_score=9, O_score=9, SC_score_reasoning="test double",
                           PQ_score_reasoning="test double", SC_raw_output="", PQ_raw_output="") for _ in frame_indices]


def make_backend(scale: float = 0.0, delay_s: float = 0.0, **_ignored) -> DoubleScorer:
    """The test double (``scale``, ``delay_s``: see :mod:`sparkle.doubles`)."""
    return DoubleScorer("editscore", scale, delay_s)
