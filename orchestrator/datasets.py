"""Bulk runs (datasets): a manifest of source clips, deterministic sample ids, a bounded window in flight.

A dataset lives in the artifact store under ``datasets/{id}/``: ``dataset.json`` (what was registered),
``samples/{chunk}.jsonl`` (the manifest entries with their sample ids) and ``state.json`` (the cursor, the
samples in flight, counts by state and the stage funnel). It is driven by :func:`dataset_tick`, from
``sparkle enqueue`` or from the ``sparkle.dataset_tick`` task after ``POST /v1/datasets``; each sample is one
journey (``journey.py``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sparkle import layout
from sparkle.backends import MAX_KEYWORD_CHARS
from sparkle.config import PipelineConfig
from sparkle.errors import InputError
from sparkle.funnel import funnel_add, funnel_result
from sparkle.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from sparkle.queues import CPU_QUEUE
from sparkle.store import ArtifactStore, jsonl_lines, staging_prefix

from . import failures, jobs, journey, liveness, webhooks
from .celery_app import SparkleTask, app, transient_types
from .local import MAX_PROMPT_CHARS, allocate_ids
from .pipeline import summary

log = logging.getLogger("sparkle.datasets")

CHUNK = 1000  # manifest entries per samples/{chunk}.jsonl file


class ManifestEntry(BaseModel):
    """One source clip of a bulk run (a JSONL object or a CSV row of the manifest).

    ``video``: a path relative to the manifest root (it must not leave it) or, with ``video_key``, a key in the
    artifact store. ``prompt``: the instruction (None: written from the theme catalogue). ``theme``: the
    ``edit_type``.
    """

    model_config = ConfigDict(extra="forbid")

    video: str | None = None
    video_key: str | None = None
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    theme: str = "location"
    chosen_keyword: str | None = Field(None, max_length=MAX_KEYWORD_CHARS)
    background: str | None = None
    background_key: str | None = None
    force: bool = False
    gates: bool = True

    @field_validator("theme")
    @classmethod
    def _theme(cls, v: str) -> str:
        return layout.check_edit_type(v)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("the prompt is empty (leave the field out to have one written from the theme)")
        return v.strip() if v else v


def iter_manifest(lines: Iterable[str], fmt: str = "jsonl") -> Iterator[tuple[int, ManifestEntry | str]]:
    """``(line number, entry)`` for every entry of a manifest given as lines (``jsonl``: one object per line,
    split at ``\\n`` only; ``csv``: a header row with the field names, quoted newlines allowed), or
    ``(line number, problem)`` for a bad one. Streams: one line in memory at a time."""
    if fmt == "csv":
        reader = csv.DictReader(lines)
        for row in reader:
            yield from _validated_entry(reader.line_num, {k: v for k, v in row.items() if v not in (None, "")})
        return
    for n, line in enumerate(lines, start=1):
        line = line.removesuffix("\n").removesuffix("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield n, f"line {n}: not JSON ({exc.msg})"
            continue
        if not isinstance(obj, dict):
            yield n, f"line {n}: expected a JSON object"
            continue
        yield from _validated_entry(n, obj)


def _validated_entry(n: int, obj: dict) -> Iterator[tuple[int, ManifestEntry | str]]:
    try:
        yield n, ManifestEntry.model_validate(obj)
    except ValidationError as exc:
        why = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())
        yield n, f"line {n}: {why}"


class _Problems:
    """What is wrong with a manifest: counts every problem, keeps the first 20 for the message."""

    def __init__(self):
        self.first: list[str] = []
        self.count = 0

    def add(self, problem: str) -> None:
        self.count += 1
        if len(self.first) < 20:
            self.first.append(problem)

    def raise_any(self) -> None:
        """Raises InputError listing the first 20 problems, if there is one."""
        if self.count:
            more = f" (and {self.count - 20} more)" if self.count > 20 else ""
            raise InputError("bad manifest: " + "; ".join(self.first) + more)


def _entries(lines: Iterable[str], fmt: str) -> Iterator[ManifestEntry]:
    """The entries of a manifest's lines, streamed; once a bad line is met, the rest is only checked. Raises
    InputError at the end listing the first 20 bad lines (1-based) and why, or when there is no entry."""
    problems = _Problems()
    entries = 0
    for _, item in iter_manifest(lines, fmt):
        if isinstance(item, str):
            problems.add(item)
        elif not problems.count:
            entries += 1
            yield item
    if not problems.count and not entries:
        problems.add("the manifest has no entries")
    problems.raise_any()


def parse_manifest(text: str, fmt: str = "jsonl") -> list[ManifestEntry]:
    """Entries of a manifest held in memory (``jsonl`` or ``csv``, see :func:`iter_manifest`).

    Raises InputError listing the first 20 bad lines (1-based) and why.
    """
    return list(_entries(io.StringIO(text, newline="") if fmt == "csv" else text.split("\n"), fmt))


class ManifestFile:
    """A manifest file as a re-iterable of entries, read line by line on every pass (a million-line manifest
    is never held in memory). A pass that meets bad lines raises InputError listing the first 20, after
    reading the whole file (so nothing is written on a bad manifest)."""

    def __init__(self, path: Path, fmt: str | None = None):
        self.path = Path(path)
        self.fmt = fmt or ("csv" if self.path.suffix.lower() == ".csv" else "jsonl")

    def __iter__(self) -> Iterator[ManifestEntry]:
        # newline="" keeps CSV's quoted newlines; JSONL lines are split at \n only (not at U+2028).
        with open(self.path, encoding="utf-8", newline="") as f:
            yield from _entries(f, self.fmt)


def resolve_path(root: Path | None, relative: str, what: str) -> Path:
    """``root / relative``, refusing absolute paths and paths that leave ``root`` (symlinks resolved).

    Raises InputError (no root configured, escaping path, missing file).
    """
    if root is None:
        raise InputError(f"{what} {relative!r} is a local path, but no manifest root is configured "
                         "(SPARKLE_MANIFEST_ROOT); use a store key instead")
    base = root.resolve()
    path = (base / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(base):
        raise InputError(f"{what} {relative!r} escapes the manifest root {base}")
    if not path.is_file():
        raise InputError(f"{what} {relative!r} not found under {base}")
    return path


PRIVATE_PREFIXES = ("staging/", "jobs/", "datasets/")
"""Store areas a manifest may not name: other jobs' uploads and the run's own state (a client could reach
another client's staged upload by its key)."""


def check_entry(e: ManifestEntry, root: Path | None, store: ArtifactStore) -> None:
    """Check one entry's files. Raises InputError (or ValueError) saying what is wrong."""
    if (e.video is None) == (e.video_key is None):
        raise InputError("give exactly one of video (a path) and video_key (a store key)")
    for field, key in (("video_key", e.video_key), ("background_key", e.background_key)):
        if key is not None and "/".join(PurePosixPath(key).parts).startswith(PRIVATE_PREFIXES):
            raise InputError(f"{field} {key!r} is in the run's private area ({', '.join(PRIVATE_PREFIXES)}); "
                             "upload the file under another prefix")
    if e.video is not None:
        resolve_path(root, e.video, "video")
    elif not store.exists(e.video_key):
        raise InputError(f"video_key {e.video_key!r} is not in the store")
    if e.background is not None and e.background_key is not None:
        raise InputError("give at most one of background and background_key")
    if e.background is not None:
        bg = resolve_path(root, e.background, "background")
        if bg.suffix.lower() not in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
            raise InputError(f"background {e.background!r} is neither an image nor a video")
    if e.background_key is not None and not store.exists(e.background_key):
        raise InputError(f"background_key {e.background_key!r} is not in the store")


def _dataset_prefix(did: str) -> str:
    if not did or "/" in did or set(did) == {"."}:
        raise KeyError(did)
    return f"datasets/{did}/"


def create_dataset(store: ArtifactStore, entries: Iterable[ManifestEntry], root: Path | None,
                   config: PipelineConfig | None = None, window: int = 64, name: str | None = None,
                   owner: str = "", callback_url: str | None = None) -> dict:
    """Register a bulk run and give every entry its sample id; returns ``dataset.json``.

    ``entries``: a re-iterable (a list, or a :class:`ManifestFile` read line by line): it is read twice, once
    to check and hash every entry and once to write them with their ids, ``CHUNK`` lines per
    ``samples/{chunk}.jsonl``; memory holds one chunk, never the manifest.

    Deterministic: the dataset id is the SHA-256 (16 hex digits) of the entries, the root and the config, so
    registering the same manifest again (after a crash of anything) returns the same dataset and ids, and
    no sample is added twice. Resumable: the id allocation is saved (``allocation.json``) before the first
    chunk, so a registration cut short continues where it stopped, with the same ids. Raises InputError
    (bad lines, missing files: see :func:`check_entry`; another manifest under the same ``name``).
    ``owner``: the principal (gateway API key hash) the dataset and its samples belong to; it is part of the
    digest when given, so two clients posting the same manifest get two datasets.
    """
    config = config or PipelineConfig()
    root_text = str(root.resolve()) if root else None
    digest, counts, total = _digest_and_check(entries, root, root_text, config, store)
    if owner:
        digest = hashlib.sha256(f"{digest}\0{owner}".encode()).hexdigest()
    did = name or digest[:16]
    try:
        prefix = _dataset_prefix(did)
    except KeyError:
        raise InputError(f"invalid dataset name {did!r}") from None
    with store.lock(f"dataset-{did}"):
        if store.exists(prefix + "dataset.json"):
            existing = store.get_json(prefix + "dataset.json")
            if existing["sha256"] != digest:
                raise InputError(f"dataset {did!r} already exists with another manifest")
            return existing
        allocation_key = prefix + "allocation.json"
        allocation = store.get_json(allocation_key) if store.exists(allocation_key) else None
        if allocation is None or allocation.get("sha256") != digest:
            first = {et: allocate_ids(store, et, n) for et, n in counts.items()}
            allocation = {"sha256": digest, "first": first}
            store.put_json(allocation_key, allocation)
        next_index = dict(allocation["first"])
        chunk: list[str] = []
        written = 0
        for e in entries:
            sid = layout.sample_id(e.theme, next_index[e.theme])
            next_index[e.theme] += 1
            chunk.append(json.dumps({"id": sid, **e.model_dump(exclude_none=True)}, ensure_ascii=False))
            if len(chunk) == CHUNK:
                _put_chunk(store, prefix, written // CHUNK, chunk)
                written += len(chunk)
                chunk = []
        if chunk:
            _put_chunk(store, prefix, written // CHUNK, chunk)
        store.put_json(prefix + "state.json", {"cursor": 0, "in_flight": [], "counts": {}, "funnel": {},
                                               "done": False, "updated_at": time.time()})
        doc = {"id": did, "sha256": digest, "total": total, "by_edit_type": counts, "root": root_text,
               "config": config.model_dump(mode="json"), "window": window, "created_at": time.time()}
        if owner:
            doc["owner"] = owner
        if callback_url:  # POSTed the dataset's status, signed, when it is done (orchestrator/webhooks.py)
            doc["callback_url"] = callback_url
        store.put_json(prefix + "dataset.json", doc)  # last: its presence means the dataset is complete
    return doc


def _digest_and_check(entries: Iterable[ManifestEntry], root: Path | None, root_text: str | None,
                      config: PipelineConfig, store: ArtifactStore) -> tuple[str, dict[str, int], int]:
    """One streaming pass: SHA-256 of ``json.dumps({"config", "entries", "root"}, sort_keys=True)`` (the
    dataset id of every earlier version), entries per theme, and every entry's files checked. Raises
    InputError listing the first 20 problems."""
    sha = hashlib.sha256()
    sha.update(('{"config": ' + json.dumps(config.model_dump(mode="json"), sort_keys=True) + ', "entries": [').encode())
    counts: dict[str, int] = {}
    problems, total = _Problems(), 0
    for e in entries:
        sha.update(((", " if total else "") + json.dumps(e.model_dump(), sort_keys=True)).encode())
        total += 1
        counts[e.theme] = counts.get(e.theme, 0) + 1
        try:
            check_entry(e, root, store)
        except (InputError, ValueError) as exc:
            problems.add(f"entry {total}: {exc}")
    problems.raise_any()
    if not total:
        raise InputError("bad manifest: the manifest has no entries")
    sha.update(('], "root": ' + json.dumps(root_text) + "}").encode())
    return sha.hexdigest(), counts, total


def _put_chunk(store: ArtifactStore, prefix: str, index: int, lines: list[str]) -> None:
    store.put_bytes(f"{prefix}samples/{index:06d}.jsonl", ("\n".join(lines) + "\n").encode())


def read_dataset(store: ArtifactStore, did: str) -> dict:
    """``dataset.json``. Raises KeyError for an unknown dataset."""
    key = _dataset_prefix(did) + "dataset.json"
    if not store.exists(key):
        raise KeyError(did)
    return store.get_json(key)


def _entry(store: ArtifactStore, did: str, i: int, cache: dict) -> dict:
    chunk = i // CHUNK
    if chunk not in cache:
        cache.clear()
        cache[chunk] = jsonl_lines(store.get_bytes(f"{_dataset_prefix(did)}samples/{chunk:06d}.jsonl").decode())
    return json.loads(cache[chunk][i % CHUNK])


def _submit_entry(celery_app, store: ArtifactStore, ds: dict, row: dict) -> None:
    e = ManifestEntry.model_validate({k: v for k, v in row.items() if k != "id"})
    root = Path(ds["root"]) if ds["root"] else None
    config = PipelineConfig.model_validate(ds["config"])
    if e.video is not None:
        background = resolve_path(root, e.background, "background") if e.background else None
        try:
            journey.submit_files(celery_app, store, resolve_path(root, e.video, "video"), e.prompt, e.theme,
                                 e.chosen_keyword, background, e.force, e.gates, config, sample_id=row["id"],
                                 dataset=ds["id"], owner=ds.get("owner", ""))
        except InputError as exc:  # a file that changed since registration: the sample fails, the run goes on
            _record_failed_submission(store, row["id"], e, ds["id"], str(exc), ds.get("owner", ""))
        return
    task = jobs.new_task(row["id"], e.theme, e.prompt, e.chosen_keyword, e.video_key, e.background_key, e.force, e.gates)
    journey.start_journey(celery_app, store, task, config, ds["id"], ds.get("owner", ""))


def _record_failed_submission(store: ArtifactStore, sid: str, e: ManifestEntry, did: str, reason: str,
                              owner: str = "") -> None:
    task = jobs.new_task(sid, e.theme, e.prompt, e.chosen_keyword, e.video or "", None, e.force, e.gates)
    task.status, task.failed_stage, task.reason = "failed", "submit", f"submit: {reason}"
    cp = jobs.Checkpoint(task=task, config={}, next="finish", submitted_at=time.time(), dataset=did, owner=owner)
    store.put_json(layout.report(e.theme, sid), summary(task))
    jobs.write_job(store, cp, "failed", "submit")
    failures.record_failure(store, cp, "submit", reason, retryable=False)  # listed; nothing kept to re-run


def dataset_tick(celery_app, store: ArtifactStore, did: str, window: int | None = None,
                 resume: bool = False) -> dict:
    """One step of a bulk run: collect finished samples, then submit entries until ``window`` are in flight.

    Idempotent and safe to run from several processes (the dataset's lock): a submission interrupted by a
    crash is found by its job document next time, never submitted twice, and its journey resumed (its first
    stage message may not have been sent). ``resume``: first re-send the
    next-stage message of every sample in flight (after a crash of workers or of the broker; duplicates are
    harmless). Returns ``state.json``: ``cursor``, ``in_flight``, ``counts`` by state, ``funnel`` (a
    :func:`~sparkle.funnel.funnel_add` tally), ``done``.
    """
    prefix = _dataset_prefix(did)
    ds = read_dataset(store, did)
    window = window or ds["window"]
    with store.lock(f"dataset-{did}"):
        state = store.get_json(prefix + "state.json")
        counts: dict[str, int] = state["counts"]
        still = []
        for sid in state["in_flight"]:
            try:
                job = jobs.read_job(store, sid)
            except KeyError:
                job = {"state": "unknown"}
            if job["state"] in jobs.TERMINAL:
                counts[job["state"]] = counts.get(job["state"], 0) + 1
                # A worker killed between the terminal job and dropping the staging area leaves it behind; a
                # failed sample keeps its staging area for a retry (the dead-letter list).
                if job["state"] != "failed":
                    store.delete_prefix(staging_prefix(sid))
                report_key = layout.report(job["edit_type"], sid)
                if store.exists(report_key):
                    funnel_add(state["funnel"], store.get_json(report_key))
            else:
                still.append(sid)
                if resume and job["state"] != "unknown":
                    journey.resume_journey(celery_app, store, sid)
        state["in_flight"] = still
        cache: dict = {}
        while len(state["in_flight"]) < window and state["cursor"] < ds["total"]:
            row = _entry(store, did, state["cursor"], cache)
            if not store.exists(jobs.job_key(row["id"])):  # not submitted before a crash
                _submit_entry(celery_app, store, ds, row)
            else:
                # Submitted by a tick that crashed before recording it: its first message may never have been
                # sent (the checkpoint says so), and no later tick resumes it. A duplicate is harmless.
                journey.resume_journey(celery_app, store, row["id"])
            state["in_flight"].append(row["id"])
            state["cursor"] += 1
            store.put_json(prefix + "state.json", {**state, "updated_at": time.time()})
        was_done = state.get("done", False)
        state["done"] = state["cursor"] >= ds["total"] and not state["in_flight"]
        state["updated_at"] = time.time()
        if state["done"] and not was_done and ds.get("callback_url"):
            # before the state that says so is saved: a crash in between repeats the event (same id), never loses it
            state["completions"] = state.get("completions", 0) + 1
            webhooks.notify(celery_app, store, "dataset", did, ds["callback_url"], ds.get("owner", ""), "done",
                            dataset_status(store, did, ds, state), generation=state["completions"] - 1)
        store.put_json(prefix + "state.json", state)
    return state


def reopen(store: ArtifactStore, did: str, sid: str) -> dict:
    """Put the failed sample ``sid`` back in the window of dataset ``did`` (it is being re-driven by
    ``sparkle retry``): its ``failed`` count and funnel entries are taken back out, and the tick collects it
    again when it ends. Returns ``state.json``."""
    prefix = _dataset_prefix(did)
    with store.lock(f"dataset-{did}"):
        state = store.get_json(prefix + "state.json")
        if sid not in state["in_flight"]:
            state["counts"]["failed"] = state["counts"].get("failed", 0) - 1
            if state["counts"]["failed"] <= 0:
                del state["counts"]["failed"]
            report_key = layout.report(layout.parse_sample_id(sid)[0], sid)
            if store.exists(report_key):
                funnel_add(state["funnel"], store.get_json(report_key), sign=-1)
            state["in_flight"].append(sid)
        state["done"], state["updated_at"] = False, time.time()
        store.put_json(prefix + "state.json", state)
    return state


def follow(celery_app, store: ArtifactStore, did: str, window: int | None = None, poll_s: float = 1.0,
           on_state: Callable[[dict], None] | None = None, sleep: Callable[[float], None] = time.sleep,
           max_backoff_s: float = 30.0) -> dict:
    """Drive a bulk run from this process until it is done (``sparkle enqueue``); returns the final state.

    The first successful tick resumes the samples in flight (``resume``); then a tick every ``poll_s`` s,
    ``on_state(state)`` after each. A transient error (Redis or the store away: a restart, a blip) is waited
    out with back-off from ``poll_s`` up to ``max_backoff_s`` and never ends the run: the tick is idempotent,
    and its lock is released or expires. Other errors propagate.
    """
    from .celery_app import is_transient

    resumed, delay = False, poll_s
    while True:
        try:
            state = dataset_tick(celery_app, store, did, window, resume=not resumed)
        except Exception as exc:  # noqa: BLE001 - only transient ones are waited out
            if not is_transient(exc):
                raise
            log.warning("dataset %s: %s: %s; next tick in %.1f s", did, exc.__class__.__name__, exc, delay)
            sleep(delay)
            delay = min(max_backoff_s, delay * 2)
            continue
        resumed, delay = True, poll_s
        if on_state is not None:
            on_state(state)
        if state["done"]:
            return state
        sleep(poll_s)


def dataset_status(store: ArtifactStore, did: str, ds: dict | None = None, state: dict | None = None) -> dict:
    """``GET /v1/datasets/{id}``: totals, counts by state, the samples in flight and the stage funnel of the
    finished samples (``ds``: its ``dataset.json`` when the caller has read it already). Raises KeyError for an
    unknown dataset."""
    ds = ds or read_dataset(store, did)
    state = state or store.get_json(_dataset_prefix(did) + "state.json")
    finished = sum(state["counts"].values())
    return {"id": did, "total": ds["total"], "submitted": state["cursor"], "finished": finished,
            "in_flight": len(state["in_flight"]), "counts": state["counts"], "done": state["done"],
            "progress": round(finished / ds["total"], 4) if ds["total"] else 1.0,
            "funnel": funnel_result(state["funnel"]), "updated_at": state["updated_at"], "created_at": ds["created_at"]}


def dataset_samples(store: ArtifactStore, did: str) -> list[str]:
    """Every sample id of a dataset, in manifest order."""
    ds = read_dataset(store, did)
    ids = []
    for c in range(0, ds["total"], CHUNK):
        lines = jsonl_lines(store.get_bytes(f"{_dataset_prefix(did)}samples/{c // CHUNK:06d}.jsonl").decode())
        ids += [json.loads(line)["id"] for line in lines if line.strip()]
    return ids


CHAIN_TTL_S = 60.0
"""How long a dataset's tick chain holds its token without ticking; then another driver may start a chain."""
ACTIVE = "sparkle:datasets"
"""Redis set of the datasets driven by the orchestrator workers (until done): the reaper revives their chains."""


def chain_key(did: str) -> str:
    """Redis key of the token of the one tick chain driving dataset ``did``."""
    return f"sparkle:dataset-chain:{did}"


@app.task(name="sparkle.dataset_tick", bind=True, base=SparkleTask, ignore_result=True,
          autoretry_for=transient_types(), max_retries=None, retry_backoff=2, retry_backoff_max=120, retry_jitter=True)
def dataset_tick_task(self: SparkleTask, dataset_id: str, resume: bool = False, every_s: float = 2.0,
                      token: str | None = None) -> dict:
    """Drive a bulk run: one :func:`dataset_tick`, then again in ``every_s`` seconds until the dataset is done.

    One chain per dataset: a tick whose ``token`` is no longer the dataset's (:func:`chain_key`) stops (another
    chain took over after this one went quiet for ``CHAIN_TTL_S``). Broker and store outages are retried
    without end, with exponential back-off (2 s doubling to 120 s) and full jitter."""
    client = liveness.redis_of(self.app)
    key = chain_key(dataset_id)
    ours = token is not None and (client.get(key) or b"").decode() == token
    if token is not None and not ours:
        return {"id": dataset_id, "skipped": "another tick chain drives this dataset"}
    state = dataset_tick(self.app, self.store, dataset_id, resume=resume)
    if state["done"]:
        if ours:
            client.delete(key)
        client.srem(ACTIVE, dataset_id)
    elif ours:
        client.set(key, token, px=int(CHAIN_TTL_S * 1000))
        self.apply_async(args=[dataset_id], kwargs={"every_s": every_s, "token": token}, countdown=every_s,
                         queue=CPU_QUEUE, ignore_result=True)
    return {"id": dataset_id, "done": state["done"], "cursor": state["cursor"]}


def drive(celery_app, dataset_id: str, resume: bool = True) -> bool:
    """Hand dataset ``dataset_id`` to the orchestrator workers: start its tick chain (a ``sparkle.dataset_tick``
    message) unless one is alive (``SET NX`` on :func:`chain_key`); True if this call started one. So a
    dataset POSTed twenty times, or polled by fifty GETs, has one chain."""
    client = liveness.redis_of(celery_app)
    client.sadd(ACTIVE, dataset_id)
    token = uuid.uuid4().hex
    if not client.set(chain_key(dataset_id), token, nx=True, px=int(CHAIN_TTL_S * 1000)):
        return False
    try:
        celery_app.send_task(dataset_tick_task.name, args=[dataset_id],
                             kwargs={"resume": resume, "token": token}, queue=CPU_QUEUE, ignore_result=True)
    except Exception:
        client.delete(chain_key(dataset_id))
        raise
    return True


def revive_chains(celery_app) -> list[str]:
    """The reaper's part for bulk runs: restart the tick chain of every driven dataset whose chain went quiet
    (its message lost with a worker, or to a Redis restart); returns their ids."""
    client = liveness.redis_of(celery_app)
    return [did for did in sorted(m.decode() for m in client.smembers(ACTIVE))
            if drive(celery_app, did, resume=True)]  # SET NX: a live chain is left alone
