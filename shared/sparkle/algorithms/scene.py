"""Scene analysis of a fixed-camera clip, shared by the ``cpu`` backends.

- Person evidence: MediaPipe's selfie segmentation (:mod:`sparkle.algorithms.person`) on every frame. A frame's
  person mask counts only where the evidence is confident (components of probability > 0.5 whose mean
  probability is >= ``PERSON_MIN_CONFIDENCE`` and whose area is >= 0.2 % of the frame); elsewhere (no person,
  a headless torso the network does not see) the motion / GrabCut path below decides, frame by frame.
- Temporal background model: the per-pixel median of the frames, refined once by the median of the
  pixels *not* flagged as foreground (a subject that stands still in most frames otherwise leaves a ghost
  in a plain median).
- Foreground (motion) masks: max-channel distance to the background model above ``diff_threshold``
  grey levels, opened/closed and hole-filled.
- Subjects: the person mask united with the motion components it does not explain (a ball, a dog, cups).
- Clean plate: the masked temporal median over the frames where a pixel is not a subject (the person masks
  and the motion boxes, dilated), and Telea inpainting (OpenCV) only where the background was never seen.

Work happens at ``work_short_side`` px (short side) for speed; boxes and masks are returned at full size.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..boxes import expand, mask_box

PERSON_MIN_CONFIDENCE = 0.75
"""Mean person probability a person-mask component needs to count as evidence (measured: 0.93-0.98 on the
people of the released Sparkle clips and the juggle clip, under 0.6 on the spurious blobs the network gives
on textured backgrounds)."""


def masked_median(frames: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel median of ``frames`` ``(T, H, W, 3) uint8`` over the frames where ``masks`` ``(T, H, W)`` is False.

    Returns ``(plate (H, W, 3) uint8, never_seen (H, W) bool)``; never-seen pixels hold the plain median.
    Only pixels masked in some frame go through the (slow) NaN median.
    """
    plate = np.median(frames, axis=0).astype(np.uint8)
    some = masks.any(axis=0)
    never = masks.all(axis=0)
    fix = some & ~never
    if fix.any():
        cols = frames[:, fix].astype(np.float32)  # (T, N, 3)
        cols[masks[:, fix]] = np.nan
        plate[fix] = np.nanmedian(cols, axis=0).round().astype(np.uint8)
    return plate, never


def cascade_plate(frames: np.ndarray, strict: np.ndarray, loose: np.ndarray, subject: np.ndarray) -> np.ndarray:
    """Clean plate ``(H, W, 3) uint8`` from masks of decreasing coverage, all ``(T, H, W)``/``(H, W)`` bool.

    1. median over frames where the pixel is outside ``strict`` (e.g. boxes united over time);
    2. where 1 never saw the background, median over frames where it is outside ``loose`` (e.g. motion);
    3. Telea inpainting where 2 never saw it either, or where 1 never saw it and ``subject`` is set (a
       subject that never moves is not background however often it is "seen").
    """
    plate, never = masked_median(frames, strict)
    if never.any():
        fallback, never_loose = masked_median(frames, loose)
        plate[never] = fallback[never]
        never = (never & never_loose) | (never & subject)
    if never.any():
        plate = cv2.inpaint(plate, never.astype(np.uint8) * 255, 5, cv2.INPAINT_TELEA)
    return plate


def window_mask(shape: tuple[int, int], window: tuple[int, int, int, int]) -> np.ndarray:
    """``(h, w)`` bool, True inside the pixel box ``window``."""
    m = np.zeros(shape, bool)
    x1, y1, x2, y2 = window
    m[y1:y2, x1:x2] = True
    return m


