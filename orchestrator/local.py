"""The embedded default: one sample, in-process, into a local directory in the Sparkle layout."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from sparkle import layout
from sparkle.artifacts import ArtifactIO
from sparkle.backends import Backends, load_backends
from sparkle.config import PipelineConfig
from sparkle.errors import InputError
from sparkle.media import IMAGE_SUFFIXES, check_input_file, check_resolution, read_image, read_video
from sparkle.published import materialise_layout, published_ids
from sparkle.store import ArtifactStore, LocalStore, staging_prefix

from .clients import in_process
from .pipeline import SampleTask, StageEnv, run_sample


MAX_PROMPT_CHARS = 4000
"""Longest accepted instruction (characters): the services' request schemas carry prompts up to this size."""


def existing_indices(store: ArtifactStore, edit_type: str) -> set[int]:
    """Sample indices of `edit_type` already used in `store`: published (a record document, or a row of a
    legacy CSV), reported or staged. Lists three prefixes: used once per store and theme, to start the counter
    of :func:`allocate_ids`."""
    ids = set(published_ids(store, edit_type))
    if store.exists(layout.prompts_csv(edit_type)):  # a store published before record documents existed
        ids |= {row.get("task") or "" for row in store.read_csv(layout.prompts_csv(edit_type))}
    ids |= {Path(k).stem for k in store.list_keys(f"reports/{edit_type}/")}
    ids |= {k.split("/")[1] for k in store.list_keys("staging/")}
    out = set()
    for sid in ids:
        try:
            et, idx = layout.parse_sample_id(sid)
        except ValueError:
            continue
        if et == edit_type:
            out.add(idx)
    return out


def allocate_ids(store: ArtifactStore, edit_type: str, n: int) -> int:
    """Reserve ``n`` consecutive sample indices of ``edit_type``; returns the first.

    The counter ``jobs/ids/{edit_type}.json`` only grows. The first allocation of a store starts it above
    every index already there (:func:`existing_indices`); later ones read and write only the counter, so an
    allocation costs the same at any dataset size. The embedded default and the cluster share it.
    """
    key = f"jobs/ids/{edit_type}.json"
    with store.lock(f"sample-ids-{edit_type}"):
        if store.exists(key):
            first = store.get_json(key)["next"]
        else:
            taken = existing_indices(store, edit_type)
            first = max(taken) + 1 if taken else 0
        store.put_json(key, {"next": first + n})
    return first


def validate_inputs(video: str | Path, prompt: str | None, edit_type: str, background: str | Path | None) -> str | None:
    """Check everything a user gives before anything is written. Returns the stripped prompt (None: to be
    written from the catalogue).

    Raises InputError: empty or oversized prompt (> ``MAX_PROMPT_CHARS``), unknown theme, missing, empty or
    undecodable video (no video stream, unsupported codec, zero frames), resolution outside
    ``MIN_SIDE_PX..MAX_SIDE_PX``, bad background.
    """
    if prompt is not None:
        prompt = prompt.strip()
        if not prompt:
            raise InputError("the prompt is empty: say what the new background should be (or leave it out to "
                             "have one written from the theme catalogue)")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"the prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    try:
        layout.check_edit_type(edit_type)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    first = read_video(video, max_frames=1)
    check_resolution(*first.shape[1:], what=f"video {Path(video).name}")
    if background is not None:
        p = check_input_file(background, "background")
        read_image(p) if p.suffix.lower() in IMAGE_SUFFIXES else read_video(p, max_frames=1)
    return prompt


def default_keyword(prompt: str) -> str:
    """``chosen_keyword`` ("subtheme: scene") for a free-form prompt: ``"custom: <scene words>"``.

    The scene is the text after "background with"/"with"/"into"/"to", up to the first comma.
    """
    low = prompt.lower()
    for marker in ("background with ", " with ", " into ", " to "):
        if marker in low:
            scene = prompt[low.index(marker) + len(marker):]
            break
    else:
        scene = prompt
    scene = scene.split(",")[0].strip().rstrip(".").removeprefix("a ").removeprefix("an ").removeprefix("the ")
    return f"custom: {scene or 'scene'}"


