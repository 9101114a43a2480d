"""``sparkle filter``: the Stage 1 camera filter on its own, over one video or thousands.

Registered by the main CLI as ``app.command("filter")(filter_command)``. Inputs are expanded by
:func:`expand_inputs`; each video is analysed by :func:`sparkle.algorithms.camera.check_fixed_camera_file`
(decodes only the samples it needs) in this process or, with ``--jobs N``, in N worker processes.
"""

from __future__ import annotations

import csv
import io
import json
import math
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import CameraFilterConfig, PipelineConfig
from .errors import SparkleError
from .media import VIDEO_SUFFIXES

MANIFEST_SUFFIXES = {".txt", ".csv", ".jsonl"}
MANIFEST_COLUMNS = ("video", "path", "src_video")  # first one present wins


def _manifest_paths(manifest: Path) -> list[Path]:
    """Video paths listed in a ``.txt`` (one a line; blank lines and ``#`` comments skipped), ``.csv`` or
    ``.jsonl`` (column/field ``video``, ``path`` or ``src_video``). Relative paths are resolved against the
    manifest's folder. Raises ValueError on a manifest without such a column."""
    base, suffix = manifest.parent, manifest.suffix.lower()
    text = manifest.read_text(encoding="utf-8")
    entries: list[str] = []
    if suffix == ".txt":
        entries = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    elif suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        col = next((c for c in MANIFEST_COLUMNS if rows and c in rows[0]), None)
        if rows and col is None:
            raise ValueError(f"no column named one of {MANIFEST_COLUMNS} in {manifest}")
        entries = [r[col].strip() for r in rows if r.get(col) and r[col].strip()]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            col = next((c for c in MANIFEST_COLUMNS if isinstance(row, dict) and row.get(c)), None)
            if col is None:
                raise ValueError(f"line {n} of {manifest} has no field named one of {MANIFEST_COLUMNS}")
            entries.append(str(row[col]))
    return [p if (p := Path(e).expanduser()).is_absolute() else base / p for e in entries]


def expand_inputs(items: list[Path]) -> list[tuple[Path, str | None]]:
    """Expand command-line inputs into ``(video path, error or None)`` in input order.

    A file whose suffix is .txt/.csv/.jsonl is a manifest; a directory gives every file with a video suffix
    (:data:`sparkle.media.VIDEO_SUFFIXES`) under it, recursively, sorted; anything else is a video (a
    missing one is kept, with its error, so the run reports it). An unreadable manifest or a directory
    without videos gives one error entry.
    """
    out: list[tuple[Path, str | None]] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
            out += [(f, None) for f in found] or [(p, f"no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) "
                                                     f"under directory {p}")]
        elif p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
            try:
                out += [(v, None) for v in _manifest_paths(p)]
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                out.append((p, f"unreadable manifest {p}: {exc}"))
        else:
            out.append((p, None))
    return out


def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def analyse_one(path: str, cfg: dict, threads: int = 0) -> dict:
    """Analyse one video; never raises. Returns ``{"video", "accepted", "reason", "error", **metrics}``.

    ``cfg``: :class:`CameraFilterConfig` fields. ``error`` is None, or the reason the file could not be
    analysed (missing, empty, undecodable); then ``accepted`` is False. NaN metrics become None.
    Top-level so worker processes can run it.
    """
    from .algorithms.camera import check_fixed_camera_file  # cv2/av load in the worker, not at CLI import

    try:
        d = check_fixed_camera_file(path, CameraFilterConfig(**cfg), threads=threads)
    except SparkleError as exc:
        return {"video": path, "accepted": False, "reason": str(exc), "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one bad file must not end a bulk run
        msg = f"analysis failed: {exc.__class__.__name__}: {exc}"
        return {"video": path, "accepted": False, "reason": msg, "error": msg}
    row = {k: _clean(v) for k, v in d.as_dict().items()}
    return {"video": path, "accepted": row.pop("accepted"), "reason": row.pop("reason"), "error": None, **row}


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # N processes already fill the cores


def run_filter(videos: list[tuple[Path, str | None]], cfg: CameraFilterConfig, jobs: int = 1) -> list[dict]:
    """Results of :func:`analyse_one` for ``videos`` (from :func:`expand_inputs`), in input order.

    ``jobs > 1``: a ``ProcessPoolExecutor`` of that many spawned workers, each decoding single-threaded.
    A worker that dies gives an error result for its video and the others still run.
    """
    data = cfg.model_dump()
    results: list[dict | None] = [None] * len(videos)
    todo = []
    for i, (p, error) in enumerate(videos):
        if error:
            results[i] = {"video": str(p), "accepted": False, "reason": error, "error": error}
        else:
            todo.append(i)
    if jobs <= 1 or len(todo) <= 1:
        for i in todo:
            results[i] = analyse_one(str(videos[i][0]), data)
    else:
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=get_context("spawn"),
                                 initializer=_init_worker) as pool:
            futures = {i: pool.submit(analyse_one, str(videos[i][0]), data, 1) for i in todo}
            for i, fut in futures.items():
                try:
                    results[i] = fut.result()
                except Exception as exc:  # noqa: BLE001 - BrokenProcessPool and the like
                    msg = f"worker failed: {exc.__class__.__name__}: {exc}"
                    results[i] = {"video": str(videos[i][0]), "accepted": False, "reason": msg, "error": msg}
    return [r for r in results if r is not None]


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _table(results: list[dict], cfg: CameraFilterConfig) -> Table:
    t = Table(title=f"camera filter: px at {cfg.analysis_width} px wide per {1 / cfg.sample_fps:g} s "
                    f"(limits: corner {cfg.max_corner_motion_px}, border {cfg.max_border_flow_px}, "
                    f"inliers >= {cfg.min_inlier_ratio})")
    for col, just in [("video", "left"), ("accepted", "center"), ("corner px", "right"), ("border px", "right"),
                      ("inliers", "right"), ("pairs", "right"), ("reason", "left")]:
        t.add_column(col, justify=just, overflow="fold")
    for r in results:
        ok = "[green]yes[/]" if r["accepted"] else ("[red]error[/]" if r.get("error") else "[yellow]no[/]")
        pairs = "-" if r.get("error") else f"{r['pairs']}" + (f" ({r['fallback_pairs']} ncc)"
                                                                if r.get("fallback_pairs") else "")
        t.add_row(r["video"], ok, _fmt(r.get("corner_px")), _fmt(r.get("border_px")),
                  _fmt(r.get("inlier_ratio")), pairs, r["reason"])
    return t


