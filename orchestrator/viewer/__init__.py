"""The sample viewer: every sample of a store in the browser, served by the gateway at ``/ui/`` and, for a local
output folder, by ``sparkle view OUT`` (no Redis, no MinIO: it reads the folder).

Pages (server-rendered Jinja2 templates, one small script committed as source in ``static/``; no build step, no
CDN):

- ``/ui/``                   the samples, newest first, filtered by theme, state, mean ``O_score`` range, refusal
                             stage, dataset and text, 50 a page (an SQLite index: ``index.py``)
- ``/ui/funnel``             the stage funnel of the samples the same filters keep, as a bar chart (SVG)
- ``/ui/samples/{id}``       one sample: source and edited video playing in sync, the background video, the BAIT
                             mask over the source (drawn on a canvas from the packed bits of the ``.npz``), the
                             Canny control video, frame 0 / edited frame 0 / clean plate, the per-stage decisions
                             with their timings (s) and the five records; a sample still on its journey updates
                             live (server-sent events) and shows its artifacts as they are staged
- ``/ui/api/samples``        the list as JSON (same filters); ``/ui/samples/{id}.json`` one sample as JSON
- ``/ui/samples/{id}/files/{name}``  an artifact (``Range`` requests: videos seek); ``/ui/samples/{id}/mask.bin``
                             the mask's packed bits as stored (``X-Mask-Shape: T,H,W``, gzip on the wire)
- ``/ui/samples/{id}/events`` the sample as server-sent events, each time it changes, until it is final

Behind the gateway the API keys apply (``X-API-Key``/``Authorization: Bearer``, or the cookie the login page
``/ui/login`` sets) and a key sees only its own samples.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Annotated

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.sse import EventSourceResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from sparkle import layout
from sparkle.store import ArtifactStore, LocalStore, staging_prefix
from sparkle.webhooks import public_record, read_record

from .index import PAGE_SIZE, STATES, Filters, SampleIndex, dumps

HERE = Path(__file__).parent
Score = Annotated[float | None, Query(ge=0, le=10, description="mean O_score bound, 0..10")]
TERMINAL = ("accepted", "rejected", "failed", "cancelled")

ARTIFACTS = {
    "source_video": "source video", "edited_video": "edited video", "background_video": "background video",
    "canny_video": "Canny control video", "source_frame0": "frame 0", "edited_frame0": "edited frame 0",
    "clean_plate": "clean plate", "mask": "BAIT mask (.npz)",
}
"""Artifact name (as in a task's ``refs`` and a report's ``artifacts``) -> what the page calls it."""


def sample_detail(store: ArtifactStore, sid: str) -> dict | None:
    """Everything the sample page shows, from the store: the job document (state, stage, decisions) and the
    report (records, artifacts) of ``sid``, the record document of a published one, and, for a journey still
    running or kept for a retry, the checkpoint's records and staged artifacts. None when nothing is known.

    Returns ``{"id", "edit_type", "state", "stage", "prompt", "chosen_keyword", "reason", "error", "stages",
    "timings", "records", "artifacts": {name: key}, "fps", "shape", "dataset", "owner", "updated_at",
    "retries", "webhook"}``.
    """
    try:
        edit_type, _ = layout.parse_sample_id(sid)
    except ValueError:
        return None
    job = _json(store, f"jobs/{sid}.json")
    report = _json(store, layout.report(edit_type, sid))
    if job is None and report is None:
        return None
    base = job or {}
    rep = report or {}
    checkpoint = _json(store, staging_prefix(sid) + "journey.json") or {}
    task = checkpoint.get("task") or {}
    state = base.get("state") or rep.get("status")
    records = rep.get("records") or task.get("records") or {}
    if state == "accepted" and not records:
        doc = _json(store, layout.document(edit_type, sid)) or {}
        records = doc.get("records", {})
    if state in ("accepted",) and rep.get("artifacts"):
        artifacts = rep["artifacts"]
    else:  # running, or failed and kept for a retry: what the journey staged so far
        artifacts = base.get("artifacts") or task.get("refs") or rep.get("artifacts") or {}
    stages = base.get("stages") or rep.get("stages") or []
    return {"id": sid, "edit_type": edit_type, "state": state, "stage": base.get("stage"),
            "prompt": base.get("prompt") or rep.get("prompt") or "", "chosen_keyword": rep.get("chosen_keyword")
            or base.get("chosen_keyword"), "original_scene": rep.get("original_scene") or task.get("original_scene"),
            "reason": base.get("reason") or rep.get("reason") or "", "error": base.get("error"),
            "stages": stages, "timings": {d["name"]: d.get("seconds", 0.0) for d in stages},
            "records": {n: records[n] for n in layout.RECORD_NAMES if n in records},
            "artifacts": {n: k for n, k in artifacts.items() if n in ARTIFACTS},
            "fps": rep.get("fps") or base.get("fps") or task.get("fps") or 16.0,
            "shape": rep.get("shape") or base.get("shape") or task.get("shape"),
            "dataset": base.get("dataset"), "owner": base.get("owner", ""), "updated_at": base.get("updated_at"),
            "retries": base.get("retries", 0), "webhook": public_record(read_record(store, "job", sid))}


def _json(store: ArtifactStore, key: str) -> dict | None:
    try:
        return store.get_json(key)
    except (KeyError, ValueError):
        return None


class _Files:
    """Artifacts as local files for ``FileResponse`` (which answers ``Range`` requests): a LocalStore's own
    file, or an object downloaded once into a temporary cache (keyed by key and version)."""

    def __init__(self, store: ArtifactStore):
        self.store = store
        self.cache = Path(tempfile.gettempdir()) / "sparkle-viewer-files"

    def path(self, key: str) -> Path:
        if isinstance(self.store, LocalStore):
            path = self.store.path(key)
            if not path.is_file():
                raise KeyError(key)
            return path
        version = self.store.version(key)
        if version is None:
            raise KeyError(key)
        dest = self.cache / (hashlib.sha256(f"{key}\0{version}".encode()).hexdigest()[:32] + PurePosixPath(key).suffix)
        if not dest.is_file():
            self.cache.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(dest.suffix + f".{time.monotonic_ns()}.part")
            self.store.get_file(key, tmp)
            tmp.replace(dest)
        return dest


def build_viewer(store: ArtifactStore, scoped: bool = False, index: SampleIndex | None = None,
                 title: str = "Sparkle Factory") -> FastAPI:
    """The viewer app over ``store``, to be mounted at ``/ui`` (the gateway) or served under it (``sparkle
    view``). ``scoped``: a request sees only the samples of its principal (``request.state.principal``, set by
    the gateway's API-key middleware). ``index``: the sample index (default: one in the cache folder)."""
    background = index is None
    index = index or SampleIndex(store)
    files = _Files(store)

    def fresh() -> None:
        """The index, in step: followed from a background thread (started by the first page), or refreshed
        here when the caller gave its own index."""
        if background:
            index.follow()
        else:
            index.refresh()

    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["tojson_pretty"] = dumps
    templates.env.globals["ARTIFACTS"] = ARTIFACTS
    app = FastAPI(title=f"{title} viewer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.index = index
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def owner(request: Request) -> str | None:
        return getattr(request.state, "principal", "") if scoped else None

    def filters(theme: str | None, state: str | None, min_score: float | None, max_score: float | None,
                refused: str | None, dataset: str | None, q: str | None) -> Filters:
        if theme and theme not in layout.EDIT_TYPES:
            raise HTTPException(422, f"unknown theme {theme!r}; one of {', '.join(layout.EDIT_TYPES)}")
        if state and state not in STATES:
            raise HTTPException(422, f"unknown state {state!r}; one of {', '.join(STATES)}")
        return Filters(theme or None, state or None, min_score, max_score, refused or None, dataset or None,
                       (q or "").strip() or None)

    def detail_or_404(request: Request, sid: str) -> dict:
        detail = sample_detail(store, sid)
        if detail is None or (scoped and detail["owner"] != owner(request)):
            raise HTTPException(404, f"no sample {sid!r}")
        return detail

    async def listing(request: Request, theme, state, min_score, max_score, refused, dataset, q, page) -> tuple:
        f = filters(theme, state, min_score, max_score, refused, dataset, q)
        await asyncio.to_thread(fresh)
        return f, await asyncio.to_thread(index.page, f, page, PAGE_SIZE, owner(request))

    @app.get("/", response_class=HTMLResponse)
    async def samples_page(request: Request, theme: str | None = None, state: str | None = None,
                           min_score: Score = None, max_score: Score = None, refused: str | None = None,
                           dataset: str | None = None, q: str | None = None,
                           page: Annotated[int, Query(ge=1)] = 1):
        """The list of samples (HTML), filtered and paged."""
        f, result = await listing(request, theme, state, min_score, max_score, refused, dataset, q, page)
        who = owner(request)
        params = {k: v for k, v in request.query_params.items() if k != "page" and v != ""}
        return templates.TemplateResponse(request, "list.html", {
            "title": title, "result": result, "f": f, "params": params, "themes": layout.EDIT_TYPES,
            "states": STATES, "refused_stages": sorted(await asyncio.to_thread(index.counts, "refused_stage", who)),
            "state_counts": await asyncio.to_thread(index.counts, "state", who),
            "refresh_s": index.last_refresh_s})

    @app.get("/api/samples")
    async def samples_json(request: Request, theme: str | None = None, state: str | None = None,
                           min_score: Score = None, max_score: Score = None, refused: str | None = None,
                           dataset: str | None = None, q: str | None = None,
                           page: Annotated[int, Query(ge=1)] = 1):
        """The list of samples as JSON: ``{"total", "page", "pages", "size", "samples": [...]}``."""
        return (await listing(request, theme, state, min_score, max_score, refused, dataset, q, page))[1]

    @app.get("/funnel", response_class=HTMLResponse)
    async def funnel_page(request: Request, theme: str | None = None, state: str | None = None,
                          min_score: Score = None, max_score: Score = None, refused: str | None = None,
                          dataset: str | None = None, q: str | None = None):
        """The stage funnel (samples in and out of every stage) of the filtered samples, as an SVG bar chart."""
        f = filters(theme, state, min_score, max_score, refused, dataset, q)
        await asyncio.to_thread(fresh)
        stages = await asyncio.to_thread(index.funnel, f, owner(request))
        params = {k: v for k, v in request.query_params.items() if v != ""}
        return templates.TemplateResponse(request, "funnel.html", {
            "title": title, "stages": stages, "f": f, "params": params, "themes": layout.EDIT_TYPES,
            "states": STATES, "top": max([s["in"] for s in stages] or [1]),
            "state_counts": await asyncio.to_thread(index.counts, "state", owner(request))})

    @app.get("/samples/{sid}.json")
    async def sample_json(request: Request, sid: str):
        """One sample as JSON (see :func:`sample_detail`)."""
        return _public(await asyncio.to_thread(detail_or_404, request, sid))

    @app.get("/samples/{sid}", response_class=HTMLResponse)
    async def sample_page(request: Request, sid: str):
        """One sample's page."""
        detail = await asyncio.to_thread(detail_or_404, request, sid)
        return templates.TemplateResponse(request, "sample.html", {
            "title": title, "s": detail, "terminal": detail["state"] in TERMINAL,
            "detail_json": json.dumps(_public(detail), default=str).replace("</", "<\\/")})

    @app.get("/samples/{sid}/files/{name}")
    async def sample_file(request: Request, sid: str, name: str):
        """An artifact of the sample (``name``: one of :data:`ARTIFACTS`), with ``Range`` support."""
        detail = await asyncio.to_thread(detail_or_404, request, sid)
        key = detail["artifacts"].get(name)
        if key is None:
            raise HTTPException(404, f"sample {sid} has no {name} (yet)")
        try:
            path = await asyncio.to_thread(files.path, key)
        except KeyError:
            raise HTTPException(404, f"sample {sid}: {name} is gone from the store") from None
        media = {".mp4": "video/mp4", ".png": "image/png", ".npz": "application/octet-stream"}
        return FileResponse(path, media_type=media.get(path.suffix, "application/octet-stream"),
                            headers={"Cache-Control": "no-cache"})

    @app.get("/samples/{sid}/mask.bin")
    async def sample_mask(request: Request, sid: str):
        """The BAIT mask's packed bits as the ``.npz`` stores them (``np.packbits`` of the flattened ``(T, H, W)``
        bool array, big-endian bit order), gzip-compressed; ``X-Mask-Shape: T,H,W``."""
        detail = await asyncio.to_thread(detail_or_404, request, sid)
        key = detail["artifacts"].get("mask")
        if key is None:
            raise HTTPException(404, f"sample {sid} has no mask (yet)")

        def read() -> tuple[bytes, tuple[int, int, int]]:
            with np.load(io.BytesIO(store.get_bytes(key))) as z:
                return z["mask"].tobytes(), tuple(int(v) for v in z["shape"])

        try:
            bits, shape = await asyncio.to_thread(read)
        except KeyError:
            raise HTTPException(404, f"sample {sid}: the mask is gone from the store") from None
        headers = {"X-Mask-Shape": ",".join(map(str, shape)), "Cache-Control": "no-cache"}
        if "gzip" in request.headers.get("accept-encoding", ""):
            bits = await asyncio.to_thread(gzip.compress, bits, 6)
            headers["Content-Encoding"] = "gzip"
        return Response(bits, media_type="application/octet-stream", headers=headers)

    async def existing(request: Request, sid: str) -> dict:
        """The sample, looked up before a stream starts (a 404 after would be a broken stream)."""
        return await asyncio.to_thread(detail_or_404, request, sid)

    @app.get("/samples/{sid}/events", response_class=EventSourceResponse)
    async def sample_events(request: Request, sid: str, poll_s: Annotated[float, Query(ge=0.2, le=30)] = 1.0,
                            detail: dict = Depends(existing)):
        """Server-sent events: the sample (as ``/ui/samples/{id}.json``) each time it changes, until it is final."""
        last = None
        while True:
            mark = (detail["state"], detail["stage"], detail["updated_at"], len(detail["stages"]),
                    tuple(sorted(detail["artifacts"])))
            if mark != last:
                last = mark
                yield _public(detail)
            if detail["state"] in TERMINAL or await request.is_disconnected():
                return
            await asyncio.sleep(poll_s)
            detail = await asyncio.to_thread(detail_or_404, request, sid)

    return app


def _public(detail: dict) -> dict:
    return {k: v for k, v in detail.items() if k != "owner"}


def serve_folder(out: Path, host: str = "127.0.0.1", port: int = 8090) -> None:
    """``sparkle view OUT``: the viewer over the output folder ``OUT`` (a LocalStore), under uvicorn."""
    import uvicorn

    root = FastAPI(title="Sparkle Factory viewer", docs_url=None, redoc_url=None, openapi_url=None)
    root.mount("/ui", build_viewer(LocalStore(out), title=f"Sparkle Factory: {Path(out).resolve().name}"))

    @root.get("/", include_in_schema=False)
    async def home():
        return RedirectResponse("/ui/")

    uvicorn.run(root, host=host, port=port, log_level="warning")
