"""Webhooks (shared/sparkle/webhooks.py, orchestrator/webhooks.py): signatures a receiver can verify, retries
after a failed delivery, no duplicate after a re-delivery, and the URLs callbacks may not go to. A loopback
receiver plays the client's server. (The whole path through Celery workers: tests/test_failures.py.)"""

from __future__ import annotations

import threading
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from standardwebhooks.webhooks import WebhookVerificationError

from sparkle.errors import InputError
from sparkle.orchestrator import webhooks as delivery
from sparkle.settings import DistributedSettings
from sparkle.store import LocalStore
from sparkle.webhooks import (body_of, check_callback_url, event_id, public_record, read_record, signed_headers,
                              signing_secret, verify)
from tests.loopback import LoopbackServer

MASTER = "test-master-signing-key"


class Receiver(LoopbackServer):
    """TEST DOUBLE of a client's webhook endpoint: answers the statuses of ``answers`` in turn (then 200),
    verifies each request with ``secret`` and handles an event once per ``webhook-id`` (as a receiver should)."""

    def __init__(self, secret: str, answers: list[int] | None = None):
        self.secret, self.answers = secret, list(answers or [])
        self.requests: list[dict] = []
        self.handled: dict[str, dict] = {}
        self.lock = threading.Lock()
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request):
            body = await request.body()
            with self.lock:
                status = self.answers.pop(0) if self.answers else 200
                try:
                    doc, ok = verify(self.secret, dict(request.headers), body), True
                except WebhookVerificationError:
                    doc, ok = None, False
                self.requests.append({"headers": dict(request.headers), "body": body, "status": status, "ok": ok})
                if status == 200 and ok:
                    self.handled.setdefault(request.headers["webhook-id"], doc)
            return JSONResponse({"status": status}, status_code=status)

        self.serve(app)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


class SentTasks:
    """TEST DOUBLE of the Celery app's ``send_task``: records the delivery messages instead of queueing them."""

    def __init__(self):
        self.sent: list[tuple] = []

    def send_task(self, name, args=None, **_):
        self.sent.append((name, tuple(args or ())))


def _settings(**updates) -> DistributedSettings:
    return DistributedSettings(webhook_signing_key=SecretStr(MASTER), webhook_backoff_s=0.05,
                               webhook_backoff_max_s=0.2, **updates)


def test_a_delivery_is_signed_retried_after_a_500_and_never_repeated(tmp_path):
    store, settings, app = LocalStore(tmp_path / "s"), _settings(), SentTasks()
    owner = "a1b2c3d4e5f60708"
    secret = signing_secret(MASTER, owner)
    doc = {"id": "Sparkle_location_000001", "state": "accepted", "stages": []}
    with Receiver(secret, answers=[500]) as rx:
        msg = delivery.notify(app, store, "job", doc["id"], rx.url, owner, "accepted", doc)
        assert app.sent == [("sparkle.webhook", ("job", doc["id"], msg))]
        wait = delivery.deliver(store, settings, "job", doc["id"], msg)
        assert wait is not None and 0 <= wait <= 0.05  # back-off before the second attempt
        assert delivery.deliver(store, settings, "job", doc["id"], msg) is None  # delivered
        assert [r["status"] for r in rx.requests] == [500, 200]
        assert all(r["ok"] for r in rx.requests)  # both attempts verify with the key's secret
        assert rx.handled == {msg: doc}
        first, second = rx.requests
        assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == msg  # the idempotency id

        # A re-delivered message (a worker died after the POST) and a repeated notify send nothing more.
        assert delivery.deliver(store, settings, "job", doc["id"], msg) is None
        assert delivery.notify(app, store, "job", doc["id"], rx.url, owner, "accepted", doc) == msg
        assert len(app.sent) == 1 and len(rx.requests) == 2

    record = public_record(read_record(store, "job", doc["id"]))
    (event,) = record["events"]
    assert [a["status"] for a in event["attempts"]] == [500, 200] and event["delivered_at"]
    assert "HTTP 500" in event["attempts"][0]["error"] and "document" not in event
    # A retried job that ends again is a new event (generation 1): a new id.
    assert event_id("job", doc["id"], "accepted", 1) != msg


def test_signatures_fail_with_another_keys_secret_a_changed_body_or_outside_the_replay_window():
    secret, other = signing_secret(MASTER, "key-a"), signing_secret(MASTER, "key-b")
    assert secret != other and secret.startswith("whsec_")
    body = body_of({"id": "x", "state": "failed"})
    headers = signed_headers(secret, "msg_1", body)
    assert verify(secret, headers, body) == {"id": "x", "state": "failed"}
    with pytest.raises(WebhookVerificationError):
        verify(other, headers, body)
    with pytest.raises(WebhookVerificationError):
        verify(secret, headers, body.replace(b"failed", b"accepted"))
    stale = signed_headers(secret, "msg_1", body, now=time.time() - 400)  # replayed after the 5-minute window
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(secret, stale, body)


def test_a_receiver_that_keeps_failing_is_given_up_after_the_attempt_limit(tmp_path):
    store, settings, app = LocalStore(tmp_path / "s"), _settings(webhook_max_attempts=3), SentTasks()
    with Receiver(signing_secret(MASTER, ""), answers=[503, 503, 503, 503]) as rx:
        msg = delivery.notify(app, store, "dataset", "d1", rx.url, "", "done", {"id": "d1", "done": True})
        waits = [delivery.deliver(store, settings, "dataset", "d1", msg) for _ in range(4)]
        assert waits[0] is not None and waits[1] is not None and waits[2] is None and waits[3] is None
        assert len(rx.requests) == 3
    (event,) = read_record(store, "dataset", "d1")["events"]
    assert event["gave_up"] and not event["delivered_at"] and len(event["attempts"]) == 3


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/hook", "http://metadata.google.internal/x",
    "http://169.254.10.20:8080/hook", "http://[::ffff:169.254.169.254]/", "ftp://127.0.0.1/hook", "/relative",
    "http://no-such-host.invalid/hook"])
def test_callback_urls_to_link_local_metadata_or_nowhere_are_refused(url):
    with pytest.raises(InputError):
        check_callback_url(url)


def test_loopback_and_configured_link_local_callbacks_are_allowed():
    assert check_callback_url("http://127.0.0.1:9/hook") == "http://127.0.0.1:9/hook"
    assert check_callback_url("http://169.254.169.254/x", allow_link_local=True)


def test_a_url_refused_at_delivery_time_is_not_retried(tmp_path):
    """DNS may change after submission: every delivery checks the URL again; a refused one is given up."""
    store, settings, app = LocalStore(tmp_path / "s"), _settings(), SentTasks()
    msg = delivery.notify(app, store, "job", "Sparkle_time_000002", "http://169.254.169.254/x", "", "failed", {})
    assert delivery.deliver(store, settings, "job", "Sparkle_time_000002", msg) is None
    (event,) = read_record(store, "job", "Sparkle_time_000002")["events"]
    assert event["gave_up"] and "link-local" in event["attempts"][0]["error"]
