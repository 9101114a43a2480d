"""Control-synthesis service: ``POST /v1/synthesize``."""

from sparkle.errors import InputError
from sparkle.schemas import SynthesizeRequest, VideoResponse
from sparkle.serving import BackendAPI


class ControlAPI(BackendAPI):
    """Wan2.2-Fun-Control: the edited video from the decoupled Canny video, the background and frame 0."""

    service = "control"
    operations = {"synthesize": (SynthesizeRequest, VideoResponse)}
    doc_synthesize = "Render the edited video (same T, H, W as the source) to `output` (H.264 MP4)."

    def decode_request(self, op, req):
        if not req.sample.mask:
            raise InputError("sample.mask (the BAIT mask) is required")
        ctx = self.context(req.sample)
        control = self.io.load_video(req.control_video).frames
        background = self.io.load_video(req.background_video).frames
        if not (control.shape == background.shape == ctx.video.frames.shape):
            raise InputError(f"control {control.shape}, background {background.shape} and source "
                             f"{ctx.video.frames.shape} must have the same shape")
        return ctx, control, background, self.io.load_image(req.first_frame), ctx.mask, req.prompt

    def predict(self, op, inputs):
        return [(self.backend.synthesize(*x), x[0].video.fps) for x in inputs]

    def encode_response(self, op, output, req):
        video, fps = output
        self.io.put_video(req.output, video, fps)
        t, h, w = video.shape[:3]
        return VideoResponse(video=req.output, num_frames=t, width=w, height=h)


API = ControlAPI
