"""Sparkle-Bench: run a model over the benchmark (``sparkle bench infer``) and score it with the six-dimension
judge (``sparkle bench eval``).

Formats (``../shared/reference/formats.md``, "Sparkle-Bench"):

- benchmark root: ``{edit_type}_bench.csv`` (columns ``edited_type, prompt, original_video``, the last a path
  relative to the root such as ``source_videos/location/Sparkle_location_010913.mp4``),
  ``{edit_type}_metadata.jsonl`` (``{"id", "prompt", "metadata": {"chosen_keyword": "subtheme: scene"}}``),
  ``source_videos/{edit_type}/{id}.mp4`` and optional ``ref_images/{edit_type}/{id}.png``. OpenVE-Bench's CSV
  has the same three columns (and no metadata: see :func:`load_bench`).
- inference output: ``{save_dir}/{edit_type}/{subtheme}---{scene_key}/{id}_edited.mp4`` with
  ``subtheme, scene = chosen_keyword.split(": ")`` and ``scene_key = scene.replace(" ", "_")``.
- reference inference conventions: the first 81 frames (count trimmed to 4k+1), area scaled down to at most
  720x1280 and both sides floored to multiples of 32 by a centre crop (diffsynth's ``VideoData``), written at
  15 fps (:func:`conform_reference`).
- judge output, per checkpoint directory (its ``save_dir``) and theme:
  ``{edit_type}_{judge_model}_sparkle_score.jsonl``, one record per sample
  ``{"id", "prompt", "edit_type", "subtheme", "scene", "scores": [6 ints], "result": raw text}``; dimensions in
  the order of :data:`DIMENSIONS`, 1..5, dimensions 2-6 capped at Instruction Compliance.

The judge sees what Sparkle's sees: the rubric first, then the source and the edited video
(``--rubric-from`` reads Sparkle's own rubric out of its script; ``--video-part image_url`` and
``--azure-endpoint`` are its transport). Ours adds to the reference scorer: any OpenAI-compatible judge
(``--judge-url``), samples that fail are written with their ``error`` and counted (never dropped), re-runs resume
per sample, and ``--plot``.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import random
import re
import shlex
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sparkle.errors import InputError, SparkleError
from sparkle.store import jsonl_lines

bench_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Sparkle-Bench: run a model over the benchmark (infer) and score it with the judge (eval).")
err = Console(stderr=True)

EXIT_FAILURES = 3
"""Exit code of ``bench infer`` / ``bench eval`` when some samples failed (everything else was still written)."""

DIMENSIONS: tuple[str, ...] = (
    "Instruction Compliance", "Overall Visual Quality", "Foreground Integrity", "Foreground Motion Consistency",
    "Background Dynamics", "Background Visual Quality")
"""The judge's six dimensions, in the order of ``scores`` (formats.md)."""

SHORT_NAMES: tuple[str, ...] = ("Ins", "Vis", "FgIn", "FgMo", "BgDy", "BgVi")
"""Summary column names of :data:`DIMENSIONS` (formats.md); ``overall`` is the mean of the six."""

SCORE_MIN, SCORE_MAX = 1, 5
REF_MAX_FRAMES = 81
REF_MAX_AREA = 720 * 1280
REF_MULTIPLE = 32
REF_FPS = 15.0
INSTRUCTION_PLACEHOLDER = "{instruction}"
COMMAND_PLACEHOLDERS = ("input", "output", "prompt", "id", "source", "edit_type", "subtheme", "scene", "ref_image")
"""Placeholders of ``bench infer --command`` (see :func:`render_command`)."""


# --- the benchmark -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchSample:
    """One benchmark sample: ``id`` (the source file's stem), theme, prompt, keyword parts and file paths."""

    id: str
    edit_type: str
    prompt: str
    subtheme: str
    scene: str
    source: Path
    ref_image: Path | None = None

    @property
    def group(self) -> str:
        """Output folder of the sample inside ``{save_dir}/{edit_type}/``: ``{subtheme}---{scene_key}``."""
        return f"{self.subtheme}---{self.scene.replace(' ', '_')}"

    def output_path(self, save_dir: str | os.PathLike) -> Path:
        """``{save_dir}/{edit_type}/{subtheme}---{scene_key}/{id}_edited.mp4`` (formats.md)."""
        return Path(save_dir) / self.edit_type / self.group / f"{self.id}_edited.mp4"


def bench_themes(bench_dir: str | os.PathLike) -> list[str]:
    """Themes of a benchmark root: the ``{edit_type}`` of every ``{edit_type}_bench.csv``, sorted."""
    return sorted(p.name[: -len("_bench.csv")] for p in Path(bench_dir).glob("*_bench.csv"))


