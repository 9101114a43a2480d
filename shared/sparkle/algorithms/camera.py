"""Stage 1 coarse camera filter: is this a fixed-camera clip?

Method (Sparkle stage 1): frames sampled at 2 FPS and resized to 640 px width; between consecutive samples,
Shi-Tomasi corners are tracked with pyramidal Lucas-Kanade flow and a homography H is fitted with RANSAC
(3 px). Per pair we measure the mean displacement of the four image corners under H (``corner_px``), the
median flow of tracked points in the outer 10 % of the frame (``border_px``, the part a foreground rarely
covers) and the RANSAC inlier ratio. The clip is static when the medians over pairs stay under the
configured thresholds (see :class:`sparkle.config.CameraFilterConfig` for the defaults and why).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from ..config import CameraFilterConfig
from ..media import sample_indices


@dataclass
class CameraDecision:
    accepted: bool
    reason: str
    pairs: int
    corner_px: float
    border_px: float
    inlier_ratio: float
    sample_fps: float
    analysis_width: int

    def as_dict(self) -> dict:
        return asdict(self)


def _pair_metrics(a: np.ndarray, b: np.ndarray, cfg: CameraFilterConfig) -> tuple[float, float, float] | None:
    """(corner_px, border_px, inlier_ratio) between two grey frames, or None if too few features."""
    h, w = a.shape
    pts = cv2.goodFeaturesToTrack(a, maxCorners=cfg.max_corners, qualityLevel=0.01, minDistance=8)
    if pts is None or len(pts) < 8:
        return None
    nxt, status, _ = cv2.calcOpticalFlowPyrLK(a, b, pts, None, winSize=(21, 21), maxLevel=3)
    ok = status.ravel() == 1
    p0, p1 = pts[ok].reshape(-1, 2), nxt[ok].reshape(-1, 2)
    if len(p0) < 8:
        return None
    H, inliers = cv2.findHomography(p0, p1, cv2.RANSAC, cfg.ransac_reproj_px)
    if H is None:
        return None
    corners = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float32).reshape(-1, 1, 2)
    corner_px = float(np.linalg.norm(cv2.perspectiveTransform(corners, H) - corners, axis=-1).mean())
    mx, my = 0.1 * w, 0.1 * h
    border = (p0[:, 0] < mx) | (p0[:, 0] > w - mx) | (p0[:, 1] < my) | (p0[:, 1] > h - my)
    flow = np.linalg.norm(p1 - p0, axis=1)
    border_px = float(np.median(flow[border])) if border.sum() >= 4 else float(np.median(flow))
    return corner_px, border_px, float(inliers.mean())


def check_fixed_camera(frames: np.ndarray, fps: float, cfg: CameraFilterConfig) -> CameraDecision:
    """Decide whether ``frames`` ``(T, H, W, 3) uint8`` at ``fps`` come from a fixed camera.

    Returns a :class:`CameraDecision` whose metrics are medians over sampled pairs, in px at
    ``cfg.analysis_width`` per 1/``sample_fps`` s. Clips shorter than one sampling step use their first
    and last frames as the one pair.
    """
    idx = sample_indices(len(frames), fps, cfg.sample_fps)
    if len(idx) < 2:
        idx = [0, len(frames) - 1]
    h, w = frames.shape[1:3]
    size = (cfg.analysis_width, max(16, round(h * cfg.analysis_width / w)))
    grey = [cv2.cvtColor(cv2.resize(frames[i], size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
            for i in idx]
    metrics = [m for a, b in zip(grey, grey[1:]) if (m := _pair_metrics(a, b, cfg)) is not None]
    base = dict(sample_fps=cfg.sample_fps, analysis_width=cfg.analysis_width)
    if not metrics:
        return CameraDecision(False, "too little texture to measure camera motion", 0,
                              float("nan"), float("nan"), float("nan"), **base)
    corner, border, inl = (float(np.median(v)) for v in zip(*metrics))
    d = dict(pairs=len(metrics), corner_px=round(corner, 3), border_px=round(border, 3),
             inlier_ratio=round(inl, 3), **base)
    if corner > cfg.max_corner_motion_px:
        return CameraDecision(False, f"camera moves: median corner motion {corner:.2f} px > "
                                     f"{cfg.max_corner_motion_px} px per pair", **d)
    if border > cfg.max_border_flow_px:
        return CameraDecision(False, f"camera moves: median border flow {border:.2f} px > "
                                     f"{cfg.max_border_flow_px} px per pair", **d)
    if inl < cfg.min_inlier_ratio:
        return CameraDecision(False, f"homography unreliable: inlier ratio {inl:.2f} < {cfg.min_inlier_ratio}", **d)
    return CameraDecision(True, f"fixed camera: corner motion {corner:.2f} px, border flow {border:.2f} px", **d)
