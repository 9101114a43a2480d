"""BAIT (Sparkle stage 4): multi-anchor tracking with a pixel-wise majority vote.

Every 2-FPS frame where round-2 grounding found at least one box is an anchor. The tracker runs one pass
per anchor, seeded with all labels' boxes on that frame and propagated forward and backward; a pass's
mask is the union over labels. The final mask is the pixel-wise majority vote over passes: a pixel is
foreground when ``2 * votes > passes``, and on a tie (``2 * votes == passes``) when ``tie_is_foreground``.
"""

from __future__ import annotations

import numpy as np

from ..backends import Anchor, GroundedObject, SampleContext, Tracker
from ..boxes import to_pixels
from ..service import check_deadline


def anchors_from_round2(frame_indices: list[int], frame_objects: list[list[GroundedObject]],
                        w: int, h: int) -> tuple[list[Anchor], list[int]]:
    """Anchors (frames with >= 1 non-empty box, boxes in pixels) and the skipped frame indices."""
    anchors, skipped = [], []
    for idx, objects in zip(frame_indices, frame_objects):
        boxes = [(o.label, px) for o in objects if (px := to_pixels(o.bbox_2d, w, h)) is not None]
        (anchors.append(Anchor(idx, boxes)) if boxes else skipped.append(idx))
    return anchors, skipped


def majority_vote(votes: np.ndarray, passes: int, tie_is_foreground: bool) -> np.ndarray:
    """``(T, H, W)`` vote counts over ``passes`` passes to a bool mask (see module doc for the tie rule)."""
    twice = 2 * votes.astype(np.int32)
    return twice >= passes if tie_is_foreground else twice > passes


def run_bait(tracker: Tracker, ctx: SampleContext, frames: np.ndarray, anchors: list[Anchor],
             tie_is_foreground: bool = True) -> np.ndarray:
    """Track from every anchor and vote (the tracking service's ``bait`` operation); returns the ``(T, H, W) bool``
    mask. ``tracker``: a model backend whose ``track`` yields one ``(T, H, W) bool`` pass per anchor.

    Raises ValueError when there is no anchor (the caller rejects the sample with that reason), TimeoutError
    when the request's deadline (:func:`~sparkle.service.run_until`) passes between two passes.
    """
    if not anchors:
        raise ValueError("no anchor frame with a grounded box")
    t, h, w = frames.shape[:3]
    votes = np.zeros((t, h, w), np.uint16)
    passes = 0
    for pass_mask in tracker.track(ctx, frames, anchors):
        check_deadline("bait")  # a request whose client got its 504 stops here, not after every pass
        if pass_mask.shape != (t, h, w):
            raise ValueError(f"tracker {tracker.name} returned {pass_mask.shape}, expected {(t, h, w)}")
        votes += pass_mask
        passes += 1
    if passes != len(anchors):
        raise ValueError(f"tracker {tracker.name} made {passes} passes for {len(anchors)} anchors")
    return majority_vote(votes, passes, tie_is_foreground)


def temporal_stability(mask: np.ndarray) -> dict:
    """Temporal stability of a ``(T, H, W) bool`` mask, for comparing BAIT with single-anchor tracking.

    - ``mean_consecutive_iou``: mean IoU of frames t and t+1 over pairs whose union is not empty (1.0 is a
      mask that never changes; a flickering or drifting mask scores lower);
    - ``area_drift``: ``|mean area of the last quarter - mean area of the first quarter| / mean area``, the
      relative growth or shrinkage of the mask over the clip (0.0 is no trend);
    - ``area_cv``: coefficient of variation of the per-frame area (std / mean);
    - ``empty_frames``: frames with no foreground at all.
    """
    t = len(mask)
    flat = mask.reshape(t, -1)
    area = flat.sum(axis=1).astype(np.float64)
    ious = []
    for a, b in zip(flat[:-1], flat[1:]):
        union = np.logical_or(a, b).sum()
        if union:
            ious.append(np.logical_and(a, b).sum() / union)
    q = max(1, t // 4)
    mean_area = area.mean()
    return {
        "mean_consecutive_iou": round(float(np.mean(ious)), 4) if ious else 0.0,
        "area_drift": round(float(abs(area[-q:].mean() - area[:q].mean()) / mean_area), 4) if mean_area else 0.0,
        "area_cv": round(float(area.std() / mean_area), 4) if mean_area else 0.0,
        "empty_frames": int((area == 0).sum()),
    }
