"""The HTTP server shell shared by the six model services (after LitServe).

A service is a :class:`~sparkle.service.ServiceAPI` whose operations are declared methods (one per operation,
with its request and response models: :func:`~sparkle.service.operation`). The shell builds everything else
from those declarations, the same for every service: routes ``POST /v1/{op}`` with their OpenAPI schemas,
``GET /healthz`` (process alive; 500 once loading failed), ``GET /readyz`` (model loaded and warmed up),
``GET /metrics`` (Prometheus: requests by status, latency, batch size, queue depth, GPU memory on CUDA).

Scheduling. Requests run in worker threads, at most ``max_concurrency`` at once per process (the setting, else
the API's own :attr:`~sparkle.service.ServiceAPI.max_concurrency`: 1 for a model on one device, more for a
client of a server that batches, such as vLLM); there is no process-wide lock. An operation declared with
``batch=True`` gets dynamic batching: up to ``max_batch_size`` requests gathered for ``batch_timeout_s``, one
call per batch. Back-pressure: beyond ``max_pending`` requests admitted in the process, 503 with
``Retry-After`` (never an unbounded queue); request body limit (413); unknown fields (422, from the strict
schemas); an optional API key (401); a per-request time-out (504).

Error mapping: ArtifactMissing 404, TooLarge 413, other InputError 400, NotReady 503, anything else 500.
"""

import asyncio
import hashlib
import json
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ArtifactMissing, InputError, NotReady, TooLarge
from .service import Operation, ServiceAPI, run_until
from .settings import resolve_key

log = logging.getLogger("sparkle.serving")


class ServeSettings(BaseSettings):
    """Shell settings; environment ``SPARKLE_SERVE_*`` (e.g. ``SPARKLE_SERVE_MAX_CONCURRENCY=16``)."""

    model_config = SettingsConfigDict(env_prefix="SPARKLE_SERVE_")

    max_concurrency: int | None = Field(None, ge=1, description="requests (or batches) running at once; "
                                        "default: the service's own (1 for a local model)")
    max_batch_size: int = Field(4, ge=1, description="requests per call of a batching operation")
    batch_timeout_s: float = Field(0.02, ge=0)
    max_pending: int = Field(16, ge=1, description="requests admitted at once (queued or running)")
    max_body_bytes: int = Field(1_048_576, ge=1024)
    request_timeout_s: float = Field(900.0, gt=0)
    retry_after_s: int = Field(5, ge=1)
    api_key: SecretStr | None = Field(None, description="the key clients must send (X-API-Key or Bearer)")
    api_key_file: Path | None = Field(None, description="a file holding the key (a mounted Secret, or the key an "
                                      "init container generated for the pod); used when api_key is unset")
    load_in_background: bool = True

    def key(self) -> str | None:
        """The API key (``api_key``, else the stripped contents of ``api_key_file``), or None. Raises
        ConfigError when the file is missing or empty."""
        return resolve_key(self.api_key, self.api_key_file, "SPARKLE_SERVE_API_KEY_FILE")


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


class _Runner:
    """Runs one operation's requests in worker threads under the process's concurrency limit; a batching
    operation's requests are first gathered into batches."""

    def __init__(self, api: ServiceAPI, spec: Operation, settings: ServeSettings, slots: asyncio.Semaphore,
                 pool: ThreadPoolExecutor, metrics: "_Metrics"):
        self.api, self.spec, self.settings, self.slots, self.pool = api, spec, settings, slots, pool
        self.metrics = metrics
        self.queue: asyncio.Queue = asyncio.Queue()

    async def _run(self, requests: list[BaseModel]) -> list[BaseModel]:
        self.metrics.batch.labels(self.api.service, self.spec.name).observe(len(requests))
        async with self.slots:
            started = time.perf_counter()
            deadline = time.monotonic() + self.settings.request_timeout_s
            responses = await asyncio.get_running_loop().run_in_executor(self.pool, self._run_until, deadline,
                                                                         requests)
            run = round(time.perf_counter() - started, 4)
        for response in responses:
            response.timings = {"run": run, **response.timings}
        return responses

    def _run_until(self, deadline: float, requests: list[BaseModel]) -> list[BaseModel]:
        with run_until(deadline):
            return self.api.run(self.spec.name, requests)

    async def submit(self, request: BaseModel) -> BaseModel:
        if not self.spec.batch:
            return (await self._run([request]))[0]
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((request, future))
        return await future

    async def gather(self) -> None:
        """The batching loop of a ``batch=True`` operation (batches of one op run one after another)."""
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
            try:
                outputs = await self._run([x for x, _ in batch])
                for (_, f), out in zip(batch, outputs):
                    if not f.done():
                        f.set_result(out)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)


