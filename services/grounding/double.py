"""TEST DOUBLE of the grounding model backend (``--backend double``): see :mod:`sparkle.doubles`."""

from __future__ import annotations

from sparkle.backends import GroundedObject
from sparkle.captions import captions_from_instruction
from sparkle.doubles import BOX, Double


class DoubleGrounder(Double):
    def describe_scene(self, ctx, image):
        self.sleep("grounding.describe_scene")
        return "a test-double scene"

    def ground_round1(self, ctx, source_frame0, edited_frame0):
        self.sleep("grounding.ground_round1")
        return [GroundedObject(bbox_2d=list(BOX), label="person")]

    def ground_round2(self, ctx, frames, frame_indices, labels):
        self.sleep("grounding.ground_round2")
        return [[GroundedObject(bbox_2d=list(BOX), label=label) for label in labels] for _ in frame_indices]

    def check_camera_motion(self, ctx, frames, sample_fps=2.0):
        self.sleep("grounding.camera_check")
        return False, "test double: camera assumed fixed"

    def write_instruction(self, ctx, frame0, edit_type, chosen_keyword):
        self.sleep("grounding.write_instruction")
        return f"Replace the background with {(chosen_keyword or 'a quiet beach').split(': ')[-1]}"


    def caption(self, ctx, instruction, labels):
        self.sleep("grounding.caption")
        return captions_from_instruction(instruction, labels)


def make_backend(scale: float = 0.0, delay_s: float = 0.0, **_ignored) -> DoubleGrounder:
    """The test double (``scale``, ``delay_s``: see :mod:`sparkle.doubles`)."""
    return DoubleGrounder("grounding", scale, delay_s)
