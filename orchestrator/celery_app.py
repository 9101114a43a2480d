"""The Celery app of the distributed run (broker and result backend: Redis), and the base of its tasks.

Reliability settings, each for a measured reason (Celery 5.7 / kombu 5.7, kombu/transport/redis.py):

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only when its task has
  finished; a pool process killed mid-task (OOM, SIGKILL) makes its parent requeue the message at once.
- ``worker_prefetch_multiplier = 1``: a worker reserves one message per process, so long GPU tasks are not
  held hostage behind a busy process, and the Redis list KEDA watches shows the real backlog.
- ``visibility_timeout`` (``SPARKLE_VISIBILITY_TIMEOUT_S``, 2 h): a message unacknowledged for longer is
  delivered again, to another worker, over and over: it must exceed the longest stage. When a whole worker
  host dies, its messages come back once this timeout has passed, at kombu's restore sweep, which runs every
  ``unacked_restore_interval`` x ``unacked_restore_throttle`` seconds (10 x 10 = 100 s by default; here
  ``SPARKLE_UNACKED_RESTORE_INTERVAL_S`` x 1). That is the last resort: the liveness watchers
  (``liveness.py``) re-send a lost stage or call within seconds, whatever this timeout.
- JSON only: task messages carry artifact keys and parameters, never pixels.
- Redis restarts: the broker transport is kombu's Redis transport with one change (:class:`Transport`): giving
  unacknowledged messages back when a lost connection is closed no longer kills the worker (kombu 5.7 raises
  ``AttributeError: 'NoneType' object has no attribute 'hostname'`` there once the pool is gone, and Celery
  treats it as unrecoverable: 2 of 2 busy workers exited on a Redis restart). Those messages stay in Redis's
  ``unacked`` hash, and the liveness watchers (``liveness.py``) re-send what they carried within seconds.
  ``worker_cancel_long_running_tasks_on_connection_loss`` is off: a stage or a GPU call in progress finishes
  (its result is saved; the unacknowledgeable message's later re-delivery finds the work done).

The tasks themselves live with what they do: ``sparkle.stage`` with the journey's state machine
(``journey.py``), ``sparkle.op`` with the service calls (``calls.py``), ``sparkle.dataset_tick`` with the bulk
runs (``datasets.py``). Each is a :class:`SparkleTask`, which holds the process's resources.
"""

from __future__ import annotations

import random
import threading

import logging

from celery import Celery, Task
from kombu.transport import redis as kombu_redis

from sparkle.errors import ConfigError, InputError, ServiceRejected, ServiceUnavailable
from sparkle.queues import CPU_QUEUE
from sparkle.settings import DistributedSettings

log = logging.getLogger("sparkle.celery")

TASK_MODULES = ["sparkle.orchestrator.journey", "sparkle.orchestrator.calls", "sparkle.orchestrator.datasets",
                "sparkle.orchestrator.webhooks"]