async def _answer(send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: 413 when a request body exceeds ``limit`` bytes, from the ``Content-Length`` header or,
    for a chunked body, by counting it as it streams (it was a 400 from the body parser); 408 when the client
    sends it too slowly: nothing for ``idle_s`` seconds, or less than ``min_rate`` bytes/s on average after the
    first ``grace_s`` seconds (a slow-upload client held a connection open for ever). The time limits end with
    the body: a response streamed afterwards (server-sent events) waits for the client's disconnect freely."""

    def __init__(self, app, limit: int, idle_s: float = 30.0, min_rate: float = 64 * 1024, grace_s: float = 60.0):
        self.app, self.limit = app, limit
        self.idle_s, self.min_rate, self.grace_s = idle_s, min_rate, grace_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and int(length) > self.limit:
            return await _answer(send, 413, f"request body larger than {self.limit} bytes")
        seen, refused, complete = 0, None, False
        started = time.monotonic()

        async def limited():
            nonlocal seen, refused, complete
            if refused:
                return {"type": "http.disconnect"}
            if complete:  # the body is in: later receives wait for a disconnect (an event stream), unlimited
                return await receive()
            allowed = self.grace_s + seen / self.min_rate - (time.monotonic() - started)
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(self.idle_s, allowed)))
            except TimeoutError:
                refused = (408, f"request body too slow (nothing for {self.idle_s:g} s, or under "
                                f"{self.min_rate / 1024:g} KiB/s after {self.grace_s:g} s)")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                complete = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # The body parser would turn an exception into its own 400 ("error parsing the body"): end
                    # the body as a disconnect instead, drop whatever the app answers, and answer 413 below.
                    refused = (413, f"request body larger than {self.limit} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except Exception:  # noqa: BLE001 - the app's reaction to the cut body; anything else re-raises
            if not refused:
                raise
        if refused:
            await _answer(send, *refused)


class ApiKeyAuth:
    """ASGI middleware: requests under ``prefix`` (one path prefix or several) must carry one of ``keys``
    (``X-API-Key`` or ``Authorization: Bearer``, or the ``cookie`` a browser got from a login page), checked from
    the headers before any of the body is read (401 otherwise; with ``login``, a browser's GET of a page is sent
    there instead, 303). The caller's principal, the first 16 hex digits of the key's SHA-256 (``""`` when no
    keys are configured), is put in ``scope["state"]["principal"]`` (``request.state.principal``).
    ``login``: a path that needs no key (the login page itself)."""

    def __init__(self, app, keys: list[str], prefix: str | tuple[str, ...] = "/v1/", cookie: str | None = None,
                 login: str | None = None):
        self.app, self.keys = app, [k.encode() for k in keys]
        self.prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
        self.cookie, self.login = cookie, login

    def _given(self, headers: dict) -> bytes:
        given = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(b"Bearer ").strip()
        if not given and self.cookie and b"cookie" in headers:
            from http.cookies import SimpleCookie

            jar = SimpleCookie()
            try:
                jar.load(headers[b"cookie"].decode("latin-1"))
            except Exception:  # noqa: BLE001 - a malformed cookie header is no key
                return b""
            if self.cookie in jar:
                given = jar[self.cookie].value.encode()
        return given

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(self.prefixes) or path == self.login:
            return await self.app(scope, receive, send)
        principal = ""
        if self.keys:
            headers = dict(scope["headers"])
            given = self._given(headers)
            if not key_matches(given, self.keys):
                if self.login and scope["method"] == "GET" and b"text/html" in headers.get(b"accept", b""):
                    from urllib.parse import quote

                    target = quote(path + ("?" + scope["query_string"].decode() if scope["query_string"] else ""))
                    return await _answer(send, 303, "an API key is needed",
                                         [(b"location", f"{self.login}?next={target}".encode())])
                return await _answer(send, 401, "missing or wrong API key (X-API-Key or Authorization: Bearer)",
                                     [(b"www-authenticate", b"Bearer")])
            principal = key_principal(given)
        scope.setdefault("state", {})["principal"] = principal
        return await self.app(scope, receive, send)


def key_matches(given: bytes, keys: list[bytes]) -> bool:
    """Whether ``given`` is one of ``keys`` (constant-time comparisons)."""
    return any(secrets.compare_digest(given, k) for k in keys)


def key_principal(key: bytes) -> str:
    """The principal of an API key: the first 16 hex digits of its SHA-256 (what jobs record as ``owner``)."""
    return hashlib.sha256(key).hexdigest()[:16]


def build_app(api: ServiceAPI, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app of ``api`` with the shell around it (see the module docstring)."""
    settings = settings or ServeSettings()
    metrics = _Metrics(api.service)
    state = {"status": "loading", "error": None, "pending": 0}
    runners: dict[str, _Runner] = {}

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
        concurrency = settings.max_concurrency or api.max_concurrency
        slots = asyncio.Semaphore(concurrency)  # what runs; the rest waits here (its "queue" time)
        # A pool of its own: asyncio's default one has only cores + 4 threads (6 here, not the 8 vLLM may take).
        pool = ThreadPoolExecutor(concurrency, thread_name_prefix=f"{api.service}-run")
        for op, spec in api.operations().items():
            runners[op] = _Runner(api, spec, settings, slots, pool, metrics)
        tasks = [asyncio.create_task(r.gather()) for r in runners.values() if r.spec.batch]
        if settings.load_in_background:
            threading.Thread(target=load, name=f"{api.service}-setup", daemon=True).start()
        else:
            load()
        yield
        for t in tasks:
            t.cancel()
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title=f"Sparkle Factory — {api.service}", lifespan=lifespan,
                  description=(api.__doc__ or "").strip())
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    key = settings.key()
    app.add_middleware(ApiKeyAuth, keys=[key] if key else [])  # outermost: before the body is read

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

    @app.get("/healthz")
    async def healthz():
        body = {"status": "alive", "model": state["status"], **api.health()}
        if state["status"] == "failed":
            return JSONResponse({**body, "error": state["error"]}, status_code=500)
        return body

    @app.get("/readyz")
    async def readyz():
        body = {"status": state["status"], **api.health()}
        if state["status"] != "ready":
            return JSONResponse({**body, "error": state["error"]}, status_code=503, headers=retry_after())
        return body

    @app.get("/metrics")
    async def prometheus():
        metrics.queue.labels(api.service).set(state["pending"])
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def make_route(spec: Operation):
        async def handler(body: spec.request) -> spec.response:  # type: ignore[valid-type]
            if state["status"] != "ready":
                raise NotReady(f"{api.service} is {state['status']}" + (f": {state['error']}" if state["error"] else ""))
            if state["pending"] >= settings.max_pending:
                raise NotReady(f"{api.service} is full ({state['pending']} requests in flight)")
            state["pending"] += 1
            try:
                t0 = time.perf_counter()
                try:
                    response = await asyncio.wait_for(runners[spec.name].submit(body), settings.request_timeout_s)
                except asyncio.TimeoutError:
                    return JSONResponse({"detail": f"{spec.name} took longer than {settings.request_timeout_s} s"},
                                        status_code=504)
                total = time.perf_counter() - t0
                run = response.timings.get("run", total)
                response.timings = {**response.timings, "queue": round(max(0.0, total - run), 4),
                                    "total": round(total, 4)}
                return response
            finally:
                state["pending"] -= 1

        handler.__name__ = spec.name
        handler.__doc__ = spec.doc or f"{api.service} operation {spec.name}."
        app.post(f"/v1/{spec.name}", response_model=spec.response,
                 summary=f"{api.service}: {spec.name}")(handler)

    for spec in api.operations().values():
        make_route(spec)
    app.state.sparkle = state
    return app
