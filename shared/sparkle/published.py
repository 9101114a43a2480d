"""Published samples: one record document per sample, and the layout's shared files materialised from them.

**Publishing is constant-time.** An accepted sample is committed by
:meth:`~sparkle.store.ArtifactStore.publish_sample`: its media move into the layout, then its record document
``published/{edit_type}/{id}.json`` (:func:`sample_document`: the CSV row, the metadata line and the five stage
records) is written once, atomically. Nothing shared is read or rewritten, so the cost of a publish does not
grow with the dataset and no lock serialises publishes; the document is the commit point.

**The shared files are materialised, not maintained.** ``prompts/{et}_train.csv``,
``prompts/{et}_train_metadata.jsonl`` and ``intermediate_data/{et}/{record}.jsonl`` (:func:`layout.layout_files
<sparkle.layout.layout_files>`) are built by :func:`materialise_layout` streaming over the documents in id
order: by ``sparkle export`` into its output folder, and by ``sparkle replace -o OUT`` into ``OUT`` itself.
Memory holds the list of ids (strings), never the records; the bytes are those the per-file upserts used to
write (csv ``QUOTE_MINIMAL`` with ``\\n`` line ends, ``json.dumps(..., ensure_ascii=False)`` lines).

**Incremental by compaction.** When the folder already holds a materialised layout, only the documents it
lacks (ids absent from its CSV) are read from the store, and their lines are merged into the existing files in
id order by one streaming pass over them. Why compaction and not ``--since TIME``: samples of a bulk run finish
out of id order and clocks of many workers differ, so a time watermark can miss or reorder samples, while the
folder's own CSV says exactly which samples it holds; and the store reads (the costly part on S3) are only the
new documents. A folder the merge cannot trust (a missing file, lines out of id order, ids the store no longer
publishes) is rebuilt in full; ``incremental=False`` forces that.

**Legacy stores** (published before documents existed: the shared files were the records) are adopted by
:func:`adopt_legacy`: a document is written for every CSV row without one, from the old files' lines.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

from . import layout
from .errors import SparkleError
from .store import ArtifactStore, LocalStore

_ID_PREFIX = re.compile(rb'^\{"id": "([^"\\]+)"')


class LayoutError(SparkleError):
    """A record document or a legacy layout file is malformed (names the sample and the file)."""


class _Rebuild(Exception):
    """The existing materialised files cannot be merged into (order, ids, header): rebuild them in full."""


# --- documents -----------------------------------------------------------------------------------------------

def sample_document(sid: str, edit_type: str, prompt: str, chosen_keyword: str | None, original_scene: str | None,
                    records: dict[str, dict]) -> dict:
    """The record document of an accepted sample: ``{"id", "edit_type", "row", "metadata", "records"}``.

    ``row``: its ``prompts/{et}_train.csv`` row (``prompt, src_video, tgt_video, task``); ``metadata``: its
    ``_train_metadata.jsonl`` line (``{"id", "prompt", "metadata": {"edit_type", "chosen_keyword",
    "original_scene"}}``; ``openve3m`` samples have ``edit_type = "openve3m_background_change"`` and no
    ``chosen_keyword``, as in the released data); ``records``: stage record name -> its JSONL line, in
    :data:`~sparkle.layout.RECORD_NAMES` order. Raises ValueError for an unknown theme or record name.
    """
    layout.check_edit_type(edit_type)
    unknown = set(records) - set(layout.RECORD_NAMES)
    if unknown:
        raise ValueError(f"unknown stage records {sorted(unknown)}")
    if edit_type == "openve3m":
        meta = {"edit_type": "openve3m_background_change", "original_scene": original_scene}
    else:
        meta = {"edit_type": edit_type, "chosen_keyword": chosen_keyword, "original_scene": original_scene}
    row = {"prompt": prompt, "src_video": layout.source_video(edit_type, sid),
           "tgt_video": layout.edited_video(edit_type, sid), "task": sid}
    return {"id": sid, "edit_type": edit_type, "row": row, "metadata": {"id": sid, "prompt": prompt, "metadata": meta},
            "records": {name: records[name] for name in layout.RECORD_NAMES if name in records}}


def _index(sid: str) -> int:
    return layout.parse_sample_id(sid)[1]


def published_ids(store: ArtifactStore, edit_type: str) -> list[str]:
    """Ids of the published samples of ``edit_type`` (those with a record document), in id order (by index,
    so ``..._999999`` comes before ``..._1000000``). One listing of ``published/{et}/``; keys that are not a
    sample id of the theme are ignored."""
    prefix = f"{layout.PUBLISHED_PREFIX}{edit_type}/"
    ids = []
    for key in store.list_keys(prefix):
        name = key[len(prefix):]
        if name.endswith(".json") and "/" not in name:
            try:
                et, _ = layout.parse_sample_id(name[:-5])
            except ValueError:
                continue
            if et == edit_type:
                ids.append(name[:-5])
    return sorted(ids, key=_index)


def read_document(store: ArtifactStore, edit_type: str, sid: str) -> dict:
    """The record document of ``sid``, checked. Raises KeyError if it is not published, LayoutError if it is
    malformed (not JSON, another id, a row naming other videos)."""
    key = layout.document(edit_type, sid)
    try:
        doc = json.loads(store.get_bytes(key))
    except json.JSONDecodeError as exc:
        raise LayoutError(f"published sample {sid}: {key} is not JSON ({exc.msg})") from None
    _check_document(doc, edit_type, sid, key)
    return doc


def _check_document(doc, et: str, sid: str, key: str) -> None:
    if not isinstance(doc, dict) or doc.get("id") != sid:
        raise LayoutError(f"published sample {sid}: {key} holds another sample")
    row, meta, records = doc.get("row"), doc.get("metadata"), doc.get("records")
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or row.get("task") != sid:
        raise LayoutError(f"published sample {sid}: {key} has no valid CSV row")
    if (row.get("src_video"), row.get("tgt_video")) != (layout.source_video(et, sid), layout.edited_video(et, sid)):
        raise LayoutError(f"published sample {sid}: its row names other videos than {layout.source_video(et, sid)} "
                          f"and {layout.edited_video(et, sid)}")
    if not isinstance(meta, dict) or meta.get("id") != sid:
        raise LayoutError(f"published sample {sid}: {key} has no metadata record")
    if not isinstance(records, dict) or not set(records) <= set(layout.RECORD_NAMES):
        raise LayoutError(f"published sample {sid}: {key} has unknown stage records")


def iter_documents(store: ArtifactStore, edit_type: str, ids: Iterable[str], workers: int = 16) -> Iterator[dict]:
    """The checked documents of ``ids``, in that order. A local store is read in this thread; other stores
    (S3: one GET each) with ``workers`` downloads in flight, at most ``4 * workers`` documents held.
    Raises KeyError (not published) or LayoutError (malformed)."""
    if isinstance(store, LocalStore) or workers <= 1:
        for sid in ids:
            yield read_document(store, edit_type, sid)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="documents") as pool:
        window: deque = deque()
        for sid in ids:
            window.append(pool.submit(read_document, store, edit_type, sid))
            if len(window) >= 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def published_documents(store: ArtifactStore, edit_type: str) -> Iterator[dict]:
    """Every published document of ``edit_type``, in id order (streamed)."""
    return iter_documents(store, edit_type, published_ids(store, edit_type))


# --- legacy stores -------------------------------------------------------------------------------------------

def adopt_legacy(store: ArtifactStore, edit_type: str, ids: list[str] | None = None) -> int:
    """Write a record document for every row of a legacy ``prompts/{et}_train.csv`` in ``store`` that has
    none, from the lines of the old metadata and record JSONL files (the last line of an id wins, as the old
    export read them). ``ids``: the theme's published ids if the caller has listed them already. Returns how
    many documents were written (0 for a store without legacy rows: a materialised CSV names only published
    samples, so a folder of the embedded default pays one streaming read of its CSV). Idempotent.

    Raises LayoutError: a row that is not a sample of the theme, names other videos, or has no metadata line.
    The CSV is streamed; the old JSONL files are read whole only when there are rows to adopt (once).
    """
    csv_key = layout.prompts_csv(edit_type)
    if not store.exists(csv_key):
        return 0
    have = set(published_ids(store, edit_type) if ids is None else ids)
    rows: dict[str, dict] = {}
    with _readable(store, csv_key) as path, open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            sid = row.get("task") or ""
            try:
                et, _ = layout.parse_sample_id(sid)
            except ValueError:
                et = None
            if et != edit_type:
                raise LayoutError(f"{csv_key}: task {sid!r} is not a sample id of theme {edit_type!r}")
            if sid not in have:
                rows[sid] = {col: row.get(col) or "" for col in layout.CSV_COLUMNS}
    if not rows:
        return 0

    def by_id(key: str) -> dict[str, dict]:
        return {r["id"]: r for r in store.read_jsonl(key) if isinstance(r, dict) and r.get("id") in rows}

    metadata = by_id(layout.prompts_metadata(edit_type))
    records = {name: by_id(layout.record(edit_type, name)) for name in layout.RECORD_NAMES}
    docs = []
    for sid in sorted(rows, key=_index):
        if sid not in metadata:
            raise LayoutError(f"published sample {sid}: no record in {layout.prompts_metadata(edit_type)}")
        doc = {"id": sid, "edit_type": edit_type, "row": rows[sid], "metadata": metadata[sid],
               "records": {name: records[name][sid] for name in layout.RECORD_NAMES if sid in records[name]}}
        _check_document(doc, edit_type, sid, csv_key)
        docs.append(doc)
    for doc in docs:  # all checked first: a bad legacy row adopts nothing
        store.put_json(layout.document(edit_type, doc["id"]), doc, compact=True)
    return len(docs)


def adopted_ids(store: ArtifactStore, edit_type: str) -> list[str]:
    """:func:`published_ids` after :func:`adopt_legacy`: one listing unless legacy rows were adopted."""
    ids = published_ids(store, edit_type)
    return published_ids(store, edit_type) if adopt_legacy(store, edit_type, ids) else ids


@contextmanager
def _readable(store: ArtifactStore, key: str) -> Iterator[Path]:
    """A local file holding ``key``: the store's own file for a local store, else a temporary download."""
    if isinstance(store, LocalStore):
        yield store.path(key)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield store.get_file(key, Path(tmp) / "file")


