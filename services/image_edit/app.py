"""Image-editing service: ``POST /v1/edit_background``, ``/v1/remove_foreground``."""

from sparkle.schemas import EditBackgroundRequest, ImageResponse, RemoveForegroundRequest
from sparkle.serving import BackendAPI


class ImageEditAPI(BackendAPI):
    """FLUX.2-klein edits: replace frame 0's background; erase the grounded foreground (clean plate)."""

    service = "image_edit"
    operations = {
        "edit_background": (EditBackgroundRequest, ImageResponse),
        "remove_foreground": (RemoveForegroundRequest, ImageResponse),
    }
    doc_edit_background = "Replace the background of `image` as `instruction` says; the result is written to `output`."
    doc_remove_foreground = "Erase `objects` from `image`; the clean plate is written to `output`."

    def decode_request(self, op, req):
        ctx = self.context(req.sample)
        image = self.io.load_image(req.image)
        return ctx, image, (req.instruction if op == "edit_background" else req.objects)

    def predict(self, op, inputs):
        method = self.backend.edit_background if op == "edit_background" else self.backend.remove_foreground
        return [method(*x) for x in inputs]

    def encode_response(self, op, output, req):
        self.io.put_image(req.output, output)
        return ImageResponse(image=req.output, width=output.shape[1], height=output.shape[0])


API = ImageEditAPI