def load_bench(bench_dir: str | os.PathLike, themes: list[str] | None = None) -> list[BenchSample]:
    """Read the samples of a Sparkle-Bench (or OpenVE-Bench) root, theme by theme in CSV row order.

    ``themes``: the ``edit_type`` values to read (default: every ``*_bench.csv``). The sample id is the stem of
    ``original_video``; ``subtheme, scene`` come from the metadata's ``chosen_keyword`` (split at ``": "``).
    A sample without metadata or keyword (OpenVE-Bench ships none) gets ``subtheme`` = its CSV
    ``edited_type`` (else the theme) and ``scene = "unspecified"``. Raises InputError for a missing root,
    theme file or column, a duplicate id, or a keyword of another shape.
    """
    root = Path(bench_dir)
    if not root.is_dir():
        raise InputError(f"benchmark directory not found: {root}")
    found = bench_themes(root)
    themes = list(themes) if themes else found
    if not themes:
        raise InputError(f"no {{edit_type}}_bench.csv in {root}")
    samples: list[BenchSample] = []
    seen: set[tuple[str, str]] = set()
    for theme in themes:
        csv_path = root / f"{theme}_bench.csv"
        if not csv_path.is_file():
            raise InputError(f"theme {theme!r} has no {csv_path.name} in {root} (found: {', '.join(found) or 'none'})")
        keywords: dict[str, str] = {}
        meta_path = root / f"{theme}_metadata.jsonl"
        if meta_path.is_file():
            for n, line in enumerate(jsonl_lines(meta_path.read_text(encoding="utf-8")), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{meta_path}:{n}: not JSON ({exc})") from exc
                kw = (rec.get("metadata") or {}).get("chosen_keyword")
                if kw:
                    keywords[str(rec["id"])] = kw
        with csv_path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"edited_type", "prompt", "original_video"} - set(reader.fieldnames or [])
            if missing:
                raise InputError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")
            for row in reader:
                rel = row["original_video"].strip()
                sid = Path(rel).stem
                if (theme, sid) in seen:
                    raise InputError(f"{csv_path}: duplicate sample {sid}")
                seen.add((theme, sid))
                kw = keywords.get(sid)
                if kw:
                    parts = kw.split(": ")
                    if len(parts) != 2 or not all(p.strip() for p in parts) or "/" in kw:
                        raise InputError(f"{meta_path}: {sid}: chosen_keyword must be 'subtheme: scene', got {kw!r}")
                    subtheme, scene = parts
                else:
                    subtheme, scene = (row.get("edited_type") or theme).strip().replace("/", "_"), "unspecified"
                ref = root / "ref_images" / theme / f"{sid}.png"
                samples.append(BenchSample(id=sid, edit_type=theme, prompt=row["prompt"].strip(), subtheme=subtheme,
                                           scene=scene, source=root / rel, ref_image=ref if ref.is_file() else None))
    return samples


