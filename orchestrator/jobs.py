"""Jobs of the distributed run, as stored: job documents, checkpoints, cancellation, sample ids.

Everything here lives in the artifact store, next to the dataset it builds, so that any process (gateway,
``sparkle enqueue``, workers) sees the same state and a restarted one carries on:

- ``staging/{id}/journey.json``  the journey's checkpoint: the :class:`SampleTask` after its last finished
  stage, the pipeline config, the next stage and whether that stage's message was sent. Removed with the
  staging area when the journey ends. (The state machine that moves it on: ``journey.py``.)
- ``jobs/{id}.json``             what ``GET /v1/jobs/{id}`` answers: state, current stage, per-stage decisions
  (timings in seconds, gate scores), error. A job id is the sample id (``Sparkle_{edit_type}_{index:06d}``).
- ``jobs/{id}.cancel``           a cancellation request; the journey stops at its next stage boundary.
- ``jobs/ids/{edit_type}.json``  the next free sample index of a theme (allocation under the store's lock).
- ``jobs/idempotency/{sha}.json`` ``Idempotency-Key`` -> job id.

States: ``queued`` -> ``running`` -> ``accepted`` | ``rejected`` (a stage or gate refused) | ``failed`` (a
terminal error, with the stage and reason) | ``cancelled``.
"""

from __future__ import annotations

import hashlib
import time

from pydantic import BaseModel, Field

from sparkle import layout
from sparkle.errors import SparkleError
from sparkle.store import ArtifactStore, staging_prefix

from .local import default_keyword
from .pipeline import SampleTask

TERMINAL = frozenset({"accepted", "rejected", "failed", "cancelled"})


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
    owner: str = Field("", description="the principal (API key hash) that submitted it; '' on an open gateway")
    callback_url: str | None = Field(None, description="webhook: POSTed the job document on each terminal state")
    retries: int = Field(0, description="re-drives of the journey after a terminal failure (`sparkle retry`)")
    failed: bool = Field(False, description="the journey failed at `next` and waits in the dead-letter list: no "
                         "message moves it until `sparkle retry` clears this")


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
    of a failed or cancelled job; ``artifacts``: name -> store key of what the journey made so far (staging keys
    until it is published); ``retries``: re-drives after a failure; ``callback_url``: the webhook, if any.
    """
    task = cp.task
    doc = {"id": task.id, "edit_type": task.edit_type, "state": state, "stage": stage, "prompt": task.prompt,
           "chosen_keyword": task.chosen_keyword, "dataset": cp.dataset, "owner": cp.owner,
           "submitted_at": cp.submitted_at,
           "updated_at": time.time(), "reason": task.reason,
           "error": ({"stage": task.failed_stage, "reason": task.reason}
                     if state in ("failed", "cancelled") else None),
           "stages": [d.model_dump() for d in task.decisions],
           "timings": {d.name: d.seconds for d in task.decisions},
           "artifacts": dict(task.refs), "fps": task.fps, "shape": list(task.shape) if task.shape else None,
           "retries": cp.retries, "callback_url": cp.callback_url}
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


# --- submissions ---------------------------------------------------------------------------------------

def new_task(sid: str, edit_type: str, prompt: str | None, chosen_keyword: str | None, source_key: str,
             background_key: str | None, force: bool, gates: bool) -> SampleTask:
    """The :class:`SampleTask` of a submission (``chosen_keyword`` derived as the embedded default does)."""
    if edit_type == "openve3m":
        chosen_keyword = None
    elif prompt and not chosen_keyword:
        chosen_keyword = default_keyword(prompt)
    return SampleTask(id=sid, edit_type=edit_type, prompt=prompt or "", chosen_keyword=chosen_keyword,
                      source_key=source_key, background_key=background_key, force=force, enforce_gates=gates)


# --- idempotent POSTs --------------------------------------------------------------------------------------

def idempotency_key(key: str, principal: str = "") -> str:
    return "jobs/idempotency/" + hashlib.sha256(f"{principal}\0{key}".encode()).hexdigest()[:32] + ".json"


