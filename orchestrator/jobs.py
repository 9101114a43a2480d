"""Jobs and datasets of the distributed run: submission, state, cancellation, bulk windows.

Everything here lives in the artifact store, next to the dataset it builds, so that any process (gateway,
``sparkle enqueue``, workers) sees the same state and a restarted one carries on:

- ``staging/{id}/journey.json``  the journey's checkpoint: the :class:`SampleTask` after its last finished
  stage, the pipeline config, the next stage and whether that stage's message was sent. Removed with the
  staging area when the journey ends.
- ``jobs/{id}.json``             what ``GET /v1/jobs/{id}`` answers: state, current stage, per-stage decisions
  (timings in seconds, gate scores), error. A job id is the sample id (``Sparkle_{edit_type}_{index:06d}``).
- ``jobs/{id}.cancel``           a cancellation request; the journey stops at its next stage boundary.
- ``jobs/ids/{edit_type}.json``  the next free sample index of a theme (allocation under the store's lock).
- ``jobs/idempotency/{sha}.json`` ``Idempotency-Key`` -> job id.
- ``datasets/{id}/dataset.json``, ``samples/{chunk}.jsonl``, ``state.json``: a bulk run (manifest entries with
  their sample ids, the cursor, the samples in flight, counts and the stage funnel).

States: ``queued`` -> ``running`` -> ``accepted`` | ``rejected`` (a stage or gate refused) | ``failed`` (a
terminal error, with the stage and reason) | ``cancelled``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sparkle import layout
from sparkle.config import PipelineConfig
from sparkle.errors import InputError, SparkleError
from sparkle.funnel import funnel_add, funnel_result
from sparkle.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from sparkle.store import ArtifactStore, staging_prefix

from .local import MAX_PROMPT_CHARS, existing_indices, default_keyword, validate_inputs
from .pipeline import SampleTask, summary
from .routing import CPU_QUEUE

STAGE_TASK = "sparkle.stage"
TERMINAL = frozenset({"accepted", "rejected", "failed", "cancelled"})
FIRST_STAGE = "ingest"
CHUNK = 1000  # manifest entries per samples/{chunk}.jsonl file


class JobFinished(SparkleError):
    """The job already reached a terminal state (cancelling it is a 409)."""


def job_key(sid: str) -> str:
    return f"jobs/{sid}.json"


def cancel_key(sid: str) -> str:
    return f"jobs/{sid}.cancel"


def checkpoint_key(sid: str) -> str:
    return f"{staging_prefix(sid)}journey.json"


# --- the journey's checkpoint ----------------------------------------------------------------------------

class Checkpoint(BaseModel):
    """The journey between two stage messages (``staging/{id}/journey.json``)."""

    task: SampleTask
    config: dict
    next: str = Field(description="the stage to run next, or 'finish' (publish or report)")
    sent: bool = Field(False, description="the message for `next` was handed to the broker")
    submitted_at: float
    dataset: str | None = None


def load_checkpoint(store: ArtifactStore, sid: str) -> Checkpoint | None:
    """The checkpoint of ``sid``, or None once its journey is over (or before it was submitted)."""
    key = checkpoint_key(sid)
    if not store.exists(key):
        return None
    return Checkpoint.model_validate(store.get_json(key))


def save_checkpoint(store: ArtifactStore, cp: Checkpoint) -> None:
    store.put_json(checkpoint_key(cp.task.id), cp.model_dump(mode="json"))


# --- job documents -----------------------------------------------------------------------------------------

def write_job(store: ArtifactStore, cp: Checkpoint, state: str, stage: str | None) -> dict:
    """Write ``jobs/{id}.json`` from the journey's checkpoint and return it.

    ``stages``: the decisions so far (``seconds`` per stage, gate ``scores``); ``error``: ``{stage, reason}``
    of a failed or cancelled job.
    """
    task = cp.task
    doc = {"id": task.id, "edit_type": task.edit_type, "state": state, "stage": stage, "prompt": task.prompt,
           "chosen_keyword": task.chosen_keyword, "dataset": cp.dataset, "submitted_at": cp.submitted_at,
           "updated_at": time.time(), "reason": task.reason,
           "error": ({"stage": task.failed_stage, "reason": task.reason}
                     if state in ("failed", "cancelled") else None),
           "stages": [d.model_dump() for d in task.decisions],
           "timings": {d.name: d.seconds for d in task.decisions}}
    store.put_json(job_key(task.id), doc)
    return doc


def read_job(store: ArtifactStore, sid: str) -> dict:
    """``jobs/{id}.json``. Raises KeyError for an unknown job."""
    key = job_key(sid)
    if "/" in sid or not store.exists(key):
        raise KeyError(sid)
    return store.get_json(key)


def request_cancel(store: ArtifactStore, sid: str) -> dict:
    """Ask the journey of ``sid`` to stop at its next stage boundary; returns the job document.

    Raises KeyError (unknown job) or JobFinished (already terminal: nothing to cancel).
    """
    doc = read_job(store, sid)
    if doc["state"] in TERMINAL:
        raise JobFinished(f"job {sid} is already {doc['state']}")
    store.put_json(cancel_key(sid), {"id": sid, "requested_at": time.time()})
    return {**doc, "cancel_requested": True}


def cancel_requested(store: ArtifactStore, sid: str) -> bool:
    return store.exists(cancel_key(sid))


def artifact_keys(store: ArtifactStore, sid: str) -> dict[str, str]:
    """Name -> key of every artifact of a finished job: the published layout files of an accepted sample,
    plus its report (``report``). Raises KeyError for an unknown job or one without a report yet."""
    doc = read_job(store, sid)
    report_key = layout.report(doc["edit_type"], sid)
    if not store.exists(report_key):
        raise KeyError(sid)
    report = store.get_json(report_key)
    return {**report.get("artifacts", {}), "report": report_key}


# --- sample ids --------------------------------------------------------------------------------------------

def allocate_ids(store: ArtifactStore, edit_type: str, n: int) -> int:
    """Reserve ``n`` consecutive sample indices of ``edit_type``; returns the first.

    The counter ``jobs/ids/{edit_type}.json`` only grows; it starts above every index already in the store
    (published, reported or staged by the embedded default), so both kinds of runs share one id space.
    """
    key = f"jobs/ids/{edit_type}.json"
    with store.lock(f"sample-ids-{edit_type}"):
        taken = existing_indices(store, edit_type)
        first = max(store.get_json(key)["next"] if store.exists(key) else 0, max(taken) + 1 if taken else 0)
        store.put_json(key, {"next": first + n})
    return first


# --- submission ------------------------------------------------------------------------------------------

def start_journey(celery_app, store: ArtifactStore, task: SampleTask, config: PipelineConfig,
                  dataset: str | None = None) -> dict:
    """Write the checkpoint and the ``queued`` job document, then send the first stage's message.

    The source (and background) must already be in the store at ``task.source_key``. If the broker refuses
    the message, what was written is removed and the error propagates (nothing half-submitted stays).
    """
    cp = Checkpoint(task=task, config=config.model_dump(mode="json"), next=FIRST_STAGE, submitted_at=time.time(),
                    dataset=dataset)
    save_checkpoint(store, cp)
    doc = write_job(store, cp, "queued", None)
    try:
        celery_app.send_task(STAGE_TASK, args=[task.id, FIRST_STAGE], queue=CPU_QUEUE, ignore_result=True)
    except Exception:
        store.delete_prefix(staging_prefix(task.id))
        store.delete_prefix(job_key(task.id))
        raise
    cp.sent = True
    save_checkpoint(store, cp)
    return doc


def new_task(sid: str, edit_type: str, prompt: str | None, chosen_keyword: str | None, source_key: str,
             background_key: str | None, force: bool, gates: bool) -> SampleTask:
    """The :class:`SampleTask` of a submission (``chosen_keyword`` derived as the embedded default does)."""
    if edit_type == "openve3m":
        chosen_keyword = None
    elif prompt and not chosen_keyword:
        chosen_keyword = default_keyword(prompt)
    return SampleTask(id=sid, edit_type=edit_type, prompt=prompt or "", chosen_keyword=chosen_keyword,
                      source_key=source_key, background_key=background_key, force=force, enforce_gates=gates)


def submit_files(celery_app, store: ArtifactStore, video: Path, prompt: str | None, edit_type: str = "location",
                 chosen_keyword: str | None = None, background: Path | None = None, force: bool = False,
                 gates: bool = True, config: PipelineConfig | None = None, sample_id: str | None = None,
                 dataset: str | None = None, video_name: str | None = None) -> dict:
    """Validate local files, upload them to ``staging/{id}/inputs/`` and start the journey; the job document.

    ``sample_id``: given by a dataset (deterministic); else the next free index of ``edit_type``.
    ``video_name``: the original file name (for its suffix) when ``video`` is a temporary file.
    Raises InputError (see :func:`~sparkle.orchestrator.local.validate_inputs`) before anything is written.
    """
    prompt = validate_inputs(video, prompt, edit_type, background)
    sid = sample_id or layout.sample_id(edit_type, allocate_ids(store, edit_type, 1))
    suffix = PurePosixPath(video_name or video.name).suffix.lower()
    source_key = store.put_file(f"{staging_prefix(sid)}inputs/source{suffix if suffix in VIDEO_SUFFIXES else '.mp4'}",
                                video)
    background_key = None
    if background is not None:
        background_key = store.put_file(f"{staging_prefix(sid)}inputs/background{background.suffix.lower()}",
                                        background)
    task = new_task(sid, edit_type, prompt, chosen_keyword, source_key, background_key, force, gates)
    try:
        return start_journey(celery_app, store, task, config or PipelineConfig(), dataset)
    except Exception:
        store.delete_prefix(staging_prefix(sid))
        raise


def resume_journey(celery_app, store: ArtifactStore, sid: str) -> bool:
    """Send the message of the journey's next stage again (after a crash of any component); True if the
    journey was still there to resume. A duplicate message is harmless: the stage worker runs a stage only
    while holding the sample's lease and only if the checkpoint names it next."""
    cp = load_checkpoint(store, sid)
    if cp is None:
        return False
    celery_app.send_task(STAGE_TASK, args=[sid, cp.next], queue=CPU_QUEUE, ignore_result=True)
    return True


