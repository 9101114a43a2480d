"""The HTTP gateway (FastAPI): one-off jobs and bulk datasets, over the Celery queues and the artifact store.

- ``POST /v1/jobs``                multipart ``video`` + ``prompt`` (optional ``theme``, ``chosen_keyword``,
                                   ``background``, ``force``, ``gates``, ``max_size``, ``max_frames``); an
                                   ``Idempotency-Key`` header makes a retried POST return the same job.
                                   202 with the job; 400/413/422 for bad input, with nothing stored.
- ``GET /v1/jobs/{id}``            state, current stage, per-stage decisions and timings (s), gate scores, error
- ``GET /v1/jobs/{id}/events``     the same document as server-sent events, each time it changes, until final
- ``GET /v1/jobs/{id}/artifacts``  presigned URLs of every artifact (``expires_s``, default 3600 s)
- ``DELETE /v1/jobs/{id}``         cancel: the journey stops at its next stage boundary (202; 409 once final)
- ``POST /v1/datasets``            a manifest (JSON entries: local paths under ``SPARKLE_MANIFEST_ROOT`` or store
                                   keys, with prompts or themes); the bulk run is driven by ``sparkle.dataset_tick``
- ``GET /v1/datasets/{id}``        progress, counts by state and the stage funnel
- ``GET /v1/failures``             the dead-letter list: failed jobs (terminal errors) with stage and reason
- ``POST /v1/jobs/{id}/retry``     re-run a failed job from its failed stage, once (``orchestrator/failures.py``)
- ``GET /v1/webhooks/secret``      the caller's webhook signing secret (``callback_url`` on POST /v1/jobs and
                                   /v1/datasets: signed callbacks on each terminal state, ``orchestrator/webhooks.py``)
- ``/ui/``                         the sample viewer (``orchestrator/viewer``): list, funnel, one page per sample
- ``GET /healthz``, ``GET /readyz`` (broker and store reachable); OpenAPI at ``/docs`` and ``/openapi.json``.

API keys (``SPARKLE_GATEWAY_API_KEYS``, comma-separated; unset: open) go in ``X-API-Key`` or
``Authorization: Bearer`` (the viewer: a cookie set by ``/ui/login``) and are checked before the body is read. Jobs and datasets belong to the key that
made them: another key gets a 404 for them (and cannot cancel them). Each client gets
``SPARKLE_GATEWAY_RATE_LIMIT`` requests (429 beyond) and ``SPARKLE_GATEWAY_MAX_STREAMS`` open event streams;
a body sent too slowly is cut with 408. The upload streams through the multipart parser into a spooled temporary file
(memory bounded at 1 MiB per file), is checked (decodable video, resolution, prompt, theme), and only then
goes to the store (multipart upload above 5 MiB); a body larger than ``SPARKLE_MAX_UPLOAD_BYTES`` is refused
with 413 while it streams, before anything is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.sse import EventSourceResponse
from pydantic import BaseModel, Field

from sparkle import layout
from sparkle.backends import MAX_KEYWORD_CHARS
from sparkle.config import PipelineConfig, distributed_config
from sparkle.errors import InputError, TooLarge
from sparkle.serving import ApiKeyAuth, BodyLimit, key_matches

from sparkle.webhooks import REPLAY_WINDOW_S, check_callback_url, public_record, read_record, signing_secret

from . import datasets, failures, jobs, journey
from .viewer import build_viewer
from sparkle.settings import DistributedSettings

class RateLimits:
    """Per-client limits of the gateway (``limits``' moving window, in this process): ``rate`` requests (e.g.
    ``20/second``), and at most ``streams`` open event streams."""

    def __init__(self, rate: str, streams: int):
        from limits import parse
        from limits.storage import MemoryStorage
        from limits.strategies import MovingWindowRateLimiter

        self.rate, self.streams = parse(rate), streams
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        self.open: dict[str, int] = {}

    def hit(self, who: str) -> bool:
        """Count one request of ``who``; False beyond the rate."""
        return self.limiter.hit(self.rate, who)

    def open_stream(self, who: str) -> bool:
        if self.open.get(who, 0) >= self.streams:
            return False
        self.open[who] = self.open.get(who, 0) + 1
        return True

    def close_stream(self, who: str) -> None:
        self.open[who] -= 1


MULTIPART_OVERHEAD = 1024 * 1024
"""Bytes of form fields and multipart framing allowed above ``max_upload_bytes`` in one request body."""


class DatasetRequest(BaseModel):
    """``POST /v1/datasets``: manifest entries (see :class:`~sparkle.orchestrator.datasets.ManifestEntry`)."""

    entries: list[dict] = Field(min_length=1, description="manifest entries: {video | video_key, prompt?, "
                                "theme?, chosen_keyword?, background? | background_key?, force?, gates?}")
    name: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.-]*[A-Za-z0-9_-][A-Za-z0-9_.-]*$",
                             description="dataset id (default: a hash)")
    window: int | None = Field(None, ge=1, le=100_000, description="samples in flight at once")
    max_frames: int | None = Field(None, ge=5, le=81)
    max_size: str | None = Field(None, pattern=r"^\d{2,4}x\d{2,4}$", description="largest output size WxH")
    callback_url: str | None = Field(None, max_length=2048, description="webhook: POSTed the dataset status, "
                                     "signed, when every sample is finished")


def _config(base: PipelineConfig, max_size: str | None, max_frames: int | None) -> PipelineConfig:
    conform = base.conform.model_dump()
    if max_size:
        a, b = (int(v) for v in max_size.lower().split("x"))
        conform.update(max_long_side=max(a, b), max_short_side=min(a, b))
    if max_frames:
        conform["max_frames"] = max_frames
    try:
        return base.model_copy(update={"conform": type(base.conform).model_validate(conform)})
    except ValueError as exc:
        raise InputError(f"bad size: {exc}") from exc


def _raise_unavailable(exc: Exception) -> None:
    """Broker errors are a 503 with Retry-After; anything else propagates (500)."""
    if type(exc).__module__.split(".")[0] in ("kombu", "redis", "amqp") or isinstance(exc, (ConnectionError, OSError)):
        raise HTTPException(503, f"queue unavailable: {exc.__class__.__name__}: {exc}",
                            headers={"Retry-After": "5"}) from exc
    raise exc


async def _save_upload(upload: UploadFile, stem: Path, limit: int) -> Path:
    """Copy an upload (already streamed by the multipart parser) to ``stem`` + the client's suffix, under the
    client's base name (``upload`` + its suffix when that name is ``..``-like or over 200 bytes: it was an
    HTTP 500); TooLarge (413) beyond ``limit`` bytes."""
    name = PurePosixPath((upload.filename or "upload.mp4").replace("\\", "/")).name
    if name in ("", ".", "..") or len(name.encode()) > 200:
        suffix = PurePosixPath(name).suffix[:16] if name not in (".", "..") else ""
        name = "upload" + (suffix or ".mp4")
    path = stem / name
    stem.mkdir(parents=True, exist_ok=True)

    def copy() -> int:
        with path.open("wb") as f:
            shutil.copyfileobj(upload.file, f, 1024 * 1024)
            return f.tell()

    size = await asyncio.to_thread(copy)
    if size > limit:
        raise TooLarge(f"{name} is {size} bytes; at most {limit} are accepted (SPARKLE_MAX_UPLOAD_BYTES)")
    return path


def _public(doc: dict) -> dict:
    """A job or dataset document as the API shows it: without its ``owner`` (the key hash it belongs to)."""
    return {k: v for k, v in doc.items() if k != "owner"}


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` reused with a different request (HTTP 422)."""


