"""A model service's contract, declared once: one method per operation, with its request and response models.

A service (``services/<name>/app.py``) is a :class:`ServiceAPI` subclass whose operations are methods marked
with :func:`operation`; the method's type hints name its request and response models (pydantic, strict)::

    class ImageEditAPI(ServiceAPI):
        service = "image_edit"

        @operation
        def edit_background(self, req: EditBackgroundRequest) -> ImageResponse:
            \"\"\"Replace the background of `image` ...\"\"\"

Everything that runs a service finds its operations here (:meth:`ServiceAPI.operations`): the HTTP shell
(:mod:`sparkle.serving`: routes, OpenAPI, batching, concurrency), the queue worker that calls a service
in-process, and the embedded default (:class:`InProcessTransport`). All of them go through
:meth:`ServiceAPI.run`, so an operation has one code path. ``@operation(batch=True)`` marks a method that takes
a list of requests and returns a list of responses, for backends that really batch; the shell then gathers
concurrent requests into one call.

Callers build requests from the same models through a :class:`ServiceClient` (each service folder has one
next to its API): handles in (:mod:`sparkle.artifacts`), handles out, over any :class:`Transport`. Requests
carry artifact *keys*, never pixels; an operation that writes an artifact writes it under the request's
``output`` key, which the client derives from a digest of the request (so a repeated call names the same key).

This module imports no web framework: queue workers and the orchestrator use it without FastAPI.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Callable, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .artifacts import ArtifactIO
from .backends import SampleContext
from .errors import InputError, ServiceRejected
from .store import ArtifactStore, staging_prefix

_deadline = threading.local()


@contextmanager
def run_until(deadline: float | None):
    """The operations run in this thread (inside the ``with``) should give up at ``deadline``
    (``time.monotonic()`` seconds; None: no limit). The HTTP shell sets it to the request's time-out, so that
    work whose client got a 504 stops at its next :func:`check_deadline` instead of running on (a ``bait``
    request ran 210 s of CPU after its 504)."""
    before = getattr(_deadline, "at", None)
    _deadline.at = deadline
    try:
        yield
    finally:
        _deadline.at = before


def check_deadline(what: str) -> None:
    """Raises TimeoutError when this thread's :func:`run_until` deadline has passed (call it between the
    passes of a long operation)."""
    at = getattr(_deadline, "at", None)
    if at is not None and time.monotonic() > at:
        raise TimeoutError(f"{what}: the request's time is up; stopped")


class Strict(BaseModel):
    """Unknown fields are refused (HTTP 422)."""

    model_config = ConfigDict(extra="forbid")


class SampleRef(Strict):
    """Which sample a request belongs to: its id, prompt and stored source (plus background and mask)."""

    sample_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.-]+$",
                           description="one path segment: the sample's staging area is staging/{sample_id}/")
    prompt: str = Field("", max_length=4000)
    source_video: str = Field(min_length=1, description="key of the conformed source video")
    background: str | None = Field(None, description="key of a user background image or video")
    mask: str | None = Field(None, description="key of the BAIT mask .npz, once stage 4 has run")


class OpRequest(Strict):
    """Base of every request: the sample it belongs to. A request that writes an artifact declares an
    ``output: str`` field and its file type in ``output_suffix`` (``png``, ``mp4``, ``npz``)."""

    output_suffix: ClassVar[str | None] = None

    sample: SampleRef

    @model_validator(mode="after")
    def _output_in_the_samples_staging_area(self):
        """A model server writes only under the calling sample's ``staging/{sample_id}/`` (one unauthenticated
        request could overwrite a published video or the dataset's CSV); 422 otherwise."""
        output = getattr(self, "output", None)
        if output:
            prefix = staging_prefix(self.sample.sample_id)
            parts = PurePosixPath(output).parts
            if not output.startswith(prefix) or ".." in parts or self.sample.sample_id in (".", ".."):
                raise ValueError(f"output {output!r} must lie under {prefix} (the calling sample's staging area)")
        return self


class OpResponse(Strict):
    timings: dict[str, float] = Field(default_factory=dict, description="seconds: queue, run, total")


