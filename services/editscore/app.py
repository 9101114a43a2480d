"""EditScore service: ``POST /v1/score_image``, ``/v1/score_frames``."""

from sparkle.errors import InputError
from sparkle.schemas import ScoreFramesRequest, ScoreFramesResponse, ScoreImageRequest, ScoreImageResponse
from sparkle.serving import BackendAPI


class EditScoreAPI(BackendAPI):
    """EditScore: SC on (source, edited), PQ on the edited image, O = sqrt(SC * PQ), 0..10."""

    service = "editscore"
    operations = {
        "score_image": (ScoreImageRequest, ScoreImageResponse),
        "score_frames": (ScoreFramesRequest, ScoreFramesResponse),
    }
    doc_score_image = "Score one image edit (`task`: edit_background or remove_foreground)."
    doc_score_frames = "Score frames `frame_indices` of the edited video against the source video."

    def decode_request(self, op, req):
        ctx = self.context(req.sample)
        if op == "score_image":
            return ctx, self.io.load_image(req.source), self.io.load_image(req.edited), req.instruction, req.task
        edited = self.io.load_video(req.edited_video).frames
        if edited.shape != ctx.video.frames.shape:
            raise InputError(f"edited video {edited.shape} does not match the source {ctx.video.frames.shape}")
        if any(not 0 <= i < len(edited) for i in req.frame_indices):
            raise InputError(f"frame_indices must lie in 0..{len(edited) - 1}")
        return ctx, ctx.video.frames, edited, req.frame_indices, req.instruction

    def predict(self, op, inputs):
        method = self.backend.score_image if op == "score_image" else self.backend.score_frames
        return [method(*x) for x in inputs]

    def encode_response(self, op, output, req):
        if op == "score_image":
            return ScoreImageResponse(score=output, scorer=self.backend.name)
        return ScoreFramesResponse(scores=output, scorer=self.backend.name)


API = EditScoreAPI
