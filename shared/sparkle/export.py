"""``sparkle export``: write the published samples of an artifact store as a Sparkle dataset folder.

The store is a :class:`~sparkle.store.LocalStore` (a directory, ``local:DIR``) or an
:class:`~sparkle.store_s3.S3Store` (``s3://BUCKET[/PREFIX]``); the output is a local folder ``OUT`` in the
released layout (``../shared/reference/formats.md``), for every theme (``edit_type``) exported::

    prompts/{et}_train.csv                       header prompt,src_video,tgt_video,task; one row per sample
    prompts/{et}_train_metadata.jsonl            one record per sample
    {et}/source_video/{id}.mp4                   loose media (left out with loose_media=False)
    {et}/edited_video/{id}.mp4
    intermediate_data/{et}/{folder}/{id}.*       every intermediate file of the sample (intermediate=True)
    intermediate_data/{et}/{record}.jsonl        the five per-stage records, one line per sample
    {et}_{source_video|edited_video}_partXX.tar  tar shards (shards=True), members {et}/{kind}/{id}.mp4

Which samples: the **published** ones, those with a record document ``published/{et}/{id}.json``. The document
is the commit point of :meth:`~sparkle.store.ArtifactStore.publish_sample` (artifacts are moved first, the
document written last), and the documents are listed first, once: a sample that is staged, rejected (only its
report exists) or being published right now is not exported, and every exported row names files that exist.
The CSV and JSONL files are materialised from the documents in id order (``sparkle.published``), streaming
(memory holds ids and file sizes, never the records), and **incrementally**: an output folder that already
holds an export gets only the new samples' lines merged in, reading only their documents from the store
(``force=True`` rebuilds them). A legacy store (published before documents existed) is adopted first.
Keys outside the layout (``staging/``, ``reports/``, ``jobs/``, ``datasets/``, ...) are never read.

Guarantees:

- **fail loud**: a published sample whose source or edited video is missing, or whose document is malformed,
  raises :class:`ExportError` naming the sample, before any file of ``OUT`` is replaced (the text files are
  staged as temporary files first). Nothing is dropped silently.
- **atomic files**: every file is written to a temporary ``.NAME.XXXX.part`` in its folder, then renamed onto
  its name (``os.replace``): a reader, or a crash, sees the previous file or the new one, never a prefix.
- **idempotent and resumable**: running the export again into the same folder skips media and intermediate
  files already there with the store's size (``force=True`` rewrites them), skips a shard whose members
  (names and sizes) are the planned ones, and merges new samples into the CSV and JSONL files. An interrupted export is
  completed by running it again. Shards of an earlier export that the new plan does not name (fewer parts) are
  removed; other files are never deleted.
- **deterministic shards**: members in id order, split greedily, fixed tar headers (PAX format, mtime 0,
  uid/gid 0, mode 0o644): two exports of the same data give byte-identical tars.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from . import layout
from .errors import SparkleError
from .published import LayoutError, StagedLayout, adopted_ids, stage_layout
from .store import ArtifactStore, LocalStore

SHARD_KINDS = ("source_video", "edited_video")
"""The two media folders that get tar shards."""

DEFAULT_SHARD_BYTES = 5 * 10**9
"""Largest shard (bytes): about 5 GB, as in the released dataset."""

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_TAR_FORMAT, _TAR_ENCODING = tarfile.PAX_FORMAT, "utf-8"

err = Console(stderr=True)


class ExportError(SparkleError):
    """The store cannot be exported: no published samples, an unknown theme, or an incomplete published sample."""


@dataclass
class _ThemePlan:
    """What one theme exports, listed from the store before anything is written. Sizes are in bytes."""

    edit_type: str
    ids: list[str]  # published sample ids, in id order
    media: dict[str, int] = field(default_factory=dict)  # source/edited video key -> size
    files: dict[str, int] = field(default_factory=dict)  # intermediate file key -> size


# --- public API ----------------------------------------------------------------------------------------------

def parse_bytes(text: str) -> int:
    """A size such as ``5GB``, ``500MB``, ``1.5GiB`` or ``1048576`` in bytes (k/M/G/T are powers of 1000,
    KiB/MiB/GiB/TiB powers of 1024; case-insensitive). Raises ValueError on anything else or a size < 1."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m[2] not in _UNITS:
        raise ValueError(f"not a size: {text!r} (expected e.g. 5GB, 500MB, 1048576)")
    try:
        size = int(Decimal(m[1]) * _UNITS[m[2]])
    except InvalidOperation as exc:
        raise ValueError(f"not a size: {text!r}") from exc
    if size < 1:
        raise ValueError(f"size must be at least 1 byte, got {text!r}")
    return size


