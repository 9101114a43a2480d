"""Test doubles of the six model backends: instant, trivially computed outputs of the right shapes.

Explicitly test doubles (never a pipeline result): the distributed run's tests and benchmarks use them to
measure what the orchestration itself costs, with zero-latency services, or how busy the services stay when
each call sleeps for a scaled realistic time. Load one with ``--backend sparkle.doubles:make_backend``
(``load_backend(service, "sparkle.doubles:make_backend", scale=..., delay_s=...)``).

Options: ``scale``: each call sleeps ``scale`` x the GPU-seconds assumed for it by the capacity plan
(:data:`sparkle.capacity.CALLS`, e.g. 600 s for control synthesis); ``delay_s``: seconds added to every
call (a slow service, for the crash tests).
"""

from __future__ import annotations

import time

import numpy as np

from .backends import FrameScore, GroundedObject, ImageScore
from .capacity import CALLS

CALL_SECONDS = {c.name.split("(")[0]: c.seconds for c in CALLS}
METHOD_CALL = {"check_camera_motion": "grounding.camera_check", "describe_scene": "grounding.describe_scene",
               "write_instruction": "grounding.write_instruction", "ground_round1": "grounding.ground_round1",
               "ground_round2": "grounding.ground_round2", "edit_background": "image_edit.edit_background",
               "remove_foreground": "image_edit.remove_foreground", "animate": "i2v.animate",
               "track": "tracking.track", "synthesize": "control.synthesize", "score_image": "editscore.score_image",
               "score_frames": "editscore.score_frames"}
"""Backend method -> the capacity plan's call whose GPU-seconds it sleeps (scaled)."""

BOX = [250, 150, 750, 950]  # the double's foreground box, 0..1000


class _Double:
    def __init__(self, service: str, scale: float = 0.0, delay_s: float = 0.0):
        self.service, self.scale, self.delay_s = service, float(scale), float(delay_s)
        self.name = f"test-double:{service}"

    def setup(self) -> None:
        pass

    def _sleep(self, method: str) -> None:
        seconds = self.delay_s + self.scale * CALL_SECONDS[METHOD_CALL[method]]
        if seconds > 0:
            time.sleep(seconds)


class DoubleGrounder(_Double):
    def describe_scene(self, ctx, image):
        self._sleep("describe_scene")
        return "a test-double scene"

    def ground_round1(self, ctx, source_frame0, edited_frame0):
        self._sleep("ground_round1")
        return [GroundedObject(bbox_2d=list(BOX), label="person")]

    def ground_round2(self, ctx, frames, frame_indices, labels):
        self._sleep("ground_round2")
        return [[GroundedObject(bbox_2d=list(BOX), label=label) for label in labels] for _ in frame_indices]

    def check_camera_motion(self, ctx, frames, sample_fps=2.0):
        self._sleep("check_camera_motion")
        return False, "test double: camera assumed fixed"

    def write_instruction(self, ctx, frame0, edit_type, chosen_keyword):
        self._sleep("write_instruction")
        return f"Replace the background with {(chosen_keyword or 'a quiet beach').split(': ')[-1]}"


class DoubleImageEditor(_Double):
    def edit_background(self, ctx, image, instruction):
        self._sleep("edit_background")
        return 255 - image

    def remove_foreground(self, ctx, image, objects):
        self._sleep("remove_foreground")
        return image.copy()


class DoubleVideoGenerator(_Double):
    def animate(self, ctx, image, prompt, num_frames, fps):
        self._sleep("animate")
        return np.repeat(image[None], num_frames, axis=0)


class DoubleTracker(_Double):
    def track(self, ctx, frames, anchors):
        self._sleep("track")
        t, h, w = frames.shape[:3]
        for anchor in anchors:
            mask = np.zeros((t, h, w), bool)
            for _, (x1, y1, x2, y2) in anchor.boxes:
                mask[:, y1:y2, x1:x2] = True
            yield mask


class DoubleControlSynthesizer(_Double):
    def synthesize(self, ctx, control, background, first_frame, mask, prompt):
        self._sleep("synthesize")
        return np.where(mask[..., None], ctx.video.frames, background)


class DoubleScorer(_Double):
    def score_image(self, ctx, source, edited, instruction, task):
        self._sleep("score_image")
        return ImageScore(prompt_following=9, consistency=9, perceptual_quality=9, overall=9,
                          SC_reasoning="test double", PQ_reasoning="test double")

    def score_frames(self, ctx, source, edited, frame_indices, instruction):
        self._sleep("score_frames")
        return [FrameScore(SC_score=9, PQ_score=9, O_score=9, SC_score_reasoning="test double",
                           PQ_score_reasoning="test double", SC_raw_output="", PQ_raw_output="") for _ in frame_indices]


DOUBLES = {"grounding": DoubleGrounder, "image_edit": DoubleImageEditor, "i2v": DoubleVideoGenerator,
           "tracking": DoubleTracker, "control": DoubleControlSynthesizer, "editscore": DoubleScorer}


def make_backend(service: str, scale: float = 0.0, delay_s: float = 0.0, **_ignored):
    """The test double of ``service`` (see the module docstring for ``scale`` and ``delay_s``)."""
    return DOUBLES[service](service, scale, delay_s)