# --- idempotent POSTs --------------------------------------------------------------------------------------

def idempotency_key(key: str, principal: str = "") -> str:
    return "jobs/idempotency/" + hashlib.sha256(f"{principal}\0{key}".encode()).hexdigest()[:32] + ".json"


# --- datasets (bulk generation) ----------------------------------------------------------------------------

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
    chosen_keyword: str | None = None
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


def parse_manifest(text: str, fmt: str = "jsonl") -> list[ManifestEntry]:
    """Entries of a manifest (``jsonl``: one object per line; ``csv``: a header row with the field names).

    Raises InputError listing the first 20 bad lines (1-based) and why.
    """
    rows: list[tuple[int, dict]] = []
    problems: list[str] = []
    if fmt == "csv":
        for n, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
            rows.append((n, {k: v for k, v in row.items() if v not in (None, "")}))
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"line {n}: not JSON ({exc.msg})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"line {n}: expected a JSON object")
                continue
            rows.append((n, obj))
    entries = []
    for n, obj in rows:
        try:
            entries.append(ManifestEntry.model_validate(obj))
        except ValidationError as exc:
            why = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())
            problems.append(f"line {n}: {why}")
    if not problems and not entries:
        problems.append("the manifest has no entries")
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise InputError("bad manifest: " + "; ".join(problems[:20]) + more)
    return entries


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


