"""The base of the test-double model backends (``services/<name>/double.py``, ``--backend double``).

Explicitly test doubles (never a pipeline result): instant, trivially computed outputs of the right shapes. The
distributed run's tests and benchmarks use them to measure what the orchestration itself costs, with
zero-latency services, or how busy the services stay when each call sleeps for a scaled realistic time. Load
one with ``--backend double`` (``load_backend(service, "double", scale=..., delay_s=...)``).

Options: ``scale``: each call sleeps ``scale`` x the GPU-seconds the capacity plan assumes for it
(:data:`sparkle.capacity.CALLS`, e.g. 600 s for control synthesis); ``delay_s``: seconds added to every call
(a slow service, for the crash tests).
"""

from __future__ import annotations

import time

from .capacity import CALLS

CALL_SECONDS = {c.name.split("(")[0]: c.seconds for c in CALLS}
"""Capacity-plan call name (``service.operation``) -> its GPU-seconds."""

BOX = [250, 150, 750, 950]  # the doubles' foreground box, 0..1000


class Double:
    """What the six doubles share: their name, options and the scaled sleep."""

    def __init__(self, service: str, scale: float = 0.0, delay_s: float = 0.0):
        self.service, self.scale, self.delay_s = service, float(scale), float(delay_s)
        self.name = f"test-double:{service}"

    def setup(self) -> None:
        pass

    def sleep(self, call: str) -> None:
        """Sleep ``delay_s`` + ``scale`` x the GPU-seconds of capacity-plan call ``call`` (0 if it has none)."""
        seconds = self.delay_s + self.scale * CALL_SECONDS.get(call, 0.0)
        if seconds > 0:
            time.sleep(seconds)