# --- materialising ---------------------------------------------------------------------------------------------

def _csv_writer(f):
    return csv.writer(f, lineterminator="\n")


def _old_csv(path: Path) -> Iterator[tuple[str, list[str]]]:
    """(task, fields) of every row of a materialised CSV. Raises _Rebuild on another header."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        if next(reader, None) != list(layout.CSV_COLUMNS):
            raise _Rebuild(f"{path}: unexpected header")
        for fields in reader:
            if len(fields) != len(layout.CSV_COLUMNS):
                raise _Rebuild(f"{path}: a row with {len(fields)} fields")
            yield fields[3], fields


def _old_jsonl(path: Path) -> Iterator[tuple[str, bytes]]:
    """(id, line) of every line of a materialised JSONL file, split at ``\\n`` only (binary lines)."""
    if not path.is_file():
        return
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            m = _ID_PREFIX.match(line)
            try:
                sid = m[1].decode() if m else json.loads(line)["id"]
            except (ValueError, KeyError, TypeError):
                raise _Rebuild(f"{path}: a line without an id") from None
            yield sid, line if line.endswith(b"\n") else line + b"\n"


class _Ordered:
    """An old file's ``(id, line)`` stream, checked to be in strictly increasing id order of one theme, with
    the line at its head (``head``, ``head_index``; ``head`` None at the end). Lines whose id is not in
    ``keep`` are skipped (records of a sample whose publish never reached the CSV). Raises _Rebuild."""

    def __init__(self, items: Iterator[tuple[str, object]], edit_type: str, keep: set[str] | None = None):
        self.items, self.et, self.keep, self.last = items, edit_type, keep, -1
        self.head: tuple[str, object] | None = None
        self.head_index = -1
        self.advance()

    def advance(self) -> None:
        for item in self.items:
            try:
                et, index = layout.parse_sample_id(item[0])
            except ValueError:
                raise _Rebuild(f"not a sample id: {item[0]!r}") from None
            if et != self.et or index <= self.last:
                raise _Rebuild("lines out of id order")
            self.last = index
            if self.keep is None or item[0] in self.keep:
                self.head, self.head_index = item, index
                return
        self.head = None

    def __iter__(self) -> Iterator[tuple[str, object]]:
        while self.head is not None:
            yield self.head
            self.advance()


class StagedLayout:
    """The seven layout files of one theme written to temporary files next to their destinations in ``out``;
    :meth:`commit` renames them into place (the CSV last: a reader that finds a row finds its records),
    :meth:`discard` removes them. ``samples``: published samples; ``new``: documents read from the store;
    ``mode``: ``full``, ``incremental`` or ``unchanged`` (nothing to write)."""

    def __init__(self, edit_type: str, out: Path):
        self.edit_type, self.out = edit_type, Path(out)
        self.temps: dict[str, Path] = {}
        self.samples = self.new = 0
        self.mode = "full"
        self.bytes = 0

    def commit(self) -> int:
        """Rename every temporary file onto its key (CSV last); returns how many files were written."""
        csv_key = layout.prompts_csv(self.edit_type)
        for key in sorted(self.temps, key=lambda k: k == csv_key):
            os.chmod(self.temps[key], 0o644)
            os.replace(self.temps[key], self.out / key)
        written, self.temps = len(self.temps), {}
        return written

    def discard(self) -> None:
        for tmp in self.temps.values():
            tmp.unlink(missing_ok=True)
        self.temps = {}


def _existing_ids(out: Path, edit_type: str, ids: list[str]) -> set[str] | None:
    """Ids the folder's materialised CSV holds, if the folder can be merged into; None means rebuild."""
    csv_path = out / layout.prompts_csv(edit_type)
    if not csv_path.is_file() or not (out / layout.prompts_metadata(edit_type)).is_file():
        return None
    try:
        old = {sid for sid, _ in _Ordered(_old_csv(csv_path), edit_type)}
    except (_Rebuild, OSError, UnicodeDecodeError, csv.Error):
        return None
    if not old <= set(ids):  # the folder holds samples the store does not publish: mirror the store
        return None
    return old


