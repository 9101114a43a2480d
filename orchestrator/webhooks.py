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
from sparkle.webhooks import body_of, check_callback_url, event_id, signed_headers, signing_secret

from .celery_app import SparkleTask, app

log = logging.getLogger("sparkle.webhooks")


def record_key(kind: str, ident: str) -> str:
    """Where the deliveries of a job (``kind`` ``job``) or a dataset (``dataset``) are recorded."""
    if kind == "job":
        return f"jobs/webhooks/{ident}.json"
    if kind == "dataset":
        return f"datasets/{ident}/webhook.json"
    raise ValueError(kind)


def read_record(store: ArtifactStore, kind: str, ident: str) -> dict | None:
    """``{"url", "events": [{"id", "state", "document", "attempts": [...], "delivered_at", "gave_up"}]}``, or None."""
    key = record_key(kind, ident)
    return store.get_json(key) if store.exists(key) else None


def public_record(record: dict | None) -> dict | None:
    """The record as the API shows it: the events without the documents they carried."""
    if record is None:
        return None
    return {"url": record["url"], "events": [{k: v for k, v in e.items() if k != "document"}
                                             for e in record["events"]]}


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


def deliver(store: ArtifactStore, settings: DistributedSettings, kind: str, ident: str, msg_id: str,
            attempt_limit: int | None = None) -> float | None:
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
    retry = True
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
        if 200 <= answer.status_code < 300:
            retry = False
        else:
            attempt["error"] = f"HTTP {answer.status_code}: {answer.text[:200]}"
    except (httpx.HTTPError, OSError) as exc:
        attempt["error"] = f"{exc.__class__.__name__}: {exc}"
    except (PermissionError, ValueError, InputError) as exc:  # not allowed (any more), or not signable: no retry helps
        attempt["error"], retry = f"{exc.__class__.__name__}: {exc}", False
    attempt["seconds"] = round(time.time() - started, 3)
    with store.lock(f"webhook-{kind}-{ident}"):
        record = read_record(store, kind, ident)
        event = next(e for e in record["events"] if e["id"] == msg_id)
        event["attempts"].append(attempt)
        limit = attempt_limit or settings.webhook_max_attempts
        if attempt["status"] is not None and 200 <= attempt["status"] < 300:
            event["delivered_at"] = time.time()
        elif not retry or len(event["attempts"]) >= limit:
            event["gave_up"] = True
        store.put_json(key, record)
    if event["delivered_at"] or event["gave_up"]:
        if event["gave_up"]:
            log.warning("webhook %s of %s %s: gave up after %d attempts: %s", msg_id, kind, ident,
                        len(event["attempts"]), attempt["error"])
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