def grabcut(frame: np.ndarray, window: tuple[int, int, int, int], probable_fg: np.ndarray,
            iterations: int = 2) -> np.ndarray:
    """GrabCut of ``frame`` ``(h, w, 3) uint8`` inside ``window``, seeded by ``probable_fg`` ``(h, w) bool``.

    Inside the window, ``probable_fg`` pixels start as probable foreground and the rest as probable
    background; a 2-px ring on the window's border is definite background. Returns ``(h, w)`` bool
    (False outside the window). A degenerate colour model (flat crop) returns the seed inside the window.
    """
    x1, y1, x2, y2 = window
    out = np.zeros(frame.shape[:2], bool)
    if x2 - x1 < 8 or y2 - y1 < 8:
        return out
    crop = np.ascontiguousarray(frame[y1:y2, x1:x2])
    gc = np.where(probable_fg[y1:y2, x1:x2], cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    gc[:2], gc[-2:], gc[:, :2], gc[:, -2:] = cv2.GC_BGD, cv2.GC_BGD, cv2.GC_BGD, cv2.GC_BGD
    if not (gc == cv2.GC_PR_FGD).any():
        return out
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(crop, gc, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return probable_fg & window_mask(frame.shape[:2], window)
    out[y1:y2, x1:x2] = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    return out


def overlapping_components(mask: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """The connected components of ``mask`` ``(h, w) bool`` that overlap ``prior``."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[np.unique(labels[prior & mask])] = True
    keep[0] = False
    return keep[labels]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a ``(H, W)`` bool mask (regions not connected to the border)."""
    m = mask.astype(np.uint8)
    h, w = m.shape
    flood = np.pad(m, 1).copy()
    cv2.floodFill(flood, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1)
    return mask | (flood[1:-1, 1:-1] == 0)


class SceneModel:
    """Background model and motion masks of ``frames`` ``(T, H, W, 3) uint8`` from a fixed camera."""

    def __init__(self, frames: np.ndarray, work_short_side: int = 180, diff_threshold: int = 28):
        self.full_shape = frames.shape[:3]
        t, h, w = self.full_shape
        self.scale = min(1.0, work_short_side / min(h, w))
        self.size = (max(16, round(w * self.scale)), max(16, round(h * self.scale)))  # (w, h) at work scale
        self.small = np.stack([cv2.resize(f, self.size, interpolation=cv2.INTER_AREA) for f in frames])
        self.diff_threshold = diff_threshold
        k = max(3, round(0.012 * min(self.size)) | 1)
        self._open = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
        self._close = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
        from .person import person_segmenter

        self.person_prob = person_segmenter().probabilities(self.small)  # (T, h, w) float32
        self.person = np.stack([self._confident_persons(p) for p in self.person_prob])  # (T, h, w) bool
        background = np.median(self.small, axis=0).astype(np.uint8)
        fg = self._motion(background) | self.person
        self.background, _ = masked_median(self.small, fg)
        self.fg = self._motion(self.background)
        # A subject that mostly stands still stays in the medians above as a ghost: rebuild the background
        # with the clean-plate cascade (boxes over time and persons, then motion, then inpainting of frame 0's
        # subject) and measure motion against it, so that the still parts count as foreground too.
        self._movers: dict[int, np.ndarray] = {}
        self.background = cascade_plate(self.small, self.object_masks() | self.person, self.fg | self.person,
                                        self.subjects(0))
        self.fg = self._motion(self.background)  # (T, h, w) bool at work scale
        self._movers = {}  # measured against the first background: computed again on demand

    def _confident_persons(self, prob: np.ndarray, min_area_frac: float = 0.002) -> np.ndarray:
        """The components of ``prob > 0.5`` ``(h, w)`` that are confident and large enough, ``(h, w)`` bool."""
        n, labels, stats, _ = cv2.connectedComponentsWithStats((prob > 0.5).astype(np.uint8), connectivity=8)
        if n <= 1:
            return np.zeros(prob.shape, bool)
        sums = np.bincount(labels.ravel(), weights=prob.ravel(), minlength=n)
        keep = (stats[:, cv2.CC_STAT_AREA] >= min_area_frac * prob.size) & \
               (sums / np.maximum(stats[:, cv2.CC_STAT_AREA], 1) >= PERSON_MIN_CONFIDENCE)
        keep[0] = False
        return keep[labels]

    def person_boxes(self, t: int) -> list[tuple[int, int, int, int]]:
        """Full-size pixel boxes of the confident person components of frame ``t``, largest first."""
        n, labels, stats, _ = cv2.connectedComponentsWithStats(self.person[t].astype(np.uint8), connectivity=8)
        order = sorted(range(1, n), key=lambda i: -stats[i, cv2.CC_STAT_AREA])
        return [self._full_box(mask_box(labels == i)) for i in order]

    def _full_box(self, b: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        _, h, w = self.full_shape
        return (max(0, int(b[0] / self.scale)), max(0, int(b[1] / self.scale)),
                min(w, int(np.ceil(b[2] / self.scale))), min(h, int(np.ceil(b[3] / self.scale))))

    def objects(self, t: int) -> list[tuple[str, tuple[int, int, int, int]]]:
        """The subjects of frame ``t``: ``("person", box)`` for each confident person component, then
        ``("moving object", box)`` for each motion component (:meth:`boxes`) whose pixels outside the persons
        (grown by 3 % of the short side) still make a component; boxes are full-size pixels, largest first."""
        found = [("person", b) for b in self.person_boxes(t)]
        if not self.person[t].any():
            return found + [("moving object", b) for b in self.boxes(t)]
        r = max(2, round(0.03 * min(self.size)))
        grown = cv2.dilate(self.person[t].astype(np.uint8),
                           cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))) > 0
        return found + [("moving object", b) for b in self.boxes(t, exclude=grown)]

    def movers(self, t: int) -> np.ndarray:
        """Frame ``t``'s moving objects (:meth:`objects` other than persons) segmented from their boxes,
        ``(h, w)`` bool at work scale; computed once per frame (the grounder's plate, the tracker's concepts
        and the scorer's evidence all ask for it)."""
        if t not in self._movers:
            boxes = [b for kind, b in self.objects(t) if kind == "moving object"]
            self._movers[t] = self.segment(t, boxes) if boxes else np.zeros(self.fg.shape[1:], bool)
        return self._movers[t]

    def subjects(self, t: int) -> np.ndarray:
        """Frame ``t``'s subjects at work scale, ``(h, w)`` bool: the persons united with :meth:`movers`."""
        return self.person[t] | self.movers(t)

    def _motion(self, background: np.ndarray) -> np.ndarray:
        out = np.empty(self.small.shape[:3], bool)
        for i, f in enumerate(self.small):
            d = np.abs(f.astype(np.int16) - background.astype(np.int16)).max(axis=-1).astype(np.uint8)
            m = cv2.GaussianBlur(d, (5, 5), 0) > self.diff_threshold
            m = cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_OPEN, self._open)
            m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, self._close)
            out[i] = fill_holes(m.astype(bool))
        return out

    def to_full(self, mask_small: np.ndarray) -> np.ndarray:
        """Upsample a work-scale ``(h, w)`` bool or soft (0..1 float) mask to full size ``(H, W)`` bool (bilinear,
        0.5 threshold)."""
        _, h, w = self.full_shape
        return cv2.resize(mask_small.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) > 0.5

    def foreground_full(self, t: int) -> np.ndarray:
        """Motion foreground of frame ``t`` at full size, ``(H, W)`` bool."""
        return self.to_full(self.fg[t])

    def boxes(self, t: int, min_area_frac: float = 0.002, max_box_frac: float = 0.5,
              max_objects: int = 8, exclude: np.ndarray | None = None) -> list[tuple[int, int, int, int]]:
        """Pixel boxes (full size) of the motion components of frame ``t``, largest first.

        Components closer than ~3 % of the short side are merged (limbs, a held object). A component whose
        box covers more than ``max_box_frac`` of the frame is camera motion or a light change, not a subject,
        and is left out; so are components under ``min_area_frac`` of the frame. ``exclude`` ``(h, w)`` bool
        (work scale): pixels that do not count (those a person already explains).
        """
        m = (self.fg[t] & ~exclude if exclude is not None else self.fg[t]).astype(np.uint8)
        r = max(2, round(0.03 * min(self.size)))
        merged = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
        n, labels, stats, _ = cv2.connectedComponentsWithStats(merged, connectivity=8)
        _, h, w = self.full_shape
        min_area = min_area_frac * m.size
        found = []
        for i in range(1, n):
            comp = (labels == i) & (m > 0)
            area = int(comp.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(comp)
            if (xs.max() + 1 - xs.min()) * (ys.max() + 1 - ys.min()) > max_box_frac * m.size:
                continue
            box = (xs.min() / self.scale, ys.min() / self.scale, (xs.max() + 1) / self.scale, (ys.max() + 1) / self.scale)
            found.append((area, (max(0, int(box[0])), max(0, int(box[1])), min(w, int(np.ceil(box[2]))),
                                 min(h, int(np.ceil(box[3]))))))
        found.sort(key=lambda a: -a[0])
        return [b for _, b in found[:max_objects]]

    def moving_in(self, t: int, box: tuple[int, int, int, int]) -> float:
        """Fraction of the full-size pixel ``box`` that moves or is a confident person in frame ``t``."""
        x1, y1, x2, y2 = self.small_box(box)
        region = self.fg[t, y1:y2, x1:x2] | self.person[t, y1:y2, x1:x2]
        return float(region.mean()) if region.size else 0.0

    def small_box(self, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """A full-size pixel box at work scale."""
        return tuple(int(round(v * self.scale)) for v in box)

    def segment(self, t: int, boxes: list[tuple[int, int, int, int]], iterations: int = 2) -> np.ndarray:
        """Whole objects in frame ``t``: GrabCut seeded by each full-size box; ``(h, w)`` bool at work scale.

        Motion alone misses the parts of a subject that stand still; the box says where the object is and
        GrabCut separates it from the background by colour; moving pixels inside the box are added (a fast
        small object, such as a ball, can share colours with the background).
        """
        h, w = self.small.shape[1:3]
        out = np.zeros((h, w), bool)
        for box in boxes:
            b = self.small_box(box)
            seed = window_mask((h, w), b)
            m = grabcut(self.small[t], expand(b, 0.15, 4, w, h), seed, iterations)
            out |= overlapping_components(m, seed) | (seed & self.fg[t])
        return out

    def object_masks(self, margin: float = 0.08, window: int = 8) -> np.ndarray:
        """``(T, h, w) bool`` at work scale: motion boxes grown by ``margin``, united over ``t +- window`` frames.

        Used where covering too much is cheap and too little is visible (the clean plate's median): a
        subject that moves only its limbs in some frames still has its whole body covered by its boxes of
        the neighbouring frames.
        """
        h, w = self.small.shape[1:3]
        boxed = self.fg.copy()
        for t in range(len(boxed)):
            for box in self.boxes(t):
                x1, y1, x2, y2 = expand(self.small_box(box), margin, 2, w, h)
                boxed[t, y1:y2, x1:x2] = True
        return np.stack([boxed[max(0, t - window):t + window + 1].any(axis=0) for t in range(len(boxed))])

    def clean_plate(self, frames: np.ndarray, masks: np.ndarray | None = None, dilate_px: int = 9) -> np.ndarray:
        """Clean plate ``(H, W, 3) uint8`` of ``frames`` (full size): masked temporal median + inpainting.

        With ``masks`` ``(T, H, W) bool`` (e.g. the BAIT mask): the median over unmasked frames, inpainting
        (Telea) where a pixel is masked in every frame. Without: a cascade, because motion alone misses a
        subject that stands still while whole boxes over-cover busy places:
        1. median over frames where the pixel is outside :meth:`object_masks` (boxes united over time);
        2. where 1 never saw the background, median over frames where it is not moving;
        3. inpainting where 2 never saw it either, or where frame 0's subjects stand (a subject that never
           moves is not background however often it is "seen").
        The person masks count in 1 and 2: a talking head's body is never "background" (measured on two
        released Sparkle clips: 0.90 and 0.72 of the subject region stayed subject-coloured with motion alone).
        Masks are dilated by ``dilate_px`` so that soft edges and shadows' rims do not leak into the plate.
        """
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1))

        def full(ms, small=True):
            return np.stack([cv2.dilate((self.to_full(m) if small else m).astype(np.uint8), kernel) > 0 for m in ms])

        if masks is not None:
            plate, never = masked_median(frames, full(masks, small=False))
            if never.any():
                plate = cv2.inpaint(plate, never.astype(np.uint8) * 255, 5, cv2.INPAINT_TELEA)
            return plate
        subject = full(self.subjects(0)[None])[0]
        return cascade_plate(frames, full(self.object_masks() | self.person), full(self.fg | self.person), subject)


def scene_of(ctx) -> SceneModel:
    """The sample's :class:`SceneModel`, built once per process and kept in ``ctx.cache``."""
    if "scene" not in ctx.cache:
        ctx.cache["scene"] = SceneModel(ctx.video.frames)
    return ctx.cache["scene"]


def frame0_foreground(ctx) -> np.ndarray:
    """Frame 0's foreground ``(H, W)`` bool: the BAIT mask once known, else :meth:`SceneModel.subjects`."""
    if ctx.mask is not None:
        return ctx.mask[0]
    if "frame0_foreground" not in ctx.cache:
        scene = scene_of(ctx)
        ctx.cache["frame0_foreground"] = scene.to_full(scene.subjects(0))
    return ctx.cache["frame0_foreground"]


