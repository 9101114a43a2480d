"""The Celery tasks of the distributed run.

- ``sparkle.stage(sample_id, stage)`` (queue ``sparkle.cpu``): one stage of one sample's journey
  (``orchestrator/pipeline.py``), run with :mod:`remote backends <sparkle.orchestrator.remote>` that send the
  model work to the service queues. The task holds the sample's Redis lease while it runs, reads the
  journey's checkpoint, runs the stage the checkpoint names next, saves the new checkpoint and sends the
  message of the following stage (the last one publishes or reports, and ends the journey). A re-delivered or
  duplicate message finds its stage done and does nothing, so every stage is idempotent; a message held
  while its stage runs lasts one stage, which is what the visibility timeout must exceed.
- ``sparkle.op(service, op, request, cache_key)`` (queue ``sparkle.<service>``): one model-service call,
  made by the worker's executor: HTTP to the model server next to it (``--service-url``) or the service's API
  in-process (``--backend``). Its answer is cached at ``cache_key`` before the task returns, so a
  re-delivered call (a worker killed after the work) returns the cached answer.
- ``sparkle.dataset_tick(dataset_id)`` (queue ``sparkle.cpu``): one step of a bulk run started through the
  gateway; it sends itself again until the dataset is done.

Errors. Transient (HTTP 503/504/429/502 and connection errors from a service; store and broker errors in a
stage): retried with exponential back-off and full jitter (``op_backoff_s`` doubling up to
``op_backoff_max_s``; ``op_max_retries`` for calls, ``stage_max_retries`` for stages). Terminal (HTTP 4xx,
bad input, retries exhausted, a backend error): the sample fails, and its job and report keep the stage and
the reason. A cancelled job stops at its next stage boundary and leaves nothing but its report.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass

from sparkle.artifacts import ArtifactIO
from sparkle.config import PipelineConfig
from sparkle.errors import ConfigError, InputError, ServiceRejected, ServiceUnavailable

from . import jobs
from .celery_app import app
from .pipeline import STAGE_FUNCTIONS, StageEnv, drop_staging, fail, finish, next_stage
from .remote import remote_backends
from .routing import CPU_QUEUE
from .settings import DistributedSettings

log = logging.getLogger("sparkle.tasks")


# --- per-process state: settings, store, executor ----------------------------------------------------------

_process: dict = {}
_process_guard = threading.RLock()
_thread = threading.local()


def settings() -> DistributedSettings:
    with _process_guard:
        if "settings" not in _process:
            _process["settings"] = DistributedSettings()
        return _process["settings"]


def store():
    """This process's artifact store (``SPARKLE_STORE_URL``)."""
    with _process_guard:
        if "store" not in _process:
            from sparkle.store_s3 import open_store

            _process["store"] = open_store(settings().store_url, settings())
        return _process["store"]


def _redis():
    with _process_guard:
        if "redis" not in _process:
            import redis

            _process["redis"] = redis.Redis.from_url(settings().broker_url)
        return _process["redis"]


def backoff_s(retries: int, retry_after: float | None = None) -> float:
    """Delay before retry number ``retries + 1``, seconds: full jitter over ``op_backoff_s * 2**retries``
    capped at ``op_backoff_max_s`` (AWS architecture blog, "Exponential Backoff and Jitter"), and never less
    than a service's ``Retry-After``."""
    s = settings()
    delay = random.uniform(0, min(s.op_backoff_max_s, s.op_backoff_s * 2 ** retries))
    return max(delay, retry_after or 0.0)


class TransientError(Exception):
    """A failure worth retrying; ``retry_after`` (seconds) from the service, ``max_retries`` its own bound."""

    def __init__(self, message: str, retry_after: float | None = None, max_retries: int | None = None):
        super().__init__(message)
        self.retry_after, self.max_retries = retry_after, max_retries


def is_transient(exc: BaseException) -> bool:
    """Store, broker and network errors (retried); not bad input, not a service's refusal."""
    if isinstance(exc, (InputError, ServiceRejected, ServiceUnavailable, ConfigError)):
        return False
    if isinstance(exc, (TransientError, ConnectionError, TimeoutError)):
        return True
    names = {c.__module__.split(".")[0] + "." + c.__name__ for c in type(exc).__mro__}
    if names & {"urllib3.HTTPError", "redis.ConnectionError", "redis.TimeoutError", "kombu.OperationalError"}:
        return True
    code = getattr(exc, "code", None)  # minio.error.S3Error
    return type(exc).__name__ == "S3Error" and code in {"SlowDown", "InternalError", "ServiceUnavailable",
                                                         "RequestTimeout", "OperationAborted"}


# --- executors: how a service worker makes a call ----------------------------------------------------------