def shard(samples: list, rank: int, world_size: int) -> list:
    """The samples of ``rank`` out of ``world_size``: every ``world_size``-th one from index ``rank``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"need 0 <= rank < world_size, got rank {rank}, world size {world_size}")
    return samples[rank::world_size]


# --- inference ---------------------------------------------------------------------------------------------

def reference_size(w: int, h: int, max_area: int = REF_MAX_AREA, multiple: int = REF_MULTIPLE) -> tuple[int, int]:
    """Output ``(w, h)`` of the reference inference: the area scaled down (aspect kept, never up) to at most
    ``max_area`` px (default 720*1280), then each side floored to a multiple of ``multiple`` (default 32).

    e.g. 1920x1080 -> 1280x704, 480x360 -> 480x352. Raises InputError when a side floors to 0.
    """
    scale = min(1.0, math.sqrt(max_area / float(w * h)))
    ow, oh = int(w * scale) // multiple * multiple, int(h * scale) // multiple * multiple
    if ow <= 0 or oh <= 0:
        raise InputError(f"video too small: {w}x{h} gives no {multiple}-px multiple")
    return ow, oh


def conform_reference(video, max_frames: int = REF_MAX_FRAMES, max_area: int = REF_MAX_AREA,
                      multiple: int = REF_MULTIPLE):
    """The source as the reference inference feeds a model: the first ``max_frames`` frames trimmed to 4k+1,
    framed as diffsynth's ``VideoData`` frames them for Sparkle's ``test_benchmark_sparkle_bench.py``
    (``crop_and_resize``): the centre is cropped to the aspect of :func:`reference_size`, then resized to it
    (PIL bicubic). An 832x468 source becomes 832x448 by dropping 10 rows top and bottom, not by squashing
    it 4.3 % vertically. Returns a :class:`~sparkle.media.Video` at the source's fps. Raises InputError when
    fewer than 5 frames remain."""
    from PIL import Image

    from sparkle.media import Video, trimmed_length

    t_in, h, w = video.shape
    t = trimmed_length(t_in, max_frames)
    if t < 5:
        raise InputError(f"video too short: {t_in} frame(s); at least 5 are needed")
    ow, oh = reference_size(w, h, max_area, multiple)
    frames = video.frames[:t]
    if (ow, oh) != (w, h):
        if h / w < oh / ow:  # wider than the target: crop columns (diffsynth's arithmetic, int() included)
            cw = int(h / oh * ow)
            frames = frames[:, :, (w - cw) // 2:(w - cw) // 2 + cw]
        else:
            ch = int(w / ow * oh)
            frames = frames[:, (h - ch) // 2:(h - ch) // 2 + ch]
        frames = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(f)).resize((ow, oh), Image.BICUBIC))
                           for f in frames])
    return Video(np.ascontiguousarray(frames), video.fps)


def render_command(template: str, values: dict[str, str]) -> list[str]:
    """argv of ``--command``: the template is split like a POSIX shell line (``shlex.split``), then the
    placeholders ``{input} {output} {prompt} {id} {source} {edit_type} {subtheme} {scene} {ref_image}`` are
    replaced inside each word. No shell runs, so a prompt with quotes or ``;`` stays one argument: do not
    quote placeholders yourself (``--prompt {prompt}`` is right); for pipes or redirects, call a script.
    Other braces are left as they are."""
    pattern = re.compile(r"\{(" + "|".join(COMMAND_PLACEHOLDERS) + r")\}")
    return [pattern.sub(lambda m: values.get(m.group(1), ""), word) for word in shlex.split(template)]


def _tmp_output(final: Path) -> Path:
    """A hidden temporary file next to ``final`` (same filesystem, so the rename is atomic); it does not end
    with ``_edited.mp4`` and so is never mistaken for an output."""
    return final.with_name(f".{final.stem}.{os.getpid()}.{threading.get_ident()}.tmp.mp4")


def _write_at_fps(frames: np.ndarray, dest: Path, fps: float, size: tuple[int, int] | None = None) -> None:
    from sparkle.media import write_video

    if size is not None and (frames.shape[2], frames.shape[1]) != size:
        frames = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])
    write_video(dest, frames, fps)


class PipelineRunner:
    """Runs our pipeline (``replace_one``) on one conformed source, gates off (``enforce_gates=False``,
    ``force=True``), so every sample that does not raise yields a video; a sample the pipeline still refuses
    (e.g. BAIT finds no foreground) raises RuntimeError with the reason. Backends are loaded once."""

    def __init__(self, profile: str, work_dir: Path | None = None, use_ref_images: bool = False):
        from sparkle.backends import load_backends
        from sparkle.config import PipelineConfig

        # The source is already conformed to the reference size (multiples of 32) and frame count; the pipeline
        # keeps it (its frames too: no 16 fps resampling, the reference edits the frames it is given) unless
        # a side is over 1280x720 (a very elongated clip), and the output is resized back then.
        self.config = PipelineConfig(profile=profile, conform={"max_long_side": 1280, "max_short_side": 720,
                                                               "max_frames": REF_MAX_FRAMES, "fps": None})
        self.backends = load_backends(profile)
        self.work_dir = work_dir
        self.use_ref_images = use_ref_images

    def __call__(self, sample: BenchSample, conformed: Path, dest: Path, size: tuple[int, int]) -> None:
        from sparkle.layout import EDIT_TYPES
        from sparkle.media import read_video
        from .local import replace_one

        edit_type = sample.edit_type if sample.edit_type in EDIT_TYPES else "openve3m"
        keyword = f"{sample.subtheme}: {sample.scene}" if edit_type != "openve3m" else None
        background = sample.ref_image if self.use_ref_images else None
        with tempfile.TemporaryDirectory(prefix="sparkle-bench-") as tmp:
            out = self.work_dir or Path(tmp) / "work"
            task, store = replace_one(conformed, sample.prompt, out, edit_type=edit_type, background=background,
                                      chosen_keyword=keyword, force=True, enforce_gates=False, config=self.config,
                                      backends=self.backends)
            if task.status != "accepted":
                raise RuntimeError(f"pipeline refused the sample: {task.reason}")
            edited = read_video(store.path(task.refs["edited_video"]))
            _write_at_fps(edited.frames, dest, REF_FPS, size)


class CommandRunner:
    """Runs ``--command TEMPLATE`` (see :func:`render_command`) for one sample; success = exit status 0 and a
    decodable ``{output}``. An output not at 15 fps is re-encoded at 15 fps (same frames); otherwise it is
    kept byte for byte."""

    def __init__(self, template: str, timeout_s: float | None = None):
        if not template.strip():
            raise InputError("--command is empty")
        if "{output}" not in template:
            raise InputError("--command must contain {output} (where the command writes the edited video)")
        self.template = template
        self.timeout_s = timeout_s

    def __call__(self, sample: BenchSample, conformed: Path, dest: Path, size: tuple[int, int]) -> None:
        from sparkle.media import read_video

        values = {"input": str(conformed), "output": str(dest), "prompt": sample.prompt, "id": sample.id,
                  "source": str(sample.source), "edit_type": sample.edit_type, "subtheme": sample.subtheme,
                  "scene": sample.scene, "ref_image": str(sample.ref_image or "")}
        argv = render_command(self.template, values)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"command timed out after {self.timeout_s} s") from exc
        except OSError as exc:
            raise RuntimeError(f"command could not start: {exc}") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout or "").strip()[-500:]
            raise RuntimeError(f"command exited {proc.returncode}: {tail}")
        if not dest.is_file() or dest.stat().st_size == 0:
            raise RuntimeError(f"command exited 0 but wrote no {{output}} ({dest})")
        video = read_video(dest)  # InputError if undecodable
        if abs(video.fps - REF_FPS) > 0.01:
            _write_at_fps(video.frames, dest, REF_FPS)


def infer_one(sample: BenchSample, save_dir: Path, runner: Callable, max_frames: int = REF_MAX_FRAMES,
              max_area: int = REF_MAX_AREA) -> Path:
    """Make ``sample.output_path(save_dir)``: conform the source (:func:`conform_reference`), run ``runner``
    into a temporary file next to the output, then rename it into place (so an output that exists is whole).
    Raises SparkleError / RuntimeError / OSError on failure (the temporary file is removed)."""
    from sparkle.media import read_video, write_video

    final = sample.output_path(save_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = _tmp_output(final)
    with tempfile.TemporaryDirectory(prefix="sparkle-bench-in-") as tmp:
        video = conform_reference(read_video(sample.source, max_frames=max_frames), max_frames, max_area)
        conformed = write_video(Path(tmp) / f"{sample.id}.mp4", video.frames, video.fps)
        size = (video.frames.shape[2], video.frames.shape[1])
        try:
            runner(sample, conformed, tmp_out, size)
            if not tmp_out.is_file() or tmp_out.stat().st_size == 0:
                raise RuntimeError("no output was written")
            os.replace(tmp_out, final)
        finally:
            tmp_out.unlink(missing_ok=True)
    return final


@dataclass
class InferCounts:
    """Outcome of ``bench infer`` on one rank: samples done, skipped (output existed) and failed (with why)."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] | None = None