def stage_layout(store: ArtifactStore, edit_type: str, out: str | os.PathLike, ids: list[str] | None = None,
                 incremental: bool = True, workers: int = 16, records: bool = True) -> StagedLayout:
    """Write the theme's seven layout files for the published samples ``ids`` (default: all, in id order)
    to temporary files in ``out``; return them staged (call ``commit()``). Streams: one document at a time.
    ``records=False``: only the CSV and the metadata (the five record files are neither read nor written).

    Incremental (default): when ``out`` already holds a materialised layout of a subset of ``ids``, only the
    missing documents are read and merged into the existing lines; otherwise (or ``incremental=False``) the
    files are built from every document. Raises LayoutError (a malformed document), KeyError (a document
    vanished); nothing is left behind on error.
    """
    out = Path(out)
    ids = published_ids(store, edit_type) if ids is None else ids
    staged = StagedLayout(edit_type, out)
    staged.samples = len(ids)
    old = _existing_ids(out, edit_type, ids) if incremental else None
    if old is not None:
        new = [sid for sid in ids if sid not in old]
        if not new:
            staged.mode = "unchanged"
            return staged
        try:
            _write(store, edit_type, out, new, staged, old, workers, records)
            staged.mode, staged.new = "incremental", len(new)
            return staged
        except _Rebuild:
            staged.discard()
        except BaseException:
            staged.discard()
            raise
    try:
        _write(store, edit_type, out, ids, staged, None, workers, records)
    except BaseException:
        staged.discard()
        raise
    staged.mode, staged.new = "full", len(ids)
    return staged


