"""The viewer's index of samples: one SQLite row per sample, kept in step with the store by version tags.

Listing 100 000 samples with filters cannot read 100 000 JSON documents per page, so the viewer keeps an index:
a SQLite database (Python's ``sqlite3``) with one row per sample (theme, state, stage, refusal stage, mean
``O_score``, prompt, dataset, owner, update time) and one row per stage decision (for the funnel). A page is an
indexed ``SELECT ... LIMIT/OFFSET`` (milliseconds at 100 000 rows: ``benchmarks/viewer_list.py``).

**What is indexed.** For every sample id, its job document ``jobs/{id}.json`` (state of a queued, running or
finished journey: the gateway's and, since the viewer, ``sparkle replace``'s) or, for a folder made before job
documents existed, its report ``reports/{edit_type}/{id}.json``. Both carry the per-stage decisions, so both
give the state, the refusal stage and the scores.

**Staying in step.** :meth:`SampleIndex.refresh` lists the version tag of every file under ``jobs/`` and
``reports/`` (:meth:`~sparkle.store.ArtifactStore.list_versions`: a ``stat`` per file, or a LIST per 1 000
objects), and re-reads only the documents whose tag changed; documents that disappeared drop their sample.
The database lives in a cache folder, not in the dataset (``$SPARKLE_VIEWER_CACHE``, default
``~/.cache/sparkle-factory/viewer/``, or the temporary folder where the home is read-only: the gateway's pod;
one file per store), so a restart re-reads nothing that did not change.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sparkle.store import ArtifactStore

_JOB = re.compile(r"^jobs/(Sparkle_[a-z0-9]+_\d{6,})\.json$")
_REPORT = re.compile(r"^reports/[a-z0-9]+/(Sparkle_[a-z0-9]+_\d{6,})\.json$")

STATES = ("queued", "running", "accepted", "rejected", "failed", "cancelled")
PAGE_SIZE = 50

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (key TEXT PRIMARY KEY, version TEXT NOT NULL, sid TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS files_sid ON files (sid);
CREATE TABLE IF NOT EXISTS samples (
    id TEXT PRIMARY KEY, edit_type TEXT, state TEXT, stage TEXT, refused_stage TEXT, mean_o REAL,
    prompt TEXT, reason TEXT, dataset TEXT, owner TEXT, updated_at REAL, seconds REAL);
CREATE INDEX IF NOT EXISTS samples_updated ON samples (updated_at DESC, id);
CREATE INDEX IF NOT EXISTS samples_type ON samples (edit_type, updated_at DESC);
CREATE INDEX IF NOT EXISTS samples_state ON samples (state, updated_at DESC);
CREATE INDEX IF NOT EXISTS samples_refused ON samples (refused_stage, updated_at DESC);
CREATE INDEX IF NOT EXISTS samples_dataset ON samples (dataset, updated_at DESC);
CREATE INDEX IF NOT EXISTS samples_owner ON samples (owner, updated_at DESC);
CREATE INDEX IF NOT EXISTS samples_score ON samples (mean_o);
CREATE TABLE IF NOT EXISTS decisions (sid TEXT, stage INTEGER, name TEXT, accepted INTEGER);
CREATE INDEX IF NOT EXISTS decisions_sid ON decisions (sid);
CREATE VIRTUAL TABLE IF NOT EXISTS texts USING fts5(body, tokenize='trigram');
"""
SCHEMA_VERSION = 2
"""Bumped when the schema changes: an index file of another version is rebuilt from the store."""


