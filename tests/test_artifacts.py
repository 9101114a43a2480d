"""Artifacts by reference: handles decode lazily, slices remember their frames, clients send keys only."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparkle.artifacts import ArtifactIO, ImageRef, MaskRef, VideoRef
from sparkle.backends import GroundedObject
from sparkle.errors import ArtifactMissing, ServiceRejected
from sparkle.service import SampleRef
from sparkle.services.grounding.app import GroundingClient, Round2Request
from sparkle.services.image_edit.app import ImageEditClient, ImageResponse
from sparkle.store import LocalStore


def video_frames(t=9, h=32, w=48):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return np.stack([np.roll(base, 2 * i, axis=1) for i in range(t)])


def test_handles_decode_lazily_and_slices_remember_their_frames(tmp_path):
    io = ArtifactIO(LocalStore(tmp_path))
    io.put_video("v.mp4", video_frames(), 16)
    video = io.video("v.mp4")
    assert "v.mp4" not in io._videos  # a video written is decoded only when read (its H.264 differs)
    full = video.array
    assert full.shape == (9, 32, 48, 3) and video.decoded.fps == pytest.approx(16)
    part = video.at([0, 4, 8])
    assert part.key == "v.mp4" and part.frame_indices == (0, 4, 8) and video.frame_indices is None
    np.testing.assert_array_equal(part.array, full[[0, 4, 8]])

    image = io.image(io.put_image("i.png", full[0]))
    assert isinstance(image, ImageRef) and np.array_equal(image.array, full[0])  # PNG: lossless
    mask = np.zeros((9, 32, 48), bool)
    mask[:, 8:20, 10:30] = True
    assert np.array_equal(io.mask(io.put_mask("m.npz", mask)).array, mask)

    io.copy("i.png", "copy.png")
    assert io.image("copy.png").array is image.array  # what is decoded of the source is decoded of the copy
    fresh = ArtifactIO(LocalStore(tmp_path))
    assert np.array_equal(fresh.image("copy.png").array, full[0])  # bytes unchanged in the store
    with pytest.raises(ArtifactMissing):
        fresh.image("nope.png").array


class RecordingTransport:
    """TEST DOUBLE of a transport: records the requests it is handed and answers without any service."""

    def __init__(self):
        self.sent = []

    def call(self, service, op, request, response, call_id):
        self.sent.append((service, op, request, call_id))
        if response is ImageResponse:
            return ImageResponse(image=request.output, width=48, height=32)
        return response(frame_objects=[[GroundedObject(bbox_2d=[], label=x) for x in request.labels]
                                       for _ in request.frame_indices])


def test_clients_send_keys_and_return_handles_on_the_output_key(tmp_path):
    io = ArtifactIO(LocalStore(tmp_path))
    io.put_video("staging/S/source.mp4", video_frames(), 16)
    frame0 = io.image(io.put_image("staging/S/frame0.png", video_frames()[0]))
    sample = SampleRef(sample_id="S", prompt="Replace the background with a beach", source_video="staging/S/source.mp4")
    transport = RecordingTransport()

    edited = ImageEditClient(transport, io).edit_background(sample, frame0, sample.prompt)
    again = ImageEditClient(transport, io).edit_background(sample, frame0, sample.prompt)
    other = ImageEditClient(transport, io).edit_background(sample, frame0, "Replace the background with snow")
    (_, op, request, call_id), *_ = transport.sent
    assert op == "edit_background" and request.image == "staging/S/frame0.png"
    assert request.output == f"staging/S/ops/{call_id}.png" and call_id.startswith("image_edit.edit_background.")
    body = json.dumps(request.model_dump(mode="json"))
    assert len(body) < 1000  # keys and parameters, never pixels
    assert isinstance(edited, ImageRef) and edited.key == request.output
    assert again.key == edited.key and other.key != edited.key  # the output key is a digest of the request
    assert edited.key not in io._images  # a handle on the service's output: nothing decoded
    with pytest.raises(ArtifactMissing):  # (this double wrote nothing there)
        edited.array

    grounding = GroundingClient(transport, io)
    source = io.video(sample.source_video)
    frames = grounding.ground_round2(sample, source.at([0, 8]), ["person"])
    assert [[o.label for o in f] for f in frames] == [["person"], ["person"]]
    sent = transport.sent[-1][2]
    assert isinstance(sent, Round2Request) and sent.frame_indices == [0, 8]
    assert "staging/S/source.mp4" not in io._videos  # the frames went as indices, nothing was decoded
    with pytest.raises(ValueError, match="source"):
        grounding.ground_round2(sample, io.video("elsewhere.mp4").at([0]), ["person"])
    with pytest.raises(ServiceRejected, match="invalid request"):  # refused by the service's model, not sent
        grounding.ground_round2(sample, source.at([0]), [f"label {i}" for i in range(40)])
    assert isinstance(io.mask("m.npz"), MaskRef) and isinstance(source, VideoRef)
