"""The server shell shared by the six model services (after LitServe).

A service is a :class:`ModelAPI` with four hooks:

- ``setup()``: load the model once (runs in a background thread; ``/readyz`` turns 200 when it is done);
- ``decode_request(op, request)``: a validated request to model inputs (reads artifacts from the store);
- ``predict(op, inputs)``: a *batch* (list) of inputs to a list of outputs, same length and order;
- ``encode_response(op, output, request)``: an output to the response model (writes artifacts).

Everything else belongs to the shell and is the same for every service: routes ``POST /v1/{op}``,
``GET /healthz`` (process alive; 500 once loading failed), ``GET /readyz`` (model loaded and warmed up),
``GET /metrics`` (Prometheus: requests by status, latency, batch size, queue depth, GPU memory on CUDA);
dynamic batching per operation (up to ``max_batch_size`` requests gathered for ``batch_timeout_s``), one
``predict`` at a time per process (one model, one device); back-pressure (beyond ``max_pending`` requests
in the process: 503 with ``Retry-After``, never an unbounded queue); request body limit (413); unknown
fields (422, from the strict schemas); an optional API key (401); a per-request time-out (504).

Error mapping: ArtifactMissing 404, TooLarge 413, other InputError 400, NotReady 503, anything else 500.
"""

import asyncio
import json
import logging
import secrets
import threading
import time
from abc import ABC, abstractmethod
from contextlib import asynccontextmanager
from typing import Any, ClassVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .artifacts import ArtifactIO
from .errors import ArtifactMissing, InputError, NotReady, TooLarge
from .store import ArtifactStore

log = logging.getLogger("sparkle.serving")


class ServeSettings(BaseSettings):
    """Shell settings; environment ``SPARKLE_SERVE_*`` (e.g. ``SPARKLE_SERVE_MAX_BATCH_SIZE=8``)."""

    model_config = SettingsConfigDict(env_prefix="SPARKLE_SERVE_")

    max_batch_size: int = Field(4, ge=1)
    batch_timeout_s: float = Field(0.02, ge=0)
    max_pending: int = Field(16, ge=1, description="requests admitted at once (decoding, queued, running)")
    max_body_bytes: int = Field(1_048_576, ge=1024)
    request_timeout_s: float = Field(900.0, gt=0)
    retry_after_s: int = Field(5, ge=1)
    api_key: SecretStr | None = None
    load_in_background: bool = True


class ModelAPI(ABC):
    """The four hooks of a model service. ``operations`` maps ``op`` to (request model, response model)."""

    service: ClassVar[str]
    operations: ClassVar[dict[str, tuple[type[BaseModel], type[BaseModel]]]]

    @abstractmethod
    def setup(self) -> None: ...

    @abstractmethod
    def decode_request(self, op: str, request: BaseModel) -> Any: ...

    @abstractmethod
    def predict(self, op: str, inputs: list[Any]) -> list[Any]: ...

    @abstractmethod
    def encode_response(self, op: str, output: Any, request: BaseModel) -> BaseModel: ...

    def warmup(self) -> None:
        """Optional: one small call after ``setup`` so that the first request pays no compilation."""

    def describe(self) -> dict:
        """Shown by ``/healthz`` and ``/readyz``."""
        return {"service": self.service}


class BackendAPI(ModelAPI):
    """A service built on a stage backend (:mod:`sparkle.backends`) and the artifact store."""

    def __init__(self, backend, store: ArtifactStore):
        self.backend = backend
        self.io = ArtifactIO(store)

    def setup(self) -> None:
        self.backend.setup()

    def context(self, sample):
        """The :class:`SampleContext` of a request's :class:`~sparkle.schemas.SampleRef`."""
        return self.io.context(sample.sample_id, sample.prompt, sample.source_video, sample.background, sample.mask)

    def describe(self) -> dict:
        return {"service": self.service, "backend": self.backend.name}