def run_infer(samples: list[BenchSample], save_dir: str | os.PathLike, runner: Callable, rank: int = 0,
              world_size: int = 1, max_frames: int = REF_MAX_FRAMES, max_area: int = REF_MAX_AREA,
              progress: Progress | None = None) -> InferCounts:
    """Run ``runner`` over this rank's shard, skipping samples whose output exists (non-empty); append one
    line per sample done or failed to ``{save_dir}/bench_infer_log.rank{rank}-of-{world_size}.jsonl``
    (``{"id", "edit_type", "status", "output", "error", "seconds"}``). Failures are counted, never raised."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    mine = shard(samples, rank, world_size)
    counts = InferCounts(failures=[])
    log_path = save_dir / f"bench_infer_log.rank{rank}-of-{world_size}.jsonl"
    task = progress.add_task("infer", total=len(mine)) if progress else None

    def describe():
        return f"rank {rank}/{world_size}: done {counts.done} skipped {counts.skipped} failed {counts.failed}"

    with log_path.open("a", encoding="utf-8") as log:
        for sample in mine:
            out = sample.output_path(save_dir)
            if out.is_file() and out.stat().st_size > 0:
                counts.skipped += 1
            else:
                started = time.perf_counter()
                error = None
                try:
                    infer_one(sample, save_dir, runner, max_frames, max_area)
                    counts.done += 1
                except Exception as exc:  # noqa: BLE001 - a failed sample is counted and logged, never fatal
                    error = f"{exc.__class__.__name__}: {exc}"
                    counts.failed += 1
                    counts.failures.append((sample.id, error))
                    err.print(f"[red]failed[/red] {sample.edit_type}/{sample.id}: {error}")
                log.write(json.dumps({"id": sample.id, "edit_type": sample.edit_type,
                                      "status": "failed" if error else "done", "output": str(out), "error": error,
                                      "seconds": round(time.perf_counter() - started, 3)}) + "\n")
                log.flush()
            if progress is not None:
                progress.update(task, advance=1, description=describe())
    return counts


def _parse_area(text: str) -> int:
    try:
        a, b = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise typer.BadParameter(f"expected WxH such as 1280x720, got {text!r}") from exc
    if a <= 0 or b <= 0:
        raise typer.BadParameter(f"expected positive sides, got {text!r}")
    return a * b


@bench_app.command("infer")
def bench_infer(
    bench_dir: Path = typer.Argument(..., help="Sparkle-Bench root ({edit_type}_bench.csv, source_videos/, ...)"),
    save_dir: Path = typer.Option(..., "--save-dir", "-o", help="checkpoint directory the edited videos go to"),
    profile: Optional[str] = typer.Option(None, "--profile", help="run our pipeline: cpu, tiny or real"),
    command: Optional[str] = typer.Option(
        None, "--command", help="run this command per sample instead; placeholders {input} (the conformed "
        "source mp4), {output} (write the edited mp4 here), {prompt}, {id}, {source} (the original file), "
        "{edit_type}, {subtheme}, {scene}, {ref_image} (empty if none). Split like a shell line, run without a "
        "shell: do not quote placeholders"),
    themes: list[str] = typer.Option([], "--theme", help="theme(s) to run (repeatable; default: all)"),
    rank: int = typer.Option(0, "--rank", min=0, help="this worker's index"),
    world_size: int = typer.Option(1, "--world-size", min=1, help="number of workers sharing the benchmark"),
    max_frames: int = typer.Option(REF_MAX_FRAMES, "--max-frames", min=5, help="frames kept from t=0 (then 4k+1)"),
    max_area: str = typer.Option("1280x720", "--max-area", help="largest output area WxH (sides then floored to 32)"),
    command_timeout: Optional[float] = typer.Option(None, "--command-timeout", help="seconds per --command run"),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="keep the pipeline's Sparkle-layout "
                                            "artifacts here (default: a temporary folder per sample)"),
    use_ref_images: bool = typer.Option(False, "--use-ref-images", help="give the pipeline ref_images/{edit_type}/"
                                        "{id}.png as the new background when the benchmark has one"),
) -> None:
    """Run our pipeline (--profile) or any command (--command) over the benchmark, writing
    SAVE_DIR/{edit_type}/{subtheme}---{scene_key}/{id}_edited.mp4 (reference conventions: first 81 frames,
    4k+1, area <= 720x1280 floored to multiples of 32, 15 fps). Existing outputs are skipped. Exit 3 if any
    sample failed (the others are written)."""
    try:
        if (profile is None) == (command is None):
            raise InputError("give exactly one of --profile (our pipeline) or --command (any command)")
        if profile is not None and profile not in ("cpu", "tiny", "real"):
            raise InputError(f"unknown profile {profile!r}; expected cpu, tiny or real")
        area = _parse_area(max_area)
        samples = load_bench(bench_dir, themes or None)
        shard(samples, rank, world_size)
        runner = CommandRunner(command, command_timeout) if command is not None else PipelineRunner(
            profile, work_dir, use_ref_images)
    except (SparkleError, typer.BadParameter) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err) as progress:
        counts = run_infer(samples, save_dir, runner, rank, world_size, max_frames, area, progress)
    typer.echo(f"bench infer (rank {rank}/{world_size}): done {counts.done}, skipped {counts.skipped}, "
               f"failed {counts.failed}; outputs under {save_dir}")
    for sid, why in counts.failures or []:
        typer.echo(f"  failed {sid}: {why}")
    if counts.failed:
        raise typer.Exit(EXIT_FAILURES)


# --- the judge ---------------------------------------------------------------------------------------------

def default_rubric_path():
    """The packaged rubric, ``sparkle/data/sparkle_bench_rubric.txt`` (an ``importlib.resources`` Traversable)."""
    return resources.files("sparkle") / "data" / "sparkle_bench_rubric.txt"


def load_rubric(path: str | os.PathLike | None = None) -> str:
    """The rubric text (default: the packaged one). It must contain ``{instruction}``, filled per sample by
    plain replacement (other braces are kept). Raises InputError otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8") if path else default_rubric_path().read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read the rubric: {exc}") from exc
    if INSTRUCTION_PLACEHOLDER not in text:
        raise InputError(f"the rubric has no {INSTRUCTION_PLACEHOLDER} placeholder")
    return text