def _fingerprint(video: Path, background: Path | None, *fields) -> str:
    """SHA-256 of a job request: the uploaded files' bytes and every field (``config`` as its JSON), so that a
    reused ``Idempotency-Key`` is recognised as the same request or refused as another one."""
    sha = hashlib.sha256()
    for path in (video, background):
        if path is not None:
            with open(path, "rb") as f:
                sha.update(hashlib.file_digest(f, "sha256").digest())
        sha.update(b"\0")
    for value in fields:
        sha.update(json.dumps(value.model_dump(mode="json") if hasattr(value, "model_dump") else value,
                              sort_keys=True, default=str).encode() + b"\0")
    return sha.hexdigest()


def build_gateway(settings: DistributedSettings | None = None, store=None, celery_app=None,
                  config: PipelineConfig | None = None) -> FastAPI:
    """The gateway app. ``store`` (default: ``SPARKLE_STORE_URL``), ``celery_app`` (default: the project's app)
    and ``config`` (default: :func:`~sparkle.config.distributed_config`, ``SPARKLE_*`` at Sparkle's 1280x720) can
    be given, as the tests do."""
    settings = settings or DistributedSettings()
    if store is None:
        from sparkle.store_s3 import open_store

        store = open_store(settings.store_url, settings)
    if celery_app is None:
        from .celery_app import app as celery_app
    base_config = config or distributed_config()
    keys = [k.strip() for k in (settings.gateway_api_keys.get_secret_value() if settings.gateway_api_keys else "")
            .split(",") if k.strip()]
    manifest_root = Path(settings.manifest_root) if settings.manifest_root else None

    app = FastAPI(title="Sparkle Factory gateway", version="1",
                  description="Instruction-guided video background replacement (the Sparkle pipeline), "
                              "one video at a time or as bulk datasets.")
    app.state.store, app.state.celery = store, celery_app
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + MULTIPART_OVERHEAD)  # JSON 413/408, streamed
    # outermost: the key is checked before any of the body is read; the viewer's pages take it from a cookie too
    app.add_middleware(ApiKeyAuth, keys=keys, prefix=("/v1/", "/ui"), cookie=VIEWER_COOKIE, login="/ui/login")
    limiter = RateLimits(settings.gateway_rate_limit, settings.gateway_max_streams)

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError):
        return JSONResponse({"detail": str(exc)}, status_code=413 if isinstance(exc, TooLarge) else 400)

    async def principal(request: Request) -> str:
        """The caller (the hash of its API key; ``""`` when the gateway has no keys), authenticated by
        :class:`~sparkle.serving.ApiKeyAuth` before the body was read; 429 beyond its request rate."""
        who = request.state.principal
        client = who or (request.client.host if request.client else "")  # an open gateway: by address
        if not limiter.hit(client):
            raise HTTPException(429, f"more than {settings.gateway_rate_limit} requests",
                                headers={"Retry-After": "1"})
        return who

    def job_or_404(job_id: str, who: str) -> dict:
        """The job document, if ``who`` owns it: another client's job is a 404, as if it did not exist. A job
        with a ``callback_url`` shows its deliveries as ``webhook`` (events, attempts)."""
        try:
            layout.parse_sample_id(job_id)
            doc = jobs.read_job(store, job_id)
        except (ValueError, KeyError):
            raise HTTPException(404, f"no job {job_id!r}") from None
        if doc.get("owner", "") != who:
            raise HTTPException(404, f"no job {job_id!r}")
        if doc.get("callback_url"):
            doc["webhook"] = public_record(read_record(store, "job", job_id))
        return _public(doc)

    async def checked_callback(url: str | None) -> str | None:
        """A callback URL the gateway may call (400 otherwise: see :func:`sparkle.webhooks.check_callback_url`),
        on a gateway that can sign (``SPARKLE_WEBHOOK_SIGNING_KEY``)."""
        if not url:
            return None
        if settings.webhook_key() is None:
            raise InputError("webhooks are not enabled on this gateway (SPARKLE_WEBHOOK_SIGNING_KEY is not set)")
        return await asyncio.to_thread(check_callback_url, url, settings.webhook_allow_link_local)

    @app.get("/healthz", tags=["health"])
    async def healthz():
        """The process is alive."""
        return {"status": "alive"}

    @app.get("/readyz", tags=["health"])
    async def readyz():
        """Broker and store reachable (503 otherwise)."""
        try:
            await asyncio.to_thread(lambda: celery_app.connection_for_write().ensure_connection(max_retries=1))
            await asyncio.to_thread(store.exists, "jobs/ids/.probe")
        except Exception as exc:  # noqa: BLE001 - reported
            return JSONResponse({"status": "unavailable", "error": f"{exc.__class__.__name__}: {exc}"}, 503)
        return {"status": "ready"}

    @app.post("/v1/jobs", status_code=202, tags=["jobs"])
    async def create_job(
        request: Request,
        video: Annotated[UploadFile, File(description="the source video (a fixed-camera clip)")],
        prompt: Annotated[str | None, Form(description="the instruction; omitted: written from the theme")] = None,
        theme: Annotated[str, Form(description="edit_type: location, season, time, style, openve3m")] = "location",
        chosen_keyword: Annotated[str | None, Form(max_length=MAX_KEYWORD_CHARS,
                                                   description='"subtheme: scene" for the metadata')] = None,
        background: Annotated[UploadFile | None, File(description="image or video to use as background")] = None,
        force: Annotated[bool, Form(description="keep a clip the camera filter refuses")] = False,
        gates: Annotated[bool, Form(description="reject samples below the EditScore gates")] = True,
        max_size: Annotated[str | None, Form(pattern=r"^\d{2,4}x\d{2,4}$")] = None,
        max_frames: Annotated[int | None, Form(ge=5, le=81)] = None,
        callback_url: Annotated[str | None, Form(max_length=2048, description="webhook: POSTed the job document, "
                                                 "signed, on each terminal state")] = None,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
        who: str = Depends(principal),
    ):
        """Replace the background of one video. 202 with the job (200 with the same job for a repeated
        ``Idempotency-Key``); 400 bad input (a ``callback_url`` to a link-local or metadata address included),
        413 too large, 422 malformed form, 503 broker unavailable."""
        config = _config(base_config, max_size, max_frames)
        callback_url = await checked_callback(callback_url)
        with tempfile.TemporaryDirectory(prefix="sparkle-upload-") as tmp:
            video_path = await _save_upload(video, Path(tmp) / "video", settings.max_upload_bytes)
            bg_path = None
            if background is not None and background.filename:
                bg_path = await _save_upload(background, Path(tmp) / "background", settings.max_upload_bytes)

            def submit() -> tuple[dict, bool]:
                args = dict(video_name=video.filename, config=config, owner=who, callback_url=callback_url)
                if not idempotency_key:
                    return journey.submit_files(celery_app, store, video_path, prompt, theme, chosen_keyword, bg_path,
                                             force, gates, **args), True
                mapping = jobs.idempotency_key(idempotency_key, who)
                request = _fingerprint(video_path, bg_path, prompt, theme, chosen_keyword, force, gates, config,
                                       *([callback_url] if callback_url else []))
                with store.lock(mapping):
                    if store.exists(mapping):
                        known = store.get_json(mapping)
                        if known.get("request", request) != request:
                            raise IdempotencyConflict(
                                "this Idempotency-Key was used for a different request (other files or fields); "
                                "use a new key for a new job")
                        return job_or_404(known["job"], who), False
                    doc = journey.submit_files(celery_app, store, video_path, prompt, theme, chosen_keyword, bg_path,
                                            force, gates, **args)
                    store.put_json(mapping, {"job": doc["id"], "request": request, "created_at": time.time()})
                    return doc, True

            try:
                doc, created = await asyncio.to_thread(submit)
            except IdempotencyConflict as exc:
                raise HTTPException(422, str(exc)) from None
            except InputError as exc:  # name the client's file, not the gateway's temporary copy
                raise type(exc)(str(exc).replace(tmp + "/", "")) from None
            except Exception as exc:  # noqa: BLE001 - broker or store down: nothing was kept
                _raise_unavailable(exc)
        doc = _public(doc)
        return JSONResponse(doc, status_code=202 if created else 200, headers={"Location": f"/v1/jobs/{doc['id']}"})

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    async def get_job(job_id: str, who: str = Depends(principal)):
        """The job: ``state`` (queued, running, accepted, rejected, failed, cancelled), ``stage``, ``stages``
        (decisions with ``seconds`` and gate ``scores``), ``timings`` (s), ``error``."""
        return await asyncio.to_thread(job_or_404, job_id, who)

    async def existing_job(job_id: str, who: str = Depends(principal)) -> dict:
        return await asyncio.to_thread(job_or_404, job_id, who)

    async def stream_slot(request: Request, doc: dict = Depends(existing_job)):
        """The job, holding one of the caller's event-stream slots until its stream ends (FastAPI runs the
        teardown after the response, disconnects included); 429 if none is free."""
        who = request.state.principal
        if not limiter.open_stream(who):
            raise HTTPException(429, f"more than {settings.gateway_max_streams} open event streams",
                                headers={"Retry-After": "5"})
        try:
            yield doc
        finally:
            limiter.close_stream(who)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_class=EventSourceResponse)
    async def job_events(request: Request, job_id: str, poll_s: Annotated[float, Query(ge=0.5, le=30)] = 1.0,
                         doc: dict = Depends(stream_slot)):
        """Server-sent events: the job document each time it changes, until it is final (404 unknown job; 429
        beyond ``SPARKLE_GATEWAY_MAX_STREAMS`` open streams of one client). One store read per ``poll_s``."""
        last = None
        while True:
            if doc["updated_at"] != last:
                last = doc["updated_at"]
                yield doc
            if doc["state"] in jobs.TERMINAL:
                return
            await asyncio.sleep(poll_s)
            doc = await asyncio.to_thread(job_or_404, job_id, request.state.principal)

    @app.get("/v1/jobs/{job_id}/artifacts", tags=["jobs"])
    async def job_artifacts(job_id: str, expires_s: Annotated[int, Query(ge=1)] = 900,
                            who: str = Depends(principal)):
        """Presigned download URLs (``expires_s`` seconds, at most ``SPARKLE_PRESIGN_MAX_S``, 1 h by default:
        a leaked link stops working soon) of the job's artifacts: the published files of an accepted sample and
        the report of every finished one. 409 while the job is not finished; 422 beyond the cap."""
        from sparkle.store_s3 import download_url

        if expires_s > settings.presign_max_s:
            raise HTTPException(422, f"expires_s is at most {settings.presign_max_s} s (SPARKLE_PRESIGN_MAX_S)")
        doc = await asyncio.to_thread(job_or_404, job_id, who)
        if doc["state"] not in jobs.TERMINAL:
            raise HTTPException(409, f"job {job_id} is {doc['state']}: artifacts come when it is finished")
        try:
            found = await asyncio.to_thread(jobs.artifact_keys, store, job_id)
            urls = {name: {"key": key, "url": await asyncio.to_thread(download_url, store, key, expires_s)}
                    for name, key in found.items()}
        except KeyError as exc:
            raise HTTPException(404, f"job {job_id} has no stored artifact {exc}") from None
        return {"id": job_id, "state": doc["state"], "expires_s": expires_s, "artifacts": urls}

    @app.delete("/v1/jobs/{job_id}", status_code=202, tags=["jobs"])
    async def cancel_job(job_id: str, who: str = Depends(principal)):
        """Cancel: the running stage finishes, then the journey stops and removes what it staged. 409 when
        the job is already final."""
        await asyncio.to_thread(job_or_404, job_id, who)
        try:
            doc = await asyncio.to_thread(jobs.request_cancel, store, job_id)
            return _public(doc)
        except jobs.JobFinished as exc:
            raise HTTPException(409, str(exc)) from None

    @app.post("/v1/jobs/{job_id}/retry", status_code=202, tags=["jobs"])
    async def retry_job(job_id: str, who: str = Depends(principal)):
        """Re-run a failed job from the stage that failed (its earlier stages are kept): 202 with the job, now
        ``queued``; 409 when it is not in the dead-letter list (it did not fail, or was re-driven already: a
        retry runs once); 503 broker unavailable (the job stays listed)."""
        await asyncio.to_thread(job_or_404, job_id, who)
        try:
            doc = await asyncio.to_thread(failures.retry, celery_app, store, job_id, who)
        except failures.NotRetryable as exc:
            raise HTTPException(409, str(exc)) from None
        except KeyError:
            raise HTTPException(404, f"no job {job_id!r}") from None
        except Exception as exc:  # noqa: BLE001 - broker down: nothing changed
            _raise_unavailable(exc)
        return _public(doc)

    @app.get("/v1/failures", tags=["jobs"])
    async def list_failures(dataset: str | None = None, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
                            who: str = Depends(principal)):
        """The dead-letter list: failed jobs (terminal errors, not gate refusals) of the caller, oldest first,
        with ``stage``, ``reason``, ``failed_at`` (Unix s), ``dataset``, ``retries`` and ``retryable``."""
        found = await asyncio.to_thread(failures.list_failures, store, dataset, who, limit)
        return {"failures": [_public(e) for e in found], "count": len(found)}

    @app.get("/v1/webhooks/secret", tags=["webhooks"])
    async def webhook_secret(who: str = Depends(principal)):
        """The caller's webhook signing secret (``whsec_...``, Standard Webhooks): verify the ``webhook-signature``
        header of our callbacks with it (HMAC-SHA256 of ``{webhook-id}.{webhook-timestamp}.{body}``) and refuse
        a ``webhook-timestamp`` older than ``replay_window_s``. 404 when webhooks are not enabled."""
        if settings.webhook_key() is None:
            raise HTTPException(404, "webhooks are not enabled on this gateway (SPARKLE_WEBHOOK_SIGNING_KEY)")
        return {"secret": signing_secret(settings.webhook_key(), who),
                "scheme": "https://www.standardwebhooks.com (v1, HMAC-SHA256)", "replay_window_s": REPLAY_WINDOW_S,
                "headers": ["webhook-id", "webhook-timestamp", "webhook-signature"]}

    @app.post("/v1/datasets", status_code=202, tags=["datasets"])
    async def create_dataset(body: DatasetRequest, who: str = Depends(principal)):
        """Generate a dataset from a manifest. Every entry is checked first (400 lists the bad ones, nothing
        is stored); the same manifest posted again returns the same dataset and sample ids. ``callback_url``:
        POSTed the dataset's status, signed, when it is done."""
        entries = datasets.parse_manifest("\n".join(json.dumps(e) for e in body.entries))
        config = _config(base_config, body.max_size, body.max_frames)
        callback_url = await checked_callback(body.callback_url)
        ds = await asyncio.to_thread(datasets.create_dataset, store, entries, manifest_root, config,
                                     body.window or settings.bulk_window, body.name, who, callback_url)
        try:
            await asyncio.to_thread(datasets.drive, celery_app, ds["id"], resume=False)
        except Exception as exc:  # noqa: BLE001 - the dataset is registered: GET /v1/datasets/{id} drives it later
            _raise_unavailable(exc)
        ds = _public(ds)
        return {**ds, "status": await asyncio.to_thread(datasets.dataset_status, store, ds["id"])}

    @app.get("/v1/datasets/{dataset_id}", tags=["datasets"])
    async def get_dataset(dataset_id: str, who: str = Depends(principal)):
        """Progress (``total``, ``submitted``, ``finished``, ``counts`` by state) and the stage ``funnel``. A
        run whose driver went quiet for a minute is driven again (with its in-flight samples resumed)."""
        try:
            ds = await asyncio.to_thread(datasets.read_dataset, store, dataset_id)
            if ds.get("owner", "") != who:
                raise KeyError(dataset_id)  # another client's dataset: as if it did not exist
            status = await asyncio.to_thread(datasets.dataset_status, store, dataset_id, ds)
        except KeyError:
            raise HTTPException(404, f"no dataset {dataset_id!r}") from None
        if not status["done"] and time.time() - status["updated_at"] > 60:
            await asyncio.to_thread(datasets.drive, celery_app, dataset_id, resume=True)
        return status

    @app.get("/ui/login", include_in_schema=False)
    async def login_page(next: str = "/ui/"):
        """The viewer's login: a form for the API key (the viewer's pages are behind the same keys as /v1/)."""
        return HTMLResponse(_LOGIN_PAGE.format(next=html.escape(_safe_next(next)), error=""))

    @app.post("/ui/login", include_in_schema=False)
    async def login(request: Request):
        """Check the key of the login form, then keep it in an HttpOnly cookie and go on to ``next``."""
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        key, target = (form.get("key") or [""])[0], _safe_next((form.get("next") or ["/ui/"])[0])
        if keys and not key_matches(key.encode(), [k.encode() for k in keys]):
            return HTMLResponse(_LOGIN_PAGE.format(next=html.escape(target), error="wrong API key"), 401)
        response = RedirectResponse(target, status_code=303)
        if keys:
            response.set_cookie(VIEWER_COOKIE, key, httponly=True, samesite="strict", path="/ui",
                                secure=request.url.scheme == "https")
        return response

    app.mount("/ui", build_viewer(store, scoped=True, title="Sparkle Factory gateway"))
    return app


