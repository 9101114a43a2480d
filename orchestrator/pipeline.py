"""A Sparkle sample's whole journey: stages 1-5, their gates and their records, top to bottom.

A sample is a :class:`SampleTask`: references to artifacts in the store plus decisions, never pixels.
Each stage function takes the task and a :class:`StageEnv` (store, the six service clients, config) and
returns the task. Artifacts travel as handles (:mod:`sparkle.artifacts`: a key, and the pixels decoded only
where a stage computes on them); the services are called through their clients (``services/<name>/app.py``),
whose outputs come back as handles on the keys the services wrote, then are staged under ``staging/{id}/`` by
a server-side copy. The same functions run in-process (the embedded default, :func:`run_sample`) and on queue
workers (``orchestrator/journey.py``): only the clients' transport differs. When the last stage accepts the
sample, :func:`publish` moves the staged artifacts into the Sparkle layout and writes its record document
(constant time; the shared CSV/JSONL files are materialised from the documents); a rejected or failed sample
leaves nothing in the layout (a rejected one leaves its report).

1. camera filter   optical flow + RANSAC homography at 2 FPS, then the VLM's fine check; a moving camera is
                   refused (unless forced); the instruction is written from the catalogue if none was given
2. frame-0 edit    image_edit.edit_background, gate: EditScore overall >= 8
3. background      grounding round 1 on frame 0, image_edit.remove_foreground (gate: overall >= 8.5),
                   grounding.caption (the new background alone, with its motion; the final video), i2v.animate
                   the clean plate into the background video from the background caption
4. BAIT            grounding round 2 at 2 FPS, tracking.bait: one pass per anchor, majority vote -> mask
5. synthesis       decoupled Canny control video, control.synthesize from the video caption, gate: mean
                   O_score >= 8 on
                   frames [1, 26, 51, 76] (spread the same way over shorter clips)
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, Field

from sparkle import layout
from sparkle.algorithms.bait import anchors_from_round2
from sparkle.algorithms.camera import check_fixed_camera
from sparkle.algorithms.control import control_video
from sparkle.algorithms.gates import spread_frame_indices
from sparkle.artifacts import ArtifactIO, ImageRef, MaskRef, VideoRef
from sparkle.config import PipelineConfig
from sparkle.errors import ArtifactMissing
from sparkle.funnel import write_funnel
from sparkle.media import conform_file, sample_indices
from sparkle.published import sample_document
from sparkle.service import SampleRef
from sparkle.store import ArtifactStore, staging_prefix

from .clients import Services

REMOVAL_INSTRUCTION = "Remove {labels} from the image, leaving only the background."


class StageDecision(BaseModel):
    """What one stage decided: kept or not, why, the scores it decided on, and how long it took (s)."""

    stage: int
    name: str
    accepted: bool
    reason: str
    scores: dict = Field(default_factory=dict)
    seconds: float = 0.0


class SampleTask(BaseModel):
    """One sample on its journey. Artifacts are store keys (``refs``), never bytes."""

    id: str
    edit_type: str
    prompt: str
    chosen_keyword: str | None = None
    original_scene: str = ""
    captions: dict[str, str] = Field(default_factory=dict)  # the generators' prompts (sparkle.captions)
    source_key: str  # the raw input video, as uploaded
    background_key: str | None = None  # optional user background (image or video)
    force: bool = False  # keep a clip the camera filter refuses
    enforce_gates: bool = True  # False: gates are scored and recorded but do not reject
    fps: float = 0.0
    shape: tuple[int, int, int] | None = None  # conformed (T, H, W)
    refs: dict[str, str] = Field(default_factory=dict)
    records: dict[str, dict] = Field(default_factory=dict)
    decisions: list[StageDecision] = Field(default_factory=list)
    backends: dict[str, str] = Field(default_factory=dict)  # service -> what served the sample
    status: Literal["running", "accepted", "rejected", "failed", "cancelled"] = "running"
    reason: str = ""
    failed_stage: str | None = None  # the stage that raised (status "failed"), for the report

    def staged(self, key: str) -> str:
        """The staging key of layout key ``key``."""
        return staging_prefix(self.id) + key


@dataclass
class StageEnv:
    """What stages run with: the store, the six service clients, the config, and the :class:`ArtifactIO` the
    clients make handles with (``io``; by default a new one on ``store``)."""

    store: ArtifactStore
    services: Services
    config: PipelineConfig
    io: ArtifactIO | None = field(default=None)

    def __post_init__(self):
        if self.io is None:
            self.io = ArtifactIO(self.store, max_frames=self.config.conform.max_frames)

    def sample(self, task: SampleTask) -> SampleRef:
        """What every service request says of the sample: id, prompt, stored source, background and mask."""
        return SampleRef(sample_id=task.id, prompt=task.prompt, source_video=task.refs["source_video"],
                         background=task.background_key, mask=task.refs.get("mask"))

    def stage(self, task: SampleTask, name: str, key: str, artifact: ImageRef | VideoRef | MaskRef):
        """Stage ``artifact`` (a service's output) at layout ``key``: a copy by reference, so the published file
        is the very file the service wrote. Returns the handle of the staged copy."""
        task.refs[name] = self.io.copy(artifact.key, task.staged(key))
        return type(artifact)(task.refs[name], self.io)

    def image(self, task: SampleTask, name: str) -> ImageRef:
        return self.io.image(task.refs[name])

    def video(self, task: SampleTask, name: str) -> VideoRef:
        return self.io.video(task.refs[name])


def _decide(task: SampleTask, stage: int, name: str, accepted: bool, reason: str, started: float,
            scores: dict | None = None, gate: bool = False) -> SampleTask:
    """Record a decision; a refusal stops the journey (a gate only when gates are enforced)."""
    if not accepted and gate and not task.enforce_gates:
        reason += " (gates not enforced: kept)"
        accepted_for_flow = True
    else:
        accepted_for_flow = accepted
    task.decisions.append(StageDecision(stage=stage, name=name, accepted=accepted, reason=reason,
                                        scores=scores or {}, seconds=round(time.perf_counter() - started, 3)))
    if not accepted_for_flow:
        task.status, task.reason = "rejected", f"stage {stage} ({name}): {reason}"
    return task


def _gate(value: float, threshold: float, what: str) -> tuple[bool, str]:
    ok = value >= threshold
    return ok, f"{what} {value:.2f} {'>=' if ok else '<'} {threshold}"


# --- stage 0: the source, conformed ---------------------------------------------------------------------

def ingest(task: SampleTask, env: StageEnv) -> SampleTask:
    """Conform the uploaded source (16 fps by timestamp, <= 81 frames, 4k+1, sides multiples of 16) and store
    it with frame 0.

    Raises InputError for an undecodable or too short video.
    """
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            raw = env.store.get_file(task.source_key, Path(tmp) / PurePosixPath(task.source_key).name)
        except KeyError as exc:
            raise ArtifactMissing(f"source video not found: {task.source_key}") from exc
        video = conform_file(raw, env.config.conform)  # frame by frame: memory bounded by the output
    task.fps, task.shape = video.fps, video.shape
    task.refs["source_video"] = env.io.put_video(task.staged(layout.source_video(task.edit_type, task.id)),
                                                 video.frames, video.fps)
    # Frame 0 as every later stage and service sees it: decoded from the stored (H.264) source video.
    frame0 = env.video(task, "source_video").array[0].copy()
    task.refs["source_frame0"] = env.io.put_image(task.staged(layout.source_frame0(task.edit_type, task.id)), frame0)
    t, h, w = video.shape
    return _decide(task, 0, "ingest", True, f"conformed to {t} frames of {w}x{h} at {video.fps:g} fps", started)


# --- stage 1: fixed-camera filter -----------------------------------------------------------------------

def stage1_camera_filter(task: SampleTask, env: StageEnv) -> SampleTask:
    """Coarse filter (flow + RANSAC homography, cheap, CPU), then the fine VLM check on 2-FPS frames."""
    started = time.perf_counter()
    source = env.video(task, "source_video")
    d = check_fixed_camera(source.array, source.decoded.fps, env.config.camera)
    reason = d.reason
    if not d.accepted and task.force:
        reason = f"forced: {reason}"
    task = _decide(task, 1, "camera_filter", d.accepted or task.force, reason, started, d.as_dict())
    if task.status != "running":
        return task
    started = time.perf_counter()
    indices = sample_indices(task.shape[0], source.decoded.fps, env.config.camera.sample_fps)
    moves, reason = env.services.grounding.check_camera_motion(env.sample(task), source.at(indices),
                                                               env.config.camera.sample_fps)
    if moves and task.force:
        reason, moves = f"forced: {reason}", False
    return _decide(task, 1, "camera_filter_fine", not moves, reason, started, {"frames": len(indices)}, gate=True)


def write_prompt(task: SampleTask, env: StageEnv) -> SampleTask:
    """Stage 1's instruction writing, for a sample that came without a prompt.

    The scene comes from the catalogue (``chosen_keyword``, picked from the sample id unless given) and the
    grounding service writes the instruction from source frame 0; an empty answer falls back to the
    catalogue's template. ``original_scene`` is the grounding service's description of frame 0.
    """
    started = time.perf_counter()
    grounding, frame0 = env.services.grounding, env.image(task, "source_frame0")
    task.original_scene = grounding.describe_scene(env.sample(task), frame0)
    if task.prompt:
        return _decide(task, 1, "instruction", True, "given by the user", started)
    from sparkle.catalogue import load_catalogue, write_instruction

    if task.edit_type != "openve3m" and not task.chosen_keyword:
        task.chosen_keyword = load_catalogue(env.config.catalogue).sample_one(task.edit_type, task.id).chosen_keyword
    text = grounding.write_instruction(env.sample(task), frame0, task.edit_type, task.chosen_keyword).strip()
    source = "written by the grounding service"
    if not text:
        catalogue = load_catalogue(env.config.catalogue)
        choice = catalogue.sample_one(task.edit_type if task.edit_type != "openve3m" else "location", task.id)
        text, source = write_instruction(choice), "the grounding service wrote nothing: catalogue template"
    task.prompt = text
    return _decide(task, 1, "instruction", True, source, started, {"chosen_keyword": task.chosen_keyword})


# --- stage 2: edit frame 0's background -----------------------------------------------------------------

def stage2_edit_frame0(task: SampleTask, env: StageEnv) -> SampleTask:
    started = time.perf_counter()
    s, sample = env.services, env.sample(task)
    frame0 = env.image(task, "source_frame0")
    edited = env.stage(task, "edited_frame0", layout.edited_frame0(task.edit_type, task.id),
                       s.image_edit.edit_background(sample, frame0, task.prompt))
    answer = s.editscore.score_image(sample, frame0, edited, task.prompt, "edit_background")
    score = answer.score
    task.records["edited_frame0_score"] = {"id": task.id, "prompt": task.prompt,
                                           "editscore": score.model_dump(exclude={"passes"}), "scorer": answer.scorer}
    ok, reason = _gate(score.overall, env.config.gates.frame0_edit_min_overall, "EditScore overall")
    return _decide(task, 2, "frame0_edit", ok, reason, started, score.model_dump(exclude_none=True), gate=True)


# --- stage 3: ground, erase, animate --------------------------------------------------------------------

def stage3_background_video(task: SampleTask, env: StageEnv) -> SampleTask:
    started = time.perf_counter()
    s, sample = env.services, env.sample(task)
    frame0, edited0 = env.image(task, "source_frame0"), env.image(task, "edited_frame0")
    objects = s.grounding.ground_round1(sample, frame0, edited0)
    task.records["foreground_grounding_r1"] = {
        "id": task.id, "prompt": task.prompt, "edit_type": task.edit_type,
        "round1_labels": [o.label for o in objects], "round1_objects": [o.model_dump() for o in objects]}
    if not any(o.bbox_2d for o in objects):
        task = _decide(task, 3, "foreground_grounding", False, "grounding round 1 found no foreground on frame 0",
                       started, gate=True)
        if task.status != "running":
            return task
    plate = env.stage(task, "clean_plate", layout.clean_plate(task.edit_type, task.id),
                      s.image_edit.remove_foreground(sample, edited0, objects))
    removal = REMOVAL_INSTRUCTION.format(labels=", ".join(o.label for o in objects))
    answer = s.editscore.score_image(sample, edited0, plate, removal, "remove_foreground")
    score = answer.score
    task.records["edited_frame0_foreground_removed_score"] = {
        "id": task.id, "prompt": task.prompt, "editscore": score.model_dump(exclude={"passes"}),
        "scorer": answer.scorer}
    ok, reason = _gate(score.overall, env.config.gates.fg_removal_min_overall, "EditScore overall")
    if not ok and task.enforce_gates:
        return _decide(task, 3, "background_video", ok, reason, started, score.model_dump(exclude_none=True),
                       gate=True)
    # I2V animates the empty plate from a caption of the new background (an instruction naming subjects would
    # invite Wan to paint them back in); Fun-Control gets the final video's caption in stage 5.
    task.captions = s.grounding.caption(sample, task.prompt, [o.label for o in objects]).model_dump()
    background, shape = s.i2v.animate(sample, plate, task.captions["background"], task.shape[0], task.fps)
    if shape != tuple(task.shape):
        raise ValueError(f"the i2v service returned a {shape} video, expected {tuple(task.shape)} (T, H, W)")
    env.stage(task, "background_video", layout.background_video(task.edit_type, task.id), background)
    return _decide(task, 3, "background_video", ok, reason, started, score.model_dump(exclude_none=True), gate=True)


# --- stage 4: BAIT ---------------------------------------------------------------------------------------

def stage4_bait(task: SampleTask, env: StageEnv) -> SampleTask:
    started = time.perf_counter()
    s, sample = env.services, env.sample(task)
    t, h, w = task.shape
    r1 = task.records["foreground_grounding_r1"]
    indices = sample_indices(t, task.fps, env.config.bait.anchor_fps)
    frame_objects = s.grounding.ground_round2(sample, env.video(task, "source_video").at(indices),
                                              r1["round1_labels"])
    task.records["foreground_grounding_r2"] = {
        **r1, "frame_objects": [[o.model_dump() for o in objs] for objs in frame_objects]}
    anchors, skipped = anchors_from_round2(indices, frame_objects, w, h)
    mask_key = layout.mask(task.edit_type, task.id)
    if anchors:
        mask, fraction = s.tracking.bait(sample, anchors, env.config.bait.tie_is_foreground)
        mask = env.stage(task, "mask", mask_key, mask)
    else:  # only reached with gates not enforced: the sample goes on with no foreground
        task.refs["mask"] = env.io.put_mask(task.staged(mask_key), np.zeros((t, h, w), bool))
        mask, fraction = env.io.mask(task.refs["mask"]), 0.0
    scores = {"anchors": [a.frame_index for a in anchors], "skipped": skipped, "mask_fraction": round(fraction, 4)}
    if not anchors:
        return _decide(task, 4, "bait", False, "no 2-FPS frame has a grounded box: no usable anchor", started,
                       scores, gate=True)
    if fraction <= 0 and not mask.array.any():  # (a fraction under 5e-7 rounds to 0: look at the pixels)
        return _decide(task, 4, "bait", False, "the majority-vote mask is empty", started, scores, gate=True)
    return _decide(task, 4, "bait", True, f"{len(anchors)} anchor passes voted ({len(skipped)} frames skipped)",
                   started, scores)


# --- stage 5: decoupled control, synthesis, video gate ---------------------------------------------------

def stage5_synthesis(task: SampleTask, env: StageEnv) -> SampleTask:
    started = time.perf_counter()
    s, sample, cfg = env.services, env.sample(task), env.config
    source, background = env.video(task, "source_video"), env.video(task, "background_video")
    control = control_video(cfg.control.mode, source.array, background.array, env.io.load_mask(task.refs["mask"]),
                            cfg.control.canny_low, cfg.control.canny_high)
    task.refs["canny_video"] = env.io.put_video(task.staged(layout.canny_video(task.edit_type, task.id)), control,
                                                task.fps)
    control = env.video(task, "canny_video")
    edited, shape = s.control.synthesize(sample, control, background, env.image(task, "edited_frame0"),
                                         task.captions.get("video") or task.prompt)
    if shape != tuple(task.shape):
        raise ValueError(f"the control service returned a {shape} video, expected {tuple(task.shape)} (T, H, W)")
    edited = env.stage(task, "edited_video", layout.edited_video(task.edit_type, task.id), edited)
    indices = spread_frame_indices(task.shape[0], cfg.gates.video_frame_indices)
    answer = s.editscore.score_frames(sample, edited, indices, task.prompt)  # judges the published file
    scores = answer.scores
    task.records["edited_video_score"] = {"id": task.id, "prompt": task.prompt, "frame_indices": indices,
                                          "editscore": [s.model_dump(exclude={"passes"}) for s in scores],
                                          "scorer": answer.scorer}
    mean_o = float(np.mean([s.O_score for s in scores]))
    ok, reason = _gate(mean_o, cfg.gates.video_min_mean_o_score, "mean O_score")
    metrics = {"mean_O_score": round(mean_o, 3), "O_scores": [s.O_score for s in scores]}
    if any(s.passes for s in scores):
        metrics["passes"] = [s.passes for s in scores]  # per frame, each pass's SC / PQ / O
    return _decide(task, 5, "synthesis", ok, reason, started, metrics, gate=True)


STAGES: dict[str, Callable[[SampleTask, StageEnv], SampleTask]] = {
    "ingest": ingest, "camera_filter": stage1_camera_filter, "instruction": write_prompt,
    "frame0_edit": stage2_edit_frame0, "background_video": stage3_background_video, "bait": stage4_bait,
    "synthesis": stage5_synthesis}
"""The stages in journey order, by name (the names the checkpoint and the job documents use)."""
STAGE_NAMES = list(STAGES)


# --- publish: the sample enters the Sparkle layout -------------------------------------------------------

def publish(task: SampleTask, env: StageEnv) -> SampleTask:
    """Commit an accepted sample in constant time: move its staged artifacts into the layout, then write its
    record document (the CSV row, the metadata line and the five records; ``sparkle.published``). The shared
    layout files are materialised from the documents later (``sparkle export``; the embedded default at the
    end of ``sparkle replace``). A re-delivered publish of a published sample is a no-op."""
    prefix = staging_prefix(task.id)
    moves = {key: key[len(prefix):] for key in task.refs.values() if key.startswith(prefix)}
    doc = sample_document(task.id, task.edit_type, task.prompt, task.chosen_keyword, task.original_scene,
                          task.records)
    env.store.publish_sample(moves, layout.document(task.edit_type, task.id), doc)
    task.refs = {name: moves.get(key, key) for name, key in task.refs.items()}
    return task


def finish(task: SampleTask, env: StageEnv, funnel: bool = True) -> SampleTask:
    """End of the journey: publish an accepted sample, keep the report of every sample, refresh the funnel.

    A task still ``running`` here passed every stage and is accepted. The staging area is removed last (by
    :func:`drop_staging`), so a crash in between can finish again: publishing is idempotent. ``funnel``:
    rebuild ``reports/funnel.json`` (reads every report: the bulk run keeps per-dataset funnels instead).
    """
    if task.status == "running":
        task.status = "accepted"
        task.reason = "accepted at every stage"
        publish(task, env)
    env.store.put_json(layout.report(task.edit_type, task.id), summary(task))
    if funnel:
        write_funnel(env.store)
    return task


def fail(task: SampleTask, env: StageEnv, stage: str, reason: str, status: str = "failed",
         funnel: bool = True) -> SampleTask:
    """Record a terminal failure (or a cancellation) of ``stage``: the report keeps the stage and the reason;
    nothing enters the layout."""
    task.status, task.failed_stage, task.reason = status, stage, f"{stage}: {reason}"
    env.store.put_json(layout.report(task.edit_type, task.id), summary(task))
    if funnel:
        write_funnel(env.store)
    return task


def drop_staging(task: SampleTask, env: StageEnv) -> None:
    """Remove everything the sample staged (inputs, stage outputs, service outputs) and its cached decodes."""
    env.store.delete_prefix(staging_prefix(task.id))
    env.io.forget(task.id)


def next_stage(task: SampleTask, done: str) -> str | None:
    """The stage after ``done`` (None: the journey is over, because it was the last or the sample was refused)."""
    i = STAGE_NAMES.index(done)
    return STAGE_NAMES[i + 1] if task.status == "running" and i + 1 < len(STAGE_NAMES) else None


def run_sample(task: SampleTask, env: StageEnv,
               on_stage: Callable[[str, str, SampleTask], None] | None = None) -> SampleTask:
    """Run every stage in-process, then publish (accepted) or keep only the report (rejected).

    ``on_stage(name, event, task)`` is called with event ``"start"`` and ``"end"`` for progress display.
    A rejected sample's report is kept at ``reports/{edit_type}/{id}.json``; an exception (bad input,
    backend failure) removes everything the sample staged and propagates. (Queue workers run the same
    stages one message at a time: ``orchestrator/journey.py``.)
    """
    task.backends = env.services.names()
    try:
        for name, stage in STAGES.items():
            if on_stage:
                on_stage(name, "start", task)
            task = stage(task, env)
            if on_stage:
                on_stage(name, "end", task)
            if task.status != "running":
                break
        return finish(task, env)
    finally:
        drop_staging(task, env)


def summary(task: SampleTask) -> dict:
    """Machine-readable account of the sample: decisions, scores, the stage records (kept for rejected samples
    too, with the reason), artifact keys and timings (s)."""
    timings = {d.name: d.seconds for d in task.decisions}
    timings["total"] = round(sum(timings.values()), 3)
    return {"id": task.id, "edit_type": task.edit_type, "status": task.status, "reason": task.reason,
            "failed_stage": task.failed_stage,
            "prompt": task.prompt, "chosen_keyword": task.chosen_keyword, "original_scene": task.original_scene,
            "captions": task.captions,
            "shape": list(task.shape) if task.shape else None, "fps": task.fps, "backends": task.backends,
            "stages": [d.model_dump() for d in task.decisions], "records": task.records,
            "artifacts": {} if task.status != "accepted" else dict(task.refs), "timings": timings}


__all__ = ["SampleTask", "StageEnv", "StageDecision", "STAGES", "STAGE_NAMES", "run_sample", "finish", "fail",
           "drop_staging", "next_stage", "publish", "summary"]