def cache_path(store: ArtifactStore) -> Path:
    """The index file of ``store``: ``$SPARKLE_VIEWER_CACHE`` (default ``~/.cache/sparkle-factory/viewer``) /
    SHA-256 of the store's description (its folder, or bucket and prefix) + ``.sqlite``."""
    root = Path(os.environ.get("SPARKLE_VIEWER_CACHE") or Path.home() / ".cache" / "sparkle-factory" / "viewer")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home (a container's root filesystem): the temporary folder
        root = Path(tempfile.gettempdir()) / "sparkle-viewer"
    where = str(getattr(store, "root", None) or repr(store))
    return root / (hashlib.sha256(where.encode()).hexdigest()[:24] + ".sqlite")


def row_of(doc: dict) -> dict:
    """The index row of a job document or a report (``status`` in reports, ``state`` in job documents).

    ``refused_stage``: the stage name that refused a rejected sample (its first decision not accepted), or the
    stage that raised for a failed or cancelled one. ``mean_o``: the stage-5 gate's mean ``O_score`` (None
    before stage 5 ran)."""
    state = doc.get("state") or doc.get("status")
    stages = doc.get("stages") or []
    refused = None
    if state == "rejected":
        refused = next((d["name"] for d in stages if not d.get("accepted")), None)
    elif state in ("failed", "cancelled"):
        refused = (doc.get("error") or {}).get("stage") or doc.get("failed_stage")
    mean_o = next((d.get("scores", {}).get("mean_O_score") for d in stages if d.get("name") == "synthesis"), None)
    return {"id": doc["id"], "edit_type": doc.get("edit_type"), "state": state,
            "stage": doc.get("stage") or (stages[-1]["name"] if stages else None), "refused_stage": refused,
            "mean_o": mean_o, "prompt": doc.get("prompt") or "", "reason": doc.get("reason") or "",
            "dataset": doc.get("dataset"), "owner": doc.get("owner", ""),
            "updated_at": doc.get("updated_at") or doc.get("submitted_at") or 0.0,
            "seconds": round(sum(d.get("seconds", 0.0) for d in stages), 3),
            "decisions": [(d.get("stage", 0), d["name"], bool(d.get("accepted"))) for d in stages]}


@dataclass
class Filters:
    """What the list shows: ``theme`` (edit_type), ``state``, ``min_score``/``max_score`` (mean ``O_score``,
    0..10), ``refused_stage`` (stage name), ``dataset``, ``q`` (a substring of the id or the prompt,
    case-insensitive; from 3 characters on through a trigram index)."""

    theme: str | None = None
    state: str | None = None
    min_score: float | None = None
    max_score: float | None = None
    refused_stage: str | None = None
    dataset: str | None = None
    q: str | None = None

    def where(self, owner: str | None) -> tuple[str, list]:
        clauses, args = [], []
        for column, value in (("edit_type", self.theme), ("state", self.state), ("refused_stage", self.refused_stage),
                              ("dataset", self.dataset), ("owner", owner)):
            if value is not None and value != "":
                clauses.append(f"{column} = ?")
                args.append(value)
        if self.min_score is not None:
            clauses.append("mean_o >= ?")
            args.append(self.min_score)
        if self.max_score is not None:
            clauses.append("mean_o <= ?")
            args.append(self.max_score)
        if self.q and len(self.q) >= 3:  # the trigram index (SQLite FTS5): a substring, case-insensitive
            clauses.append("rowid IN (SELECT rowid FROM texts WHERE body LIKE ?)")
            args.append(f"%{self.q}%")
        elif self.q:  # too short for trigrams: a scan
            clauses.append("(id LIKE ? OR prompt LIKE ?)")
            args += [f"%{self.q}%"] * 2
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


class SampleIndex:
    """The samples of ``store``, indexed (see the module docstring). Thread-safe: one connection, one lock.

    ``path``: the SQLite file (default :func:`cache_path`; ``":memory:"`` for none). ``min_interval_s``: a
    :meth:`refresh` sooner than this after the last one returns at once (pages can call it freely)."""

    def __init__(self, store: ArtifactStore, path: str | Path | None = None, min_interval_s: float = 1.0):
        self.store, self.min_interval_s = store, min_interval_s
        path = cache_path(store) if path is None else path
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        if self.db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            for table in ("files", "samples", "decisions", "texts"):
                self.db.execute(f"DROP TABLE IF EXISTS {table}")
        self.db.executescript(_SCHEMA)
        self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.lock = threading.Lock()
        self.refresh_lock = threading.Lock()
        self.last_refresh = 0.0
        self.last_refresh_s = 0.0

    # --- keeping in step ---------------------------------------------------------------------------------

    def follow(self, interval_s: float = 1.0) -> None:
        """Keep in step from a background thread (started once; daemon): a refresh, then a pause of
        ``interval_s`` or five times the last refresh's duration, whichever is longer (a LIST of 100 000
        objects is not repeated every second). The first call refreshes before it returns, so a page never
        shows an empty index of a full store; later pages never wait for a refresh."""
        with self.lock:
            started = getattr(self, "_thread", None) is not None
            if not started:
                self._thread, self._ready = threading.current_thread(), threading.Event()  # claimed
        if started:
            self._ready.wait(120)  # a concurrent first call: wait for the first refresh
            return
        try:
            self.refresh(force=True)
        finally:
            self._ready.set()

        def loop() -> None:
            while True:
                time.sleep(max(interval_s, 5 * self.last_refresh_s))
                try:
                    self.refresh(force=True)
                except Exception:  # noqa: BLE001 - the store away for a moment: the next round retries
                    time.sleep(interval_s)

        self._thread = threading.Thread(target=loop, name="sparkle-viewer-index", daemon=True)
        self._thread.start()

    def refresh(self, force: bool = False) -> int:
        """Re-read the job documents and reports that changed since the last refresh; returns how many samples
        were (re)indexed. Concurrent callers do not queue: one refreshes, the others return 0 at once."""
        if not force and time.monotonic() - self.last_refresh < self.min_interval_s:
            return 0
        if not self.refresh_lock.acquire(blocking=force):
            return 0
        try:
            started = time.perf_counter()
            seen: dict[str, tuple[str, str]] = {}
            for prefix, pattern in (("jobs/", _JOB), ("reports/", _REPORT)):
                for key, version in self.store.list_versions(prefix).items():
                    m = pattern.match(key)
                    if m:
                        seen[key] = (version, m[1])
            with self.lock:
                known = dict(self.db.execute("SELECT key, version FROM files").fetchall())
            changed = {sid for key, (version, sid) in seen.items() if known.get(key) != version}
            gone = [key for key in known if key not in seen]
            for i in range(0, len(gone), 500):  # their samples: re-read from what is left, or dropped
                part = gone[i:i + 500]
                with self.lock:
                    rows = self.db.execute(f"SELECT sid FROM files WHERE key IN ({','.join('?' * len(part))})",
                                           part).fetchall()
                changed |= {r[0] for r in rows}
            by_sid: dict[str, dict[str, str]] = {}
            for key, (version, sid) in seen.items():
                if sid in changed:
                    by_sid.setdefault(sid, {})[key] = version
            batch = []
            for sid in changed:
                keys = by_sid.get(sid, {})
                doc = self._read(sid, keys)
                batch.append((sid, keys, doc))
                if len(batch) >= 500:
                    self._write(batch, gone)
                    batch, gone = [], []
            self._write(batch, gone)
            self.last_refresh_s = time.perf_counter() - started
            return len(changed)
        finally:
            self.last_refresh = time.monotonic()
            self.refresh_lock.release()

    def _read(self, sid: str, keys: dict[str, str]) -> dict | None:
        """The document a sample is indexed from: its job document, else its report; None if neither reads."""
        for key in sorted(keys, key=lambda k: not k.startswith("jobs/")):
            try:
                return self.store.get_json(key)
            except (KeyError, ValueError):  # removed or half-written meanwhile: the next refresh sees it
                continue
        return None

    def _write(self, batch: list[tuple[str, dict[str, str], dict | None]], gone: list[str]) -> None:
        with self.lock:
            self.db.execute("BEGIN")
            try:
                for key in gone:
                    self.db.execute("DELETE FROM files WHERE key = ?", (key,))
                for sid, keys, doc in batch:
                    old = self.db.execute("SELECT rowid FROM samples WHERE id = ?", (sid,)).fetchone()
                    if old is not None:
                        self.db.execute("DELETE FROM texts WHERE rowid = ?", old)
                    self.db.execute("DELETE FROM samples WHERE id = ?", (sid,))
                    self.db.execute("DELETE FROM decisions WHERE sid = ?", (sid,))
                    self.db.execute("DELETE FROM files WHERE sid = ?", (sid,))
                    if doc is None:
                        continue
                    row = row_of(doc)
                    cur = self.db.execute("INSERT INTO samples VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                                          (row["id"], row["edit_type"], row["state"], row["stage"],
                                           row["refused_stage"], row["mean_o"], row["prompt"], row["reason"],
                                           row["dataset"], row["owner"], row["updated_at"], row["seconds"]))
                    # the text search's trigram index, row for row with the sample (same rowid)
                    self.db.execute("INSERT INTO texts (rowid, body) VALUES (?, ?)",
                                    (cur.lastrowid, f"{row['id']}\n{row['prompt']}"))
                    self.db.executemany("INSERT INTO decisions VALUES (?,?,?,?)",
                                        [(sid, s, n, int(a)) for s, n, a in row["decisions"]])
                    self.db.executemany("INSERT INTO files VALUES (?,?,?)", [(k, v, sid) for k, v in keys.items()])
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    # --- reading -----------------------------------------------------------------------------------------

    def page(self, filters: Filters, page: int = 1, size: int = PAGE_SIZE, owner: str | None = None) -> dict:
        """One page of samples, newest first: ``{"total", "page", "pages", "size", "samples": [row, ...]}``
        (``page`` 1-based; rows as :func:`row_of` without ``decisions``). ``owner``: only that principal's."""
        where, args = filters.where(owner)
        with self.lock:
            total = self.db.execute(f"SELECT COUNT(*) FROM samples{where}", args).fetchone()[0]
            cur = self.db.execute(f"SELECT id, edit_type, state, stage, refused_stage, mean_o, prompt, reason, "
                                  f"dataset, updated_at, seconds FROM samples{where} "
                                  f"ORDER BY updated_at DESC, id LIMIT ? OFFSET ?",
                                  [*args, size, (max(page, 1) - 1) * size])
            names = [c[0] for c in cur.description]
            rows = [dict(zip(names, r)) for r in cur.fetchall()]
        return {"total": total, "page": page, "size": size, "pages": max(1, -(-total // size)), "samples": rows}

    def funnel(self, filters: Filters, owner: str | None = None) -> list[dict]:
        """Per stage, in journey order: ``{"stage", "name", "in", "out"}`` over the samples ``filters`` keep."""
        where, args = filters.where(owner)
        with self.lock:
            keep = f"WHERE d.sid IN (SELECT id FROM samples{where}) " if where else ""
            rows = self.db.execute(
                f"SELECT d.stage, d.name, COUNT(*), SUM(d.accepted) FROM decisions d {keep}"
                "GROUP BY d.stage, d.name ORDER BY d.stage, MIN(d.rowid)", args).fetchall()
        return [{"stage": s, "name": n, "in": i, "out": o or 0} for s, n, i, o in rows]

    def counts(self, column: str, owner: str | None = None) -> dict[str, int]:
        """Samples per value of ``column`` (``state``, ``edit_type``, ``refused_stage``, ``dataset``)."""
        if column not in ("state", "edit_type", "refused_stage", "dataset"):
            raise ValueError(column)
        where, args = Filters().where(owner)
        with self.lock:
            rows = self.db.execute(f"SELECT {column}, COUNT(*) FROM samples{where} GROUP BY {column}", args)
            return {str(k): n for k, n in rows.fetchall() if k is not None}

    def owner_of(self, sid: str) -> str | None:
        """The owner of an indexed sample (None: not indexed)."""
        with self.lock:
            row = self.db.execute("SELECT owner FROM samples WHERE id = ?", (sid,)).fetchone()
        return None if row is None else (row[0] or "")

    def close(self) -> None:
        self.db.close()


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=1, default=str)