class VideoResponse(OpResponse):
    """The answer of an operation that wrote a video (``video``: its key; frames and size as written)."""

    video: str
    num_frames: int
    width: int
    height: int


@dataclass(frozen=True)
class Operation:
    """One declared operation: ``name`` (the route ``POST /v1/{name}``), its models, whether it batches."""

    name: str
    request: type[BaseModel]
    response: type[BaseModel]
    batch: bool
    doc: str


def operation(fn: Callable | None = None, *, batch: bool = False):
    """Declare a :class:`ServiceAPI` method as an operation.

    ``def op(self, req: Request) -> Response``; with ``batch=True``,
    ``def op(self, reqs: list[Request]) -> list[Response]`` (same length and order). The docstring is the
    operation's OpenAPI description.
    """

    def mark(f: Callable) -> Callable:
        f.__sparkle_operation__ = {"batch": batch}
        return f

    return mark(fn) if fn is not None else mark


def _describe(name: str, fn: Callable, batch: bool) -> Operation:
    hints = typing.get_type_hints(fn)
    params = list(fn.__code__.co_varnames[1:fn.__code__.co_argcount])
    if len(params) != 1 or params[0] not in hints or "return" not in hints:
        raise TypeError(f"operation {name}: expected def {name}(self, req: Request) -> Response with type hints")
    request, response = hints[params[0]], hints["return"]
    if batch:
        request, response = typing.get_args(request)[0], typing.get_args(response)[0]
    return Operation(name, request, response, batch, (fn.__doc__ or "").strip())


class ServiceAPI:
    """A model service: a model backend (:mod:`sparkle.backends`) behind declared operations.

    ``backend``: the model backend (``cpu``, ``tiny``, ``real``, a test double); ``store``: the artifact store,
    or an :class:`ArtifactIO` to share decoded artifacts with the caller (the embedded default does).
    """

    service: ClassVar[str]

    def __init__(self, backend, store: ArtifactStore | ArtifactIO):
        self.backend = backend
        self.io = store if isinstance(store, ArtifactIO) else ArtifactIO(store)

    def setup(self) -> None:
        """Load the model once per process."""
        self.backend.setup()

    def warmup(self) -> None:
        """Optional: one small call after ``setup`` so that the first request pays no compilation."""

    def health(self) -> dict:
        """Shown by ``/healthz`` and ``/readyz``."""
        return {"service": self.service, "backend": self.backend.name}

    @property
    def max_concurrency(self) -> int:
        """Requests this service runs at once in one process: the backend's ``max_concurrency`` (a client of a
        server that batches, e.g. vLLM, takes many), else 1 (one model on one device)."""
        return max(1, int(getattr(self.backend, "max_concurrency", 1)))

    @classmethod
    @functools.cache
    def operations(cls) -> dict[str, Operation]:
        """The declared operations, by name."""
        ops = {}
        for name in dir(cls):
            fn = getattr(cls, name)
            if callable(fn) and hasattr(fn, "__sparkle_operation__"):
                if hasattr(ServiceAPI, name):
                    raise TypeError(f"{cls.__name__}.{name}: an operation may not shadow ServiceAPI.{name}")
                ops[name] = _describe(name, fn, fn.__sparkle_operation__["batch"])
        return ops

    def write_video(self, key: str, frames, fps: float) -> VideoResponse:
        """Write ``(T, H, W, 3) uint8`` ``frames`` as H.264 at ``fps`` under ``key``; the answer naming it."""
        self.io.put_video(key, frames, fps)
        t, h, w = frames.shape[:3]
        return VideoResponse(video=key, num_frames=t, width=w, height=h)

    def context(self, sample: SampleRef) -> SampleContext:
        """The :class:`SampleContext` of a request's sample (decoded once per process)."""
        return self.io.context(sample.sample_id, sample.prompt, sample.source_video, sample.background, sample.mask)

    def run(self, op: str, requests: list[BaseModel]) -> list[BaseModel]:
        """Run operation ``op`` on validated requests: a batched operation in one call, others one by one.

        Raises InputError (bad artifacts or parameters: the caller maps it to 4xx), anything else from the model.
        """
        spec = self.operations()[op]
        method = getattr(self, op)
        if spec.batch:
            out = method(list(requests))
            if len(out) != len(requests):
                raise RuntimeError(f"{self.service}.{op} returned {len(out)} responses for {len(requests)} requests")
            return out
        return [method(r) for r in requests]

    def call(self, op: str, request: BaseModel | dict) -> BaseModel:
        """One request, in this process (queue workers with ``--backend``, the embedded default): validated,
        run through :meth:`run` (the path the HTTP shell takes too), with its run time in ``timings``.

        Raises InputError for an unknown operation, an invalid request or bad artifacts.
        """
        spec = self.operations().get(op)
        if spec is None:
            raise InputError(f"{self.service} has no operation {op!r}")
        try:
            body = request if isinstance(request, spec.request) else spec.request.model_validate(
                request.model_dump() if isinstance(request, BaseModel) else request)
        except ValidationError as exc:
            raise InputError(f"{self.service}.{op}: invalid request: {exc.errors()[:3]}") from exc
        started = time.perf_counter()
        [response] = self.run(op, [body])
        response.timings = {"run": round(time.perf_counter() - started, 4), **response.timings}
        return response


