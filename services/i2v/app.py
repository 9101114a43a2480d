"""I2V service (Wan2.2-I2V-A14B + LightX2V 4-step): its operation, its models, and its client.

``POST /v1/animate`` writes the background video (H.264 MP4) to the request's ``output`` key.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from sparkle.artifacts import ImageRef, VideoRef
from sparkle.service import OpRequest, SampleRef, ServiceAPI, ServiceClient, VideoResponse, operation


class AnimateRequest(OpRequest):
    output_suffix: ClassVar[str] = "mp4"

    image: str
    prompt: str = Field(max_length=4000)
    num_frames: int = Field(ge=1, le=81)
    fps: float = Field(gt=0, le=120)
    output: str


class I2VAPI(ServiceAPI):
    """Wan2.2-I2V: the clean plate animated into the background video (`num_frames` frames, same size)."""

    service = "i2v"

    @operation
    def animate(self, req: AnimateRequest) -> VideoResponse:
        """Animate `image` into a `num_frames`-frame video at `fps`, written to `output` (H.264 MP4)."""
        video = self.backend.animate(self.context(req.sample), self.io.load_image(req.image), req.prompt,
                                     req.num_frames, req.fps)
        return self.write_video(req.output, video, req.fps)


class I2VClient(ServiceClient):
    """The I2V call of stage 3."""

    api = I2VAPI

    def animate(self, sample: SampleRef, image: ImageRef, prompt: str, num_frames: int,
                fps: float) -> tuple[VideoRef, tuple[int, int, int]]:
        """The background video and its ``(T, H, W)`` as the service reports it (nothing is decoded here)."""
        answer = self.call("animate", sample, image=image.key, prompt=prompt, num_frames=int(num_frames),
                           fps=float(fps))
        return self.io.video(answer.video), (answer.num_frames, answer.height, answer.width)


API, Client = I2VAPI, I2VClient