def export_dataset(store: ArtifactStore, out: Path, edit_types: list[str] | None = None, shards: bool = False,
                   shard_bytes: int = DEFAULT_SHARD_BYTES, intermediate: bool = True, loose_media: bool = True,
                   force: bool = False, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Write the published samples of ``store`` into the folder ``out`` (created if missing) in the Sparkle layout.

    Args:
        store: the artifact store to read.
        out: the dataset root to write.
        edit_types: themes to export; None exports every theme that has a ``prompts/{et}_train.csv``.
        shards: also write the tar shards ``{et}_{source_video|edited_video}_partXX.tar`` in ``out``.
        shard_bytes: largest size of a shard file, in bytes; a shard holding one larger member is the exception.
        intermediate: also export ``intermediate_data/{et}/`` (files and the five records) of the samples.
        loose_media: write ``{et}/{source_video|edited_video}/{id}.mp4``; False needs ``shards=True``.
        force: rewrite files and shards that are already in ``out``, and rebuild the CSV and JSONL files
            from every record document instead of merging the new ones into them.
        progress: called as ``progress(key, done, total)`` after each media/intermediate file and shard
            member (``done`` and ``total`` count those).

    Returns:
        ``{"out", "samples": {et: count}, "total_samples", "files_written", "files_skipped", "shards",
        "shards_written", "shards_skipped", "bytes_written", "layout": {et: {"mode", "documents_read"}}}``:
        files count loose files (media, intermediates, CSV and JSONL), ``shards`` names every shard of the
        export, bytes are those written by this run; ``mode`` is how the CSV/JSONL files were made (``full``,
        ``incremental`` or ``unchanged``), ``documents_read`` how many record documents were read.

    Raises:
        ExportError: no published samples in the store, a requested theme has none, a legacy CSV row or a
            record document is malformed, or a published sample misses its source/edited video.
        ValueError: unknown theme, ``shard_bytes < 1``, or ``loose_media=False`` without shards.
    """
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be at least 1, got {shard_bytes}")
    if not loose_media and not shards:
        raise ValueError("loose_media=False needs shards=True: the videos would be written nowhere")
    plans = [_plan_theme(store, et, ids, intermediate) for et, ids in _themes(store, edit_types).items()]

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"out": str(out), "samples": {p.edit_type: len(p.ids) for p in plans},
               "total_samples": sum(len(p.ids) for p in plans), "files_written": 0, "files_skipped": 0,
               "shards": [], "shards_written": 0, "shards_skipped": 0, "bytes_written": 0, "layout": {}}
    total = sum((len(p.media) if loose_media else 0) + len(p.files) + (len(p.media) if shards else 0)
                for p in plans)
    done = 0

    def step(key: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(key, done, total)

    staged: list[StagedLayout] = []
    try:
        # The text files first, as temporary files: a malformed document fails the export before OUT changes.
        for plan in plans:
            staged.append(_stage_text(store, plan, out, intermediate, force))
        for plan in plans:
            loose = {**(plan.media if loose_media else {}), **plan.files}
            for key, size in loose.items():
                written = _copy(store, key, out / key, size, force)
                summary["files_skipped" if written is None else "files_written"] += 1
                summary["bytes_written"] += written or 0
                step(key)
            if shards:
                for kind in SHARD_KINDS:
                    members = [(k, s) for k, s in plan.media.items() if k.startswith(f"{plan.edit_type}/{kind}/")]
                    for name, written in _write_shards(store, out, f"{plan.edit_type}_{kind}", members, shard_bytes,
                                                       force, step):
                        summary["shards"].append(name)
                        summary["shards_written" if written else "shards_skipped"] += 1
                        summary["bytes_written"] += written
        # The CSV last: as in the store, a reader that finds a row finds every file it names.
        for text in staged:
            n = len(layout.layout_files(text.edit_type)) if intermediate else 2
            written = text.commit()
            summary["files_written"] += written
            summary["files_skipped"] += n - written if text.mode == "unchanged" else 0
            summary["bytes_written"] += text.bytes
            summary["layout"][text.edit_type] = {"mode": text.mode, "documents_read": text.new}
    finally:
        for text in staged:
            text.discard()
    return summary


def _stage_text(store: ArtifactStore, plan: _ThemePlan, out: Path, intermediate: bool, force: bool) -> StagedLayout:
    """The theme's CSV and JSONL files staged in ``out`` (all seven; without ``intermediate`` only the CSV and
    the metadata are written). Raises ExportError for a malformed or vanished document."""
    try:
        return stage_layout(store, plan.edit_type, out, plan.ids, incremental=not force, records=intermediate)
    except LayoutError as exc:
        raise ExportError(str(exc)) from None
    except KeyError as exc:
        raise ExportError(f"the record document {exc} disappeared from the store during the export") from None


def export_command(
    out: Path = typer.Argument(..., help="folder to write the dataset into (created if missing)"),
    store: str = typer.Option("data", "--store", envvar="SPARKLE_STORE_URL",
                              help="local:DIR, a directory, s3://BUCKET or s3://BUCKET/PREFIX"),
    edit_type: list[str] = typer.Option([], "--theme", help="theme to export (repeatable); default: every theme "
                                        "with published samples"),
    shards: bool = typer.Option(False, "--shards/--no-shards",
                                help="also write the videos as tar shards THEME_KIND_partXX.tar"),
    shard_size: str = typer.Option("5GB", "--shard-size", help="largest shard, e.g. 5GB, 500MB, 1048576 (bytes)"),
    intermediate: bool = typer.Option(True, "--intermediate/--no-intermediate",
                                      help="also export intermediate_data/ (files and the five records)"),
    loose_media: bool = typer.Option(True, "--loose-media/--no-loose-media",
                                     help="write the videos as loose files too (--no-loose-media needs --shards)"),
    force: bool = typer.Option(False, "--force", help="rewrite files and shards already in OUT"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Export the published samples of a store as a Sparkle dataset in OUT (re-runs skip what is there)."""
    try:
        shard_bytes = parse_bytes(shard_size)
        for et in edit_type:
            layout.check_edit_type(et)
        artifact_store = _open_store(store)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[key]}"))
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task("exporting", total=None, key="")

            def on_file(key: str, done: int, total: int) -> None:
                bar.update(task, completed=done, total=total, key=key)

            result = export_dataset(artifact_store, out, edit_type or None, shards=shards, shard_bytes=shard_bytes,
                                    intermediate=intermediate, loose_media=loose_media, force=force,
                                    progress=on_file)
    except (SparkleError, ValueError, ImportError) as exc:
        err.print("[red]error:[/red]", escape(str(exc)))
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table("theme", "samples", "shards")
    for et, count in result["samples"].items():
        table.add_row(et, str(count), str(sum(name.startswith(f"{et}_") for name in result["shards"])))
    console = Console()
    console.print(table)
    console.print(f"{result['total_samples']} samples exported to {out}: {result['files_written']} files and "
                  f"{result['shards_written']} shards written ({result['bytes_written']} bytes), "
                  f"{result['files_skipped'] + result['shards_skipped']} already there", markup=False, highlight=False)


