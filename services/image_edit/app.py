"""Image-editing service (FLUX.2-klein): its operations, their models, and its client.

``POST /v1/edit_background``, ``/v1/remove_foreground``; each writes a PNG to the request's ``output`` key.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from sparkle.artifacts import ImageRef
from sparkle.backends import GroundedObject
from sparkle.service import OpRequest, OpResponse, SampleRef, ServiceAPI, ServiceClient, operation


class EditBackgroundRequest(OpRequest):
    output_suffix: ClassVar[str] = "png"

    image: str
    instruction: str = Field(min_length=1, max_length=4000)
    output: str


class RemoveForegroundRequest(OpRequest):
    output_suffix: ClassVar[str] = "png"

    image: str
    objects: list[GroundedObject] = Field(max_length=32)
    output: str


class ImageResponse(OpResponse):
    image: str
    width: int
    height: int


class ImageEditAPI(ServiceAPI):
    """FLUX.2-klein edits: replace frame 0's background; erase the grounded foreground (clean plate)."""

    service = "image_edit"

    def _write(self, key: str, image) -> ImageResponse:
        self.io.put_image(key, image)
        return ImageResponse(image=key, width=image.shape[1], height=image.shape[0])

    @operation
    def edit_background(self, req: EditBackgroundRequest) -> ImageResponse:
        """Replace the background of `image` as `instruction` says; the result is written to `output`."""
        edited = self.backend.edit_background(self.context(req.sample), self.io.load_image(req.image), req.instruction)
        return self._write(req.output, edited)

    @operation
    def remove_foreground(self, req: RemoveForegroundRequest) -> ImageResponse:
        """Erase `objects` from `image`; the clean plate is written to `output`."""
        plate = self.backend.remove_foreground(self.context(req.sample), self.io.load_image(req.image), req.objects)
        return self._write(req.output, plate)


class ImageEditClient(ServiceClient):
    """The image-editing calls of the pipeline's stages: images in and out as handles."""

    api = ImageEditAPI

    def edit_background(self, sample: SampleRef, image: ImageRef, instruction: str) -> ImageRef:
        return self.io.image(self.call("edit_background", sample, image=image.key, instruction=instruction).image)

    def remove_foreground(self, sample: SampleRef, image: ImageRef, objects: list[GroundedObject]) -> ImageRef:
        answer = self.call("remove_foreground", sample, image=image.key, objects=[o.model_dump() for o in objects])
        return self.io.image(answer.image)


API, Client = ImageEditAPI, ImageEditClient
