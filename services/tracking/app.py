"""Tracking service: ``POST /v1/bait`` (one pass per anchor, pixel-wise majority vote, bit-packed mask)."""

from sparkle.algorithms.bait import run_bait
from sparkle.backends import Anchor
from sparkle.errors import InputError
from sparkle.schemas import BaitRequest, MaskResponse
from sparkle.serving import BackendAPI


class TrackingAPI(BackendAPI):
    """SAM3 tracking for BAIT: every anchor's boxes propagated forward and backward, then voted."""

    service = "tracking"
    operations = {"bait": (BaitRequest, MaskResponse)}
    doc_bait = "Track from every anchor over the source video and vote; the `.npz` mask is written to `output`."

    def decode_request(self, op, req):
        ctx = self.context(req.sample)
        t, h, w = ctx.video.shape
        anchors = []
        for a in req.anchors:
            if a.frame_index >= t:
                raise InputError(f"anchor frame {a.frame_index} outside 0..{t - 1}")
            for b in a.boxes:
                x1, y1, x2, y2 = b.box
                if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
                    raise InputError(f"box {b.box} of {b.label!r} is not inside {w}x{h}")
            anchors.append(Anchor(a.frame_index, [(b.label, tuple(b.box)) for b in a.boxes]))
        return ctx, anchors, req.tie_is_foreground

    def predict(self, op, inputs):
        return [(run_bait(self.backend, ctx, ctx.video.frames, anchors, tie), len(anchors))
                for ctx, anchors, tie in inputs]

    def encode_response(self, op, output, req):
        mask, passes = output
        self.io.put_mask(req.output, mask)
        return MaskResponse(mask=req.output, shape=mask.shape, passes=passes,
                            foreground_fraction=round(float(mask.mean()), 6))


API = TrackingAPI