def _write(store: ArtifactStore, et: str, out: Path, ids: list[str], staged: StagedLayout, keep: set[str] | None,
           workers: int, records: bool) -> None:
    """Stream the documents of ``ids`` into temp files; with ``keep`` (the ids of the folder's CSV), merge
    them with the existing files' lines of those ids, in id order. ``records``: the five record files too."""
    keys = layout.layout_files(et) if records else layout.layout_files(et)[:2]
    csv_key, meta_key, record_keys = keys[0], keys[1], keys[2:]
    handles, lines = {}, dict.fromkeys(keys, 0)
    try:
        for key in keys:
            dest = out / key
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
            staged.temps[key] = Path(tmp)
            handles[key] = os.fdopen(fd, "w", newline="", encoding="utf-8") if key == csv_key else os.fdopen(fd, "wb")
        writer = _csv_writer(handles[csv_key])
        writer.writerow(layout.CSV_COLUMNS)
        old = {}
        if keep is not None:
            old[csv_key] = _Ordered(_old_csv(out / csv_key), et)
            for key in keys[1:]:
                old[key] = _Ordered(_old_jsonl(out / key), et, keep)

        def copy_old(key: str, below: float) -> None:
            stream = old.get(key)
            while stream is not None and stream.head is not None and stream.head_index < below:
                if key == csv_key:
                    writer.writerow(stream.head[1])
                else:
                    handles[key].write(stream.head[1])
                lines[key] += 1
                stream.advance()
            if stream is not None and stream.head is not None and stream.head_index == below:
                raise _Rebuild(f"{key} already holds {stream.head[0]}")

        for doc in iter_documents(store, et, ids, workers):
            index = _index(doc["id"])
            for key in keys:
                copy_old(key, index)
            row = doc["row"]
            writer.writerow([row[c] for c in layout.CSV_COLUMNS])
            handles[meta_key].write(_line(doc["metadata"]))
            lines[csv_key] += 1
            lines[meta_key] += 1
            for name, key in zip(layout.RECORD_NAMES, record_keys):
                if name in doc["records"]:
                    handles[key].write(_line(doc["records"][name]))
                    lines[key] += 1
        for key in keys:
            copy_old(key, float("inf"))
    finally:
        for f in handles.values():
            f.close()
    for key in record_keys:  # a record no sample has gets no file (as the per-file upserts never made one)
        if lines[key] == 0 and not (out / key).is_file():
            staged.temps.pop(key).unlink()
    staged.bytes = sum(p.stat().st_size for p in staged.temps.values())


