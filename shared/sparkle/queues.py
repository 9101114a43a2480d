"""Queue routing of the distributed run: the one place that names the Celery queues.

One queue per model service, whose workers call that service (and whose backlog KEDA scales that
service's Deployment on), plus a CPU queue for the orchestrator's algorithmic stages (ingest, camera
filter, decoupled control, publish). Kubernetes manifests, docker-compose and the workers read these names
from here (``sparkle k8s-render`` writes the manifests), never type them twice.
"""

from __future__ import annotations

from .backends import SERVICES

QUEUE_PREFIX = "sparkle."
CPU_QUEUE = f"{QUEUE_PREFIX}cpu"
"""The orchestrator's queue: sample journeys (stage functions) and CPU-only steps."""

SERVICE_QUEUES: dict[str, str] = {service: f"{QUEUE_PREFIX}{service}" for service in SERVICES}
"""Model service -> its Celery queue (= the Redis list KEDA watches): e.g. ``i2v`` -> ``sparkle.i2v``."""

ALL_QUEUES: tuple[str, ...] = (CPU_QUEUE, *SERVICE_QUEUES.values())

