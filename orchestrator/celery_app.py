"""The Celery app of the distributed run (broker and result backend: Redis).

Reliability settings, each for a measured reason (Celery 5.7 / kombu 5.7, kombu/transport/redis.py):

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only when its task has
  finished; a pool process killed mid-task (OOM, SIGKILL) makes its parent requeue the message at once.
- ``worker_prefetch_multiplier = 1``: a worker reserves one message per process, so long GPU tasks are not
  held hostage behind a busy process, and the Redis list KEDA watches shows the real backlog.
- ``visibility_timeout`` (``SPARKLE_VISIBILITY_TIMEOUT_S``, 2 h): a message unacknowledged for longer is
  delivered again, to another worker, over and over: it must exceed the longest stage. When a whole worker
  host dies, its messages come back once this timeout has passed, at kombu's restore sweep, which runs every
  ``unacked_restore_interval`` x ``unacked_restore_throttle`` seconds (10 x 10 = 100 s by default; here
  ``SPARKLE_UNACKED_RESTORE_INTERVAL_S`` x 1).
- JSON only: task messages carry artifact keys and parameters, never pixels.
"""

from __future__ import annotations

from celery import Celery

from .routing import CPU_QUEUE, SERVICE_QUEUES
from .settings import DistributedSettings


def make_app(settings: DistributedSettings | None = None) -> Celery:
    """A configured Celery app; workers and clients build it from the same ``SPARKLE_*`` environment."""
    settings = settings or DistributedSettings()
    app = Celery("sparkle", broker=settings.broker_url, backend=settings.broker_url,
                 include=["sparkle.orchestrator.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=CPU_QUEUE,
        task_routes={"sparkle.journey": {"queue": CPU_QUEUE}},  # service ops are sent to SERVICE_QUEUES[service]
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
        worker_cancel_long_running_tasks_on_connection_loss=True,
    )
    app.conf.sparkle_queues = {"cpu": CPU_QUEUE, **SERVICE_QUEUES}
    return app


app = make_app()
