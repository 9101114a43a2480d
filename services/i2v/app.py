"""I2V service: ``POST /v1/animate``."""

from sparkle.schemas import AnimateRequest, VideoResponse
from sparkle.serving import BackendAPI


class I2VAPI(BackendAPI):
    """Wan2.2-I2V: the clean plate animated into the background video (`num_frames` frames, same size)."""

    service = "i2v"
    operations = {"animate": (AnimateRequest, VideoResponse)}
    doc_animate = "Animate `image` into a `num_frames`-frame video at `fps`, written to `output` (H.264 MP4)."

    def decode_request(self, op, req):
        return self.context(req.sample), self.io.load_image(req.image), req.prompt, req.num_frames, req.fps

    def predict(self, op, inputs):
        return [self.backend.animate(*x) for x in inputs]

    def encode_response(self, op, output, req):
        self.io.put_video(req.output, output, req.fps)
        t, h, w = output.shape[:3]
        return VideoResponse(video=req.output, num_frames=t, width=w, height=h)


API = I2VAPI