def replace_one(video: str | Path, prompt: str | None, out_dir: str | Path, edit_type: str = "location",
                background: str | Path | None = None, chosen_keyword: str | None = None, force: bool = False,
                enforce_gates: bool = True, config: PipelineConfig | None = None, backends: Backends | None = None,
                on_stage: Callable | None = None) -> tuple[SampleTask, LocalStore]:
    """Replace the background of one video; returns the finished task and the store of ``out_dir``.

    ``backends``: the six model backends, set up (default: ``load_backends(config.profile)``); the services'
    operations run on them in this process.

    An accepted sample is published (its record document) and ``out_dir``'s shared layout files are then
    materialised, so the folder is the released layout after every call.

    Raises InputError on bad input, before anything is written to ``out_dir``; on the ``cpu`` profile, also
    for an edit it cannot honestly do without a user ``background`` (a ``location`` edit, or an instruction
    none of its re-grades covers: :func:`sparkle.services.image_edit.cpu.needs_background`).
    """
    prompt = validate_inputs(video, prompt, edit_type, background)
    config = config or PipelineConfig()
    from sparkle.services.image_edit.cpu import CpuCompositorEditor, needs_background

    cpu_editor = isinstance(backends.image_edit, CpuCompositorEditor) if backends else config.profile == "cpu"
    if cpu_editor and background is None:
        if why := needs_background(prompt, edit_type):
            raise InputError(f"{why}: give the new background (sparkle replace --background IMAGE|VIDEO, a video "
                             "is played back and forth; bench infer --use-ref-images), or use --profile real")
    backends = backends or load_backends(config.profile)
    store = LocalStore(out_dir)
    video = Path(video)
    sid = layout.sample_id(edit_type, allocate_ids(store, edit_type, 1))
    source_key = store.put_file(staging_prefix(sid) + f"inputs/source{video.suffix.lower() or '.mp4'}", video)
    background_key = None
    if background is not None:
        bg = Path(background)
        background_key = store.put_file(staging_prefix(sid) + f"inputs/background{bg.suffix.lower()}", bg)
    if edit_type == "openve3m":
        chosen_keyword = None
    elif prompt and not chosen_keyword:
        chosen_keyword = default_keyword(prompt)
    task = SampleTask(id=sid, edit_type=edit_type, prompt=prompt or "", chosen_keyword=chosen_keyword,
                      source_key=source_key, background_key=background_key, force=force, enforce_gates=enforce_gates)
    io = ArtifactIO(store, max_frames=config.conform.max_frames)
    from . import jobs  # (jobs imports this module)

    # The job document (jobs/{id}.json) as the distributed run keeps it: what `sparkle view` shows live.
    cp = jobs.Checkpoint(task=task, config={}, next="ingest", submitted_at=time.time())
    jobs.write_job(store, cp, "running", "ingest")
    current = {"stage": "ingest"}

    def progress(name: str, event: str, t: SampleTask) -> None:
        current["stage"], cp.task = name, t
        if t.status == "running":  # after each stage's start and end: its decision and timing show live
            jobs.write_job(store, cp, "running", name)
        if on_stage:
            on_stage(name, event, t)

    try:
        task = run_sample(task, StageEnv(store, in_process(backends, io), config, io), progress)
    except BaseException as exc:
        cp.task.status, cp.task.failed_stage = "failed", current["stage"]
        cp.task.reason = f"{current['stage']}: {exc.__class__.__name__}: {exc}"
        cp.task.refs = {}  # the staging area is gone
        jobs.write_job(store, cp, "failed", current["stage"])
        raise
    cp.task = task
    jobs.write_job(store, cp, task.status, task.decisions[-1].name if task.decisions else None)
    # OUT stays the released layout after every command: its CSV and JSONL files are materialised from the
    # record documents (incrementally: only this sample's lines are read from its document).
    materialise_layout(store, edit_types=[edit_type])
    return task, store
