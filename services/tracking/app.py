"""Tracking service (SAM3): BAIT as one operation, its models, and its client.

``POST /v1/bait``: one tracking pass per anchor over the source video, the pixel-wise majority vote, and the
bit-packed mask written to the request's ``output`` key; only the mask travels back.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from sparkle.algorithms.bait import run_bait
from sparkle.artifacts import MaskRef
from sparkle.backends import Anchor
from sparkle.errors import InputError
from sparkle.service import OpRequest, OpResponse, SampleRef, ServiceAPI, ServiceClient, Strict, operation


MAX_ANCHORS = 24
"""Anchors per ``bait`` request: BAIT re-grounds at 2 FPS, 11 anchor frames for Sparkle's 81 frames at 16 fps
(up to 21 for a 10 s clip). It was 81, and with 32 boxes each one request cost 210 s of CPU."""


class AnchorBox(Strict):
    label: str
    box: tuple[int, int, int, int] = Field(description="pixels (x1, y1, x2, y2), x2/y2 exclusive")


class AnchorModel(Strict):
    frame_index: int = Field(ge=0)
    boxes: list[AnchorBox] = Field(min_length=1, max_length=16)


class BaitRequest(OpRequest):
    output_suffix: ClassVar[str] = "npz"

    anchors: list[AnchorModel] = Field(min_length=1, max_length=MAX_ANCHORS, description=(
        "one per re-grounded frame at 2 FPS (11 for 81 frames at 16 fps), each frame at most once"))
    tie_is_foreground: bool = True
    output: str = Field(description="key of the voted mask .npz")


class MaskResponse(OpResponse):
    mask: str
    shape: tuple[int, int, int]
    passes: int
    foreground_fraction: float


class TrackingAPI(ServiceAPI):
    """SAM3 tracking for BAIT: every anchor's boxes propagated forward and backward, then voted."""

    service = "tracking"

    @operation
    def bait(self, req: BaitRequest) -> MaskResponse:
        """Track from every anchor over the source video and vote; the `.npz` mask is written to `output`."""
        ctx = self.context(req.sample)
        t, h, w = ctx.video.shape
        frames = [a.frame_index for a in req.anchors]
        if len(set(frames)) != len(frames):
            raise InputError(f"anchor frames repeat: {frames} (one anchor per frame)")
        anchors = []
        for a in req.anchors:
            if a.frame_index >= t:
                raise InputError(f"anchor frame {a.frame_index} outside 0..{t - 1}")
            for b in a.boxes:
                x1, y1, x2, y2 = b.box
                if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
                    raise InputError(f"box {b.box} of {b.label!r} is not inside {w}x{h}")
            anchors.append(Anchor(a.frame_index, [(b.label, tuple(b.box)) for b in a.boxes]))
        mask = run_bait(self.backend, ctx, ctx.video.frames, anchors, req.tie_is_foreground)
        self.io.put_mask(req.output, mask)
        return MaskResponse(mask=req.output, shape=mask.shape, passes=len(anchors),
                            foreground_fraction=round(float(mask.mean()), 6))


class TrackingClient(ServiceClient):
    """BAIT as stage 4 calls it."""

    api = TrackingAPI

    def bait(self, sample: SampleRef, anchors: list[Anchor], tie_is_foreground: bool) -> tuple[MaskRef, float]:
        """The voted mask over the sample's source video and its foreground fraction (0..1)."""
        answer = self.call("bait", sample, tie_is_foreground=bool(tie_is_foreground), anchors=[
            {"frame_index": int(a.frame_index), "boxes": [{"label": label, "box": [int(v) for v in box]}
                                                          for label, box in a.boxes]} for a in anchors])
        return self.io.mask(answer.mask), answer.foreground_fraction


API, Client = TrackingAPI, TrackingClient
