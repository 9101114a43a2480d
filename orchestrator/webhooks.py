"""Webhook deliveries of the distributed run: each terminal state of a job (or the end of a dataset) is an
event, POSTed to the ``callback_url`` given at submission, signed (``sparkle.webhooks``), at least once.

- :func:`notify` records the event, with the document it carries, in the delivery record
  (``jobs/webhooks/{id}.json`` for a job, ``datasets/{id}/webhook.json`` for a dataset), then sends a
  ``sparkle.webhook`` message. It is called where the state became terminal, before that is acknowledged
  (``journey._end``, the dead-letter path, the dataset tick), so a crash in between repeats the event with the
  same id rather than losing it.
- :func:`deliver` makes one attempt and records it (time, HTTP status or error, seconds); the task retries a
  failed attempt (a non-2xx answer, a time-out, a refused connection) with exponential back-off and full jitter
  (``SPARKLE_WEBHOOK_BACKOFF_S`` doubling up to ``SPARKLE_WEBHOOK_BACKOFF_MAX_S``) until
  ``SPARKLE_WEBHOOK_MAX_ATTEMPTS``, then gives up (recorded).
- An event already delivered is not sent again when its message is delivered twice (a worker crash, a
  duplicate ``notify``); a receiver that still sees one twice de-duplicates on ``webhook-id``.

The record is what ``GET /v1/jobs/{id}`` shows as ``webhook`` (and the viewer's sample page).
"""

from __future__ import annotations

import logging
import random
import time

from sparkle.errors import InputError
from sparkle.settings import DistributedSettings
from sparkle.store import ArtifactStore
from sparkle.webhooks import (body_of, check_callback_url, event_id, read_record, record_key, signed_headers,
                              signing_secret)

from .celery_app import SparkleTask, app

log = logging.getLogger("sparkle.webhooks")


def notify(celery_app, store: ArtifactStore, kind: str, ident: str, url: str, owner: str, state: str,
           document: dict, generation: int = 0) -> str:
    """Record the event ``(kind, ident, state, generation)`` with ``document`` and send its delivery message;
    returns its id. Recording the same event again keeps the first (and its attempts)."""
    msg_id = event_id(kind, ident, state, generation)
    key = record_key(kind, ident)
    with store.lock(f"webhook-{kind}-{ident}"):
        record = read_record(store, kind, ident) or {"url": url, "owner": owner, "events": []}
        if not any(e["id"] == msg_id for e in record["events"]):
            record["events"].append({"id": msg_id, "state": state, "type": f"{kind}.{state}", "document": document,
                                     "attempts": [], "delivered_at": None, "gave_up": False})
            record["url"], record["owner"] = url, owner
            store.put_json(key, record)
        delivered = next(e for e in record["events"] if e["id"] == msg_id)["delivered_at"]
    if not delivered:
        celery_app.send_task(webhook_task.name, args=[kind, ident, msg_id], ignore_result=True)
    return msg_id


def deliver(store: ArtifactStore, settings: DistributedSettings, kind: str, ident: str, msg_id: str) -> float | None:
    """One delivery attempt of event ``msg_id``, recorded. Returns None when there is nothing more to do
    (delivered now or before, given up, or a URL no longer allowed), else the seconds to wait before the next
    attempt (back-off with full jitter)."""
    import httpx

    key = record_key(kind, ident)
    with store.lock(f"webhook-{kind}-{ident}"):
        record = read_record(store, kind, ident)
        event = next((e for e in (record or {}).get("events", []) if e["id"] == msg_id), None)
        if event is None or event["delivered_at"] or event["gave_up"]:
            return None
    master = settings.webhook_key()
    body = body_of(event["document"])
    started = time.time()
    attempt = {"attempt": len(event["attempts"]) + 1, "at": started, "status": None, "error": None}
    delivered = final = False
    try:
        if not master:
            raise PermissionError("SPARKLE_WEBHOOK_SIGNING_KEY is not set on this worker: nothing can be signed")
        url = check_callback_url(record["url"], settings.webhook_allow_link_local)
        headers = signed_headers(signing_secret(master, record.get("owner", "")), msg_id, body)
        headers["user-agent"] = "sparkle-factory-webhooks/1"
        headers["x-sparkle-event"] = event["type"]
        answer = httpx.post(url, content=body, headers=headers, timeout=settings.webhook_timeout_s,
                            follow_redirects=False)
        attempt["status"] = answer.status_code
        delivered = 200 <= answer.status_code < 300
        if not delivered:
            attempt["error"] = f"HTTP {answer.status_code}: {answer.text[:200]}"
    except (httpx.HTTPError, OSError) as exc:
        attempt["error"] = f"{exc.__class__.__name__}: {exc}"
    except (PermissionError, ValueError, InputError) as exc:  # not allowed (any more), or not signable: no retry helps
        attempt["error"], final = f"{exc.__class__.__name__}: {exc}", True
    attempt["seconds"] = round(time.time() - started, 3)
    with store.lock(f"webhook-{kind}-{ident}"):
        record = read_record(store, kind, ident)
        event = next(e for e in record["events"] if e["id"] == msg_id)
        event["attempts"].append(attempt)
        if delivered:
            event["delivered_at"] = time.time()
        elif final or len(event["attempts"]) >= settings.webhook_max_attempts:
            event["gave_up"] = True
            log.warning("webhook %s of %s %s: gave up after %d attempts: %s", msg_id, kind, ident,
                        len(event["attempts"]), attempt["error"])
        store.put_json(key, record)
    if delivered or event["gave_up"]:
        return None
    n = len(event["attempts"]) - 1
    return random.uniform(0, min(settings.webhook_backoff_max_s, settings.webhook_backoff_s * 2 ** n))


@app.task(name="sparkle.webhook", bind=True, base=SparkleTask, max_retries=None, ignore_result=True)
def webhook_task(self: SparkleTask, kind: str, ident: str, msg_id: str) -> dict:
    """Deliver one webhook event (see :func:`deliver`), re-scheduling itself with back-off until it is
    delivered or given up."""
    wait = deliver(self.store, self.settings, kind, ident, msg_id)
    if wait is None:
        return {"id": msg_id, "done": True}
    raise self.retry(countdown=wait)
