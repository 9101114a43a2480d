"""The six stage-backend interfaces implemented by sending the work to the model services' queues.

A stage running on an orchestrator worker calls ``env.backends.image_edit.edit_background(ctx, frame0, prompt)``
exactly as in-process; here that call becomes a ``sparkle.op`` Celery message on the ``sparkle.image_edit``
queue carrying artifact **keys** (never pixels), and the stage waits for the service worker's answer.

- Inputs: an array the stage loaded from, or stored at, a key (``ArtifactIO.origin``) is sent as that key;
  frame 0 of the source as the staged ``source_frame0``; frame subsets of the source as ``frame_indices``;
  anything else is stored once under ``staging/{id}/ops/in-{sha1}.png``.
- Outputs: the service writes to ``staging/{id}/ops/{service}.{op}.{digest}.{ext}``, where ``digest`` is the
  SHA-1 of the request, so a re-sent request writes the same key; the answer is cached next to it as
  ``.json``, and a repeated call (a stage re-delivered after a crash) returns the cached answer without
  calling the service again.
- Waiting: polling the result backend for the deterministic task id ``{id}.{service}.{op}.{digest}``. Retries of
  transient failures happen on the service side (``orchestrator/tasks.py``); what reaches the stage is the
  answer, :class:`~sparkle.errors.ServiceRejected` (4xx, terminal) or
  :class:`~sparkle.errors.ServiceUnavailable` (retries exhausted, or no answer within ``op_wait_s``).
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np

from sparkle.artifacts import ArtifactIO
from sparkle.backends import Anchor, Backends, FrameScore, GroundedObject, ImageScore, SampleContext
from sparkle.errors import ServiceUnavailable
from sparkle.media import sample_indices
from sparkle.store import staging_prefix

from .routing import SERVICE_QUEUES

OP_TASK = "sparkle.op"

OUTPUT_SUFFIX = {("image_edit", "edit_background"): "png", ("image_edit", "remove_foreground"): "png",
                 ("i2v", "animate"): "mp4", ("tracking", "bait"): "npz", ("control", "synthesize"): "mp4"}
"""Operations that write an artifact, and its file type (the key the caller names in ``output``)."""


def op_digest(service: str, op: str, request: dict) -> str:
    """First 16 hex digits of the SHA-1 of the canonical JSON of ``(service, op, request)``."""
    body = json.dumps([service, op, request], sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(body.encode()).hexdigest()[:16]


class ServiceClient:
    """Sends one service operation to its queue and waits for the answer (see the module docstring).

    ``celery_app``: the app the service workers consume; ``io``: the journey's :class:`ArtifactIO`;
    ``wait_s``: longest wait for one answer, seconds (queueing included).
    """

    def __init__(self, celery_app, io: ArtifactIO, wait_s: float):
        self.app, self.io, self.wait_s = celery_app, io, wait_s

    def call(self, service: str, op: str, sample_id: str, request: dict) -> dict:
        """The service's JSON answer to ``request`` (with ``output`` filled in for artifact-writing ops).

        Raises ServiceRejected, ServiceUnavailable (see the module docstring).
        """
        digest = op_digest(service, op, request)
        base = f"{staging_prefix(sample_id)}ops/{service}.{op}.{digest}"
        if (suffix := OUTPUT_SUFFIX.get((service, op))) is not None:
            request = {**request, "output": f"{base}.{suffix}"}
        cache_key = f"{base}.json"
        if self.io.store.exists(cache_key):
            return self.io.store.get_json(cache_key)
        task_id = f"{sample_id}.{service}.{op}.{digest}"
        backend = self.app.backend
        if backend.get_task_meta(task_id)["status"] == "FAILURE":  # an earlier journey attempt's failure
            backend.forget(task_id)
        self.app.send_task(OP_TASK, args=[service, op, request, cache_key], queue=SERVICE_QUEUES[service],
                           task_id=task_id)
        return self._wait(service, op, task_id)

    def _wait(self, service: str, op: str, task_id: str) -> dict:
        """Poll the result backend (plain GETs: safe from the many threads of an orchestrator worker, unlike
        Celery's shared pub/sub result consumer) every 20 ms, backing off to 0.5 s."""
        backend, delay = self.app.backend, 0.02
        deadline = time.monotonic() + self.wait_s
        while True:
            meta = backend.get_task_meta(task_id)
            if meta["status"] == "SUCCESS":
                return meta["result"]
            if meta["status"] == "FAILURE":
                raise backend.exception_to_python(meta["result"])
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"{service}.{op}: no answer within {self.wait_s:g} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)


class _Remote:
    """What the six remote backends share: the client, the sample reference and input keys."""

    service: str

    def __init__(self, client: ServiceClient):
        self.client, self.io = client, client.io
        self.name = f"remote:{self.service}"

    def setup(self) -> None:
        """Nothing to load: the model lives in the service."""

    def _call(self, op: str, ctx: SampleContext, **fields) -> dict:
        return self.client.call(self.service, op, ctx.sample_id, {"sample": self._sample(ctx), **fields})

    @staticmethod
    def _sample(ctx: SampleContext) -> dict:
        refs = ctx.cache["refs"]
        return {"sample_id": ctx.sample_id, "prompt": ctx.prompt, "source_video": refs["source_video"],
                "background": refs.get("background"), "mask": refs.get("mask")}

    def _image(self, ctx: SampleContext, image: np.ndarray) -> str:
        """The key of ``image`` ``(H, W, 3) uint8``: where it came from, or a content-addressed upload."""
        if (key := self.io.origin(image)) is not None:
            return key
        frames = ctx.video.frames
        frame0 = ctx.cache.get("task_refs", {}).get("source_frame0")
        if (frame0 and image.shape == frames.shape[1:]
                and image.__array_interface__["data"][0] == frames.__array_interface__["data"][0]):
            return frame0
        key = f"{staging_prefix(ctx.sample_id)}ops/in-{hashlib.sha1(image.tobytes()).hexdigest()[:16]}.png"
        if not self.io.store.exists(key):
            self.io.put_image(key, image)
        return key

    def _frame_indices(self, ctx: SampleContext, frames: np.ndarray, indices: list[int]) -> list[int]:
        if len(indices) != len(frames):
            raise ValueError(f"{len(frames)} frames sent with {len(indices)} frame_indices")
        return [int(i) for i in indices]


class RemoteGrounder(_Remote):
    service = "grounding"

    def describe_scene(self, ctx, image):
        return self._call("describe", ctx, image=self._image(ctx, image))["text"]

    def ground_round1(self, ctx, source_frame0, edited_frame0):
        answer = self._call("ground_round1", ctx, source_frame0=self._image(ctx, source_frame0),
                            edited_frame0=self._image(ctx, edited_frame0))
        return [GroundedObject(**o) for o in answer["objects"]]

    def ground_round2(self, ctx, frames, frame_indices, labels):
        answer = self._call("ground_round2", ctx, frame_indices=self._frame_indices(ctx, frames, frame_indices),
                            labels=list(labels))
        return [[GroundedObject(**o) for o in objs] for objs in answer["frame_objects"]]

    def check_camera_motion(self, ctx, frames, sample_fps=2.0):
        # The stage sends the source sampled at sample_fps; the service samples the same frames by index.
        indices = sample_indices(len(ctx.video.frames), ctx.video.fps, sample_fps)
        answer = self._call("check_camera_motion", ctx, frame_indices=self._frame_indices(ctx, frames, indices),
                            sample_fps=sample_fps)
        return answer["camera_motion"], answer["reason"]

    def write_instruction(self, ctx, frame0, edit_type, chosen_keyword):
        return self._call("write_instruction", ctx, image=self._image(ctx, frame0), edit_type=edit_type,
                          chosen_keyword=chosen_keyword)["text"]


class RemoteImageEditor(_Remote):
    service = "image_edit"

    def edit_background(self, ctx, image, instruction):
        answer = self._call("edit_background", ctx, image=self._image(ctx, image), instruction=instruction)
        return self.io.load_image(answer["image"])

    def remove_foreground(self, ctx, image, objects):
        answer = self._call("remove_foreground", ctx, image=self._image(ctx, image),
                            objects=[o.model_dump() for o in objects])
        return self.io.load_image(answer["image"])


class RemoteVideoGenerator(_Remote):
    service = "i2v"

    def animate(self, ctx, image, prompt, num_frames, fps):
        answer = self._call("animate", ctx, image=self._image(ctx, image), prompt=prompt, num_frames=int(num_frames),
                            fps=float(fps))
        return self.io.load_video(answer["video"]).frames


class RemoteTracker(_Remote):
    """BAIT runs on the tracking service (every anchor's pass and the vote), so only the mask travels back."""

    service = "tracking"

    def track(self, ctx, frames, anchors):
        raise NotImplementedError("the remote tracker runs whole BAIT votes: use bait()")

    def bait(self, ctx: SampleContext, frames: np.ndarray, anchors: list[Anchor], tie_is_foreground: bool):
        answer = self._call("bait", ctx, tie_is_foreground=bool(tie_is_foreground), anchors=[
            {"frame_index": int(a.frame_index), "boxes": [{"label": label, "box": [int(v) for v in box]}
                                                          for label, box in a.boxes]} for a in anchors])
        return self.io.load_mask(answer["mask"])


class RemoteControlSynthesizer(_Remote):
    service = "control"

    def synthesize(self, ctx, control, background, first_frame, mask, prompt):
        keys = {"control_video": self.io.origin(control), "background_video": self.io.origin(background)}
        if None in keys.values() or not ctx.cache["refs"].get("mask"):
            raise ValueError("remote synthesis needs the control video, background video and mask stored first")
        answer = self._call("synthesize", ctx, **keys, first_frame=self._image(ctx, first_frame), prompt=prompt)
        return self.io.load_video(answer["video"]).frames


class RemoteScorer(_Remote):
    service = "editscore"

    def score_image(self, ctx, source, edited, instruction, task):
        answer = self._call("score_image", ctx, source=self._image(ctx, source), edited=self._image(ctx, edited),
                            instruction=instruction, task=task)
        self.name = answer["scorer"]  # the records name the service's scorer, not this client
        return ImageScore(**answer["score"])

    def score_frames(self, ctx, source, edited, frame_indices, instruction):
        key = self.io.origin(edited)
        if key is None:
            raise ValueError("remote frame scoring needs the edited video stored first")
        answer = self._call("score_frames", ctx, edited_video=key, frame_indices=[int(i) for i in frame_indices],
                            instruction=instruction)
        self.name = answer["scorer"]
        return [FrameScore(**s) for s in answer["scores"]]


def remote_backends(celery_app, io: ArtifactIO, wait_s: float) -> Backends:
    """The six backends of a journey running on queue workers, all sharing one :class:`ServiceClient`."""
    client = ServiceClient(celery_app, io, wait_s)
    return Backends(grounding=RemoteGrounder(client), image_edit=RemoteImageEditor(client),
                    i2v=RemoteVideoGenerator(client), tracking=RemoteTracker(client),
                    control=RemoteControlSynthesizer(client), editscore=RemoteScorer(client))