def check_entries(entries: list[ManifestEntry], root: Path | None, store: ArtifactStore) -> None:
    """Check every entry's files before anything is written. Raises InputError listing the first 20 problems
    (1-based entry numbers)."""
    problems = []
    for n, e in enumerate(entries, start=1):
        try:
            if (e.video is None) == (e.video_key is None):
                raise InputError("give exactly one of video (a path) and video_key (a store key)")
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
        except (InputError, ValueError) as exc:
            problems.append(f"entry {n}: {exc}")
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise InputError("bad manifest: " + "; ".join(problems[:20]) + more)


def _dataset_prefix(did: str) -> str:
    if not did or "/" in did or set(did) == {"."}:
        raise KeyError(did)
    return f"datasets/{did}/"


def create_dataset(store: ArtifactStore, entries: list[ManifestEntry], root: Path | None,
                   config: PipelineConfig | None = None, window: int = 64, name: str | None = None) -> dict:
    """Register a bulk run and give every entry its sample id; returns ``dataset.json``.

    Deterministic: the dataset id is the SHA-256 (16 hex digits) of the entries, the root and the config, so
    registering the same manifest again (after a crash of anything) returns the same dataset and ids, and
    no sample is added twice. Raises InputError (see :func:`check_entries`).
    """
    config = config or PipelineConfig()
    body = json.dumps({"entries": [e.model_dump() for e in entries], "root": str(root.resolve()) if root else None,
                       "config": config.model_dump(mode="json")}, sort_keys=True)
    did = name or hashlib.sha256(body.encode()).hexdigest()[:16]
    try:
        prefix = _dataset_prefix(did)
    except KeyError:
        raise InputError(f"invalid dataset name {did!r}") from None
    with store.lock(f"dataset-{did}"):
        if store.exists(prefix + "dataset.json"):
            existing = store.get_json(prefix + "dataset.json")
            if existing["sha256"] != hashlib.sha256(body.encode()).hexdigest():
                raise InputError(f"dataset {did!r} already exists with another manifest")
            return existing
        check_entries(entries, root, store)
        counts: dict[str, int] = {}
        for e in entries:
            counts[e.theme] = counts.get(e.theme, 0) + 1
        next_index = {et: allocate_ids(store, et, n) for et, n in counts.items()}
        lines = []
        for e in entries:
            sid = layout.sample_id(e.theme, next_index[e.theme])
            next_index[e.theme] += 1
            lines.append(json.dumps({"id": sid, **e.model_dump(exclude_none=True)}))
        for c in range(0, len(lines), CHUNK):
            store.put_bytes(f"{prefix}samples/{c // CHUNK:06d}.jsonl", ("\n".join(lines[c:c + CHUNK]) + "\n").encode())
        store.put_json(prefix + "state.json", {"cursor": 0, "in_flight": [], "counts": {}, "funnel": {},
                                               "done": False, "updated_at": time.time()})
        doc = {"id": did, "sha256": hashlib.sha256(body.encode()).hexdigest(), "total": len(entries),
               "by_edit_type": counts, "root": str(root.resolve()) if root else None,
               "config": config.model_dump(mode="json"), "window": window, "created_at": time.time()}
        store.put_json(prefix + "dataset.json", doc)  # last: its presence means the dataset is complete
    return doc


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
        cache[chunk] = store.get_bytes(f"{_dataset_prefix(did)}samples/{chunk:06d}.jsonl").decode().splitlines()
    return json.loads(cache[chunk][i % CHUNK])


