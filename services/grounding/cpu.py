"""``cpu`` grounding backend: people from a learned person segmenter, other subjects from motion.

Round 1 boxes the subjects of source frame 0 (:meth:`sparkle.algorithms.scene.SceneModel.objects`): each
confident person component is ``"person k"``, each motion component that no person explains is
``"moving object k"`` (it cannot name objects), in order of area. Round 2 re-locates every round-1 label on
each 2-FPS frame by greedy matching of that frame's subjects *of the same kind* to the label's last known box
(highest IoU, else nearest centre within 1.5 box diagonals); a label with no match gets ``bbox_2d = []``,
exactly as a VLM that does not find it, unless 20 % of its last box still moves (a subject merged with
another or briefly split by the motion mask is still there). A subject left unmatched that overlaps a
label's last box joins that label's box: a woman and her dog boxed as one in frame 0 stay one label when
they part, instead of the dog being dropped (measured before: the dog missing from the edited video,
frames 16-72). The labels are anonymous ("moving object 2"), so a label whose subject left the frame takes
the largest subject of its kind that entered (a pedestrian walking in), rather than leaving it unboxed.
"""

from __future__ import annotations

import cv2
import numpy as np

from sparkle.algorithms.scene import scene_of
from sparkle.backends import GroundedObject, SampleContext
from sparkle.boxes import iou, to_normalised

_HUES = [(10, "red"), (25, "orange"), (35, "yellow"), (85, "green"), (130, "blue"), (160, "purple"), (180, "red")]


def _colour_name(rgb_pixels: np.ndarray) -> str:
    hsv = cv2.cvtColor(rgb_pixels.reshape(-1, 1, 3), cv2.COLOR_RGB2HSV).reshape(-1, 3)
    if np.median(hsv[:, 1]) < 50:
        v = np.median(hsv[:, 2])
        return "white" if v > 200 else "grey" if v > 70 else "black"
    hue = np.median(hsv[:, 0])
    return next(name for limit, name in _HUES if hue < limit)


