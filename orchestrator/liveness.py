"""Liveness of the messages in flight, so that a lost one is found in seconds whatever the visibility timeout.

Every message of the distributed run is, at any moment, in one of three places, and each leaves a mark in
Redis (the broker) that the others can see:

- **queued**: sent and not yet taken; ``sparkle:queued:{what}`` exists (``SET`` at send time, with a time-to-live:
  ``queued_max_s`` for a fresh message, the retry delay plus ``stall_s`` for a retry waiting for its ETA). Once
  a worker has received the message (prefetched, or holding a retry until its ETA) the mark names that worker
  process, and counts only while the process's heartbeat (``sparkle:worker:{pid}@{host}``, refreshed every
  ``HEARTBEAT_S`` seconds, gone ``HEARTBEAT_TTL_S`` seconds after the process dies) lives;
- **running**: a process holds its lease, ``sparkle:sample:{id}`` for a journey's stage and
  ``sparkle:op:{task id}`` for a service call (a :class:`~sparkle.store_s3.RedisLock`, renewed every third of
  its period while the process lives: ``sample_lease_s``, ``op_lease_s``);
- **done**: the journey's checkpoint moved on (and the next message is queued), or the call's answer is in the
  result backend.

A message that is in none of these places was lost with the process that held it (a SIGKILL, a host gone, a
Redis restart that dropped the last second): Celery would deliver it again only after the visibility timeout
(hours). Two watchers look for that state and send the message again:

- the **reaper** (:func:`reap`, a thread of every orchestrator worker, one at a time cluster-wide) for journeys:
  ``sparkle:journeys`` is a sorted set of the journeys in flight scored by when they were last seen alive; every
  ``reap_interval_s`` seconds, those not seen for ``stall_s`` seconds are checked, and the next stage of each one
  neither queued nor running is sent again. Recovery after a lost worker is bounded by ``sample_lease_s`` (the
  dead holder's lease expires) + ``stall_s`` + ``reap_interval_s`` (20 + 15 + 5 = 40 s by default);
- the **waiting stage** for its own service call (``calls.QueueTransport``): a call neither queued, running
  nor answered for two checks ``op_check_s`` apart is sent again (``op_lease_s`` + 2 x ``op_check_s``).

Both re-sends are safe because every stage and every call is idempotent: a stage runs only under the
sample's lease and only if the checkpoint names it next; a call's answer is cached under a key derived from
the request. A duplicate therefore costs a message, never a second result.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

log = logging.getLogger("sparkle.liveness")

JOURNEYS = "sparkle:journeys"
"""Sorted set: sample id -> Unix time (seconds) the journey was last seen alive (sent, stage started, checked)."""
REAPER = "sparkle:reaper"
"""Held (``SET NX`` with a time-to-live) by the process reaping this interval: one reaper at a time."""


def sample_lease(sample_id: str) -> str:
    """Key of a journey's lease (a stage running)."""
    return f"sparkle:sample:{sample_id}"


def op_lease(task_id: str) -> str:
    """Key of a service call's lease (the call running on a service worker)."""
    return f"sparkle:op:{task_id}"


def queued(what: str) -> str:
    """Key of the mark of a queued message: ``stage:{sample id}`` or ``op:{task id}``."""
    return f"sparkle:queued:{what}"


HEARTBEAT_S = 3.0
HEARTBEAT_TTL_S = 10.0


def identity() -> str:
    """This worker process, as marks name it: ``{pid}@{host}`` (a restarted worker is another process)."""
    return f"{os.getpid()}@{socket.gethostname()}"


def heartbeat_key(who: str) -> str:
    return f"sparkle:worker:{who}"


def redis_of(celery_app):
    """The Redis client of ``celery_app``'s result backend (the broker's server): where the marks live."""
    return celery_app.backend.client


def mark_queued(client, what: str, ttl_s: float) -> None:
    """``what`` was handed to the broker; the mark lasts ``ttl_s`` seconds (then the watcher may re-send)."""
    client.set(queued(what), time.time(), px=max(1, int(ttl_s * 1000)))


def received(client, what: str, who: str, ttl_s: float) -> None:
    """A worker process ``who`` received ``what``: the mark now names that process (so it dies with the
    process's heartbeat) and lasts ``ttl_s`` seconds, until a little after the message is due to start (its
    ETA, for a retry); a message the worker then loses without starting it (its connection reset, a failure
    before the stage began) is found lost when the mark expires."""
    client.set(queued(what), f"w:{who}", px=max(1, int(ttl_s * 1000)), xx=True)


def taken(client, what: str) -> None:
    """A process took ``what`` from its queue (call it once its lease is held, so that one mark always exists)."""
    client.delete(queued(what))


def journey_seen(client, sample_id: str, at: float | None = None) -> None:
    """The journey of ``sample_id`` is in flight and alive at ``at`` (default: now)."""
    client.zadd(JOURNEYS, {sample_id: at if at is not None else time.time()})


def journey_over(client, sample_id: str) -> None:
    """The journey ended (or is no longer ours to watch)."""
    pipe = client.pipeline()
    pipe.zrem(JOURNEYS, sample_id)
    pipe.delete(queued(f"stage:{sample_id}"))
    pipe.execute()