class HttpExecutor:
    """Calls the model server at ``url`` (``POST {url}/v1/{op}``), as the pod's queue worker does.

    200 -> the JSON answer; 429, 502, 503, 504 and connection errors -> TransientError (honouring
    ``Retry-After``); other 5xx -> TransientError with at most 2 retries (a crash may be a bad request);
    other 4xx -> ServiceRejected (terminal).
    """

    def __init__(self, url: str, timeout_s: float):
        import httpx

        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, timeout=timeout_s)

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
    """Runs the service's API (``services/<service>/app.py``: the same four hooks the server runs) in this
    worker process, on backend ``backend`` (``cpu``, ``tiny``, ``real`` or ``module:factory``). Each service
    is set up once per process, on first use."""

    def __init__(self, backend: str, options: dict | None = None):
        self.backend, self.options = backend, options or {}
        self._apis: dict = {}
        self._guard = threading.Lock()

    def api(self, service: str):
        with self._guard:
            if service not in self._apis:
                import importlib

                from sparkle.backends import load_backend

                api = importlib.import_module(f"sparkle.services.{service}.app").API(
                    load_backend(service, self.backend, **self.options.get(service, {})), store())
                api.setup()
                self._apis[service] = api
            return self._apis[service]

    def __call__(self, service: str, op: str, request: dict) -> dict:
        from pydantic import ValidationError

        api = self.api(service)
        if op not in api.operations:
            raise ServiceRejected(f"{service} has no operation {op!r}")
        request_model, _ = api.operations[op]
        try:
            body = request_model.model_validate(request)
            t0 = time.perf_counter()
            inputs = api.decode_request(op, body)
            t1 = time.perf_counter()
            output = api.predict(op, [inputs])[0]
            t2 = time.perf_counter()
            response = api.encode_response(op, output, body)
        except ValidationError as exc:
            raise ServiceRejected(f"{service}.{op}: invalid request: {exc.errors()[:3]}") from exc
        except InputError as exc:
            raise ServiceRejected(f"{service}.{op}: {exc}") from exc
        response.timings = {"decode": round(t1 - t0, 4), "predict": round(t2 - t1, 4),
                            "encode": round(time.perf_counter() - t2, 4), **response.timings}
        return response.model_dump(mode="json")


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
        executor = HttpExecutor(service_url, settings().op_timeout_s)
    elif backend:
        executor = InProcessExecutor(backend, options)
    _worker = WorkerConfig(tuple(services), executor)
    return _worker


# --- sparkle.op ----------------------------------------------------------------------------------------------

@app.task(name="sparkle.op", bind=True, max_retries=None)
def service_op(self, service: str, op: str, request: dict, cache_key: str) -> dict:
    """One service call (see the module docstring). Returns the service's JSON answer plus ``worker``
    (host, pid, start and end as Unix times in seconds: what the benchmarks measure busy time with)."""
    s = store()
    if s.exists(cache_key):
        return s.get_json(cache_key)
    if _worker.executor is None or service not in _worker.services:
        raise ConfigError(f"this worker does not serve {service!r} (it serves {list(_worker.services)})")
    started = time.time()
    try:
        answer = _worker.executor(service, op, request)
    except Exception as exc:  # noqa: BLE001 - classified below
        if not is_transient(exc):
            raise
        limit = settings().op_max_retries
        if isinstance(exc, TransientError) and exc.max_retries is not None:
            limit = min(limit, exc.max_retries)
        if self.request.retries >= limit:
            raise ServiceUnavailable(f"{exc} (gave up after {self.request.retries} retries)") from None
        delay = backoff_s(self.request.retries, getattr(exc, "retry_after", None))
        log.warning("%s.%s: %s; retry %d in %.1f s", service, op, exc, self.request.retries + 1, delay)
        raise self.retry(countdown=delay)
    answer["worker"] = {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "ended": time.time()}
    s.put_json(cache_key, answer)
    return answer


# --- sparkle.stage -------------------------------------------------------------------------------------------

def _env(config: dict) -> StageEnv:
    """A stage environment on this thread's ArtifactIO (decoded videos stay cached between stages)."""
    if getattr(_thread, "io", None) is None or _thread.io.store is not store():
        _thread.io = ArtifactIO(store())
    env = StageEnv(store(), None, PipelineConfig.model_validate(config))
    env.io = _thread.io
    env.backends = remote_backends(app, env.io, settings().op_wait_s)
    return env


def _end(cp: jobs.Checkpoint, env: StageEnv, stage: str) -> dict:
    """The journey is over: job document in its final state, staging area removed."""
    doc = jobs.write_job(env.store, cp, cp.task.status, stage)
    drop_staging(cp.task, env)
    return {"id": cp.task.id, "state": doc["state"]}


