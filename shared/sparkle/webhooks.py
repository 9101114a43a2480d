"""Webhooks: signed callbacks to ``callback_url`` on each terminal state of a job or a dataset.

**Signature** (the Standard Webhooks scheme, https://www.standardwebhooks.com, with its reference library
``standardwebhooks``): three headers,

- ``webhook-id``         the event id, the same on every redelivery of one event (the receiver's idempotency key)
- ``webhook-timestamp``  Unix seconds when this attempt was signed
- ``webhook-signature``  ``v1,`` + base64 HMAC-SHA256 of ``"{webhook-id}.{webhook-timestamp}.{body}"``

keyed by the API key's signing secret (``whsec_`` + base64 of 32 bytes): HMAC-SHA256 of the key's principal
under ``SPARKLE_WEBHOOK_SIGNING_KEY`` (:func:`signing_secret`), so each API key has its own secret and a
receiver of one key cannot forge the callbacks of another. The caller reads its secret at ``GET
/v1/webhooks/secret``. A receiver verifies with :func:`verify` (or any Standard Webhooks library), which also
refuses a timestamp outside the replay window (:data:`REPLAY_WINDOW_S`, the library's 5 minutes).

**Where callbacks may go**: ``http``/``https`` URLs whose host resolves, never to link-local addresses
(169.254.0.0/16, fe80::/10: the cloud metadata services live there) or known metadata hosts, unless
``SPARKLE_WEBHOOK_ALLOW_LINK_LOCAL`` (:func:`check_callback_url`, at submission and again at each delivery,
against DNS rebinding).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from datetime import datetime, timezone
from urllib.parse import urlsplit

from .errors import InputError
from .store import ArtifactStore

REPLAY_WINDOW_S = 300
"""How old (or how far in the future) a ``webhook-timestamp`` may be: ``standardwebhooks``' tolerance (5 min)."""

METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "metadata.azure.internal", "instance-data",
                            "instance-data.ec2.internal"})
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200"))
"""Cloud metadata endpoints (AWS IMDS and ECS, GCP, Azure, Alibaba's 100.100.100.200): refused like link-local."""


def signing_secret(master: str, principal: str) -> str:
    """The webhook signing secret of an API key: ``whsec_`` + base64 of HMAC-SHA256(``master``, ``principal``)
    (``principal``: the key's hash, ``""`` on an open gateway)."""
    digest = hmac.new(master.encode(), b"sparkle-webhook\0" + principal.encode(), hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(digest).decode()


def event_id(kind: str, ident: str, state: str, generation: int = 0) -> str:
    """The id of one event (``webhook-id``): the same for every redelivery of it, new for a new terminal state
    (a retried job's second ``accepted`` is generation 1)."""
    return "msg_" + hashlib.sha256(f"{kind}\0{ident}\0{state}\0{generation}".encode()).hexdigest()[:26]


def signed_headers(secret: str, msg_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body`` (plus ``content-type``), signed now."""
    from standardwebhooks.webhooks import Webhook

    ts = datetime.fromtimestamp(int(now if now is not None else time.time()), tz=timezone.utc)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(ts.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, ts, body.decode()),
            "content-type": "application/json"}


def verify(secret: str, headers: dict, body: bytes) -> dict:
    """What a receiver does: check the signature and the replay window; returns the parsed body. Raises
    ``standardwebhooks.webhooks.WebhookVerificationError`` on a bad or stale signature."""
    from standardwebhooks.webhooks import Webhook

    return Webhook(secret).verify(body, {k.lower(): v for k, v in dict(headers).items()})


def body_of(doc: dict) -> bytes:
    """The bytes POSTed: the document as compact JSON (what the signature covers)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def check_callback_url(url: str, allow_link_local: bool = False) -> str:
    """Return ``url`` if callbacks may be sent there. Raises InputError: not http(s), no host, a host that does
    not resolve, or one that resolves to a link-local or cloud-metadata address (unless ``allow_link_local``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"callback_url {url!r} is not an http(s) URL with a host")
    if len(url) > 2048:
        raise InputError("callback_url is longer than 2048 characters")
    host = parts.hostname.rstrip(".").lower()
    if allow_link_local:
        return url
    if host in METADATA_HOSTS:
        raise InputError(f"callback_url host {host!r} is a cloud metadata service (SPARKLE_WEBHOOK_ALLOW_LINK_LOCAL)")
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80),
                                   proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise InputError(f"callback_url host {host!r} does not resolve: {exc}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        mapped = getattr(address, "ipv4_mapped", None) or address
        if mapped.is_link_local or mapped in METADATA_ADDRESSES:
            raise InputError(f"callback_url {url!r} resolves to {address}, a link-local or metadata address; "
                             "set SPARKLE_WEBHOOK_ALLOW_LINK_LOCAL=true to allow it")
    return url


# --- the delivery record (written by the orchestrator's webhook task, read by the gateway and the viewer) -------

def record_key(kind: str, ident: str) -> str:
    """Where the deliveries of a job (``kind`` ``job``) or a dataset (``dataset``) are recorded."""
    if kind == "job":
        return f"jobs/webhooks/{ident}.json"
    if kind == "dataset":
        return f"datasets/{ident}/webhook.json"
    raise ValueError(kind)


def read_record(store: ArtifactStore, kind: str, ident: str) -> dict | None:
    """``{"url", "owner", "events": [{"id", "state", "type", "document", "attempts": [...], "delivered_at",
    "gave_up"}]}``, or None."""
    key = record_key(kind, ident)
    return store.get_json(key) if store.exists(key) else None


def public_record(record: dict | None) -> dict | None:
    """The record as the API and the viewer show it: the URL and the events with their attempts, without the
    documents they carried or the owner."""
    if record is None:
        return None
    return {"url": record["url"], "events": [{k: v for k, v in e.items() if k != "document"}
                                             for e in record["events"]]}
