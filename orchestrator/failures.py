"""Dead-letter and re-drive: samples that failed (a terminal error: a service's refusal, retries exhausted, an
undecodable input; not a gate's refusal, which is a decision) are kept to be re-run once the cause is fixed.

When a journey fails, :func:`~sparkle.orchestrator.journey.advance` keeps what it had: the checkpoint
(``staging/{id}/journey.json``, the task as it was before the failed stage, with that stage next) and the
staged artifacts of the earlier stages, and writes the dead-letter entry ``jobs/failures/{id}.json`` (stage,
reason, time, dataset, owner). Listed by ``GET /v1/failures`` and ``sparkle failures``.

:func:`retry` re-drives one: under the sample's retry lock it claims the entry (deleting it is the claim, so two
concurrent retries re-run it once: the second finds nothing to retry, a 409), puts a dataset's sample back in its
window, and sends the failed stage's message again: the journey goes on from there, the earlier stages are not
re-run, and the sample is published once (publishing is idempotent).
"""

from __future__ import annotations

import time

from sparkle.errors import SparkleError
from sparkle.store import ArtifactStore

from . import jobs

PREFIX = "jobs/failures/"


class NotRetryable(SparkleError):
    """The job is not in the dead-letter list (never failed, already re-driven) or nothing of it was kept."""


def failure_key(sid: str) -> str:
    return f"{PREFIX}{sid}.json"


def record_failure(store: ArtifactStore, cp: jobs.Checkpoint, stage: str, reason: str, retryable: bool = True) -> dict:
    """Write the dead-letter entry of a failed journey; returns it."""
    entry = {"id": cp.task.id, "edit_type": cp.task.edit_type, "stage": stage, "reason": reason,
             "failed_at": time.time(), "dataset": cp.dataset, "owner": cp.owner, "retries": cp.retries,
             "retryable": retryable}
    store.put_json(failure_key(cp.task.id), entry)
    return entry


def list_failures(store: ArtifactStore, dataset: str | None = None, owner: str | None = None,
                  limit: int = 1000) -> list[dict]:
    """Dead-letter entries, oldest failure first: ``{"id", "edit_type", "stage", "reason", "failed_at",
    "dataset", "retries", "retryable"}`` (``owner``: only that principal's; ``dataset``: only that dataset's)."""
    out = []
    for key in store.list_keys(PREFIX):
        try:
            entry = store.get_json(key)
        except (KeyError, ValueError):  # re-driven meanwhile
            continue
        if (dataset is None or entry.get("dataset") == dataset) and (owner is None or entry.get("owner", "") == owner):
            out.append(entry)
    out.sort(key=lambda e: (e["failed_at"], e["id"]))
    return out[:limit]


def retry(celery_app, store: ArtifactStore, sid: str, owner: str | None = None) -> dict:
    """Re-run the failed journey ``sid`` from its failed stage; returns the job document (``queued``).

    Raises NotRetryable (not in the dead-letter list, or its checkpoint is gone), KeyError (another owner's),
    and the broker's errors (then nothing changed: the entry stays for a later retry).
    """
    from . import datasets, journey

    with store.lock(f"retry-{sid}"):
        key = failure_key(sid)
        if not store.exists(key):
            raise NotRetryable(f"job {sid} is not in the dead-letter list (it did not fail, or was re-driven)")
        entry = store.get_json(key)
        if owner is not None and entry.get("owner", "") != owner:
            raise KeyError(sid)
        cp = jobs.load_checkpoint(store, sid)
        if cp is None or not entry.get("retryable", True):
            raise NotRetryable(f"job {sid} failed at {entry['stage']} and kept nothing to re-run from "
                               f"({entry['reason']}); submit it again")
        was_cp, was_job = cp.model_copy(deep=True), jobs.read_job(store, sid)
        cp.retries, cp.sent, cp.failed = cp.retries + 1, False, False
        jobs.save_checkpoint(store, cp)
        doc = jobs.write_job(store, cp, "queued", cp.next)
        try:
            journey.send_stage(celery_app, sid, cp.next)
        except Exception:  # the broker refused: the failed journey and its job document as they were
            jobs.save_checkpoint(store, was_cp)
            store.put_json(jobs.job_key(sid), was_job)
            raise
        if cp.dataset:  # back in its dataset's window (the tick collects it when it ends again)
            datasets.reopen(store, cp.dataset, sid)
        store.delete_prefix(key)  # claimed: a second retry finds nothing
        cp.sent = True
        jobs.save_checkpoint(store, cp)
        if cp.dataset:
            datasets.drive(celery_app, cp.dataset, resume=False)
    return doc