class _Metrics:
    def __init__(self, service: str):
        self.registry = CollectorRegistry()
        self.service = service
        self.requests = Counter("sparkle_requests_total", "requests by operation and HTTP status",
                                ["service", "operation", "status"], registry=self.registry)
        self.latency = Histogram("sparkle_request_latency_seconds", "request latency", ["service", "operation"],
                                 buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
                                 registry=self.registry)
        self.batch = Histogram("sparkle_batch_size", "requests per predict call", ["service", "operation"],
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.queue = Gauge("sparkle_queue_depth", "requests admitted and not finished", ["service"],
                           registry=self.registry)
        self.gpu = Gauge("sparkle_gpu_memory_bytes", "CUDA memory allocated by this process", ["service"],
                         registry=self.registry)

    def render(self) -> bytes:
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self.gpu.labels(self.service).set(torch.cuda.memory_allocated())
        except ImportError:
            pass
        return generate_latest(self.registry)


class _Batcher:
    """Gathers requests of one operation into batches and runs them one predict at a time."""

    def __init__(self, api: ModelAPI, op: str, settings: ServeSettings, lock: asyncio.Lock, metrics: _Metrics):
        self.api, self.op, self.settings, self.lock, self.metrics = api, op, settings, lock, metrics
        self.queue: asyncio.Queue = asyncio.Queue()

    async def submit(self, inputs: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((inputs, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.settings.batch_timeout_s
            while len(batch) < self.settings.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch = [(x, f) for x, f in batch if not f.done()]  # callers that timed out
            if not batch:
                continue
            self.metrics.batch.labels(self.api.service, self.op).observe(len(batch))
            try:
                async with self.lock:
                    outputs = await asyncio.to_thread(self.api.predict, self.op, [x for x, _ in batch])
                if len(outputs) != len(batch):
                    raise RuntimeError(f"predict returned {len(outputs)} outputs for {len(batch)} inputs")
                for (_, f), out in zip(batch, outputs):
                    if not f.done():
                        f.set_result(out)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)


class _BodyLimit:
    """ASGI middleware: 413 when a request body exceeds ``limit`` bytes (header or streamed count)."""

    class _Exceeded(Exception):
        pass

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _reject(self, send) -> None:
        body = json.dumps({"detail": f"request body larger than {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and int(length) > self.limit:
            return await self._reject(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._Exceeded()
            return message

        try:
            await self.app(scope, limited, send)
        except self._Exceeded:
            await self._reject(send)


def build_app(api: ModelAPI, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app of ``api`` with the shell around it (see the module docstring)."""
    settings = settings or ServeSettings()
    metrics = _Metrics(api.service)
    state = {"status": "loading", "error": None, "pending": 0}
    batchers: dict[str, _Batcher] = {}

    def load() -> None:
        try:
            started = time.perf_counter()
            api.setup()
            api.warmup()
            state["status"] = "ready"
            log.info("%s ready in %.1f s", api.service, time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - reported by /healthz and /readyz
            state["status"], state["error"] = "failed", f"{exc.__class__.__name__}: {exc}"
            log.exception("%s failed to load", api.service)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        lock = asyncio.Lock()
        for op in api.operations:
            batchers[op] = _Batcher(api, op, settings, lock, metrics)
        tasks = [asyncio.create_task(b.run()) for b in batchers.values()]
        if settings.load_in_background:
            threading.Thread(target=load, name=f"{api.service}-setup", daemon=True).start()
        else:
            load()
        yield
        for t in tasks:
            t.cancel()

    app = FastAPI(title=f"Sparkle Factory — {api.service}", lifespan=lifespan,
                  description=(api.__doc__ or "").strip())
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)

    @app.middleware("http")
    async def count(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        path = request.url.path
        if path.startswith("/v1/"):
            op = path.removeprefix("/v1/")
            metrics.requests.labels(api.service, op, str(response.status_code)).inc()
            metrics.latency.labels(api.service, op).observe(time.perf_counter() - started)
        return response

    def retry_after() -> dict:
        return {"Retry-After": str(settings.retry_after_s)}

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError):
        code = 404 if isinstance(exc, ArtifactMissing) else 413 if isinstance(exc, TooLarge) else 400
        return JSONResponse({"detail": str(exc)}, status_code=code)

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, exc: NotReady):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers=retry_after())

    async def authorise(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not secrets.compare_digest(given.encode(), settings.api_key.get_secret_value().encode()):
            from fastapi import HTTPException

            raise HTTPException(401, "missing or wrong API key (X-API-Key or Authorization: Bearer)")

    @app.get("/healthz")
    async def healthz():
        body = {"status": "alive", "model": state["status"], **api.describe()}
        if state["status"] == "failed":
            return JSONResponse({**body, "error": state["error"]}, status_code=500)
        return body

    @app.get("/readyz")
    async def readyz():
        body = {"status": state["status"], **api.describe()}
        if state["status"] != "ready":
            return JSONResponse({**body, "error": state["error"]}, status_code=503, headers=retry_after())
        return body

    @app.get("/metrics")
    async def prometheus():
        metrics.queue.labels(api.service).set(state["pending"])
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def make_route(op: str, request_model: type[BaseModel], response_model: type[BaseModel]):
        async def handler(body: request_model) -> response_model:  # type: ignore[valid-type]
            if state["status"] != "ready":
                raise NotReady(f"{api.service} is {state['status']}" + (f": {state['error']}" if state["error"] else ""))
            if state["pending"] >= settings.max_pending:
                raise NotReady(f"{api.service} is full ({state['pending']} requests in flight)")
            state["pending"] += 1
            try:
                t0 = time.perf_counter()
                inputs = await asyncio.to_thread(api.decode_request, op, body)
                t1 = time.perf_counter()
                try:
                    output = await asyncio.wait_for(batchers[op].submit(inputs), settings.request_timeout_s)
                except asyncio.TimeoutError:
                    return JSONResponse({"detail": f"{op} took longer than {settings.request_timeout_s} s"},
                                        status_code=504)
                t2 = time.perf_counter()
                response = await asyncio.to_thread(api.encode_response, op, output, body)
                t3 = time.perf_counter()
                response.timings = {"decode": round(t1 - t0, 4), "queue_and_predict": round(t2 - t1, 4),
                                    "encode": round(t3 - t2, 4), "total": round(t3 - t0, 4), **response.timings}
                return response
            finally:
                state["pending"] -= 1

        handler.__name__ = op
        handler.__doc__ = getattr(api, f"doc_{op}", None) or f"{api.service} operation {op}."
        app.post(f"/v1/{op}", response_model=response_model, dependencies=[Depends(authorise)],
                 summary=f"{api.service}: {op}")(handler)

    for op, (request_model, response_model) in api.operations.items():
        make_route(op, request_model, response_model)
    app.state.sparkle = state
    return app