def advance(sample_id: str, stage: str) -> dict:
    """Run stage ``stage`` of ``sample_id`` if the checkpoint names it next (the caller holds the lease).

    Raises transient errors (the message is retried); terminal ones end the journey as ``failed``.
    """
    s = store()
    cp = jobs.load_checkpoint(s, sample_id)
    if cp is None:
        return {"id": sample_id, "skipped": "the journey is over"}
    if stage != cp.next:
        if cp.sent:
            return {"id": sample_id, "skipped": f"stage {stage} is done; {cp.next} was sent"}
        stage = cp.next  # the crash came between checkpoint and send: this message stands in for the next one
    env = _env(cp.config)
    if jobs.cancel_requested(s, sample_id):
        fail(cp.task, env, stage, "cancelled by the user", status="cancelled", funnel=False)
        return _end(cp, env, stage)
    if stage == "finish":
        finish(cp.task, env, funnel=False)
        return _end(cp, env, stage)
    jobs.write_job(s, cp, "running", stage)
    task = cp.task.model_copy(deep=True)
    try:
        task = STAGE_FUNCTIONS[stage](task, env)
    except Exception as exc:  # noqa: BLE001 - transient ones are retried by the caller
        if is_transient(exc):
            raise
        log.warning("%s: %s failed: %s: %s", sample_id, stage, exc.__class__.__name__, exc)
        cp.task = task
        fail(task, env, stage, f"{exc.__class__.__name__}: {exc}", funnel=False)
        return _end(cp, env, stage)
    cp.task, cp.next, cp.sent = task, next_stage(task, stage) or "finish", False
    jobs.save_checkpoint(s, cp)
    if cp.next == "finish":
        finish(cp.task, env, funnel=False)
        return _end(cp, env, stage)
    jobs.write_job(s, cp, "running", cp.next)
    app.send_task(jobs.STAGE_TASK, args=[sample_id, cp.next], queue=CPU_QUEUE, ignore_result=True)
    cp.sent = True
    jobs.save_checkpoint(s, cp)
    return {"id": sample_id, "done": stage, "next": cp.next}


@app.task(name="sparkle.stage", bind=True, max_retries=None, ignore_result=True)
def stage_task(self, sample_id: str, stage: str) -> dict:
    """One stage of one journey under the sample's lease (``sparkle:sample:{id}`` in Redis, ``sample_lease_s``,
    renewed while held). A second delivery waits for the lease at most one lease period, then leaves the
    sample to its live holder."""
    from sparkle.store_s3 import RedisLock

    lease_s = settings().sample_lease_s
    lease = RedisLock(_redis(), f"sparkle:sample:{sample_id}", lease_s, wait_s=lease_s + 5)
    try:
        lease.__enter__()
    except TimeoutError:
        return {"id": sample_id, "skipped": "another worker holds the sample"}
    except Exception as exc:  # noqa: BLE001 - Redis unreachable: transient
        return _retry_or_fail(self, sample_id, stage, exc)
    try:
        return advance(sample_id, stage)
    except Exception as exc:  # noqa: BLE001 - only transient errors get here
        return _retry_or_fail(self, sample_id, stage, exc)
    finally:
        lease.__exit__(None, None, None)


def _retry_or_fail(self, sample_id: str, stage: str, exc: BaseException) -> dict:
    """Retry the stage message after a transient error; past ``stage_max_retries`` the sample fails."""
    if self.request.retries < settings().stage_max_retries and is_transient(exc):
        delay = backoff_s(self.request.retries)
        log.warning("%s: %s: %s; retry %d in %.1f s", sample_id, stage, exc, self.request.retries + 1, delay)
        raise self.retry(countdown=delay)
    s = store()
    cp = jobs.load_checkpoint(s, sample_id)
    if cp is None:
        raise exc
    env = _env(cp.config)
    fail(cp.task, env, stage, f"{exc.__class__.__name__}: {exc} (after {self.request.retries} retries)",
         funnel=False)
    return _end(cp, env, stage)


# --- sparkle.dataset_tick --------------------------------------------------------------------------------

@app.task(name="sparkle.dataset_tick", bind=True, max_retries=None, ignore_result=True)
def dataset_tick_task(self, dataset_id: str, resume: bool = False, every_s: float = 2.0) -> dict:
    """Drive a bulk run: one :func:`~sparkle.orchestrator.jobs.dataset_tick`, then again in ``every_s``
    seconds until the dataset is done. Several concurrent drivers are harmless (the tick takes the
    dataset's lock)."""
    try:
        state = jobs.dataset_tick(app, store(), dataset_id, resume=resume)
    except Exception as exc:  # noqa: BLE001
        if is_transient(exc):
            raise self.retry(countdown=backoff_s(min(self.request.retries, 6)))
        raise
    if not state["done"]:
        self.apply_async(args=[dataset_id], kwargs={"every_s": every_s}, countdown=every_s, queue=CPU_QUEUE,
                         ignore_result=True)
    return {"id": dataset_id, "done": state["done"], "cursor": state["cursor"]}

