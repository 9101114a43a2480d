"""Grounding service (Qwen3-VL, served by vLLM): its operations, their models, and its client.

``POST /v1/describe``, ``/v1/ground_round1``, ``/v1/ground_round2``, ``/v1/check_camera_motion``,
``/v1/write_instruction``, ``/v1/caption``. A real backend talking to a vLLM server declares ``max_concurrency`` (default 8), so
that many requests reach vLLM at once and its continuous batching works.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from sparkle.artifacts import ImageRef, VideoRef
from sparkle.backends import MAX_LABEL_CHARS, GroundedObject
from sparkle.captions import Captions
from sparkle.errors import InputError
from sparkle.service import OpRequest, OpResponse, SampleRef, ServiceAPI, ServiceClient, operation


Label = Annotated[str, Field(max_length=MAX_LABEL_CHARS)]
"""A round-1 label in a request: short (a model writes a few words; 500 000 characters were published)."""


class DescribeRequest(OpRequest):
    image: str


class DescribeResponse(OpResponse):
    text: str


class Round1Request(OpRequest):
    source_frame0: str
    edited_frame0: str


class ObjectsResponse(OpResponse):
    objects: list[GroundedObject]


class Round2Request(OpRequest):
    frame_indices: list[int] = Field(min_length=1, max_length=81, description="source frames, sampled at 2 FPS")
    labels: list[Label] = Field(max_length=32)


class FrameObjectsResponse(OpResponse):
    frame_objects: list[list[GroundedObject]]


class CameraMotionRequest(OpRequest):
    frame_indices: list[int] = Field(min_length=2, max_length=81, description="source frames, sampled at 2 FPS")
    sample_fps: float = Field(2.0, gt=0)


class CameraMotionResponse(OpResponse):
    camera_motion: bool
    reason: str


class InstructionRequest(OpRequest):
    image: str = Field(description="key of source frame 0")
    edit_type: str
    chosen_keyword: str | None = Field(None, description="'subtheme: scene'; None for openve3m")


class TextResponse(OpResponse):
    text: str


class CaptionRequest(OpRequest):
    instruction: str = Field(min_length=1, max_length=4000)
    labels: list[Label] = Field(default_factory=list, max_length=32, description="round-1 labels")


class CaptionResponse(OpResponse):
    captions: Captions


class GroundingAPI(ServiceAPI):
    """Qwen3-VL grounding: scene description, round-1 boxes on frame 0, round-2 boxes on 2-FPS frames."""

    service = "grounding"

    def _frames(self, req: Round2Request | CameraMotionRequest):
        ctx = self.context(req.sample)
        t = len(ctx.video.frames)
        if any(not 0 <= i < t for i in req.frame_indices):
            raise InputError(f"frame_indices must lie in 0..{t - 1}")
        return ctx, ctx.video.frames[req.frame_indices]

    @operation
    def describe(self, req: DescribeRequest) -> DescribeResponse:
        """One sentence about an image (metadata `original_scene`)."""
        return DescribeResponse(text=self.backend.describe_scene(self.context(req.sample), self.io.load_image(req.image)))

    @operation
    def ground_round1(self, req: Round1Request) -> ObjectsResponse:
        """Foreground objects to preserve on source frame 0: `[{bbox_2d (0..1000), label}]`."""
        objects = self.backend.ground_round1(self.context(req.sample), self.io.load_image(req.source_frame0),
                                             self.io.load_image(req.edited_frame0))
        return ObjectsResponse(objects=objects)

    @operation
    def ground_round2(self, req: Round2Request) -> FrameObjectsResponse:
        """Every label re-located on the source frames `frame_indices`: one list per frame."""
        ctx, frames = self._frames(req)
        return FrameObjectsResponse(frame_objects=self.backend.ground_round2(ctx, frames, req.frame_indices, req.labels))

    @operation
    def check_camera_motion(self, req: CameraMotionRequest) -> CameraMotionResponse:
        """Stage 1's fine filter: residual camera motion on the source frames `frame_indices`."""
        ctx, frames = self._frames(req)
        moves, reason = self.backend.check_camera_motion(ctx, frames, req.sample_fps)
        return CameraMotionResponse(camera_motion=moves, reason=reason)

    @operation
    def write_instruction(self, req: InstructionRequest) -> TextResponse:
        """A background-replacement instruction for `edit_type` and `chosen_keyword`."""
        text = self.backend.write_instruction(self.context(req.sample), self.io.load_image(req.image), req.edit_type,
                                              req.chosen_keyword)
        return TextResponse(text=text)

    @operation
    def caption(self, req: CaptionRequest) -> CaptionResponse:
        """The generators' prompts from the instruction: `background` (I2V: the new background alone, with its
        motion) and `video` (Fun-Control: the subjects in front of it)."""
        return CaptionResponse(captions=self.backend.caption(self.context(req.sample), req.instruction, req.labels))


class GroundingClient(ServiceClient):
    """The grounding calls of the pipeline's stages. Frames travel as a slice of the stored source video
    (its key and ``frame_indices``)."""

    api = GroundingAPI

    @staticmethod
    def _indices(sample: SampleRef, frames: VideoRef) -> list[int]:
        if frames.key != sample.source_video or frames.frame_indices is None:
            raise ValueError("grounding reads frames of the sample's source video: pass source.at(indices)")
        return list(frames.frame_indices)

    def describe_scene(self, sample: SampleRef, image: ImageRef) -> str:
        return self.call("describe", sample, image=image.key).text

    def ground_round1(self, sample: SampleRef, source_frame0: ImageRef, edited_frame0: ImageRef) -> list[GroundedObject]:
        return self.call("ground_round1", sample, source_frame0=source_frame0.key, edited_frame0=edited_frame0.key).objects

    def ground_round2(self, sample: SampleRef, frames: VideoRef, labels: list[str]) -> list[list[GroundedObject]]:
        return self.call("ground_round2", sample, frame_indices=self._indices(sample, frames),
                         labels=list(labels)).frame_objects

    def check_camera_motion(self, sample: SampleRef, frames: VideoRef, sample_fps: float) -> tuple[bool, str]:
        answer = self.call("check_camera_motion", sample, frame_indices=self._indices(sample, frames),
                           sample_fps=sample_fps)
        return answer.camera_motion, answer.reason

    def write_instruction(self, sample: SampleRef, frame0: ImageRef, edit_type: str, chosen_keyword: str | None) -> str:
        return self.call("write_instruction", sample, image=frame0.key, edit_type=edit_type,
                         chosen_keyword=chosen_keyword).text

    def caption(self, sample: SampleRef, instruction: str, labels: list[str]) -> Captions:
        return self.call("caption", sample, instruction=instruction, labels=list(labels)).captions


API, Client = GroundingAPI, GroundingClient
