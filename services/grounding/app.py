"""Grounding service: ``POST /v1/describe``, ``/v1/ground_round1``, ``/v1/ground_round2``."""

from sparkle.schemas import (CameraMotionRequest, CameraMotionResponse, DescribeRequest, DescribeResponse,
                             FrameObjectsResponse, InstructionRequest, ObjectsResponse, Round1Request, Round2Request,
                             TextResponse)
from sparkle.errors import InputError
from sparkle.serving import BackendAPI


class GroundingAPI(BackendAPI):
    """Qwen3-VL grounding: scene description, round-1 boxes on frame 0, round-2 boxes on 2-FPS frames."""

    service = "grounding"
    operations = {
        "describe": (DescribeRequest, DescribeResponse),
        "ground_round1": (Round1Request, ObjectsResponse),
        "ground_round2": (Round2Request, FrameObjectsResponse),
        "check_camera_motion": (CameraMotionRequest, CameraMotionResponse),
        "write_instruction": (InstructionRequest, TextResponse),
    }
    doc_describe = "One sentence about an image (metadata `original_scene`)."
    doc_ground_round1 = "Foreground objects to preserve on source frame 0: `[{bbox_2d (0..1000), label}]`."
    doc_ground_round2 = "Every label re-located on the source frames `frame_indices`: one list per frame."
    doc_check_camera_motion = "Stage 1's fine filter: residual camera motion on the source frames `frame_indices`."
    doc_write_instruction = "A background-replacement instruction for `edit_type` and `chosen_keyword`."

    def decode_request(self, op, req):
        ctx = self.context(req.sample)
        if op == "describe":
            return ctx, self.io.load_image(req.image)
        if op == "ground_round1":
            return ctx, self.io.load_image(req.source_frame0), self.io.load_image(req.edited_frame0)
        if op == "write_instruction":
            return ctx, self.io.load_image(req.image), req.edit_type, req.chosen_keyword
        t = len(ctx.video.frames)
        if any(not 0 <= i < t for i in req.frame_indices):
            raise InputError(f"frame_indices must lie in 0..{t - 1}")
        if op == "check_camera_motion":
            return ctx, ctx.video.frames[req.frame_indices], req.sample_fps
        return ctx, ctx.video.frames[req.frame_indices], req.frame_indices, req.labels

    def predict(self, op, inputs):
        method = {"describe": self.backend.describe_scene, "ground_round1": self.backend.ground_round1,
                  "ground_round2": self.backend.ground_round2,
                  "check_camera_motion": self.backend.check_camera_motion,
                  "write_instruction": self.backend.write_instruction}[op]
        return [method(*x) for x in inputs]

    def encode_response(self, op, output, req):
        if op == "describe":
            return DescribeResponse(text=output)
        if op == "ground_round1":
            return ObjectsResponse(objects=output)
        if op == "check_camera_motion":
            return CameraMotionResponse(camera_motion=output[0], reason=output[1])
        if op == "write_instruction":
            return TextResponse(text=output)
        return FrameObjectsResponse(frame_objects=output)


API = GroundingAPI
