"""Control-synthesis service (Wan2.2-Fun-A14B-Control): its operation, its models, and its client.

``POST /v1/synthesize`` writes the edited video (H.264 MP4) to the request's ``output`` key.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from sparkle.artifacts import ImageRef, VideoRef
from sparkle.errors import InputError
from sparkle.service import OpRequest, SampleRef, ServiceAPI, ServiceClient, VideoResponse, operation


class SynthesizeRequest(OpRequest):
    output_suffix: ClassVar[str] = "mp4"

    sample: SampleRef = Field(description="sample.mask is required")
    control_video: str
    background_video: str
    first_frame: str
    prompt: str = Field(max_length=4000)
    output: str


class ControlAPI(ServiceAPI):
    """Wan2.2-Fun-Control: the edited video from the decoupled Canny video, the background and frame 0."""

    service = "control"

    @operation
    def synthesize(self, req: SynthesizeRequest) -> VideoResponse:
        """Render the edited video (same T, H, W as the source) to `output` (H.264 MP4)."""
        if not req.sample.mask:
            raise InputError("sample.mask (the BAIT mask) is required")
        ctx = self.context(req.sample)
        control = self.io.load_video(req.control_video).frames
        background = self.io.load_video(req.background_video).frames
        if not (control.shape == background.shape == ctx.video.frames.shape):
            raise InputError(f"control {control.shape}, background {background.shape} and source "
                             f"{ctx.video.frames.shape} must have the same shape")
        video = self.backend.synthesize(ctx, control, background, self.io.load_image(req.first_frame), ctx.mask,
                                        req.prompt)
        return self.write_video(req.output, video, ctx.video.fps)


class ControlClient(ServiceClient):
    """The synthesis call of stage 5."""

    api = ControlAPI

    def synthesize(self, sample: SampleRef, control: VideoRef, background: VideoRef, first_frame: ImageRef,
                   prompt: str) -> tuple[VideoRef, tuple[int, int, int]]:
        """The edited video and its ``(T, H, W)`` as the service reports it. ``sample.mask`` must be set."""
        answer = self.call("synthesize", sample, control_video=control.key, background_video=background.key,
                           first_frame=first_frame.key, prompt=prompt)
        return self.io.video(answer.video), (answer.num_frames, answer.height, answer.width)


API, Client = ControlAPI, ControlClient