def filter_command(
    videos: list[Path] = typer.Argument(..., help="video files, directories (searched recursively) or manifests "
                                                  "(.txt one path a line; .csv/.jsonl with a video/path/src_video "
                                                  "column; relative paths from the manifest's folder)"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list instead of a table"),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="worker processes (bulk mode)"),
    max_corner_motion_px: Optional[float] = typer.Option(
        None, "--max-corner-px", help="refuse above this median corner motion under H, px per pair "
                                      "[default 1.0; env SPARKLE_CAMERA__MAX_CORNER_MOTION_PX]"),
    max_border_flow_px: Optional[float] = typer.Option(
        None, "--max-border-px", help="refuse above this median border-band flow, px per pair [default 1.0]"),
    min_inlier_ratio: Optional[float] = typer.Option(
        None, "--min-inliers", help="refuse below this median RANSAC inlier ratio [default 0.3]"),
    sample_fps: Optional[float] = typer.Option(None, "--sample-fps", help="samples per second [default 2]"),
    analysis_width: Optional[int] = typer.Option(None, "--width", help="analysis width, px [default 640]"),
    max_frames: Optional[int] = typer.Option(
        None, "--max-frames", help="decode at most this many frames from t=0 [default 81, what the pipeline keeps]"),
    max_seconds: Optional[float] = typer.Option(
        None, "--max-seconds", help="decode at most this many seconds from t=0 [default: no limit]"),
) -> None:
    """Is each video a fixed-camera shot? Prints, per video, accepted, the reason and the metrics.

    Metrics are medians over frame pairs sampled at 2 FPS, in px at 640 px width per 0.5 s: corner (image
    corners' motion under the background's RANSAC homography), border (median optical flow in the outer 10 %
    band), inliers (RANSAC inlier ratio). Defaults come from SPARKLE_CAMERA__* environment variables, then
    the built-in values (SOURCES.md: fixed-camera clips <= 0.05 px, handheld >= 6.6 px; limit 1 px).

    Exit code 0 when every video could be analysed (accepted or not); 1 if any was missing or undecodable.
    """
    try:
        cfg = PipelineConfig().camera
        overrides = {k: v for k, v in dict(max_corner_motion_px=max_corner_motion_px,
                                           max_border_flow_px=max_border_flow_px, min_inlier_ratio=min_inlier_ratio,
                                           sample_fps=sample_fps, analysis_width=analysis_width,
                                           analysis_max_frames=max_frames,
                                           analysis_max_seconds=max_seconds).items() if v is not None}
        cfg = CameraFilterConfig(**{**cfg.model_dump(), **overrides})
    except Exception as exc:  # pydantic ValidationError: a bad value
        Console(stderr=True).print(f"[red]error:[/] bad camera-filter configuration: {exc}")
        raise typer.Exit(1) from exc
    results = run_filter(expand_inputs(list(videos)), cfg, jobs)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        Console(width=max(120, Console().width)).print(_table(results, cfg))
        n_ok = sum(r["accepted"] for r in results)
        n_err = sum(bool(r.get("error")) for r in results)
        typer.echo(f"{n_ok} accepted, {len(results) - n_ok - n_err} refused, {n_err} could not be analysed")
    if any(r.get("error") for r in results):
        raise typer.Exit(1)
