"""Artifact store: keys (``/``-separated paths of the Sparkle layout) to bytes.

The interface is what the orchestrator and the services use; :class:`LocalStore` (a directory, the embedded
default) implements it here and the MinIO store implements it for the cluster. Two rules hold for every
implementation:

- an artifact becomes visible only when complete (written elsewhere, then committed by one rename/commit);
- a sample is built under ``staging/{id}/`` and moved into the layout by :meth:`ArtifactStore.publish`
  only when it is accepted, so a failed or rejected sample leaves nothing in the dataset.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from pathlib import Path, PurePosixPath

from filelock import FileLock


def json_safe(obj):
    """``obj`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def staging_prefix(sid: str) -> str:
    """Where sample ``sid`` is built before it is published: ``staging/{sid}/``."""
    return f"staging/{sid}/"


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSON Lines text, split at ``\\n`` only (the JSON Lines rule). ``str.splitlines`` also
    splits at U+2028, U+2029, U+0085 and other breaks that JSON strings may hold raw, which would cut a record
    whose prompt contains one. A ``\\r`` before the ``\\n`` is dropped."""
    return [line.removesuffix("\r") for line in text.split("\n")]


class ArtifactStore(ABC):
    """Key/value store of artifacts. Keys are relative POSIX paths without ``..``."""

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike) -> str:
        """Store the file at ``path`` under ``key`` atomically; returns ``key``."""

    @abstractmethod
    def get_file(self, key: str, dest: str | os.PathLike) -> Path:
        """Copy the artifact to ``dest``. Raises KeyError if absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """All keys under ``prefix``, sorted."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; returns how many."""

    @abstractmethod
    def move(self, src: str, dst: str) -> None:
        """Rename one artifact (used by :meth:`publish`); ``dst`` appears complete or not at all."""

    @abstractmethod
    def lock(self, name: str) -> AbstractContextManager:
        """A lock shared by every writer of this store (read-modify-write of shared files)."""

    # --- derived operations, the same for every store ---------------------------------------------------

    def copy(self, src: str, dst: str) -> str:
        """Copy one artifact; ``dst`` appears complete or not at all. Raises KeyError if ``src`` is absent.
        Stores with a server-side copy override this."""
        with tempfile.TemporaryDirectory() as tmp:
            return self.put_file(dst, self.get_file(src, Path(tmp) / PurePosixPath(src).name))

    def put_bytes(self, key: str, data: bytes) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / PurePosixPath(key).name
            path.write_bytes(data)
            return self.put_file(key, path)

    def get_bytes(self, key: str) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            return self.get_file(key, Path(tmp) / "blob").read_bytes()

    def put_json(self, key: str, obj) -> str:
        """Store ``obj`` as strict JSON: NaN and infinities (e.g. an unmeasured camera metric) become null."""
        return self.put_bytes(key, json.dumps(json_safe(obj), ensure_ascii=False, indent=2, allow_nan=False).encode())

    def get_json(self, key: str):
        return json.loads(self.get_bytes(key))

    def read_jsonl(self, key: str) -> list[dict]:
        if not self.exists(key):
            return []
        return [json.loads(line) for line in jsonl_lines(self.get_bytes(key).decode()) if line.strip()]

    def upsert_jsonl(self, key: str, records: list[dict], id_field: str = "id") -> None:
        """Add ``records`` to a JSONL file, replacing lines whose ``id_field`` matches (idempotent re-runs)."""
        with self.lock(key):
            new_ids = {r[id_field] for r in records}
            kept = [r for r in self.read_jsonl(key) if r.get(id_field) not in new_ids]
            lines = [json.dumps(json_safe(r), ensure_ascii=False, allow_nan=False) for r in kept + records]
            self.put_bytes(key, ("\n".join(lines) + "\n").encode())

    def read_csv(self, key: str) -> list[dict]:
        if not self.exists(key):
            return []
        return list(csv.DictReader(io.StringIO(self.get_bytes(key).decode())))

    def upsert_csv(self, key: str, fieldnames: tuple[str, ...], rows: list[dict], id_field: str) -> None:
        """Add ``rows`` to a CSV with header ``fieldnames``, replacing rows whose ``id_field`` matches."""
        with self.lock(key):
            new_ids = {r[id_field] for r in rows}
            kept = [r for r in self.read_csv(key) if r.get(id_field) not in new_ids]
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(fieldnames), lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept + rows)
            self.put_bytes(key, buf.getvalue().encode())

    def publish(self, moves: dict[str, str], jsonl: dict[str, list[dict]], csv_rows: dict[str, list[dict]],
                csv_fields: tuple[str, ...], csv_id: str) -> None:
        """Commit a sample: move staged artifacts to their layout keys, then add its records and rows.

        Records come last, so a reader that finds a sample's CSV row finds every file it names.
        """
        for src, dst in moves.items():
            self.move(src, dst)
        for key, records in jsonl.items():
            self.upsert_jsonl(key, records)
        for key, rows in csv_rows.items():
            self.upsert_csv(key, csv_fields, rows, csv_id)


class LocalStore(ArtifactStore):
    """A directory as an artifact store (the embedded default). Writes go to a temp file, then ``os.replace``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def path(self, key: str) -> Path:
        """The file of ``key``. Raises ValueError on absolute keys or keys leaving the root."""
        pure = PurePosixPath(key)
        if pure.is_absolute() or ".." in pure.parts or not pure.parts:
            raise ValueError(f"invalid artifact key {key!r}")
        return self.root.joinpath(*pure.parts)

    def put_file(self, key: str, path: str | os.PathLike) -> str:
        dst = self.path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return key

    def get_file(self, key: str, dest: str | os.PathLike) -> Path:
        src = self.path(key)
        if not src.is_file():
            raise KeyError(key)
        shutil.copyfile(src, dest)
        return Path(dest)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        base = self.path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.endswith((".part", ".lock")))

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        base = self.path(prefix.rstrip("/"))
        if base.is_dir():
            shutil.rmtree(base)
        else:
            for k in keys:
                self.path(k).unlink(missing_ok=True)
        self._prune_empty_parents(base.parent)
        return len(keys)

    def move(self, src: str, dst: str) -> None:
        s, d = self.path(src), self.path(dst)
        if not s.is_file():
            raise KeyError(src)
        d.parent.mkdir(parents=True, exist_ok=True)
        os.replace(s, d)
        self._prune_empty_parents(s.parent)

    def lock(self, name: str) -> FileLock:
        lock_dir = self.root / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(lock_dir / (name.replace("/", "__") + ".lock"), timeout=120)

    def _prune_empty_parents(self, d: Path) -> None:
        while d != self.root and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
            d = d.parent