class CpuGrounder:
    name = "cpu-motion-grounder"

    def setup(self) -> None:
        """Nothing to load."""

    def describe_scene(self, ctx: SampleContext, image: np.ndarray) -> str:
        """A factual sentence from measurements: brightness, dominant colours, number of moving objects."""
        v = float(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).mean())
        light = "bright" if v > 150 else "dim" if v < 70 else "evenly lit"
        h = image.shape[0]
        top, bottom = _colour_name(image[: h // 3]), _colour_name(image[2 * h // 3:])
        n = len(scene_of(ctx).objects(0))
        subject = f"{n} moving foreground object{'s' if n != 1 else ''}" if n else "no moving foreground"
        tones = f"{top} tones throughout" if top == bottom else f"{top} tones above and {bottom} tones below"
        article = "An" if light[0] in "aeiou" else "A"
        return f"{article} {light} fixed-camera shot, {tones}, with {subject}."

    def ground_round1(self, ctx, source_frame0, edited_frame0) -> list[GroundedObject]:
        """The subjects of frame 0 as ``[{bbox_2d, label}]``, ``bbox_2d`` in 0..1000."""
        h, w = source_frame0.shape[:2]
        counts: dict[str, int] = {}
        out = []
        for kind, box in scene_of(ctx).objects(0):
            counts[kind] = counts.get(kind, 0) + 1
            out.append(GroundedObject(bbox_2d=to_normalised(box, w, h), label=f"{kind} {counts[kind]}"))
        return out

    def ground_round2(self, ctx, frames, frame_indices, labels) -> list[list[GroundedObject]]:
        """For each frame of ``frame_indices``, one object per label (``bbox_2d = []`` if not found)."""
        scene = scene_of(ctx)
        h, w = frames.shape[1:3]
        last = {label: box for label, (_kind, box) in zip(labels, scene.objects(0))}
        out = []
        for idx in frame_indices:
            candidates = scene.objects(idx)
            found: dict[str, tuple] = {}
            for label in labels:
                prev = last.get(label)
                same_kind = [c for kind, c in candidates if label.startswith(kind + " ")]
                if prev is None or not same_kind:
                    continue
                best = _match(prev, same_kind)
                if best is None:
                    continue
                found[label] = best
                candidates = [(k, c) for k, c in candidates if c != best]
            for _kind, c in candidates:  # a subject that parted from a label's subject stays with that label
                for label, box in found.items():
                    if iou(last[label], c) > 0:
                        found[label] = (min(box[0], c[0]), min(box[1], c[1]), max(box[2], c[2]), max(box[3], c[3]))
                        break
            for label in labels:  # not found, but its subject still moves where it was last seen: still there
                if label not in found and label in last and scene.moving_in(idx, last[label]) >= 0.2:
                    found[label] = last[label]
            for label in labels:  # a label whose subject left takes a newcomer of its kind (largest first)
                newcomers = [c for kind, c in candidates if label.startswith(kind + " ")
                             and not any(iou(c, b) > 0 for b in found.values())]
                if label not in found and newcomers:
                    found[label] = newcomers[0]
                    candidates = [(k, c) for k, c in candidates if c != newcomers[0]]
            last.update(found)
            out.append([GroundedObject(bbox_2d=to_normalised(found[lb], w, h) if lb in found else [], label=lb)
                        for lb in labels])
        return out


    def check_camera_motion(self, ctx, frames, sample_fps: float = 2.0) -> tuple[bool, str]:
        """Residual camera drift over the clip, measured on the still background.

        The coarse filter allows up to 1 px per 0.5-s pair, so a slow pan can pass it pair by pair while
        drifting several pixels over the clip; this check bounds the drift of every sampled frame against the
        middle one (:func:`sparkle.algorithms.camera.drift_against`: features tracked there and back, a
        similarity fitted by RANSAC on the frame's outer band, at the coarse filter's 640-px analysis width,
        scaled back to full size). The clip moves when the second-largest drift exceeds ``MAX_DRIFT_PX``
        (1.5 px at full size): one frame may be off (a keyframe's codec noise on a dark sky moved one frame of
        a released Sparkle clip by 5.5 px), a pan moves the frames at both ends. Whole-frame phase
        correlation against frame 0, used before, followed a large moving subject: it read 4.9-29.8 px of
        "drift" on three of Sparkle's four released fixed-camera clips. Measured with this check at 1280x720:
        0.22, 0.41, 0.63 and 1.18 px on those four, 0.02-0.03 px on the two fixed-camera clips of
        ``../shared/data/videos``, 25 px on the handheld one, 2.96 px on a synthetic 6-px slow pan of the juggle
        clip (a 3-px one, 1.48 px, passes). A clip none of whose frames can be measured
        (too little texture) is not refused here: the coarse filter already judged it.
        """
        from sparkle.algorithms.camera import drift_against
        from sparkle.config import CameraFilterConfig

        cfg = CameraFilterConfig()
        h, w = frames.shape[1:3]
        width = min(cfg.analysis_width, w)
        size = (width, max(16, round(h * width / w)))
        grey = [cv2.cvtColor(cv2.resize(f, size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY) for f in frames]
        drifts = sorted((d * w / width for d in drift_against(grey, cfg, len(grey) // 2) if d is not None),
                        reverse=True)
        worst = drifts[1] if len(drifts) > 2 else max(drifts, default=0.0)
        if worst > self.MAX_DRIFT_PX:
            return True, (f"residual camera drift {worst:.2f} px (full size, second-largest of the frames against "
                          f"the middle one) > {self.MAX_DRIFT_PX} px")
        return False, f"no residual camera motion: drift {worst:.2f} px (full size) against the middle frame"

    MAX_DRIFT_PX = 1.5

    def write_instruction(self, ctx, frame0, edit_type: str, chosen_keyword: str | None) -> str:
        """The catalogue's instruction template for ``chosen_keyword`` (a VLM writes a freer one)."""
        from sparkle.catalogue import load_catalogue, parse_keyword, write_instruction

        if not chosen_keyword:
            return "Replace the background with a different, plausible scene."
        subtheme, scene = parse_keyword(chosen_keyword)
        catalogue = load_catalogue()
        template_key = f"{ctx.sample_id}|template"
        try:
            choice = catalogue.choice(edit_type, subtheme, scene)
        except (KeyError, ValueError):
            choice = catalogue.sample_one(edit_type, template_key).model_copy(
                update={"subtheme": subtheme, "scene": scene, "chosen_keyword": chosen_keyword})
        return write_instruction(choice)


    def caption(self, ctx, instruction: str, labels: list[str]):
        """The rule-based captions of :func:`sparkle.captions.captions_from_instruction` (a VLM writes freer
        ones)."""
        from sparkle.captions import captions_from_instruction

        return captions_from_instruction(instruction, labels)


def _match(prev: tuple, candidates: list[tuple]) -> tuple | None:
    """The candidate box that continues ``prev``: highest IoU, else the nearest centre within 1.5 of
    ``prev``'s diagonals; None when none is close enough."""
    best = max(candidates, key=lambda c: iou(prev, c))
    if iou(prev, best) > 0:
        return best
    centre = np.array([(prev[0] + prev[2]) / 2, (prev[1] + prev[3]) / 2])
    dist = [np.hypot(*(np.array([(c[0] + c[2]) / 2, (c[1] + c[3]) / 2]) - centre)) for c in candidates]
    if min(dist) > 1.5 * np.hypot(prev[2] - prev[0], prev[3] - prev[1]):
        return None
    return candidates[int(np.argmin(dist))]


def make_backend(**options) -> CpuGrounder:
    return CpuGrounder()
