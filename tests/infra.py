"""Infrastructure the distributed tests start on loopback (the helpers live in :mod:`sparkle.orchestrator.cluster`)."""

from sparkle.orchestrator.cluster import REDIS_SERVER, free_port, serving, stop_process, wait_port  # noqa: F401

BUCKET = "sparkle-test"