# --- the caller's side -------------------------------------------------------------------------------------

class Transport(Protocol):
    """How a :class:`ServiceClient` reaches a service: in-process, over the queues, ..."""

    def call(self, service: str, op: str, request: OpRequest, response: type[BaseModel], call_id: str) -> BaseModel:
        """The service's response to ``request``. ``call_id`` (``{service}.{op}.{digest}``) names the call
        uniquely within its sample, for caches and task ids."""

    def backend_name(self, service: str) -> str:
        """What serves ``service``, as the sample's report names it."""


class InProcessTransport:
    """Calls the services' APIs in this process (``apis``: service name -> :class:`ServiceAPI`)."""

    def __init__(self, apis: dict[str, ServiceAPI]):
        self.apis = apis

    def call(self, service, op, request, response, call_id):
        return self.apis[service].call(op, request)

    def backend_name(self, service: str) -> str:
        return self.apis[service].backend.name


def op_digest(service: str, op: str, request: dict) -> str:
    """First 16 hex digits of the SHA-1 of the canonical JSON of ``(service, op, request)``."""
    body = json.dumps([service, op, request], sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(body.encode()).hexdigest()[:16]


class ServiceClient:
    """Typed calls of one service, as the pipeline's stages make them (subclassed in each service folder).

    ``api``: the service's :class:`ServiceAPI` class (its declared models); ``transport``: how calls travel;
    ``io``: the caller's :class:`ArtifactIO`, which makes handles of the keys that come back.
    """

    api: ClassVar[type[ServiceAPI]]

    def __init__(self, transport: Transport, io: ArtifactIO):
        self.transport, self.io = transport, io

    @property
    def service(self) -> str:
        return self.api.service

    def call(self, op: str, sample: SampleRef, **fields: Any) -> Any:
        """Build ``op``'s request from ``fields`` (plus ``output``, for an operation that writes an artifact:
        ``staging/{id}/ops/{service}.{op}.{digest}.{suffix}``), send it, return the validated response.

        Raises ServiceRejected for a request the service's model refuses (e.g. more than 32 labels), before
        anything is sent; the transport's errors otherwise.
        """
        spec = self.api.operations()[op]
        body = {"sample": sample.model_dump(), **fields}
        try:
            request = spec.request.model_validate({**body, "output": ""} if spec.request.output_suffix else body)
        except ValidationError as exc:
            raise ServiceRejected(f"{self.service}.{op}: invalid request: {exc.errors()[:3]}") from exc
        call_id = f"{self.service}.{op}.{op_digest(self.service, op, request.model_dump(mode='json', exclude={'output'}))}"
        if spec.request.output_suffix:
            request.output = f"{staging_prefix(sample.sample_id)}ops/{call_id}.{spec.request.output_suffix}"
        return self.transport.call(self.service, op, request, spec.response, call_id)


__all__ = ["Strict", "SampleRef", "OpRequest", "OpResponse", "VideoResponse", "Operation", "operation", "ServiceAPI", "Transport",
           "InProcessTransport", "ServiceClient", "op_digest"]
