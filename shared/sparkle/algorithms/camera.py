"""Stage 1 coarse camera filter: is this a fixed-camera clip?

Method (Sparkle stage 1, arXiv 2605.06535: "optical flow and RANSAC homography at 2 FPS"): frames sampled at
``cfg.sample_fps`` (2 FPS) by presentation time and converted to grey at ``cfg.analysis_width`` (640 px).
Between consecutive samples:

1. **Features, spread out.** Corners are the local maxima of the Shi-Tomasi score (``cv2.cornerMinEigenVal``)
   above an *absolute* floor (``cfg.min_corner_eig``: sensor noise and codec grain stay below it), picked
   per cell of a 8x6 grid so that a strongly textured foreground cannot take every point (a relative
   quality level, as in ``cv2.goodFeaturesToTrack``, would drop a weak background next to a strong
   foreground). They are found on a half-size image (4x cheaper) and tracked at full analysis size.
2. **Pyramidal Lucas-Kanade flow** (11x11 window, 4 levels: up to ~80 px per pair).
3. **The background's homography.** A large foreground (a person walking close to the lens, a car crossing)
   can hold more tracked points than the background, and a global RANSAC fit then follows the foreground.
   The camera's motion is the motion of the *background*, and the background is what a frame's outer band
   (``cfg.border_fraction`` = 10 % of each side) mostly shows. So the homography H is fitted with RANSAC
   (``cfg.ransac_reproj_px``) on the points in that band when there are at least ``cfg.min_border_points``
   of them (the band's majority motion wins, wherever the foreground is), else on all points.
   Metrics per pair: ``corner_px`` (mean displacement of the four image corners under H, px at the analysis
   width per pair), ``border_px`` (median |flow| of the band's points), ``inlier_ratio`` (RANSAC inliers
   among the points H was fitted on).
4. **Low texture.** When fewer than ``cfg.min_tracked_points`` points can be tracked (a wall, sky, a flat
   studio backdrop), the pair is measured as a whole-frame translation by normalised cross-correlation at
   ``cfg.fallback_width`` px wide (area downscaling averages the noise away; the shift is scaled back to the
   analysis width); a correlation peak below ``cfg.min_fallback_ncc`` means the pair cannot be measured.
   Phase correlation was tried first and rejected: see :func:`_fallback_metrics`.

The clip is static when the medians over measured pairs stay under ``cfg.max_corner_motion_px`` and
``cfg.max_border_flow_px``, and (feature pairs only) the median inlier ratio is at least
``cfg.min_inlier_ratio``. See :class:`sparkle.config.CameraFilterConfig` for the defaults and why.

Two entry points share the pair code: :func:`check_fixed_camera` on decoded ``(T, H, W, 3)`` frames (the
pipeline's stage 1) and :func:`check_fixed_camera_file` on a file, which decodes only what it needs
(:func:`read_sampled_grey`).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import av
import cv2
from av.video.reformatter import VideoReformatter
import numpy as np

from ..config import CameraFilterConfig
from ..errors import InputError
from ..media import check_input_file, display_rotation, sample_indices

GRID = (8, 6)  # feature-selection cells (x, y); 48 cells of 80x60 px at 640x360
NMS_PX = 7  # local-maximum window of the corner score, px at half analysis size (~14 px at full size)
# Lucas-Kanade: an 11x11 window over 4 pyramid levels follows up to ~5 * 2**4 = 80 px per pair; measured on
# the real clips and synthetic pans (32-60 px per pair tracked to 0.1 px) it matches a 21x21 / 3-level
# tracker within 0.3 px at a quarter of the cost (benchmarks/camera_filter.py).
LK_WIN = (11, 11)
LK_LEVELS = 4
LK_CRITERIA = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 10, 0.03)  # 10 iterations or 0.03 px per level
FB_MAX_PX = 1.0  # forward-backward error of a kept track in drift_from_first (px at the analysis width)


@dataclass
class CameraDecision:
    """What the camera filter decided and the metrics it decided on.

    ``corner_px`` / ``border_px``: medians over measured pairs, px at ``analysis_width`` per
    1/``sample_fps`` s (NaN when nothing could be measured). ``inlier_ratio``: median over feature pairs
    (NaN when every pair used the low-texture fallback). ``pairs``: measured pairs, of which
    ``fallback_pairs`` by the fallback's cross-correlation; ``unmeasured_pairs``: pairs with neither enough
    features nor a correlation peak. File analysis only (0 / NaN otherwise): ``frames_decoded``, ``duration_s`` (the
    analysed span, s), ``rotation`` (display rotation applied, degrees counter-clockwise).
    """

    accepted: bool
    reason: str
    pairs: int
    corner_px: float
    border_px: float
    inlier_ratio: float
    sample_fps: float
    analysis_width: int
    analysis_height: int = 0
    fallback_pairs: int = 0
    unmeasured_pairs: int = 0
    samples: int = 0
    frames_decoded: int = 0
    duration_s: float = float("nan")
    rotation: int = 0

    def as_dict(self) -> dict:
        """Plain dict of every field (NaN stays NaN)."""
        return asdict(self)


@dataclass
class PairMetrics:
    """Camera motion between two samples: px at the analysis width per pair; ``method`` features|ncc."""

    corner_px: float
    border_px: float
    inlier_ratio: float
    method: str


@dataclass
class SampledFrames:
    """Grey samples of a file: ``frames (N, H, W) uint8`` upright at the analysis size.

    ``times``: ``(N,) float64`` presentation times in s from the first decoded frame; ``indices``:
    ``(N,) int64`` positions in presentation order; ``frames_decoded``: frames decoded in all;
    ``duration_s``: time of the last decoded frame (s from the first); ``rotation``: degrees
    counter-clockwise applied to make the frames upright (the stream's display matrix); ``source_size``:
    stored ``(width, height)`` in px.
    """

    frames: np.ndarray
    times: np.ndarray
    indices: np.ndarray
    frames_decoded: int
    duration_s: float
    rotation: int = 0
    source_size: tuple[int, int] = (0, 0)
    extra: dict = field(default_factory=dict)


# --- per-frame and per-pair measurements ---------------------------------------------------------------

def _features(grey: np.ndarray, cfg: CameraFilterConfig) -> np.ndarray:
    """Up to ``cfg.max_corners`` corner points ``(N, 1, 2) float32`` (x, y px) spread over a grid.

    Shi-Tomasi score on a half-size image (INTER_AREA), local maxima over ``NMS_PX`` px above the
    absolute floor ``cfg.min_corner_eig``; the strongest ``max_corners / 48`` per grid cell.
    """
    h, w = grey.shape
    small = cv2.resize(grey, (max(8, w // 2), max(8, h // 2)), interpolation=cv2.INTER_AREA)
    sx, sy = w / small.shape[1], h / small.shape[0]
    eig = cv2.cornerMinEigenVal(small, blockSize=3, ksize=3)
    peak = cv2.dilate(eig, np.ones((NMS_PX, NMS_PX), np.uint8))
    ys, xs = np.nonzero((eig >= peak) & (eig > cfg.min_corner_eig))
    if len(xs) == 0:
        return np.empty((0, 1, 2), np.float32)
    score = eig[ys, xs]
    gx, gy = GRID
    cell = (ys * gy // small.shape[0]) * gx + xs * gx // small.shape[1]
    order = np.lexsort((-score, cell))
    cell_sorted = cell[order]
    first = np.searchsorted(cell_sorted, cell_sorted, side="left")
    rank = np.arange(len(order)) - first
    per_cell = max(1, cfg.max_corners // (gx * gy))
    keep = order[rank < per_cell]
    pts = np.stack([(xs[keep] + 0.5) * sx - 0.5, (ys[keep] + 0.5) * sy - 0.5], axis=1)
    return pts.astype(np.float32).reshape(-1, 1, 2)


def _corner_motion(H: np.ndarray, w: int, h: int) -> float:
    """Mean displacement (px) of the four image corners of a ``w x h`` frame under homography ``H``."""
    corners = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float32).reshape(-1, 1, 2)
    return float(np.linalg.norm(cv2.perspectiveTransform(corners, H) - corners, axis=-1).mean())


def _subpixel(c: float, left: float, right: float) -> float:
    """Offset (-0.5..0.5) of a parabola's vertex through three samples around a maximum ``c``."""
    d = left - 2.0 * c + right
    return float(np.clip(0.5 * (left - right) / d, -0.5, 0.5)) if d < 0 else 0.0


def _fallback_metrics(a: np.ndarray, b: np.ndarray, cfg: CameraFilterConfig) -> PairMetrics | None:
    """Whole-frame translation for low-texture pairs, or None when the frames do not correlate.

    Both frames are area-downscaled to ``cfg.fallback_width`` px wide (noise averages out, a 16-px codec
    block becomes 4 px) and blurred (Gaussian sigma 1.5 px, removes the block pattern); the centre
    (3/4 of each side) of ``a`` is matched in ``b`` by normalised cross-correlation
    (``cv2.matchTemplate``, TM_CCOEFF_NORMED) over shifts up to 1/8 of each side (80 px at 640 wide),
    refined to subpixel by a parabola. A peak under ``cfg.min_fallback_ncc`` means no measurement; a peak
    on the edge of the search range is reported as that (large) shift.

    Why not phase correlation (``cv2.phaseCorrelate``): it whitens the spectrum, so on a nearly flat frame
    the noise and the fixed codec block grid weigh as much as the scene; measured on a still, nearly flat
    noisy x264 clip it reported 2.3 px per pair with a "confident" 0.4 peak, and on pure noise the same.
    NCC reported <= 0.3 px (peak 0.99) on the still scene, 48.0 px on its 48-px pan, and a 0.09-0.16 peak
    on pure noise.
    """
    h, w = a.shape
    pw = min(w, cfg.fallback_width)
    ph = max(16, round(h * pw / w))
    sa, sb = (cv2.GaussianBlur(cv2.resize(x, (pw, ph), interpolation=cv2.INTER_AREA).astype(np.float32),
                               (0, 0), 1.5) for x in (a, b))
    mx, my = max(1, pw // 8), max(1, ph // 8)
    res = cv2.matchTemplate(sb, sa[my:ph - my, mx:pw - mx], cv2.TM_CCOEFF_NORMED)
    _, peak, _, (x, y) = cv2.minMaxLoc(res)
    if not np.isfinite(peak) or peak < cfg.min_fallback_ncc:
        return None
    sx = _subpixel(res[y, x], res[y, x - 1], res[y, x + 1]) if 0 < x < res.shape[1] - 1 else 0.0
    sy = _subpixel(res[y, x], res[y - 1, x], res[y + 1, x]) if 0 < y < res.shape[0] - 1 else 0.0
    shift = math.hypot((x + sx - mx) * w / pw, (y + sy - my) * h / ph)
    return PairMetrics(shift, shift, float("nan"), "ncc")


def _pair_metrics(a: np.ndarray, b: np.ndarray, cfg: CameraFilterConfig,
                  pts: np.ndarray | None = None) -> PairMetrics | None:
    """Camera motion between grey frames ``a`` and ``b`` ``(H, W) uint8``; None if it cannot be measured.

    ``pts``: ``a``'s features from :func:`_features` (computed when None).
    """
    h, w = a.shape
    if pts is None:
        pts = _features(a, cfg)
    if len(pts) >= cfg.min_tracked_points:
        nxt, status, _ = cv2.calcOpticalFlowPyrLK(a, b, pts, None, winSize=LK_WIN, maxLevel=LK_LEVELS,
                                                  criteria=LK_CRITERIA)
        ok = status.ravel() == 1
        p0, p1 = pts[ok].reshape(-1, 2), nxt[ok].reshape(-1, 2)
        if len(p0) >= cfg.min_tracked_points:
            band = _in_band(p0, w, h, cfg)
            fit = band if band.sum() >= cfg.min_border_points else np.ones(len(p0), bool)
            H, inliers = cv2.findHomography(p0[fit], p1[fit], cv2.RANSAC, cfg.ransac_reproj_px)
            if H is not None:
                flow = np.linalg.norm(p1 - p0, axis=1)
                still = _still_background(p0, p1, flow, fit, H, w, h, cfg)
                if still is not None:
                    H, inliers, fit = still
                return PairMetrics(_corner_motion(H, w, h), float(np.median(flow[fit])),
                                   float(inliers.mean()), "features")
    return _fallback_metrics(a, b, cfg)


def _in_band(p: np.ndarray, w: int, h: int, cfg: CameraFilterConfig) -> np.ndarray:
    """``(N,) bool``: which points ``(N, 2)`` lie in the frame's outer band (``cfg.border_fraction`` of each
    side), the part of a frame that mostly shows the background."""
    mx, my = cfg.border_fraction * w, cfg.border_fraction * h
    return (p[:, 0] < mx) | (p[:, 0] > w - 1 - mx) | (p[:, 1] < my) | (p[:, 1] > h - 1 - my)


def _still_background(p0: np.ndarray, p1: np.ndarray, flow: np.ndarray, fit: np.ndarray, H: np.ndarray, w: int,
                      h: int, cfg: CameraFilterConfig):
    """The still background behind a moving foreground that took RANSAC's consensus, if there is one.

    ``p0``/``p1``: every tracked point of the pair, ``flow`` their displacements; ``fit``: the points ``H`` was
    fitted on (the band's).
    A subject filling the frame (someone talking to the camera, a car passing close) can hold more of the
    band's points than the background does, and RANSAC then fits the subject's motion (and the band's median
    flow is the subject's). If either moves (corner motion over ``cfg.max_corner_motion_px``, median flow over
    ``cfg.max_border_flow_px``) while the tracked points hold a still set (flow under ``cfg.ransac_reproj_px``)
    of at least ``cfg.min_border_points`` points and an eighth of all (3 of the 8x6 feature grid's 24 cells'
    worth: a strip of background above a subject), the still set's own motion is the camera's: with a moving
    camera the background moves, and a still set that large would need an object moving with the camera
    over much of the frame (a car's dashboard), which the fine check still sees. The still set's motion is
    measured, not assumed: a camera moving 1-3 px per pair is still measured as moving. Its motion is a
    similarity fitted on it (``cv2.estimateAffinePartial2D``, RANSAC: a homography is degenerate on points
    along one side of the frame). Returns ``(H, inliers, fit)`` for it (``fit``: indices into ``p0``), or None
    to keep the first fit. (A synthetic subject over 85 % of the width and of the height, moving ~6 px per
    pair, was measured as camera motion of 8-20 px per pair before; the still background now decides.)
    """
    if _corner_motion(H, w, h) <= cfg.max_corner_motion_px and np.median(flow[fit]) <= cfg.max_border_flow_px:
        return None
    still = np.flatnonzero(flow < cfg.ransac_reproj_px)
    if len(still) < max(cfg.min_border_points, len(p0) / 8):
        return None
    m, inliers = cv2.estimateAffinePartial2D(p0[still], p1[still], method=cv2.RANSAC,
                                             ransacReprojThreshold=cfg.ransac_reproj_px)
    if m is None:
        return None
    return np.vstack([m, [0.0, 0.0, 1.0]]), inliers.ravel().astype(bool), still


def decide_from_grey(grey: list[np.ndarray] | np.ndarray, cfg: CameraFilterConfig) -> CameraDecision:
    """Decide on consecutive grey samples ``(N, H, W) uint8`` taken at ``cfg.sample_fps``.

    With one sample nothing can be measured (refused). The metrics are medians over measured pairs.
    """
    grey = [np.ascontiguousarray(g) for g in grey]
    h, w = grey[0].shape if grey else (0, 0)
    base = dict(sample_fps=cfg.sample_fps, analysis_width=w, analysis_height=h, samples=len(grey))
    metrics, unmeasured = [], 0
    for a, b in zip(grey, grey[1:]):
        m = _pair_metrics(a, b, cfg, _features(a, cfg))
        if m is None:
            unmeasured += 1
        else:
            metrics.append(m)
    if not metrics:
        why = "a single frame" if len(grey) < 2 else "too little texture"
        return CameraDecision(False, f"{why}: camera motion cannot be measured", 0, float("nan"),
                              float("nan"), float("nan"), unmeasured_pairs=unmeasured, **base)
    corner = float(np.median([m.corner_px for m in metrics]))
    border = float(np.median([m.border_px for m in metrics]))
    feats = [m.inlier_ratio for m in metrics if m.method == "features"]
    inl = float(np.median(feats)) if feats else float("nan")
    d = dict(pairs=len(metrics), corner_px=round(corner, 3), border_px=round(border, 3),
             inlier_ratio=round(inl, 3), fallback_pairs=len(metrics) - len(feats), unmeasured_pairs=unmeasured,
             **base)
    if corner > cfg.max_corner_motion_px:
        return CameraDecision(False, f"camera moves: median corner motion {corner:.2f} px > "
                                     f"{cfg.max_corner_motion_px} px per pair", **d)
    if border > cfg.max_border_flow_px:
        return CameraDecision(False, f"camera moves: median border flow {border:.2f} px > "
                                     f"{cfg.max_border_flow_px} px per pair", **d)
    if feats and inl < cfg.min_inlier_ratio:
        return CameraDecision(False, f"homography unreliable: inlier ratio {inl:.2f} < {cfg.min_inlier_ratio}", **d)
    how = f" ({d['fallback_pairs']} of {len(metrics)} pairs by the low-texture fallback)" if d["fallback_pairs"] else ""
    return CameraDecision(True, f"fixed camera: corner motion {corner:.2f} px, border flow {border:.2f} px"
                                f"{how}", **d)


def drift_against(grey: list[np.ndarray] | np.ndarray, cfg: CameraFilterConfig,
                  reference: int = 0) -> list[float | None]:
    """Camera drift of each grey sample ``(N, H, W) uint8`` against sample ``reference``, px at their width
    (0.0 for the reference itself).

    Features of the reference (:func:`_features`) are tracked to sample k by Lucas-Kanade and back (tracks whose
    round trip misses by ``FB_MAX_PX`` or more are dropped: Kalal et al.'s forward-backward error); a similarity transform
    (translation, rotation, scale: ``cv2.estimateAffinePartial2D``, RANSAC at ``cfg.ransac_reproj_px``) is
    fitted on the points of the frame's outer band (``cfg.border_fraction``), which shows the still
    background even when a subject fills the middle (all points when the band has fewer than
    ``cfg.min_border_points``, or the band's fit has fewer than half of them as inliers or an inlier ratio under
    ``cfg.min_inlier_ratio``); the drift is the mean displacement of the four image corners under it. A
    similarity, not the coarse filter's homography: over a whole clip a homography's perspective terms,
    fitted on a band, can swing the far corners by hundreds of pixels on a still shot. Too few features: the
    low-texture fallback's whole-frame shift. ``None`` where a pair cannot be measured; ``[]`` for fewer than
    two samples. Bounds what pairwise motion misses: a slow pan under the per-pair threshold that adds up
    over the clip. Raises IndexError for a reference outside the samples.
    """
    grey = [np.ascontiguousarray(g) for g in grey]
    if len(grey) < 2:
        return []
    a = grey[reference]
    h, w = a.shape
    pts = _features(a, cfg)
    corners = np.float32([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]])
    out: list[float | None] = []
    for k, b in enumerate(grey):
        if k == reference:
            out.append(0.0)
            continue
        drift = None
        if len(pts) >= cfg.min_tracked_points:
            nxt, status, _ = cv2.calcOpticalFlowPyrLK(a, b, pts, None, winSize=LK_WIN, maxLevel=LK_LEVELS,
                                                      criteria=LK_CRITERIA)
            back, status_back, _ = cv2.calcOpticalFlowPyrLK(b, a, nxt, None, winSize=LK_WIN, maxLevel=LK_LEVELS,
                                                            criteria=LK_CRITERIA)
            # forward-backward check: a track that does not come back to within FB_MAX_PX of its start was lost
            # (codec noise on a dark sky, a feature that left the frame)
            fb = np.linalg.norm((back - pts).reshape(-1, 2), axis=1)
            ok = (status.ravel() == 1) & (status_back.ravel() == 1) & (fb < FB_MAX_PX)
            p0, p1 = pts[ok].reshape(-1, 2), nxt[ok].reshape(-1, 2)
            if len(p0) >= cfg.min_tracked_points:
                band = _in_band(p0, w, h, cfg)
                for fit in ((band, np.ones(len(p0), bool)) if band.sum() >= cfg.min_border_points
                            else (np.ones(len(p0), bool),)):
                    m, inliers = cv2.estimateAffinePartial2D(p0[fit], p1[fit], method=cv2.RANSAC,
                                                             ransacReprojThreshold=cfg.ransac_reproj_px)
                    # a fit the band's points do not agree on (few inliers) is no measurement of the camera
                    if m is not None and inliers.sum() >= max(cfg.min_border_points // 2, 4) \
                            and inliers.mean() >= cfg.min_inlier_ratio:
                        moved = corners @ m[:, :2].T + m[:, 2]
                        drift = float(np.linalg.norm(moved - corners, axis=1).mean())
                        break
        if drift is None:
            fallback = _fallback_metrics(a, b, cfg)
            drift = None if fallback is None else fallback.corner_px
        out.append(drift)
    return out


def check_fixed_camera(frames: np.ndarray, fps: float, cfg: CameraFilterConfig) -> CameraDecision:
    """Decide whether ``frames`` ``(T, H, W, 3) uint8`` RGB at ``fps`` come from a fixed camera.

    Samples by index (:func:`sparkle.media.sample_indices`, constant rate), resizes to
    ``cfg.analysis_width`` (INTER_AREA) and greys them, then :func:`decide_from_grey`. Returns a
    :class:`CameraDecision` whose metrics are medians over sampled pairs, in px at ``cfg.analysis_width``
    per 1/``sample_fps`` s. Clips shorter than one sampling step use their first and last frames.
    """
    idx = sample_indices(len(frames), fps, cfg.sample_fps)
    if len(idx) < 2 and len(frames) > 1:
        idx = [0, len(frames) - 1]
    h, w = frames.shape[1:3]
    size = (cfg.analysis_width, max(16, round(h * cfg.analysis_width / w)))
    grey = [cv2.cvtColor(cv2.resize(frames[i], size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
            for i in idx]
    return decide_from_grey(grey, cfg)


# --- sparse decoding ---------------------------------------------------------------------------------

_PLANAR_YUV = {"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "nv12", "nv21", "yuv410p",
               "yuv411p", "yuv440p"}
"""8-bit pixel formats whose first plane is full-resolution luma (read directly instead of through swscale)."""


def read_sampled_grey(path: str | os.PathLike, sample_fps: float = 2.0, width: int = 640,
                      max_frames: int | None = 81, max_seconds: float | None = None,
                      threads: int = 0) -> SampledFrames:
    """Decode ``path`` from t=0 and keep only the frames sampled at ``sample_fps``, grey, upright, ``width`` wide.

    Sampling is by presentation time (``frame.time = pts * time_base``, so variable-frame-rate files sample
    correctly): for each target ``t0 + k / sample_fps`` (``t0``: the first frame's time) the nearest decoded
    frame is kept (ties: the later one; a frame is kept once; the last target is kept only if it lies within
    half a frame interval of the last frame, as :func:`sparkle.media.sample_indices` rounds). Only kept frames
    are converted, straight to grey at the analysis size by swscale (PyAV's ``frame.reformat(width, height,
    format="gray")`` through one reused ``VideoReformatter``, area filter; no RGB conversion at all); the
    stream's display rotation is applied afterwards (``np.rot90``), and the analysis size is chosen so that
    the *upright* frame is ``width`` px wide. Decoding stops after ``max_frames`` frames
    (default 81: what the pipeline keeps, :class:`sparkle.config.ConformConfig`) or once a frame lies
    ``max_seconds`` after the first (None: no limit). A clip shorter than one sampling step gives its first
    and last frames. ``threads``: decoder threads (0: FFmpeg's choice, frame+slice threading).

    Raises :class:`InputError` for a missing, empty or undecodable file or one without video frames.
    """
    p = check_input_file(path)
    step = 1.0 / sample_fps
    kept: list[np.ndarray] = []
    times: list[float] = []
    indices: list[int] = []
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise InputError(f"no video stream in {p}")
            stream = container.streams.video[0]
            if threads == 1:
                stream.thread_type = "SLICE"
                stream.codec_context.thread_count = 1
            else:
                stream.thread_type = "AUTO"
                stream.codec_context.thread_count = threads
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps_guess = float(rate) if rate else 25.0
            size = rot = None
            t0 = None
            target = 0.0
            prev = prev_t = None
            n = 0
            last_dt = 1.0 / fps_guess

            reformatter = VideoReformatter()  # one swscale context for every kept frame (a fresh one per
            # frame, as frame.reformat() makes, costs ~2 ms of set-up each)

            def keep(frame, t: float, i: int) -> None:
                if indices and indices[-1] == i:
                    return
                if frame.format.name in _PLANAR_YUV:  # the luma plane is the grey image: no conversion
                    plane = frame.planes[0]
                    luma = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, :plane.width]
                    g = cv2.resize(luma, size, interpolation=cv2.INTER_AREA)
                else:
                    g = reformatter.reformat(frame, width=size[0], height=size[1], format="gray",
                                             interpolation="AREA").to_ndarray()
                if rot:
                    g = np.rot90(g, k=rot // 90)
                kept.append(np.ascontiguousarray(g))
                times.append(t)
                indices.append(i)

            for frame in container.decode(stream):
                if frame.pts is not None and frame.time is not None:
                    t_abs = float(frame.time)
                else:  # no timestamps (raw streams): count frames at the nominal rate
                    t_abs = n / fps_guess
                if t0 is None:
                    t0 = t_abs
                    rot = display_rotation(stream, frame)
                    sw, sh = frame.width, frame.height
                    uw, uh = (sh, sw) if rot % 180 else (sw, sh)
                    ah = max(16, round(uh * width / uw))
                    size = (ah, width) if rot % 180 else (width, ah)
                t = t_abs - t0
                if max_seconds is not None and t > max_seconds + 1e-9:
                    break
                if prev is not None and t > prev_t:
                    last_dt = t - prev_t
                while t >= target - 1e-9:
                    if prev is not None and target - prev_t < t - target:
                        keep(prev, prev_t, n - 1)
                    else:
                        keep(frame, t, n)
                    target += step
                prev, prev_t = frame, t
                n += 1
                if max_frames is not None and n >= max_frames:
                    break
    except InputError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise InputError(f"not a decodable video: {p} ({exc.__class__.__name__}: {exc})") from exc
    if prev is None:
        raise InputError(f"no decodable frames in {p}")
    if target - prev_t <= 0.5 * last_dt + 1e-9:  # the pending target rounds to the last frame
        keep(prev, prev_t, n - 1)
    if len(kept) < 2 and n > 1:  # shorter than one sampling step: first and last frames
        keep(prev, prev_t, n - 1)
    return SampledFrames(np.stack(kept), np.asarray(times, np.float64), np.asarray(indices, np.int64),
                         n, float(prev_t), rot or 0, (sw, sh))


def check_fixed_camera_file(path: str | os.PathLike, cfg: CameraFilterConfig | None = None,
                            threads: int = 0) -> CameraDecision:
    """Decide whether the video file at ``path`` comes from a fixed camera, decoding only what it needs.

    Reads samples with :func:`read_sampled_grey` (``cfg.sample_fps``, ``cfg.analysis_width``,
    ``cfg.analysis_max_frames``, ``cfg.analysis_max_seconds``), then :func:`decide_from_grey`. The
    decision also carries ``frames_decoded``, ``duration_s`` and ``rotation``. Raises :class:`InputError`
    for a missing or undecodable file.
    """
    cfg = cfg or CameraFilterConfig()
    s = read_sampled_grey(path, cfg.sample_fps, cfg.analysis_width, cfg.analysis_max_frames,
                          cfg.analysis_max_seconds, threads)
    d = decide_from_grey(s.frames, cfg)
    d.frames_decoded, d.duration_s, d.rotation = s.frames_decoded, round(s.duration_s, 4), s.rotation
    return d