# --- reading the store ---------------------------------------------------------------------------------------

def _open_store(url: str) -> ArtifactStore:
    """The store of ``--store`` (as ``sparkle serve`` opens it). Raises ExportError for a missing directory."""
    if ":" in url.split("/")[0]:  # local:DIR or s3://BUCKET (needs the distributed extra)
        from .store_s3 import open_store

        store = open_store(url)
    else:
        store = LocalStore(url)
    if isinstance(store, LocalStore) and not store.root.is_dir():
        raise ExportError(f"no such store folder: {store.root}")
    return store


def _themes(store: ArtifactStore, edit_types: list[str] | None) -> dict[str, list[str]]:
    """The themes to export, in EDIT_TYPES order, with their published ids (listed once, after adopting a
    legacy layout: the documents are the commit point). Raises ValueError/ExportError (see export_dataset)."""
    for et in edit_types or []:
        layout.check_edit_type(et)
    found = {}
    for et in layout.EDIT_TYPES:
        if edit_types is not None and et not in edit_types:
            continue
        try:
            ids = adopted_ids(store, et)
        except LayoutError as exc:
            raise ExportError(str(exc)) from None
        if ids:
            found[et] = ids
        elif edit_types is not None:
            raise ExportError(f"no published samples of theme {et!r} in the store: no {layout.PUBLISHED_PREFIX}{et}/*.json")
    if not found:
        raise ExportError("no published samples in the store: no published/{edit_type}/*.json record documents")
    return found