SPARKLE_RUBRIC_NAME = "BACKGROUND_REPLACEMENT"
SPARKLE_RUBRIC_FIELD = "edit_prompt"
"""Sparkle's ``eval_sparkle_bench_gemini.py`` holds its rubric in ``BACKGROUND_REPLACEMENT`` and fills it with
``.format(edit_prompt=...)``."""


def rubric_from_script(path: str | os.PathLike) -> str:
    """The rubric of Sparkle's judge script, as a template for :func:`build_judge_request`.

    The script is parsed (``ast``), never executed: the module-level ``BACKGROUND_REPLACEMENT = "..."`` string is
    read and turned into our template by ``.format(edit_prompt="{instruction}")``, so that filling it later gives
    exactly ``BACKGROUND_REPLACEMENT.format(edit_prompt=instruction)`` (escaped braces included). Raises
    InputError when the file cannot be read or parsed, or holds no such string with an ``{edit_prompt}`` field.
    """
    import ast

    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read Sparkle's judge script {path}: {exc}") from exc
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == SPARKLE_RUBRIC_NAME
                                                 for t in node.targets)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            text = node.value.value
            break
    else:
        raise InputError(f"{path} has no module-level {SPARKLE_RUBRIC_NAME} = \"...\" string")
    try:
        return text.format(**{SPARKLE_RUBRIC_FIELD: INSTRUCTION_PLACEHOLDER})
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(f"{SPARKLE_RUBRIC_NAME} in {path} is not a template with only "
                         f"{{{SPARKLE_RUBRIC_FIELD}}}: {exc}") from exc


VIDEO_PARTS = ("video_url", "image_url")
"""How a video travels in a chat message: ``video_url`` (vLLM, the default) or ``image_url`` holding
``data:video/mp4;base64,...`` (what Sparkle's script sends: Gemini behind an OpenAI-compatible endpoint)."""


def video_data_url(path: str | os.PathLike) -> str:
    """``data:video/mp4;base64,...`` of a file (the mp4 bytes as they are)."""
    return "data:video/mp4;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def build_judge_request(model: str, rubric: str, instruction: str, source: str | os.PathLike,
                        edited: str | os.PathLike, max_tokens: int | None = 2048,
                        video_part: str = "video_url") -> dict:
    """Keyword arguments of ``client.chat.completions.create`` for one sample: the only place that knows the
    request format.

    One user message in the order of Sparkle's ``eval_sparkle_bench_gemini.py`` (``create_content([sys_prompt,
    source, edited])``): the rubric with ``{instruction}`` filled in, the source video, the edited video.
    ``video_part`` (:data:`VIDEO_PARTS`): Sparkle's script sends each video as an ``image_url`` part whose URL is
    ``data:video/mp4;base64,...`` (Gemini through an OpenAI-compatible endpoint takes that); vLLM's server
    needs ``video_url`` parts (http(s), ``data:video/...;base64`` or, with ``--allowed-local-media-path``,
    ``file://``) and samples frames for Qwen3-VL itself; two videos per request need ``--limit-mm-per-prompt
    '{"video": 2}'``. ``temperature=0`` and ``seed=42`` as in Sparkle's script. Raises ValueError for an
    unknown ``video_part``.
    """
    if video_part not in VIDEO_PARTS:
        raise ValueError(f"video_part must be one of {VIDEO_PARTS}, got {video_part!r}")
    content = [
        {"type": "text", "text": rubric.replace(INSTRUCTION_PLACEHOLDER, instruction)},
        {"type": video_part, video_part: {"url": video_data_url(source)}},
        {"type": video_part, video_part: {"url": video_data_url(edited)}},
    ]
    kwargs = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, "seed": 42}
    if max_tokens:
        kwargs["max_tokens"] = max_tokens
    return kwargs


class JudgeReplyError(ValueError):
    """The judge's reply lacks a dimension or has a value that is not an integer in 1..5 (it is retried)."""


_NUMBER = r"[-+]?\d+(?:\.\d+)?"


def parse_scores(text: str) -> list[int]:
    """The six scores of a judge reply, in :data:`DIMENSIONS` order, before the cap.

    A score is a line ``Name: N`` (case-insensitive; markdown such as ``**Name**: N``, ``- Name: **N**`` or
    ``N/5`` is tolerated); when a name appears on several lines the last one counts (the final verdict after
    the justification). Raises :class:`JudgeReplyError` when a dimension is missing or its value is not an
    integer in 1..5.
    """
    scores = []
    for name in DIMENSIONS:
        pattern = re.compile(r"^[\s*#>\-\d.)]*" + re.escape(name) + r"[\s*_]*:[\s*_]*(" + _NUMBER + r")",
                             re.IGNORECASE | re.MULTILINE)
        found = pattern.findall(text or "")
        if not found:
            raise JudgeReplyError(f"no '{name}: N' line in the reply")
        value = float(found[-1])
        if value != int(value) or not SCORE_MIN <= value <= SCORE_MAX:
            raise JudgeReplyError(f"{name} = {found[-1]} is not an integer in {SCORE_MIN}..{SCORE_MAX}")
        scores.append(int(value))
    return scores


