"""EditScore service: its operations, their models, and its client.

``POST /v1/score_image``, ``/v1/score_frames``. Both batch: concurrent requests are gathered (up to
``SPARKLE_SERVE_MAX_BATCH_SIZE``) and handed to the backend in one call, so a backend that generates many
prompts at once (the real EditScore: SC and PQ prompts in one batched ``generate``) scores them together.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sparkle.artifacts import ImageRef, VideoRef
from sparkle.backends import FrameScore, ImageScore
from sparkle.errors import InputError
from sparkle.service import OpRequest, OpResponse, SampleRef, ServiceAPI, ServiceClient, operation


class ScoreImageRequest(OpRequest):
    source: str
    edited: str
    instruction: str = Field(max_length=4000)
    task: Literal["edit_background", "remove_foreground"]


class ScoreImageResponse(OpResponse):
    score: ImageScore
    scorer: str


class ScoreFramesRequest(OpRequest):
    edited_video: str
    frame_indices: list[int] = Field(min_length=1, max_length=16)
    instruction: str = Field(max_length=4000)


class ScoreFramesResponse(OpResponse):
    scores: list[FrameScore]
    scorer: str


class EditScoreAPI(ServiceAPI):
    """EditScore: SC on (source, edited), PQ on the edited image, O = sqrt(SC * PQ), 0..10."""

    service = "editscore"

    def _batch(self, method: str, items: list[tuple]) -> list:
        """``backend.<method>_batch(items)`` where the backend batches across requests, else one by one."""
        if (batched := getattr(self.backend, f"{method}_batch", None)) is not None:
            return batched(items)
        return [getattr(self.backend, method)(*item) for item in items]

    @operation(batch=True)
    def score_image(self, reqs: list[ScoreImageRequest]) -> list[ScoreImageResponse]:
        """Score one image edit (`task`: edit_background or remove_foreground)."""
        items = [(self.context(r.sample), self.io.load_image(r.source), self.io.load_image(r.edited), r.instruction,
                  r.task) for r in reqs]
        return [ScoreImageResponse(score=s, scorer=self.backend.name) for s in self._batch("score_image", items)]

    @operation(batch=True)
    def score_frames(self, reqs: list[ScoreFramesRequest]) -> list[ScoreFramesResponse]:
        """Score frames `frame_indices` of the edited video against the source video."""
        items = []
        for r in reqs:
            ctx = self.context(r.sample)
            edited = self.io.load_video(r.edited_video).frames
            if edited.shape != ctx.video.frames.shape:
                raise InputError(f"edited video {edited.shape} does not match the source {ctx.video.frames.shape}")
            if any(not 0 <= i < len(edited) for i in r.frame_indices):
                raise InputError(f"frame_indices must lie in 0..{len(edited) - 1}")
            items.append((ctx, ctx.video.frames, edited, r.frame_indices, r.instruction))
        return [ScoreFramesResponse(scores=s, scorer=self.backend.name) for s in self._batch("score_frames", items)]


class EditScoreClient(ServiceClient):
    """The gates' scoring calls; the answers name the scorer that made them (for the records)."""

    api = EditScoreAPI

    def score_image(self, sample: SampleRef, source: ImageRef, edited: ImageRef, instruction: str,
                    task: str) -> ScoreImageResponse:
        return self.call("score_image", sample, source=source.key, edited=edited.key, instruction=instruction,
                         task=task)

    def score_frames(self, sample: SampleRef, edited: VideoRef, frame_indices: list[int],
                     instruction: str) -> ScoreFramesResponse:
        return self.call("score_frames", sample, edited_video=edited.key, frame_indices=[int(i) for i in frame_indices],
                         instruction=instruction)


API, Client = EditScoreAPI, EditScoreClient