def _plan_theme(store: ArtifactStore, et: str, ids: list[str], intermediate: bool) -> _ThemePlan:
    """The theme's files' sizes for the published ``ids``; checks every sample has its source and edited video."""
    plan = _ThemePlan(et, ids)
    for kind, key_of in (("source_video", layout.source_video), ("edited_video", layout.edited_video)):
        sizes = _sizes_under(store, f"{et}/{kind}/")
        for sid in ids:
            key = key_of(et, sid)
            if key not in sizes:
                raise ExportError(f"published sample {sid}: {key} is missing in the store")
            plan.media[key] = sizes[key]
    if intermediate:
        wanted = set(ids)
        for key, size in _sizes_under(store, f"intermediate_data/{et}/").items():
            parts = key.split("/")  # intermediate_data, et, folder, {id}.{ext}
            if len(parts) == 4 and parts[3].split(".")[0] in wanted:
                plan.files[key] = size
    return plan


def _sizes_under(store: ArtifactStore, prefix: str) -> dict[str, int]:
    """Every key under ``prefix`` with its size in bytes, from one listing (LocalStore, S3Store)."""
    if isinstance(store, LocalStore):
        return {key: store.path(key).stat().st_size for key in store.list_keys(prefix)}
    try:
        from .store_s3 import S3Store
    except ImportError:  # the distributed extra is not installed: no S3Store to meet here
        S3Store = None
    if S3Store is not None and isinstance(store, S3Store):
        objects = store.client.list_objects(store.bucket, prefix=store.object_name(prefix.rstrip("/")) + "/",
                                            recursive=True)
        return {o.object_name[len(store.prefix):]: o.size for o in objects if not o.is_dir}
    sizes = {}  # another store: no size API, so measure a download
    with tempfile.TemporaryDirectory() as tmp:
        for key in store.list_keys(prefix):
            sizes[key] = store.get_file(key, Path(tmp) / "blob").stat().st_size
    return sizes


# --- writing -------------------------------------------------------------------------------------------------

