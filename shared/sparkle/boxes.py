"""Boxes in Qwen3-VL convention: ``bbox_2d = [x1, y1, x2, y2]`` normalised to 0..1000.

Pixel conversion (formats.md): ``x = int(v / 1000 * W)``, ``y = int(v / 1000 * H)``, clamped into the frame,
corners ordered so that x1 <= x2 and y1 <= y2. Pixel boxes are ``(x1, y1, x2, y2)`` ints, exclusive of
x2/y2 when used as slices.
"""

from __future__ import annotations

import numpy as np


def to_pixels(bbox_2d: list[float], w: int, h: int) -> tuple[int, int, int, int] | None:
    """0..1000 box to pixels; None for an empty ``[]`` or malformed box (wrong length, non-numbers)."""
    if not isinstance(bbox_2d, (list, tuple)) or len(bbox_2d) != 4:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in bbox_2d)
    except (TypeError, ValueError):
        return None
    xs = sorted(min(max(int(v / 1000 * w), 0), w) for v in (x1, x2))
    ys = sorted(min(max(int(v / 1000 * h), 0), h) for v in (y1, y2))
    if xs[1] <= xs[0] or ys[1] <= ys[0]:
        return None
    return xs[0], ys[0], xs[1], ys[1]


def to_normalised(box: tuple[int, int, int, int], w: int, h: int) -> list[int]:
    """Pixel box to 0..1000 ints (rounded up at the far corner so that :func:`to_pixels` covers it)."""
    x1, y1, x2, y2 = box
    return [int(np.floor(x1 * 1000 / w)), int(np.floor(y1 * 1000 / h)),
            min(1000, int(np.ceil(x2 * 1000 / w))), min(1000, int(np.ceil(y2 * 1000 / h)))]


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box ``(x1, y1, x2, y2)`` of a ``(H, W)`` bool mask (x2, y2 exclusive); None if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two pixel boxes."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def expand(box: tuple[int, int, int, int], margin: float, min_px: int, w: int, h: int):
    """Grow a pixel box by ``margin`` of its size (at least ``min_px``) on each side, clamped to the frame."""
    x1, y1, x2, y2 = box
    mx = max(min_px, int(margin * (x2 - x1)))
    my = max(min_px, int(margin * (y2 - y1)))
    return max(0, x1 - mx), max(0, y1 - my), min(w, x2 + mx), min(h, y2 + my)
