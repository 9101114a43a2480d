"""``sparkle worker``, ``sparkle gateway`` and ``sparkle enqueue``: the processes of the distributed run.

Settings come from ``SPARKLE_*`` (:class:`~sparkle.orchestrator.settings.DistributedSettings`): the broker
(``SPARKLE_BROKER_URL``), the store (``SPARKLE_STORE_URL``) and the S3 endpoint and credentials.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sparkle.errors import SparkleError

err = Console(stderr=True)


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


def _options(option: list[str]) -> dict:
    from sparkle.cli import _option_value

    out = {}
    for item in option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--option expects KEY=VALUE, got {item!r}")
        out[key] = _option_value(value)
    return out


def worker_command(
    queues: str = typer.Option("sparkle.cpu", "--queues", "-Q",
                               help="comma-separated queues: sparkle.cpu (journeys) and/or sparkle.<service>"),
    pool: str = typer.Option("prefork", "--pool", help="prefork (model services), threads (journeys), solo"),
    concurrency: int = typer.Option(1, "--concurrency", "-c", min=1, help="processes or threads"),
    service_url: Optional[str] = typer.Option(None, "--service-url",
                                              help="the model server this worker calls (one service queue)"),
    backend: Optional[str] = typer.Option(None, "--backend",
                                          help="run the services in-process instead: cpu, tiny, real or module:factory"),
    option: list[str] = typer.Option([], "--option", help="in-process backend option KEY=VALUE (repeatable)"),
    hostname: Optional[str] = typer.Option(None, "--hostname", "-n", help="Celery node name (default: celery@host)"),
    loglevel: str = typer.Option("info", "--loglevel", "-l"),
) -> None:
    """Consume queues of the distributed run (Celery's own worker, in this process: SIGTERM is a warm
    shutdown that finishes the running tasks)."""
    from .routing import ALL_QUEUES, SERVICE_QUEUES

    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(names) - set(ALL_QUEUES))
    if not names or unknown:
        _fail(f"unknown queue(s) {', '.join(unknown) or '(none given)'}; expected some of {', '.join(ALL_QUEUES)}")
    if pool not in ("prefork", "threads", "solo"):
        _fail(f"--pool must be prefork, threads or solo, got {pool!r}")
    services = [s for s, q in SERVICE_QUEUES.items() if q in names]
    options = _options(option)
    from .celery_app import app
    from .tasks import configure_worker, store

    try:
        configure_worker(services, service_url, backend, {s: options for s in services})
        s = store()
        if hasattr(s, "ensure_bucket"):
            s.ensure_bucket()
    except SparkleError as exc:
        _fail(str(exc))
    argv = ["worker", "--queues", ",".join(names), "--pool", pool, "--concurrency", str(concurrency),
            "--loglevel", loglevel, "--without-gossip", "--without-mingle"]
    if hostname:
        argv += ["--hostname", hostname]
    app.worker_main(argv)


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
    max_size: str = typer.Option("832x480", "--max-size", help="largest output size WxH"),
    max_frames: int = typer.Option(81, "--max-frames", min=5, max=81),
    detach: bool = typer.Option(False, "--detach", help="hand the run to the orchestrator workers and return"),
    poll_s: float = typer.Option(1.0, "--poll-s", min=0.05, help="seconds between progress checks"),
    as_json: bool = typer.Option(False, "--json", help="print the final status as JSON"),
) -> None:
    """Generate a dataset from MANIFEST: register it (deterministic sample ids), then keep a bounded window
    of samples in flight until every one is finished. Running it again after a crash of anything resumes
    the same run: no sample is added twice or lost."""
    from sparkle.cli import _parse_size
    from sparkle.config import PipelineConfig

    from . import jobs
    from .celery_app import app
    from .routing import CPU_QUEUE
    from .settings import DistributedSettings
    from .tasks import store as worker_store

    if not manifest.is_file():
        _fail(f"manifest not found: {manifest}")
    settings = DistributedSettings()
    try:
        long_side, short_side = _parse_size(max_size)
        config = PipelineConfig(conform={"max_long_side": long_side, "max_short_side": short_side,
                                         "max_frames": max_frames})
        entries = jobs.parse_manifest(manifest.read_text(), "csv" if manifest.suffix.lower() == ".csv" else "jsonl")
        store = worker_store()
        if hasattr(store, "ensure_bucket"):
            store.ensure_bucket()
        ds = jobs.create_dataset(store, entries, root or manifest.parent, config, window or settings.bulk_window,
                                 name)
    except (SparkleError, ValueError, typer.BadParameter) as exc:
        _fail(str(exc))
    err.print(f"dataset [bold]{ds['id']}[/bold]: {ds['total']} samples ({', '.join(f'{k} {v}' for k, v in ds['by_edit_type'].items())})")
    if detach:
        app.send_task("sparkle.dataset_tick", args=[ds["id"]], kwargs={"resume": True}, queue=CPU_QUEUE,
                      ignore_result=True)
        typer.echo(ds["id"])
        return
    first = True
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as progress:
        bar = progress.add_task("samples", total=ds["total"])
        while True:
            state = jobs.dataset_tick(app, store, ds["id"], window, resume=first)
            first = False
            counts = state["counts"]
            progress.update(bar, completed=sum(counts.values()),
                            description=f"in flight {len(state['in_flight'])}, " +
                                        ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
            if state["done"]:
                break
            time.sleep(poll_s)
    status = jobs.dataset_status(store, ds["id"])
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    table = Table("stage", "in", "out", "refused", title=f"dataset {ds['id']}: " +
                  ", ".join(f"{k} {v}" for k, v in sorted(status["counts"].items())))
    for s in status["funnel"]["stages"]:
        table.add_row(f"{s['stage']} {s['name']}", str(s["in"]), str(s["out"]),
                      "; ".join(f"{n}: {why}" for why, n in s["refused"].items()))
    Console().print(table)