def _alive(client, marks: list[str], leases: list[str]) -> list[bool]:
    """For each (mark, lease) pair: the lease exists, or the mark exists and, if it names a worker process,
    that process's heartbeat lives."""
    pipe = client.pipeline()
    for mark, lease in zip(marks, leases):
        pipe.get(mark)
        pipe.exists(lease)
    got = pipe.execute()
    values, held = got[0::2], got[1::2]
    workers = {v[2:].decode() for v in values if v is not None and v.startswith(b"w:")}
    if workers:
        pipe = client.pipeline()
        for w in sorted(workers):
            pipe.exists(heartbeat_key(w))
        beating = dict(zip(sorted(workers), pipe.execute()))
    alive = []
    for value, lease in zip(values, held):
        if lease:
            alive.append(True)
        elif value is None:
            alive.append(False)
        else:
            alive.append(not value.startswith(b"w:") or bool(beating[value[2:].decode()]))
    return alive


def op_alive(client, task_id: str) -> bool:
    """The call ``task_id`` is queued (or held by a live worker) or running."""
    return _alive(client, [queued(f"op:{task_id}")], [op_lease(task_id)])[0]


def reap(client, resend, stall_s: float, now: float | None = None, batch: int = 1000) -> list[str]:
    """One pass of the reaper: the journeys not seen alive for ``stall_s`` seconds are checked; those still
    queued or running are marked seen, the others are handed to ``resend(sample_id) -> bool`` (True: its next
    stage was sent again; False: the journey is over, and it is forgotten). Returns the ids re-sent.

    At most ``batch`` journeys per pass (the oldest first); Redis errors propagate (the caller waits them out).
    """
    now = time.time() if now is None else now
    stale = [s.decode() if isinstance(s, bytes) else s
             for s in client.zrangebyscore(JOURNEYS, "-inf", now - stall_s, start=0, num=batch)]
    if not stale:
        return []
    alive = _alive(client, [queued(f"stage:{sid}") for sid in stale], [sample_lease(sid) for sid in stale])
    resent = []
    for sid, live in zip(stale, alive):
        if live:
            journey_seen(client, sid, now)
        elif resend(sid):
            resent.append(sid)
            journey_seen(client, sid, now)
        else:
            journey_over(client, sid)
    return resent


class Periodic:
    """A daemon thread calling :meth:`tick` every ``every_s`` seconds until :meth:`stop`; its errors (Redis or the
    store away: a restart) are logged and waited out, so the thread never ends on its own."""

    name = "sparkle-periodic"

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)

    def tick(self) -> None:
        raise NotImplementedError

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - waited out: the next tick tries again
                log.warning("%s: %s: %s", self.name, exc.__class__.__name__, exc)
            if self._stop.wait(self.every_s):
                return


class Reaper(Periodic):
    """The reaper's thread: every ``interval_s`` seconds, if no other process reaped this interval (``SET NX``
    on :data:`REAPER`), one :func:`reap` pass, then ``also()`` (the bulk runs' chains)."""

    name = "sparkle-reaper"

    def __init__(self, client, resend, stall_s: float, interval_s: float, also=None):
        super().__init__(interval_s)
        self.client, self.resend, self.stall_s, self.also = client, resend, stall_s, also
        self.resent: list[tuple[float, str]] = []

    def tick(self) -> None:
        if not self.client.set(REAPER, 1, nx=True, px=max(1, int(self.every_s * 900))):
            return
        for sid in reap(self.client, self.resend, self.stall_s):
            log.warning("reaper: journey %s had no live message for %.0f s: its next stage was sent again",
                        sid, self.stall_s)
            self.resent.append((time.time(), sid))
        if self.also is not None:
            self.also()


class Heartbeat(Periodic):
    """This worker process's heartbeat (:func:`heartbeat_key`, every ``HEARTBEAT_S`` s, lasting
    ``HEARTBEAT_TTL_S``)."""

    name = "sparkle-heartbeat"

    def __init__(self, client, who: str | None = None):
        super().__init__(HEARTBEAT_S)
        self.client, self.who = client, who or identity()

    def tick(self) -> None:
        self.client.set(heartbeat_key(self.who), time.time(), px=int(HEARTBEAT_TTL_S * 1000))


def _due_in(request) -> float:
    """Seconds until a received message is due to start (its ETA; 0 without one)."""
    from datetime import datetime

    eta = getattr(request, "eta", None)
    if not eta:
        return 0.0
    if isinstance(eta, str):
        eta = datetime.fromisoformat(eta)
    return max(0.0, eta.timestamp() - time.time())


def watch_receipts(celery_app, grace_s: float) -> Heartbeat:
    """In a worker process: start its heartbeat, and name it in the mark of every stage or call message it
    receives (Celery's ``task_received``), lasting until ``grace_s`` seconds after the message is due, so that
    a message prefetched by a process that then died, or dropped without being started, is seen lost within
    seconds rather than ``queued_max_s``."""
    from celery.signals import task_received

    client, who = redis_of(celery_app), identity()

    def on_received(request=None, **_):
        what = {"sparkle.stage": lambda: f"stage:{request.args[0]}", "sparkle.op": lambda: f"op:{request.id}"}
        if request is not None and request.name in what:
            try:
                received(client, what[request.name](), who, _due_in(request) + grace_s)
            except Exception as exc:  # noqa: BLE001 - Redis away: the mark stays as it was
                log.warning("receipt of %s not marked: %s", request.id, exc)

    task_received.connect(on_received, weak=False)
    return Heartbeat(client, who).start()


def start_reaper(celery_app, store, settings) -> Reaper:
    """Start this process's reaper thread: journeys with no live message for ``stall_s`` seconds get their next
    stage sent again, and bulk runs whose tick chain went quiet get a new one. Every orchestrator worker runs
    one; one reaps at a time."""
    from .datasets import revive_chains
    from .journey import resume_journey

    return Reaper(redis_of(celery_app), lambda sid: resume_journey(celery_app, store, sid), settings.stall_s,
                  settings.reap_interval_s, also=lambda: revive_chains(celery_app)).start()
