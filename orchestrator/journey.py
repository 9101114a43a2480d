"""The distributed journey: one sample's stages as Celery messages, moved on by one state machine.

A journey's state is its checkpoint (``staging/{id}/journey.json``, :class:`~sparkle.orchestrator.jobs.Checkpoint`):
the :class:`SampleTask` after its last finished stage, the next stage, and whether that stage's message was
sent. Three functions move it, and nothing else does:

- :func:`start_journey` writes the first checkpoint and the ``queued`` job, then sends ``ingest``;
- :func:`advance` (run by the ``sparkle.stage`` task under the sample's Redis lease) runs the stage the
  checkpoint names next (``orchestrator/pipeline.py``, with the service clients over the queues), saves the new
  checkpoint, then sends the following stage's message; the last one publishes or reports and ends the journey;
- :func:`resume_journey` sends the next stage's message again after a crash of anything: the reaper of
  ``liveness.py`` calls it for a journey with no queued, received or running message for ``stall_s`` seconds
  (so recovery takes seconds, not the visibility timeout), and so do ``sparkle enqueue`` and the dataset tick.

A re-delivered or duplicate message finds its stage done and does nothing, so every stage is idempotent; a
message held while its stage runs lasts one stage, which is what the visibility timeout must exceed.
Transient errors of a stage (store, broker) retry the message with back-off (``stage_max_retries``); terminal
ones (bad input, a service's refusal, retries exhausted) fail the sample, with the stage and the reason in the
job and the report, and keep it for a retry from that stage (the dead-letter list: ``failures.py``). A
cancelled job stops at its next stage boundary and leaves only its report. A job with a ``callback_url`` is
POSTed its document on each terminal state (``webhooks.py``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path, PurePosixPath

from sparkle import layout
from sparkle.artifacts import ArtifactIO
from sparkle.config import PipelineConfig
from sparkle.media import VIDEO_SUFFIXES
from sparkle.queues import CPU_QUEUE
from sparkle.store import ArtifactStore, staging_prefix

from . import failures, jobs, liveness, webhooks
from .calls import QueueTransport
from .celery_app import SparkleTask, app, is_transient, resources
from .clients import Services
from .local import allocate_ids, validate_inputs
from .pipeline import STAGES, SampleTask, StageEnv, drop_staging, fail, finish, next_stage

log = logging.getLogger("sparkle.journey")

FIRST_STAGE = "ingest"


def send_stage(celery_app, sample_id: str, stage: str) -> None:
    """Send the message of ``stage`` of ``sample_id`` to the orchestrator's queue, marked queued and the journey
    seen alive (``liveness.py``: what lets the reaper tell a queued message from a lost one)."""
    client = liveness.redis_of(celery_app)
    liveness.mark_queued(client, f"stage:{sample_id}", resources().settings.queued_max_s)
    liveness.journey_seen(client, sample_id)
    celery_app.send_task(stage_task.name, args=[sample_id, stage], queue=CPU_QUEUE, ignore_result=True)


# --- starting and resuming ------------------------------------------------------------------------------

def start_journey(celery_app, store: ArtifactStore, task: SampleTask, config: PipelineConfig,
                  dataset: str | None = None, owner: str = "", callback_url: str | None = None) -> dict:
    """Write the checkpoint and the ``queued`` job document, then send the first stage's message.

    The source (and background) must already be in the store at ``task.source_key``. If the broker refuses
    the message, what was written is removed and the error propagates (nothing half-submitted stays).
    ``callback_url``: POSTed the job document, signed, on each terminal state (``orchestrator/webhooks.py``).
    """
    cp = jobs.Checkpoint(task=task, config=config.model_dump(mode="json"), next=FIRST_STAGE,
                         submitted_at=time.time(), dataset=dataset, owner=owner, callback_url=callback_url)
    jobs.save_checkpoint(store, cp)
    doc = jobs.write_job(store, cp, "queued", None)
    try:
        send_stage(celery_app, task.id, FIRST_STAGE)
    except Exception:
        store.delete_prefix(staging_prefix(task.id))
        store.delete_prefix(jobs.job_key(task.id))
        raise
    cp.sent = True
    jobs.save_checkpoint(store, cp)
    return doc


def submit_files(celery_app, store: ArtifactStore, video: Path, prompt: str | None, edit_type: str = "location",
                 chosen_keyword: str | None = None, background: Path | None = None, force: bool = False,
                 gates: bool = True, config: PipelineConfig | None = None, sample_id: str | None = None,
                 dataset: str | None = None, video_name: str | None = None, owner: str = "",
                 callback_url: str | None = None) -> dict:
    """Validate local files, upload them to ``staging/{id}/inputs/`` and start the journey; the job document.

    ``sample_id``: given by a dataset (deterministic); else the next free index of ``edit_type``.
    ``video_name``: the original file name (for its suffix) when ``video`` is a temporary file. ``owner``: the
    principal the job belongs to (the gateway's API key hash).
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
    task = jobs.new_task(sid, edit_type, prompt, chosen_keyword, source_key, background_key, force, gates)
    try:
        return start_journey(celery_app, store, task, config or PipelineConfig(), dataset, owner, callback_url)
    except Exception:
        store.delete_prefix(staging_prefix(sid))
        raise


def resume_journey(celery_app, store: ArtifactStore, sid: str) -> bool:
    """Send the message of the journey's next stage again (after a crash of any component); True if the
    journey was still there to resume. A duplicate message is harmless: the stage worker runs a stage only
    while holding the sample's lease and only if the checkpoint names it next."""
    cp = jobs.load_checkpoint(store, sid)
    if cp is None or cp.failed:  # over, or failed and kept for `sparkle retry`
        return False
    send_stage(celery_app, sid, cp.next)
    return True


# --- advancing -------------------------------------------------------------------------------------------

def stage_env(io: ArtifactIO, config: dict, wait_s: float, celery_app=None) -> StageEnv:
    """A stage environment on ``io`` (the process's, so decoded artifacts stay cached between the stages of a
    sample) whose service clients send their calls over the queues. Raises ValueError for a bad ``config``."""
    services = Services.over(QueueTransport(celery_app or app, io.store, wait_s), io)
    return StageEnv(io.store, services, PipelineConfig.model_validate(config), io)


def _end(celery_app, cp: jobs.Checkpoint, env: StageEnv, stage: str) -> dict:
    """The journey is over: job document in its final state, staging area removed. (A crash between the two
    leaves the staging area behind; the dataset tick that collects the sample removes it.)"""
    doc = jobs.write_job(env.store, cp, cp.task.status, stage)
    _notify(celery_app, env.store, cp, doc)
    drop_staging(cp.task, env)
    liveness.journey_over(liveness.redis_of(celery_app), cp.task.id)
    return {"id": cp.task.id, "state": doc["state"]}


def _notify(celery_app, store: ArtifactStore, cp: jobs.Checkpoint, doc: dict) -> None:
    """The job's webhook, if it has one: the terminal job document (without its owner), signed, at least once."""
    if cp.callback_url:
        webhooks.notify(celery_app, store, "job", cp.task.id, cp.callback_url, cp.owner, doc["state"],
                        {k: v for k, v in doc.items() if k != "owner"}, generation=cp.retries)


def _dead_letter(celery_app, cp: jobs.Checkpoint, env: StageEnv, stage: str, failed: SampleTask,
                 reason: str) -> dict:
    """The journey failed at ``stage``: keep it for a retry (``orchestrator/failures.py``). The checkpoint keeps
    the task as it was before ``stage``, with ``stage`` next; the staging area (the earlier stages' artifacts)
    stays; the report and the job document say ``failed`` with the stage and the reason; the dead-letter entry
    lists it. Nothing enters the layout."""
    fail(failed, env, stage, reason, funnel=False)
    cp.next, cp.sent, cp.failed = stage, False, True
    jobs.save_checkpoint(env.store, cp)
    shown = cp.model_copy(update={"task": failed})
    doc = jobs.write_job(env.store, shown, "failed", stage)
    failures.record_failure(env.store, cp, stage, reason)
    _notify(celery_app, env.store, cp, doc)
    env.io.forget(cp.task.id)
    liveness.journey_over(liveness.redis_of(celery_app), cp.task.id)
    return {"id": cp.task.id, "state": "failed"}


def advance(celery_app, io: ArtifactIO, sample_id: str, stage: str, wait_s: float) -> dict:
    """Run stage ``stage`` of ``sample_id`` if the checkpoint names it next (the caller holds the lease), with
    ``io`` over the store of the journey.

    Raises transient errors (the caller retries the message); terminal ones end the journey as ``failed``.
    """
    store = io.store
    cp = jobs.load_checkpoint(store, sample_id)
    if cp is None:
        return {"id": sample_id, "skipped": "the journey is over"}
    if cp.failed:
        return {"id": sample_id, "skipped": "the journey failed and waits for a retry (sparkle retry)"}
    if stage != cp.next:
        if cp.sent:
            return {"id": sample_id, "skipped": f"stage {stage} is done; {cp.next} was sent"}
        stage = cp.next  # the crash came between checkpoint and send: this message stands in for the next one
    env = stage_env(io, cp.config, wait_s, celery_app)
    if jobs.cancel_requested(store, sample_id):
        fail(cp.task, env, stage, "cancelled by the user", status="cancelled", funnel=False)
        return _end(celery_app, cp, env, stage)
    if stage == "finish":
        finish(cp.task, env, funnel=False)
        return _end(celery_app, cp, env, stage)
    jobs.write_job(store, cp, "running", stage)
    task = cp.task.model_copy(deep=True)
    if not task.backends:
        task.backends = env.services.names()
    try:
        task = STAGES[stage](task, env)
    except Exception as exc:  # noqa: BLE001 - transient ones are retried by the caller
        if is_transient(exc):
            raise
        log.warning("%s: %s failed: %s: %s", sample_id, stage, exc.__class__.__name__, exc)
        return _dead_letter(celery_app, cp, env, stage, task, f"{exc.__class__.__name__}: {exc}")
    cp.task, cp.next, cp.sent = task, next_stage(task, stage) or "finish", False
    jobs.save_checkpoint(store, cp)
    if cp.next == "finish":
        finish(cp.task, env, funnel=False)
        return _end(celery_app, cp, env, stage)
    jobs.write_job(store, cp, "running", cp.next)
    send_stage(celery_app, sample_id, cp.next)
    cp.sent = True
    jobs.save_checkpoint(store, cp)
    return {"id": sample_id, "done": stage, "next": cp.next}


def fail_journey(celery_app, io: ArtifactIO, sample_id: str, stage: str, reason: str, wait_s: float) -> dict:
    """End the journey of ``sample_id`` as ``failed`` at ``stage`` (its retries are exhausted)."""
    cp = jobs.load_checkpoint(io.store, sample_id)
    if cp is None:
        return {"id": sample_id, "skipped": "the journey is over"}
    if cp.failed:
        return {"id": sample_id, "skipped": "already failed"}
    try:
        env = stage_env(io, cp.config, wait_s, celery_app)
    except ValueError:  # a checkpoint this version cannot read (its config): the failure is still recorded
        env = stage_env(io, {}, wait_s, celery_app)
    return _dead_letter(celery_app, cp, env, stage, cp.task.model_copy(deep=True), reason)


@app.task(name="sparkle.stage", bind=True, base=SparkleTask, max_retries=None, ignore_result=True)
def stage_task(self: SparkleTask, sample_id: str, stage: str) -> dict:
    """One stage of one journey under the sample's lease (``sparkle:sample:{id}`` in Redis, ``sample_lease_s``,
    renewed while held). A delivery that finds the lease taken (a duplicate, or the lease of a worker that
    just died) leaves the sample at once: a live holder moves the journey on, and the reaper re-sends the
    stage of a dead one (``liveness.py``). Transient errors retry the message (``stage_max_retries``, back-off
    with jitter); past that the sample fails. A lease lost while the stage ran (Redis away longer than the
    lease) is not an error: the stage's result is saved, and a duplicate run of it is harmless."""
    from sparkle.store_s3 import RedisLock

    s = self.settings
    client = liveness.redis_of(self.app)
    lease = RedisLock(self.resources.redis, liveness.sample_lease(sample_id), s.sample_lease_s, wait_s=1.0)
    try:
        took = lease.acquire()
        try:
            liveness.taken(client, f"stage:{sample_id}")
            if not took:
                return {"id": sample_id, "skipped": "another worker holds the sample"}
            liveness.journey_seen(client, sample_id)
            result = advance(self.app, self.resources.io, sample_id, stage, s.op_wait_s)
        except BaseException:
            if took:  # stop renewing whatever happens (a lease renewed for ever hides a dead journey)
                lease.release(quiet=True)
            raise
        try:
            lease.release()
        except RuntimeError as exc:
            log.warning("%s: %s", sample_id, exc)
        return result
    except Exception as exc:  # noqa: BLE001 - transient errors
        if self.request.retries < s.stage_max_retries and is_transient(exc):
            delay = self.backoff_s()
            log.warning("%s: %s: %s; retry %d in %.1f s", sample_id, stage, exc, self.request.retries + 1, delay)
            try:
                liveness.mark_queued(client, f"stage:{sample_id}", delay + s.stall_s)
            except Exception:  # noqa: BLE001 - Redis away: the reaper re-sends the stage if the retry is lost
                pass
            raise self.retry(countdown=delay)
        return fail_journey(self.app, self.resources.io, sample_id, stage,
                            f"{exc.__class__.__name__}: {exc} (after {self.request.retries} retries)", s.op_wait_s)
