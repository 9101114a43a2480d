"""``cpu`` EditScore backend: ``cpu-proxy-v1``, a measured stand-in for the EditScore judge.

It keeps EditScore's structure (formats.md): SC is the minimum of its criteria, PQ the minimum of its
criteria, each on 0..10, and ``O = sqrt(SC * PQ)``. The criteria are measurements, all in grey levels
(0..255, mean absolute difference over RGB) inside or outside the foreground mask (the BAIT mask once
known, else the motion mask of frame 0; inside = eroded 3 px, outside = beyond a 7 px dilation):

SC criteria
- ``edit_background`` / video frames: foreground fidelity ``10 * (1 - d_in / 30)`` (the subject must stay
  as it was) and background change ``10 * d_out / 25`` (the instruction asks for a new background).
- ``remove_foreground``: removal ``10 * d_in / 25`` (the subject must be gone) and consistency
  ``10 * (1 - d_out / 15)`` (nothing else may change).

PQ criteria
- detail: ``10 * r / 0.35`` where ``r`` is the ratio edited/source of std(Laplacian)/std(grey), i.e.
  contrast-normalised high-frequency energy (a darker grade keeps it, a blur loses it);
- exposure: ``10 * (1 - (c - 0.05) / 0.25)`` with ``c`` the fraction of clipped pixels (<= 2 or >= 253);
- video frames only, flicker: ``10 * (1 - e / 8)`` with ``e`` the change of mean brightness outside the
  mask between frames i-1 and i, in excess of the source's (grey levels). Motion is not flicker: a lively
  or moving background keeps its score, a pulsing exposure loses it.

Every score is clipped to 0..10 and rounded to 2 decimals; the reasoning strings give the measurements.
"""

from __future__ import annotations

import json

import cv2
import numpy as np

from sparkle.algorithms.scene import frame0_foreground
from sparkle.backends import FrameScore, ImageScore, SampleContext

SCORER = "cpu-proxy-v1"


def _clip(v: float) -> float:
    return round(float(np.clip(v, 0.0, 10.0)), 2)


def _regions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k3 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    k7 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15))
    m = mask.astype(np.uint8)
    return cv2.erode(m, k3) > 0, ~(cv2.dilate(m, k7) > 0)


def _mad(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    if not where.any():
        return 0.0
    return float(np.abs(a[where].astype(np.int16) - b[where].astype(np.int16)).mean())


def _brightness(img: np.ndarray, where: np.ndarray) -> float:
    return float(img[where].mean()) if where.any() else 0.0


def _detail(img: np.ndarray) -> float:
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return float(cv2.Laplacian(g, cv2.CV_32F).std() / (g.std() + 1e-3))


def _pq(source: np.ndarray, edited: np.ndarray) -> tuple[float, dict]:
    r = _detail(edited) / max(_detail(source), 1e-6)
    clipped = float(((edited <= 2).all(-1) | (edited >= 253).all(-1)).mean())
    detail, exposure = _clip(10 * r / 0.35), _clip(10 * (1 - (clipped - 0.05) / 0.25))
    return min(detail, exposure), {"detail_ratio": round(r, 3), "detail": detail,
                                   "clipped_fraction": round(clipped, 4), "exposure": exposure}


class CpuProxyScorer:
    name = SCORER

    def setup(self) -> None:
        """Nothing to load."""

    def score_image(self, ctx: SampleContext, source: np.ndarray, edited: np.ndarray,
                    instruction: str, task: str) -> ImageScore:
        """Score one edit; ``task``: ``"edit_background"`` or ``"remove_foreground"``. Raises ValueError otherwise."""
        inside, outside = _regions(frame0_foreground(ctx))
        d_in, d_out = _mad(source, edited, inside), _mad(source, edited, outside)
        if task == "edit_background":
            pf, pf_name = _clip(10 * d_out / 25), "background change"
            cons, cons_name = _clip(10 * (1 - d_in / 30)), "foreground fidelity"
        elif task == "remove_foreground":
            pf, pf_name = _clip(10 * d_in / 25), "foreground removal"
            cons, cons_name = _clip(10 * (1 - d_out / 15)), "consistency outside the foreground"
        else:
            raise ValueError(f"unknown task {task!r}")
        pq, m = _pq(source, edited)
        sc = min(pf, cons)
        return ImageScore(
            prompt_following=pf, consistency=cons, perceptual_quality=pq, overall=round(float(np.sqrt(sc * pq)), 2),
            SC_reasoning=(f"[{SCORER}] mean abs diff {d_in:.1f}/255 inside the foreground, {d_out:.1f}/255 outside; "
                          f"{pf_name} {pf}, {cons_name} {cons}"),
            PQ_reasoning=(f"[{SCORER}] detail ratio {m['detail_ratio']} (score {m['detail']}), clipped pixels "
                          f"{m['clipped_fraction']:.2%} (score {m['exposure']})"),
        )

    def score_frames(self, ctx: SampleContext, source: np.ndarray, edited: np.ndarray,
                     frame_indices: list[int], instruction: str) -> list[FrameScore]:
        """One :class:`FrameScore` per index of ``frame_indices`` (each < T)."""
        mask = ctx.mask if ctx.mask is not None else np.repeat(frame0_foreground(ctx)[None], len(source), 0)
        out = []
        for i in frame_indices:
            inside, outside = _regions(mask[i])
            d_in, d_out = _mad(source[i], edited[i], inside), _mad(source[i], edited[i], outside)
            fidelity, change = _clip(10 * (1 - d_in / 30)), _clip(10 * d_out / 25)
            pq, m = _pq(source[i], edited[i])
            j = max(i - 1, 0)
            still = outside & _regions(mask[j])[1]
            excess = max(0.0, abs(_brightness(edited[i], still) - _brightness(edited[j], still))
                         - abs(_brightness(source[i], still) - _brightness(source[j], still)))
            flicker = _clip(10 * (1 - excess / 8))
            sc, pq = min(fidelity, change), min(pq, flicker)
            sc_raw = {"foreground_mad": round(d_in, 2), "background_mad": round(d_out, 2),
                      "foreground_fidelity": fidelity, "background_change": change}
            pq_raw = {**m, "flicker_excess": round(excess, 2), "flicker": flicker}
            out.append(FrameScore(
                SC_score=sc, PQ_score=pq, O_score=round(float(np.sqrt(sc * pq)), 2),
                SC_score_reasoning=(f"[{SCORER}] frame {i}: foreground mean abs diff {d_in:.1f}/255 (fidelity "
                                    f"{fidelity}), background {d_out:.1f}/255 (change {change})"),
                PQ_score_reasoning=(f"[{SCORER}] frame {i}: detail ratio {m['detail_ratio']}, clipped "
                                    f"{m['clipped_fraction']:.2%}, flicker excess {excess:.1f}/255"),
                SC_raw_output=json.dumps(sc_raw), PQ_raw_output=json.dumps(pq_raw),
            ))
        return out


def make_backend(**options) -> CpuProxyScorer:
    return CpuProxyScorer()
