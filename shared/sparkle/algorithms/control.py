"""Control videos of Sparkle stage 5.

``decoupled`` (Sparkle's): foreground structure from the source video and background structure from the
generated background video, ``control = canny(source) * mask + canny(background) * (1 - mask)`` per frame,
OpenCV Canny (thresholds 100/200 by default) on the grey image. The two signals the paper compares against:
``foreground_only`` (source edges inside the mask, nothing outside: the background is left to the model) and
``copy_paste`` (the source's pixels inside the mask pasted over the background video). Output
``(T, H, W, 3) uint8``; edge maps are 255 on 0, grey replicated to 3 channels as the Wan2.2-Fun-Control
pipelines take RGB control videos.
"""

from __future__ import annotations

import cv2
import numpy as np


def canny(frame: np.ndarray, low: int, high: int) -> np.ndarray:
    """``(H, W)`` uint8 edge map of an ``(H, W, 3)`` RGB frame."""
    return cv2.Canny(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), low, high)


def decoupled_canny(source: np.ndarray, background: np.ndarray, mask: np.ndarray,
                    low: int = 100, high: int = 200) -> np.ndarray:
    """Control video from source ``(T, H, W, 3)``, background ``(T, H, W, 3)`` and mask ``(T, H, W) bool``."""
    if not (source.shape == background.shape and source.shape[:3] == mask.shape):
        raise ValueError(f"shape mismatch: source {source.shape}, background {background.shape}, "
                         f"mask {mask.shape}")
    out = np.empty(source.shape, np.uint8)
    for t in range(len(source)):
        edges = np.where(mask[t], canny(source[t], low, high), canny(background[t], low, high))
        out[t] = edges[..., None]
    return out


CONTROL_MODES = ("decoupled", "foreground_only", "copy_paste")


def control_video(mode: str, source: np.ndarray, background: np.ndarray, mask: np.ndarray,
                  low: int = 100, high: int = 200) -> np.ndarray:
    """The control video of ``mode`` (see the module doc) from source/background ``(T, H, W, 3)`` and mask
    ``(T, H, W) bool``. Raises ValueError for an unknown mode or mismatched shapes."""
    if mode == "decoupled":
        return decoupled_canny(source, background, mask, low, high)
    if not (source.shape == background.shape and source.shape[:3] == mask.shape):
        raise ValueError(f"shape mismatch: source {source.shape}, background {background.shape}, mask {mask.shape}")
    if mode == "foreground_only":
        out = np.zeros(source.shape, np.uint8)
        for t in range(len(source)):
            out[t] = np.where(mask[t], canny(source[t], low, high), 0)[..., None]
        return out
    if mode == "copy_paste":
        return np.where(mask[..., None], source, background)
    raise ValueError(f"unknown control mode {mode!r}; expected one of {', '.join(CONTROL_MODES)}")
