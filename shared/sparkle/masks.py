"""The BAIT mask file: bit-packed ``.npz`` exactly as in the released Sparkle dataset.

Keys: ``mask`` = ``np.packbits`` of the flattened ``(T, H, W)`` bool array (uint8), ``shape`` = ``(T, H, W)``
(int64). Reading back: ``np.unpackbits(mask)[:T*H*W].reshape(T, H, W).astype(bool)``.
"""

from __future__ import annotations

import io

import numpy as np


def pack_mask(mask: np.ndarray) -> bytes:
    """Serialise a ``(T, H, W)`` bool mask to the ``.npz`` bytes (compressed)."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be (T, H, W), got shape {mask.shape}")
    buf = io.BytesIO()
    np.savez_compressed(buf, mask=np.packbits(mask.astype(bool).ravel()),
                        shape=np.asarray(mask.shape, dtype=np.int64))
    return buf.getvalue()


def unpack_mask(data: bytes) -> np.ndarray:
    """Inverse of :func:`pack_mask`: ``(T, H, W)`` bool."""
    with np.load(io.BytesIO(data)) as z:
        t, h, w = (int(v) for v in z["shape"])
        return np.unpackbits(z["mask"])[: t * h * w].reshape(t, h, w).astype(bool)