def _line(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode()


def materialise_layout(store: ArtifactStore, out: str | os.PathLike | None = None,
                       edit_types: list[str] | None = None, incremental: bool = True) -> dict:
    """Materialise the shared layout files of every theme with published samples (or of ``edit_types``)
    into the folder ``out`` (default: the store's own root, for a :class:`~sparkle.store.LocalStore`).

    Adopts legacy rows first (:func:`adopt_legacy`). When ``out`` is the store's root, the store's lock
    ``layout-{et}`` keeps two materialisations of a theme apart (publishes never wait for it).
    Returns ``{et: {"samples", "new", "mode", "files_written", "bytes"}}``. Raises LayoutError, ValueError
    (no ``out`` for a store without a root folder).
    """
    if out is None:
        if not isinstance(store, LocalStore):
            raise ValueError("materialise_layout needs an output folder for a store that is not a local folder")
        out = store.root
    out = Path(out)
    in_place = isinstance(store, LocalStore) and out.resolve() == store.root
    result = {}
    for et in edit_types or layout.EDIT_TYPES:
        with store.lock(f"layout-{et}") if in_place else nullcontext():
            ids = adopted_ids(store, et)
            if not ids:
                continue
            staged = stage_layout(store, et, out, ids, incremental)
            written = staged.commit()
        result[et] = {"samples": staged.samples, "new": staged.new, "mode": staged.mode, "files_written": written,
                      "bytes": staged.bytes}
    return result


__all__ = ["LayoutError", "StagedLayout", "adopt_legacy", "adopted_ids", "iter_documents", "materialise_layout",
           "published_documents", "published_ids", "read_document", "sample_document", "stage_layout"]