def cap_scores(scores: list[int]) -> list[int]:
    """Dimensions 2-6 capped at Instruction Compliance (``min(s, scores[0])``): a video that ignores the
    instruction cannot score well elsewhere (Sparkle's rule, enforced in code, not only asked of the judge)."""
    return [scores[0]] + [min(s, scores[0]) for s in scores[1:]]


def _retryable(exc: Exception) -> bool:
    import openai

    if isinstance(exc, JudgeReplyError):
        return True
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return False


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    try:
        value = response.headers.get("retry-after") if response is not None else None
        return float(value) if value else None
    except (TypeError, ValueError):
        return None


@dataclass
class JudgeSettings:
    """How ``bench eval`` talks to the judge: ``attempts`` per sample (1 + retries), exponential back-off from
    ``backoff_s`` seconds (doubling, capped at ``max_backoff_s``, half of it random jitter), request
    ``timeout_s`` seconds, at most ``concurrency`` requests in flight, ``max_tokens`` per reply."""

    url: str
    model: str
    api_key: str = "EMPTY"
    timeout_s: float = 300.0
    attempts: int = 4
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0
    concurrency: int = 4
    max_tokens: int | None = 2048
    video_part: str = "video_url"
    azure_endpoint: str | None = None
    api_version: str = "2024-03-01-preview"

    def client(self):
        """An ``openai.OpenAI`` client on ``url``, or with ``azure_endpoint`` an ``openai.AzureOpenAI`` one
        (``api-key`` header, ``api-version`` query: Sparkle's script, ``api_version`` 2024-03-01-preview); our
        timeout and no SDK retries (ours are counted and logged)."""
        from openai import AzureOpenAI, OpenAI

        if self.azure_endpoint:
            return AzureOpenAI(azure_endpoint=self.azure_endpoint, api_version=self.api_version,
                               api_key=self.api_key, timeout=self.timeout_s, max_retries=0)
        return OpenAI(base_url=self.url, api_key=self.api_key, timeout=self.timeout_s, max_retries=0)


def judge_sample(client, settings: JudgeSettings, rubric: str, sample: BenchSample, edited: Path,
                 sleep: Callable[[float], None] = time.sleep) -> dict:
    """Score one sample: returns its record ``{id, prompt, edit_type, subtheme, scene, scores, result,
    attempts}`` (``scores`` capped, ``uncapped_scores`` as parsed) or, when every attempt failed, the same
    with ``scores = None`` and ``error`` (``result`` = the last reply, if any). Never raises for the judge's
    faults; retries connection errors, timeouts, 408/409/429/5xx and malformed replies with back-off."""
    record = {"id": sample.id, "prompt": sample.prompt, "edit_type": sample.edit_type, "subtheme": sample.subtheme,
              "scene": sample.scene, "scores": None, "result": ""}
    if not edited.is_file():
        return {**record, "error": f"edited video not found: {edited}", "attempts": 0}
    if not sample.source.is_file():
        return {**record, "error": f"source video not found: {sample.source}", "attempts": 0}
    try:
        request = build_judge_request(settings.model, rubric, sample.prompt, sample.source, edited,
                                      settings.max_tokens, settings.video_part)
    except OSError as exc:
        return {**record, "error": f"cannot read a video: {exc}", "attempts": 0}
    error, attempt = "", 0
    for attempt in range(1, settings.attempts + 1):
        try:
            response = client.chat.completions.create(**request)
            text = (response.choices[0].message.content or "") if response.choices else ""
            record["result"] = text
            raw = parse_scores(text)
            return {**record, "scores": cap_scores(raw), "uncapped_scores": raw, "attempts": attempt}
        except Exception as exc:  # noqa: BLE001 - every judge fault is recorded, never raised
            error = f"{exc.__class__.__name__}: {exc}"
            if not _retryable(exc) or attempt == settings.attempts:
                break
            delay = min(settings.max_backoff_s, settings.backoff_s * 2 ** (attempt - 1))
            delay = delay / 2 + random.uniform(0, delay / 2)
            hint = _retry_after(exc)
            sleep(min(settings.max_backoff_s, max(delay, hint)) if hint else delay)
    return {**record, "error": error, "attempts": attempt}