@contextmanager
def _atomic(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it is renamed onto ``dest`` (mode 0o644)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _copy(store: ArtifactStore, key: str, dest: Path, size: int, force: bool) -> int | None:
    """Download ``key`` to ``dest`` unless it is there with ``size`` bytes. Returns bytes written, None if skipped."""
    if not force and dest.is_file() and dest.stat().st_size == size:
        return None
    with _atomic(dest) as tmp:
        try:
            store.get_file(key, tmp)
        except KeyError:
            raise ExportError(f"{key} disappeared from the store during the export") from None
    return dest.stat().st_size


# --- tar shards ----------------------------------------------------------------------------------------------

def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    """A member header that depends only on the name and the size (bytes): byte-identical across exports."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _member_bytes(name: str, size: int) -> int:
    """Bytes a member takes in the tar: its header(s) plus the data padded to 512-byte blocks."""
    header = _tar_info(name, size).tobuf(_TAR_FORMAT, _TAR_ENCODING, "surrogateescape")
    return len(header) + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _tar_bytes(content: int) -> int:
    """Size of a tar file whose members take ``content`` bytes: plus the two zero end blocks, padded to
    tarfile's 10240-byte records."""
    return -(-(content + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def plan_shards(members: list[tuple[str, int]], shard_bytes: int) -> list[list[tuple[str, int]]]:
    """Split ``(name, size)`` members, in order, into shards whose tar files take at most ``shard_bytes`` bytes:
    a new shard starts before a member that would push the current one past the limit; a member larger than
    the limit on its own gets its own shard."""
    groups: list[list[tuple[str, int]]] = []
    used = 0
    for name, size in members:
        need = _member_bytes(name, size)
        if not groups or _tar_bytes(used + need) > shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append((name, size))
        used += need
    return groups


def _write_shards(store: ArtifactStore, out: Path, stem: str, members: list[tuple[str, int]], shard_bytes: int,
                  force: bool, step: Callable[[str], None]) -> Iterator[tuple[str, int]]:
    """Write the shards ``{stem}_partXX.tar`` of ``members`` (ordered by id); yields (file name, bytes written).

    A shard already in ``out`` with the planned members is kept (0 bytes written) unless ``force``; shards of
    ``stem`` that the plan does not name are removed.
    """
    members = sorted(members, key=lambda m: layout.parse_sample_id(Path(m[0]).stem)[1])
    groups = plan_shards(members, shard_bytes)
    width = max(2, len(str(len(groups) - 1)))
    names = [f"{stem}_part{i:0{width}d}.tar" for i in range(len(groups))]
    for stale in out.glob(f"{stem}_part*.tar"):
        if re.fullmatch(rf"{re.escape(stem)}_part\d+\.tar", stale.name) and stale.name not in names:
            stale.unlink()
    for name, group in zip(names, groups):
        path = out / name
        if not force and _tar_members(path) == group:
            for key, _ in group:
                step(key)
            yield name, 0
            continue
        with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as scratch, _atomic(path) as tmp:
            with tarfile.open(tmp, "w", format=_TAR_FORMAT, encoding=_TAR_ENCODING) as tar:
                for key, size in group:
                    _add_member(tar, store, key, size, out / key, Path(scratch) / "member")
                    step(key)
        yield name, path.stat().st_size


def _tar_members(path: Path) -> list[tuple[str, int]] | None:
    """``(name, size)`` of every member of an existing tar; None if it is absent or unreadable."""
    try:
        with tarfile.open(path) as tar:
            return [(m.name, m.size) for m in tar.getmembers()]
    except (OSError, tarfile.TarError):
        return None


def _add_member(tar: tarfile.TarFile, store: ArtifactStore, key: str, size: int, loose: Path, scratch: Path) -> None:
    """Add ``key`` as a member named ``key``, from its loose copy in the export when that has ``size`` bytes, else
    downloaded. Raises ExportError if the store's object changed size since the listing."""
    src = loose if loose.is_file() and loose.stat().st_size == size else scratch
    if src is scratch:
        try:
            store.get_file(key, scratch)
        except KeyError:
            raise ExportError(f"{key} disappeared from the store during the export") from None
        if scratch.stat().st_size != size:
            raise ExportError(f"{key} changed in the store during the export ({size} -> "
                              f"{scratch.stat().st_size} bytes): run the export again")
    with open(src, "rb") as f:
        tar.addfile(_tar_info(key, size), f)


__all__ = ["DEFAULT_SHARD_BYTES", "ExportError", "SHARD_KINDS", "export_command", "export_dataset", "parse_bytes",
           "plan_shards"]
