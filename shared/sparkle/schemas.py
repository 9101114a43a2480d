"""Request and response schemas of the six model services (pydantic, shared by services and clients).

Requests carry artifact *keys* in the store and parameters, never pixels; unknown fields are refused (422).
Each operation writes its outputs under the key the caller names (``output``), so that a re-delivered
request overwrites the same artifact (idempotent), and answers with the keys plus ``timings`` in seconds.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .backends import FrameScore, GroundedObject, ImageScore


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SampleRef(Strict):
    """Which sample a request belongs to: its id, prompt and stored source (plus background and mask)."""

    sample_id: str = Field(min_length=1, max_length=200)
    prompt: str = Field("", max_length=4000)
    source_video: str = Field(min_length=1, description="key of the conformed source video")
    background: str | None = Field(None, description="key of a user background image or video")
    mask: str | None = Field(None, description="key of the BAIT mask .npz, once stage 4 has run")


class OpResponse(Strict):
    timings: dict[str, float] = Field(default_factory=dict, description="seconds: decode, queue, predict, encode")


# --- grounding -------------------------------------------------------------------------------------------

class DescribeRequest(Strict):
    sample: SampleRef
    image: str


class DescribeResponse(OpResponse):
    text: str


class Round1Request(Strict):
    sample: SampleRef
    source_frame0: str
    edited_frame0: str


class ObjectsResponse(OpResponse):
    objects: list[GroundedObject]


class Round2Request(Strict):
    sample: SampleRef
    frame_indices: list[int] = Field(min_length=1, max_length=81)
    labels: list[str] = Field(max_length=32)


class FrameObjectsResponse(OpResponse):
    frame_objects: list[list[GroundedObject]]


class CameraMotionRequest(Strict):
    sample: SampleRef
    frame_indices: list[int] = Field(min_length=2, max_length=81, description="source frames, sampled at 2 FPS")
    sample_fps: float = Field(2.0, gt=0)


class CameraMotionResponse(OpResponse):
    camera_motion: bool
    reason: str


class InstructionRequest(Strict):
    sample: SampleRef
    image: str = Field(description="key of source frame 0")
    edit_type: str
    chosen_keyword: str | None = Field(None, description="'subtheme: scene'; None for openve3m")


class TextResponse(OpResponse):
    text: str


# --- image_edit ------------------------------------------------------------------------------------------

class EditBackgroundRequest(Strict):
    sample: SampleRef
    image: str
    instruction: str = Field(min_length=1, max_length=4000)
    output: str


class RemoveForegroundRequest(Strict):
    sample: SampleRef
    image: str
    objects: list[GroundedObject] = Field(max_length=32)
    output: str


class ImageResponse(OpResponse):
    image: str
    width: int
    height: int


# --- i2v -------------------------------------------------------------------------------------------------

class AnimateRequest(Strict):
    sample: SampleRef
    image: str
    prompt: str = Field(max_length=4000)
    num_frames: int = Field(ge=1, le=81)
    fps: float = Field(gt=0, le=120)
    output: str


class VideoResponse(OpResponse):
    video: str
    num_frames: int
    width: int
    height: int


# --- tracking --------------------------------------------------------------------------------------------

class AnchorBox(Strict):
    label: str
    box: tuple[int, int, int, int] = Field(description="pixels (x1, y1, x2, y2), x2/y2 exclusive")


class AnchorModel(Strict):
    frame_index: int = Field(ge=0)
    boxes: list[AnchorBox] = Field(min_length=1, max_length=32)


class BaitRequest(Strict):
    sample: SampleRef
    anchors: list[AnchorModel] = Field(min_length=1, max_length=81)
    tie_is_foreground: bool = True
    output: str = Field(description="key of the voted mask .npz")


class MaskResponse(OpResponse):
    mask: str
    shape: tuple[int, int, int]
    passes: int
    foreground_fraction: float


# --- control ---------------------------------------------------------------------------------------------

class SynthesizeRequest(Strict):
    sample: SampleRef = Field(description="sample.mask is required")
    control_video: str
    background_video: str
    first_frame: str
    prompt: str = Field(max_length=4000)
    output: str


# --- editscore -------------------------------------------------------------------------------------------

class ScoreImageRequest(Strict):
    sample: SampleRef
    source: str
    edited: str
    instruction: str = Field(max_length=4000)
    task: Literal["edit_background", "remove_foreground"]


class ScoreImageResponse(OpResponse):
    score: ImageScore
    scorer: str


class ScoreFramesRequest(Strict):
    sample: SampleRef
    edited_video: str
    frame_indices: list[int] = Field(min_length=1, max_length=16)
    instruction: str = Field(max_length=4000)


class ScoreFramesResponse(OpResponse):
    scores: list[FrameScore]
    scorer: str