def score_file(save_dir: str | os.PathLike, edit_type: str, judge_model: str) -> Path:
    """``{save_dir}/{edit_type}_{judge_model}_sparkle_score.jsonl``; characters of the model name other than
    letters, digits, ``.``, ``_`` and ``-`` become ``_`` (``Qwen/Qwen3-VL-8B-Instruct`` ->
    ``Qwen_Qwen3-VL-8B-Instruct``), so a hub id stays one file name."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", judge_model)
    return Path(save_dir) / f"{edit_type}_{safe}_sparkle_score.jsonl"


def is_scored(record: dict) -> bool:
    """Whether a record holds six valid scores (and no error): such a sample is not judged again."""
    s = record.get("scores")
    return (not record.get("error") and isinstance(s, list) and len(s) == len(DIMENSIONS)
            and all(isinstance(v, int) and SCORE_MIN <= v <= SCORE_MAX for v in s))


def read_records(path: Path) -> dict[str, dict]:
    """Records of a score file by id. Unreadable lines (a line cut by a crash) are ignored; for an id written
    more than once, a scored record wins over an error, and a later one over an earlier one of the same kind."""
    out: dict[str, dict] = {}
    if not path.is_file():
        return out
    for line in jsonl_lines(path.read_text(encoding="utf-8")):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or "id" not in rec:
            continue
        old = out.get(rec["id"])
        if old is None or is_scored(rec) or not is_scored(old):
            out[rec["id"]] = rec
    return out


def _write_atomic(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def evaluate_checkpoint(save_dir: str | os.PathLike, samples: list[BenchSample], settings: JudgeSettings,
                        rubric: str, client=None, progress: Progress | None = None,
                        sleep: Callable[[float], None] = time.sleep) -> dict[str, Path]:
    """Judge every sample of one checkpoint directory, theme by theme; returns ``{edit_type: score file}``.

    Resume: records already scored in the theme's score file are kept and not sent again; samples with an
    error (or none) are judged. Each finished sample is appended to the file at once (one line, flushed),
    so a crash loses only the requests in flight; at the end the file is rewritten atomically with exactly
    one record per benchmark sample, in benchmark order.
    """
    save_dir = Path(save_dir)
    client = client or settings.client()
    by_theme: dict[str, list[BenchSample]] = {}
    for s in samples:
        by_theme.setdefault(s.edit_type, []).append(s)
    files: dict[str, Path] = {}
    for theme, theme_samples in by_theme.items():
        path = score_file(save_dir, theme, settings.model)
        path.parent.mkdir(parents=True, exist_ok=True)
        records = read_records(path)
        todo = [s for s in theme_samples if not is_scored(records.get(s.id, {}))]
        task = progress.add_task(f"{save_dir.name}/{theme}", total=len(todo)) if progress else None
        lock = threading.Lock()
        with path.open("a", encoding="utf-8") as out, \
                ThreadPoolExecutor(max_workers=max(1, settings.concurrency)) as pool:
            futures = {pool.submit(judge_sample, client, settings, rubric, s, s.output_path(save_dir), sleep): s
                       for s in todo}
            for fut in as_completed(futures):
                rec = fut.result()
                with lock:
                    records[rec["id"]] = rec
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    out.flush()
                if progress is not None:
                    progress.update(task, advance=1)
        wanted = [s.id for s in theme_samples]
        _write_atomic(path, [records[i] for i in wanted if i in records])
        files[theme] = path
    return files


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(files: dict[str, Path]) -> dict:
    """Per theme and MACRO: means of ``Ins, Vis, FgIn, FgMo, BgDy, BgVi`` and ``overall`` (mean of the six)
    over the scored samples, with ``n`` (scored) and ``failures`` (records with an error). MACRO is the
    unweighted mean over the themes that have at least one scored sample; its n and failures are sums.
    A column without data is None."""
    rows: dict[str, dict] = {}
    for theme, path in files.items():
        recs = list(read_records(path).values())
        scored = [r["scores"] for r in recs if is_scored(r)]
        row = {name: _mean([s[i] for s in scored]) for i, name in enumerate(SHORT_NAMES)}
        row["overall"] = _mean([float(np.mean(s)) for s in scored])
        row["n"], row["failures"] = len(scored), sum(1 for r in recs if not is_scored(r))
        rows[theme] = row
    have = [r for r in rows.values() if r["n"]]
    macro = {name: _mean([r[name] for r in have]) for name in (*SHORT_NAMES, "overall")}
    macro["n"] = sum(r["n"] for r in rows.values())
    macro["failures"] = sum(r["failures"] for r in rows.values())
    return {"themes": rows, "MACRO": macro}


def plot_summaries(summaries: dict[str, dict], path: str | os.PathLike) -> Path:
    """Grouped bar chart (matplotlib, Agg): one group per dimension plus ``overall``, one bar per checkpoint,
    MACRO values on the 1..5 scale (a missing value: no bar, labelled n/a). ``summaries``: ``{checkpoint label: summarize(...)}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = (*SHORT_NAMES, "overall")
    labels = list(summaries)
    x = np.arange(len(columns))
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(columns) + 0.4 * len(labels) * len(columns) / 3), 4.2))
    for k, label in enumerate(labels):
        macro = summaries[label]["MACRO"]
        values = [macro[c] if macro[c] is not None else 0.0 for c in columns]
        bars = ax.bar(x - 0.4 + width * (k + 0.5), values, width,
                      label=f"{label} (n={macro['n']}, failed {macro['failures']})")
        ax.bar_label(bars, labels=[f"{macro[c]:.2f}" if macro[c] is not None else "n/a" for c in columns],
                     fontsize=7, padding=1)
    ax.set_xticks(x, columns)
    ax.set_ylim(0, SCORE_MAX + 0.5)
    ax.set_ylabel(f"MACRO mean score ({SCORE_MIN}..{SCORE_MAX})")
    ax.set_title("Sparkle-Bench judge scores per dimension")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _checkpoint_labels(dirs: list[Path]) -> list[str]:
    names = [d.resolve().name or str(d) for d in dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in dirs]


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


