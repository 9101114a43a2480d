"""Which frames the final video gate judges, and how per-stage decisions are grouped in a funnel."""

from __future__ import annotations

import re


def spread_frame_indices(t: int, base: tuple[int, ...] = (1, 26, 51, 76), base_t: int = 81) -> list[int]:
    """Frame indices judged by stage 5's gate for a ``t``-frame video.

    Sparkle judges frames [1, 26, 51, 76] of 81 (a step of 25 = (81 - 6) / 3 from frame 1). Shorter clips get
    the same pattern scaled: ``round(1 + (i - 1) * (t - 6) / (base_t - 6))`` for each base index ``i``, clamped
    into ``0..t-1`` and de-duplicated, e.g. t=57 -> [1, 18, 35, 52], t=17 -> [1, 5, 8, 12].
    """
    if t < 1:
        raise ValueError("a video has at least one frame")
    if t == base_t:
        return list(base)
    scale = (t - 6) / (base_t - 6)
    return sorted({min(max(round(1 + (i - 1) * scale), 0), t - 1) for i in base})


def reason_kind(reason: str) -> str:
    """A decision's reason with its numbers replaced by ``N``, so that like refusals are counted together."""
    return re.sub(r"[-+]?\d+(?:\.\d+)?", "N", reason).strip()
