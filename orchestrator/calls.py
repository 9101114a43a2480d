"""Service calls over the queues: the stage's side (:class:`QueueTransport`) and the service worker's side
(the ``sparkle.op`` task and its executors).

A stage running on an orchestrator worker calls a service through its client exactly as in-process
(``env.services.image_edit.edit_background(sample, frame0, prompt)``); over a :class:`QueueTransport` the
request (artifact keys and parameters, never pixels) becomes a ``sparkle.op`` message on the service's queue
(``sparkle.<service>``), and the stage waits for the answer.

- Outputs: an operation that writes an artifact writes it to ``staging/{id}/ops/{service}.{op}.{digest}.{ext}``,
  where ``digest`` is the SHA-1 of the request (the client names it), so a re-sent request writes the same key.
- Answers are cached next to it (``.json``) by the service worker before its task returns, so a repeated call
  (a stage re-delivered after a crash) returns the cached answer without calling the service again.
- Waiting: polling the result backend for the deterministic task id ``{id}.{service}.{op}.{digest}``.

Errors. Transient failures of a call (HTTP 429, 502, 503, 504 and connection errors; other 5xx at most twice)
are retried by the service worker with exponential back-off and full jitter, honouring ``Retry-After``, until
``op_wait_s`` after the call was first sent (an outage is waited out by time, not by a count: a model server
may take half an hour to start); what reaches the stage is the answer, :class:`~sparkle.errors.ServiceRejected`
(4xx or a refused request: terminal) or :class:`~sparkle.errors.ServiceUnavailable` (the time is up).
- Liveness: a call is marked queued when sent and holds a lease while it runs (``liveness.py``); the waiting
  stage sends it again if its worker died with it, whatever the visibility timeout.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from pydantic import BaseModel

from sparkle.backends import load_backend
from sparkle.errors import ConfigError, InputError, ServiceRejected, ServiceUnavailable
from sparkle.queues import SERVICE_QUEUES
from sparkle.service import OpRequest
from sparkle.settings import resolve_key
from sparkle.store import staging_prefix

from . import liveness
from .celery_app import SparkleTask, TransientError, app, is_transient, resources

log = logging.getLogger("sparkle.calls")


# --- the service worker's side -------------------------------------------------------------------------------

class HttpExecutor:
    """Calls the model server at ``url`` (``POST {url}/v1/{op}``), as the pod's queue worker does.

    200 -> the JSON answer; 429, 502, 503, 504 and connection errors -> TransientError (honouring
    ``Retry-After``); other 5xx -> TransientError with at most 2 retries (a crash may be a bad request);
    other 4xx -> ServiceRejected (terminal).
    """

    def __init__(self, url: str, timeout_s: float, api_key: str | None = None):
        import httpx

        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, timeout=timeout_s,
                                   headers={"X-API-Key": api_key} if api_key else None)

    def __call__(self, service: str, op: str, request: dict) -> dict:
        import httpx

        try:
            response = self.client.post(f"/v1/{op}", json=request)
        except httpx.TransportError as exc:
            raise TransientError(f"{service} at {self.url}: {exc.__class__.__name__}: {exc}") from exc
        if response.status_code == 200:
            return response.json()
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        message = f"{service}.{op}: HTTP {response.status_code}: {str(detail)[:500]}"
        retry_after = response.headers.get("retry-after")
        retry_after = float(retry_after) if retry_after and retry_after.isdigit() else None
        if response.status_code in (429, 502, 503, 504):
            raise TransientError(message, retry_after)
        if response.status_code >= 500:
            raise TransientError(message, retry_after, max_retries=2)
        raise ServiceRejected(message)


class InProcessExecutor:
    """Runs the service's API (``services/<service>/app.py``, the same declared operations the server runs) in
    this worker process, on backend ``backend`` (``cpu``, ``tiny``, ``real`` or ``module:factory``). Each
    service is set up once per process, on first use."""

    def __init__(self, backend: str, options: dict | None = None):
        self.backend, self.options = backend, options or {}
        self._apis: dict = {}
        self._guard = threading.Lock()

    def api(self, service: str):
        with self._guard:
            if service not in self._apis:
                api = importlib.import_module(f"sparkle.services.{service}.app").API(
                    load_backend(service, self.backend, **self.options.get(service, {})), resources().io)
                api.setup()
                self._apis[service] = api
            return self._apis[service]

    def __call__(self, service: str, op: str, request: dict) -> dict:
        try:
            return self.api(service).call(op, request).model_dump(mode="json")
        except InputError as exc:
            raise ServiceRejected(f"{service}.{op}: {exc}") from exc


@dataclass
class WorkerConfig:
    """What ``sparkle worker`` set up for this process: the services it serves and how it calls them."""

    services: tuple[str, ...] = ()
    executor: object | None = None


_worker = WorkerConfig()


def configure_worker(services: list[str], service_url: str | None = None, backend: str | None = None,
                     options: dict | None = None) -> WorkerConfig:
    """Set how this worker makes service calls (before the Celery worker starts; prefork children inherit it).

    Raises ConfigError when service queues are consumed with neither a URL nor a backend, or one URL is
    given for several services.
    """
    global _worker
    if services and not (service_url or backend):
        raise ConfigError(f"queues of {', '.join(services)} need --service-url URL or --backend NAME")
    if service_url and backend:
        raise ConfigError("give --service-url or --backend, not both")
    if service_url and len(services) != 1:
        raise ConfigError("--service-url serves exactly one service queue (one model server per worker)")
    executor = None
    if service_url:
        s = resources().settings
        executor = HttpExecutor(service_url, s.op_timeout_s,
                                resolve_key(s.serve_api_key, s.serve_api_key_file, "SPARKLE_SERVE_API_KEY_FILE"))
    elif backend:
        executor = InProcessExecutor(backend, options)
    _worker = WorkerConfig(tuple(services), executor)
    return _worker


@app.task(name="sparkle.op", bind=True, base=SparkleTask, max_retries=None)
def service_op(self: SparkleTask, service: str, op: str, request: dict, cache_key: str,
               deadline: float | None = None) -> dict:
    """One service call (see the module docstring), under the call's lease (``liveness.op_lease``). Returns the
    service's JSON answer plus ``worker`` (host, pid, start and end as Unix times in seconds: what the
    benchmarks measure busy time with). Transient failures are retried until ``deadline`` (Unix time, s: the
    caller's ``op_wait_s`` after it first sent the call), however many retries that takes."""
    from sparkle.store_s3 import RedisLock

    s = self.settings
    what = f"op:{self.request.id}"
    client = liveness.redis_of(self.app)
    # A duplicate of a running call waits for it, then finds its answer cached.
    lease = RedisLock(self.resources.redis, liveness.op_lease(self.request.id), s.op_lease_s, wait_s=s.op_timeout_s)
    if not lease.acquire():
        raise TransientError(f"{service}.{op}: a duplicate of this call ran for over {s.op_timeout_s:g} s")
    try:
        liveness.taken(client, what)
        return _call(self, service, op, request, cache_key, deadline)
    finally:
        lease.release(quiet=True)  # nothing raised: a lease lost, or Redis away (the key then expires)


def _call(task: SparkleTask, service: str, op: str, request: dict, cache_key: str, deadline: float | None) -> dict:
    """The body of :func:`service_op` under its lease: the cached answer, or the executor's (cached before it
    is returned); a transient failure is a retry (``task.retry``) while ``deadline`` allows."""
    if task.store.exists(cache_key):
        return task.store.get_json(cache_key)
    if _worker.executor is None or service not in _worker.services:
        raise ConfigError(f"this worker does not serve {service!r} (it serves {list(_worker.services)})")
    s = task.settings
    started = time.time()
    try:
        answer = _worker.executor(service, op, request)
    except Exception as exc:  # noqa: BLE001 - classified below
        if not is_transient(exc):
            raise
        limit = getattr(exc, "max_retries", None)
        deadline = deadline or started + s.op_wait_s
        delay = task.backoff_s(getattr(exc, "retry_after", None))
        if (limit is not None and task.request.retries >= limit) or time.time() + delay > deadline:
            raise ServiceUnavailable(f"{exc} (gave up after {task.request.retries} retries, "
                                     f"{s.op_wait_s:g} s after the call was sent)") from None
        log.warning("%s.%s: %s; retry %d in %.1f s", service, op, exc, task.request.retries + 1, delay)
        liveness.mark_queued(liveness.redis_of(task.app), f"op:{task.request.id}",
                             delay + s.op_lease_s + 2 * s.op_check_s)
        raise task.retry(countdown=delay, kwargs={"deadline": deadline}) from None
    answer["worker"] = {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "ended": time.time()}
    task.store.put_json(cache_key, answer)
    return answer


# --- the stage's side ----------------------------------------------------------------------------------------

class QueueTransport:
    """The :class:`~sparkle.service.Transport` of the distributed run: one ``sparkle.op`` message per call.

    ``celery_app``: the app the service workers consume; ``store``: where answers are cached; ``wait_s``:
    longest wait for one answer, seconds (queueing included).
    """

    def __init__(self, celery_app, store, wait_s: float):
        self.app, self.store, self.wait_s = celery_app, store, wait_s

    def backend_name(self, service: str) -> str:
        """What the reports name as the service's backend: its queue (the model is the service's business)."""
        return f"queue:{service}"

    def call(self, service: str, op: str, request: OpRequest, response: type[BaseModel], call_id: str) -> BaseModel:
        """Raises ServiceRejected, ServiceUnavailable (see the module docstring)."""
        sample_id = request.sample.sample_id
        cache_key = f"{staging_prefix(sample_id)}ops/{call_id}.json"
        if self.store.exists(cache_key):
            return _validated(response, self.store.get_json(cache_key))
        task_id = f"{sample_id}.{call_id}"
        backend = self.app.backend
        if backend.get_task_meta(task_id)["status"] == "FAILURE":  # an earlier journey attempt's failure
            backend.forget(task_id)
        deadline = time.time() + self.wait_s
        send = lambda: self._send(service, op, request, cache_key, task_id, deadline)  # noqa: E731
        send()
        return _validated(response, self._wait(service, op, task_id, send))

    def _send(self, service: str, op: str, request: OpRequest, cache_key: str, task_id: str, deadline: float) -> None:
        liveness.mark_queued(liveness.redis_of(self.app), f"op:{task_id}", resources().settings.queued_max_s)
        self.app.send_task(service_op.name, args=[service, op, request.model_dump(mode="json"), cache_key],
                           kwargs={"deadline": deadline}, queue=SERVICE_QUEUES[service], task_id=task_id)

    def _wait(self, service: str, op: str, task_id: str, resend) -> dict:
        """Poll the result backend (plain GETs: safe from the many threads of an orchestrator worker, unlike
        Celery's shared pub/sub result consumer) every 5 ms at first, backing off by 1.3x to 0.25 s: a quick
        call is seen within a few ms, a long one costs at most 4 Redis GETs a second. Every ``op_check_s``
        seconds the call must be queued or running (``liveness.op_alive``); after two checks that find it
        neither, its worker died with it, and it is sent again."""
        backend, delay = self.app.backend, 0.005
        settings = resources().settings
        deadline = time.monotonic() + self.wait_s
        next_check, misses = time.monotonic() + settings.op_check_s, 0
        while True:
            meta = backend.get_task_meta(task_id)
            if meta["status"] == "SUCCESS":
                return meta["result"]
            if meta["status"] == "FAILURE":
                raise backend.exception_to_python(meta["result"])
            now = time.monotonic()
            if now > deadline:
                raise ServiceUnavailable(f"{service}.{op}: no answer within {self.wait_s:g} s")
            if now >= next_check:
                next_check = now + settings.op_check_s
                misses = 0 if liveness.op_alive(liveness.redis_of(self.app), task_id) else misses + 1
                if misses >= 2:
                    log.warning("%s: the call was neither queued nor running for %.0f s: sent again", task_id,
                                settings.op_check_s)
                    resend()
                    misses = 0
            time.sleep(delay)
            delay = min(delay * 1.3, 0.25)


def _validated(response: type[BaseModel], answer: dict) -> BaseModel:
    return response.model_validate({k: v for k, v in answer.items() if k != "worker"})