@bench_app.command("eval", context_settings={"allow_extra_args": True})
def bench_eval(
    ctx: typer.Context,
    video_paths: list[Path] = typer.Option(..., "--video-paths", "--video_paths",
                                           help="checkpoint directories (the save_dir of bench infer); several "
                                                "may follow one --video-paths"),
    bench_dir: Path = typer.Option(..., "--bench-dir", "--bench_root",
                                   help="Sparkle-Bench root (prompts, keywords, source videos)"),
    judge_url: Optional[str] = typer.Option(None, "--judge-url",
                                            help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1"),
    azure_endpoint: Optional[str] = typer.Option(None, "--azure-endpoint",
                                                 help="Azure OpenAI endpoint instead of --judge-url (Sparkle's "
                                                      "script: $AZURE_ENDPOINT; key in --api-key)"),
    api_version: str = typer.Option("2024-03-01-preview", "--api-version", help="Azure OpenAI api-version"),
    judge_model: str = typer.Option(..., "--judge-model", "--model_id", help="model name the server serves"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="API key (default: $OPENAI_API_KEY, else "
                                          "$GEMINI_API_KEY with --azure-endpoint, else EMPTY)"),
    themes: list[str] = typer.Option([], "--theme", "--edit_types", help="theme(s) to score (repeatable; "
                                     "default: all); Sparkle's spelling takes several after one flag"),
    rubric: Optional[Path] = typer.Option(None, "--rubric", help="rubric text with {instruction} (default: packaged)"),
    rubric_from: Optional[Path] = typer.Option(None, "--rubric-from",
                                               help="Sparkle's eval_sparkle_bench_gemini.py: use its "
                                                    "BACKGROUND_REPLACEMENT rubric (parsed, not run)"),
    video_part: str = typer.Option("video_url", "--video-part",
                                   help="video_url (vLLM) or image_url (data:video/mp4 in an image part, as "
                                        "Sparkle's script sends to Gemini)"),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="requests in flight at most"),
    timeout: float = typer.Option(300.0, "--timeout", min=0.001, help="seconds per request"),
    retries: int = typer.Option(3, "--retries", min=0, help="retries per sample (errors and malformed replies)"),
    backoff: float = typer.Option(2.0, "--backoff", min=0.0, help="first back-off in seconds (then doubled)"),
    max_tokens: int = typer.Option(2048, "--max-tokens", min=0, help="reply length limit (0: server default)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG: checkpoints side by side per dimension"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON on stdout"),
) -> None:
    """Score each checkpoint's edited videos with the six-dimension judge. Writes
    {checkpoint}/{edit_type}_{judge_model}_sparkle_score.jsonl (resumed per sample) and prints per theme and
    MACRO means. Extra directories after --video-paths are taken as more checkpoints. Exit 3 if any sample
    still failed after its retries (it is written with its error)."""
    extra = [a for a in ctx.args]
    bad = [a for a in extra if a.startswith("-")]
    if bad:
        err.print(f"[red]error:[/red] unknown option(s): {' '.join(bad)}")
        raise typer.Exit(1)
    # Words after one --video-paths are more checkpoints; after Sparkle's --edit_types, more themes.
    more_themes = [a for a in extra if themes and a in bench_themes(bench_dir) and not Path(a).is_dir()]
    dirs = [*video_paths, *(Path(a) for a in extra if a not in more_themes)]
    try:
        if (judge_url is None) == (azure_endpoint is None):
            raise InputError("give exactly one of --judge-url and --azure-endpoint")
        if video_part not in VIDEO_PARTS:
            raise InputError(f"--video-part must be one of {', '.join(VIDEO_PARTS)}, got {video_part!r}")
        if rubric is not None and rubric_from is not None:
            raise InputError("give at most one of --rubric and --rubric-from")
        missing = [str(d) for d in dirs if not d.is_dir()]
        if missing:
            raise InputError(f"checkpoint directory not found: {', '.join(missing)}")
        text = rubric_from_script(rubric_from) if rubric_from is not None else load_rubric(rubric)
        samples = load_bench(bench_dir, [*themes, *more_themes] or None)
    except SparkleError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1)
    key = api_key or os.environ.get("OPENAI_API_KEY") or (os.environ.get("GEMINI_API_KEY") if azure_endpoint else None)
    settings = JudgeSettings(url=judge_url or "", model=judge_model, api_key=key or "EMPTY", timeout_s=timeout,
                             attempts=retries + 1, backoff_s=backoff, concurrency=concurrency,
                             max_tokens=max_tokens or None, video_part=video_part, azure_endpoint=azure_endpoint,
                             api_version=api_version)
    client = settings.client()
    summaries: dict[str, dict] = {}
    files: dict[str, dict[str, str]] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err) as progress:
        for label, d in zip(_checkpoint_labels(dirs), dirs):
            written = evaluate_checkpoint(d, samples, settings, text, client, progress)
            summaries[label] = summarize(written)
            files[label] = {k: str(v) for k, v in written.items()}
    failures = sum(s["MACRO"]["failures"] for s in summaries.values())
    if plot is not None:
        plot_summaries(summaries, plot)
    if as_json:
        typer.echo(json.dumps({"judge_model": judge_model, "checkpoints": summaries, "files": files,
                               "plot": str(plot) if plot else None}, indent=2))
    else:
        console = Console()
        for label, summary in summaries.items():
            table = Table("theme", *SHORT_NAMES, "overall", "n", "failures", title=f"{label} ({judge_model})")
            for theme, row in [*summary["themes"].items(), ("MACRO", summary["MACRO"])]:
                table.add_row(theme, *(_fmt(row[c]) for c in (*SHORT_NAMES, "overall")), str(row["n"]),
                              str(row["failures"]))
            console.print(table)
        if plot is not None:
            typer.echo(f"plot: {plot}")
    if failures:
        err.print(f"[yellow]{failures} sample(s) failed after retries; they are in the score files with their "
                  f"error and are judged again on the next run[/yellow]")
        raise typer.Exit(EXIT_FAILURES)