VIEWER_COOKIE = "sparkle_api_key"

_LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sparkle Factory: API key</title>
<style>body{{font:14px/1.4 system-ui,sans-serif;margin:0}}header{{background:#222;color:#eee;padding:.6em 1.2em}}
main{{padding:1em 1.2em}}.refused{{color:#b3261e}}</style><link rel="icon" href="data:,"></head><body>
<header><span class="brand">Sparkle Factory gateway</span></header><main><h1>API key</h1>
<p>The viewer is behind the gateway's API keys (the key you send as <code>X-API-Key</code>).</p>
<p class="refused">{error}</p><form method="post" action="/ui/login"><input type="hidden" name="next" value="{next}">
<input type="password" name="key" size="40" autofocus> <button type="submit">Open</button></form></main></body></html>"""


def _safe_next(target: str) -> str:
    """Where the login may send the browser: a path of the viewer (never another site)."""
    return target if target.startswith("/ui") and not target.startswith("//") and "\\" not in target else "/ui/"


def gateway_command(host: str = "127.0.0.1", port: int = 8080) -> None:
    """``sparkle gateway``: serve :func:`build_gateway` under uvicorn (settings from ``SPARKLE_*``)."""
    import uvicorn

    settings = DistributedSettings()
    app = build_gateway(settings)
    store = app.state.store
    if hasattr(store, "ensure_bucket"):
        store.ensure_bucket()
    uvicorn.run(app, host=host, port=port, log_level="info")