def _submit_entry(celery_app, store: ArtifactStore, ds: dict, row: dict) -> None:
    e = ManifestEntry.model_validate({k: v for k, v in row.items() if k != "id"})
    root = Path(ds["root"]) if ds["root"] else None
    config = PipelineConfig.model_validate(ds["config"])
    if e.video is not None:
        background = resolve_path(root, e.background, "background") if e.background else None
        try:
            submit_files(celery_app, store, resolve_path(root, e.video, "video"), e.prompt, e.theme, e.chosen_keyword,
                         background, e.force, e.gates, config, sample_id=row["id"], dataset=ds["id"])
        except InputError as exc:  # a file that changed since registration: the sample fails, the run goes on
            _record_failed_submission(store, row["id"], e, ds["id"], str(exc))
        return
    task = new_task(row["id"], e.theme, e.prompt, e.chosen_keyword, e.video_key, e.background_key, e.force, e.gates)
    start_journey(celery_app, store, task, config, ds["id"])


def _record_failed_submission(store: ArtifactStore, sid: str, e: ManifestEntry, did: str, reason: str) -> None:
    task = new_task(sid, e.theme, e.prompt, e.chosen_keyword, e.video or "", None, e.force, e.gates)
    task.status, task.failed_stage, task.reason = "failed", "submit", f"submit: {reason}"
    cp = Checkpoint(task=task, config={}, next="finish", submitted_at=time.time(), dataset=did)
    store.put_json(layout.report(e.theme, sid), summary(task))
    write_job(store, cp, "failed", "submit")


def dataset_tick(celery_app, store: ArtifactStore, did: str, window: int | None = None,
                 resume: bool = False) -> dict:
    """One step of a bulk run: collect finished samples, then submit entries until ``window`` are in flight.

    Idempotent and safe to run from several processes (the dataset's lock): a submission interrupted by a
    crash is found by its job document next time and never submitted twice. ``resume``: first re-send the
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
                job = read_job(store, sid)
            except KeyError:
                job = {"state": "unknown"}
            if job["state"] in TERMINAL:
                counts[job["state"]] = counts.get(job["state"], 0) + 1
                report_key = layout.report(job["edit_type"], sid)
                if store.exists(report_key):
                    funnel_add(state["funnel"], store.get_json(report_key))
            else:
                still.append(sid)
                if resume and job["state"] != "unknown":
                    resume_journey(celery_app, store, sid)
        state["in_flight"] = still
        cache: dict = {}
        while len(state["in_flight"]) < window and state["cursor"] < ds["total"]:
            row = _entry(store, did, state["cursor"], cache)
            if not store.exists(job_key(row["id"])):  # not submitted before a crash
                _submit_entry(celery_app, store, ds, row)
            state["in_flight"].append(row["id"])
            state["cursor"] += 1
            store.put_json(prefix + "state.json", {**state, "updated_at": time.time()})
        state["done"] = state["cursor"] >= ds["total"] and not state["in_flight"]
        state["updated_at"] = time.time()
        store.put_json(prefix + "state.json", state)
    return state


def dataset_status(store: ArtifactStore, did: str) -> dict:
    """``GET /v1/datasets/{id}``: totals, counts by state, the samples in flight and the stage funnel of the
    finished samples. Raises KeyError for an unknown dataset."""
    ds = read_dataset(store, did)
    state = store.get_json(_dataset_prefix(did) + "state.json")
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
        lines = store.get_bytes(f"{_dataset_prefix(did)}samples/{c // CHUNK:06d}.jsonl").decode().splitlines()
        ids += [json.loads(line)["id"] for line in lines if line.strip()]
    return ids
