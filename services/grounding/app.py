"""Grounding service: ``POST /v1/describe``, ``/v1/ground_round1``, ``/v1/ground_round2``."""

from sparkle.schemas import (DescribeRequest, DescribeResponse, FrameObjectsResponse, ObjectsResponse, Round1Request,
                             Round2Request)
from sparkle.errors import InputError
from sparkle.serving import BackendAPI


class GroundingAPI(BackendAPI):
    """Qwen3-VL grounding: scene description, round-1 boxes on frame 0, round-2 boxes on 2-FPS frames."""

    service = "grounding"
    operations = {
        "describe": (DescribeRequest, DescribeResponse),
        "ground_round1": (Round1Request, ObjectsResponse),
        "ground_round2": (Round2Request, FrameObjectsResponse),
    }
    doc_describe = "One sentence about an image (metadata `original_scene`)."
    doc_ground_round1 = "Foreground objects to preserve on source frame 0: `[{bbox_2d (0..1000), label}]`."
    doc_ground_round2 = "Every label re-located on the source frames `frame_indices`: one list per frame."

    def decode_request(self, op, req):
        ctx = self.context(req.sample)
        if op == "describe":
            return ctx, self.io.load_image(req.image)
        if op == "ground_round1":
            return ctx, self.io.load_image(req.source_frame0), self.io.load_image(req.edited_frame0)
        t = len(ctx.video.frames)
        if any(not 0 <= i < t for i in req.frame_indices):
            raise InputError(f"frame_indices must lie in 0..{t - 1}")
        return ctx, ctx.video.frames[req.frame_indices], req.frame_indices, req.labels

    def predict(self, op, inputs):
        method = {"describe": self.backend.describe_scene, "ground_round1": self.backend.ground_round1,
                  "ground_round2": self.backend.ground_round2}[op]
        return [method(*x) for x in inputs]

    def encode_response(self, op, output, req):
        if op == "describe":
            return DescribeResponse(text=output)
        if op == "ground_round1":
            return ObjectsResponse(objects=output)
        return FrameObjectsResponse(frame_objects=output)


API = GroundingAPI