def make_app(settings: DistributedSettings | None = None) -> Celery:
    """A configured Celery app; workers and clients build it from the same ``SPARKLE_*`` environment."""
    settings = settings or DistributedSettings()
    app = Celery("sparkle", broker=settings.broker_url, backend=settings.broker_url, include=TASK_MODULES)
    app.conf.update(
        broker_transport=f"{__name__}:Transport" if settings.broker_url.startswith("redis") else None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=CPU_QUEUE,  # service calls are sent to SERVICE_QUEUES[service]
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_track_started=True,
        result_expires=7 * 24 * 3600,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.unacked_restore_interval_s,
            "unacked_restore_throttle": 1,
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


class _QoS(kombu_redis.QoS):
    def restore_unacked(self, client=None):
        """Give back the unacknowledged messages (kombu's), or, when the connection is already gone (a Redis
        restart), leave them in Redis's ``unacked`` hash instead of raising: see the module docstring."""
        try:
            return super().restore_unacked(client)
        except Exception as exc:  # noqa: BLE001 - kombu's AttributeError, or the connection errors
            log.warning("could not give back %d unacknowledged message(s) (%s: %s); they stay in Redis and are "
                        "re-sent by the liveness watchers", len(self._delivered), exc.__class__.__name__, exc)
            self._delivered.clear()
            return None

    def ack(self, delivery_tag):
        """kombu's, except on a channel closed by a lost connection (see :meth:`_closed`)."""
        try:
            super().ack(delivery_tag)
        except Exception as exc:  # noqa: BLE001 - re-raised unless the channel is closed
            self._closed(exc, delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        """kombu's, except on a channel closed by a lost connection (see :meth:`_closed`)."""
        try:
            super().reject(delivery_tag, requeue=requeue)
        except Exception as exc:  # noqa: BLE001 - re-raised unless the channel is closed
            self._closed(exc, delivery_tag)

    def _closed(self, exc: Exception, delivery_tag) -> None:
        """A task that finished after its channel was closed (Redis restarted meanwhile) cannot settle its
        message: kombu 5.7 raises AttributeError from the dead channel, which kills the worker. The message
        stays in ``unacked``; its later re-delivery finds the work done. Other errors propagate."""
        if not (self.channel.closed or self.channel.connection is None):
            raise exc
        log.warning("message %s of a closed channel left unacknowledged (%s)", delivery_tag, exc.__class__.__name__)
        self._delivered.pop(delivery_tag, None)


class _Channel(kombu_redis.Channel):
    QoS = _QoS


class Transport(kombu_redis.Transport):
    """kombu's Redis transport whose channels survive closing while Redis is away (see the module docstring)."""

    Channel = _Channel


app = make_app()


class Resources:
    """What one process of the distributed run opens once: settings, the artifact store, a Redis client and the
    :class:`~sparkle.artifacts.ArtifactIO` every stage of the process decodes through (thread-safe, so a
    sample's stages share decoded artifacts whichever thread runs them).

    Each is created on first use (importing a task module connects to nothing), once, under a lock.
    """

    def __init__(self):
        self._made: dict = {}
        self._guard = threading.RLock()

    def _once(self, name: str, make):
        with self._guard:
            if name not in self._made:
                self._made[name] = make()
            return self._made[name]

    @property
    def settings(self) -> DistributedSettings:
        return self._once("settings", DistributedSettings)

    @property
    def store(self):
        """This process's artifact store (``SPARKLE_STORE_URL``)."""
        from sparkle.store_s3 import open_store

        return self._once("store", lambda: open_store(self.settings.store_url, self.settings))

    @property
    def redis(self):
        import redis

        return self._once("redis", lambda: redis.Redis.from_url(self.settings.broker_url))

    @property
    def io(self):
        from sparkle.artifacts import ArtifactIO

        return self._once("io", lambda: ArtifactIO(self.store))


_resources = Resources()


def resources() -> Resources:
    """This process's :class:`Resources`."""
    return _resources


class SparkleTask(Task):
    """Base of the distributed run's tasks: the process's :class:`Resources`, and the retry back-off."""

    @property
    def resources(self) -> Resources:
        return _resources

    @property
    def settings(self) -> DistributedSettings:
        return _resources.settings

    @property
    def store(self):
        return _resources.store

    def backoff_s(self, retry_after: float | None = None) -> float:
        """Delay before this task's next retry: :func:`backoff_s` with the task's retry count."""
        return backoff_s(self.request.retries, retry_after, self.settings)


def backoff_s(retries: int, retry_after: float | None = None, settings: DistributedSettings | None = None) -> float:
    """Delay before retry number ``retries + 1``, seconds: full jitter over ``op_backoff_s * 2**retries``
    capped at ``op_backoff_max_s`` (AWS architecture blog, "Exponential Backoff and Jitter"), and never less
    than a service's ``Retry-After``."""
    s = settings or _resources.settings
    delay = random.uniform(0, min(s.op_backoff_max_s, s.op_backoff_s * 2 ** retries))
    return max(delay, retry_after or 0.0)


class TransientError(Exception):
    """A failure worth retrying; ``retry_after`` (seconds) from the service, ``max_retries`` its own bound."""

    def __init__(self, message: str, retry_after: float | None = None, max_retries: int | None = None):
        super().__init__(message)
        self.retry_after, self.max_retries = retry_after, max_retries


def transient_types() -> tuple[type[BaseException], ...]:
    """The exception classes that are always transient (network, broker, store connection): what a task can
    declare in ``autoretry_for``. (:func:`is_transient` also knows S3 error codes, which are not classes.)"""
    import redis.exceptions
    import urllib3.exceptions
    from kombu.exceptions import OperationalError

    return (TransientError, ConnectionError, TimeoutError, redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError, OperationalError, urllib3.exceptions.HTTPError)


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
