"""Artifact store: keys (``/``-separated paths of the Sparkle layout) to bytes.

The interface is what the orchestrator and the services use; :class:`LocalStore` (a directory, the embedded
default) implements it here and the MinIO store implements it for the cluster. Two rules hold for every
implementation:

- an artifact becomes visible only when complete (written elsewhere, then committed by one rename/commit);
- a sample is built under ``staging/{id}/`` and moved into the layout by :meth:`ArtifactStore.publish_sample`
  only when it is accepted, so a failed or rejected sample leaves nothing in the dataset. Its records go into
  one per-sample document (``published/{edit_type}/{id}.json``); the shared layout files (the CSV, the
  metadata and record JSONL) are materialised from those documents (``sparkle.published``), never rewritten
  by a publish.
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
from typing import Callable, TypeVar

from filelock import FileLock

from .errors import InvalidKey

T = TypeVar("T")


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
    def list_versions(self, prefix: str) -> dict[str, str]:
        """Key -> version tag of every key under the folder ``prefix``; a key's tag changes when its content
        does (a file's modification time and size, an object's ETag). The viewer's index compares tags to
        re-read only what changed."""

    @abstractmethod
    def version(self, key: str) -> str | None:
        """The version tag of one key (as :meth:`list_versions` gives it), or None when it is absent."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; returns how many."""

    @abstractmethod
    def move(self, src: str, dst: str) -> None:
        """Rename one artifact (used by :meth:`publish`); ``dst`` appears complete or not at all."""

    @abstractmethod
    def lock(self, name: str) -> AbstractContextManager:
        """A lock shared by every writer of this store (read-modify-write of shared files: id counters,
        dataset state, the funnel, materialising the layout; never on the publish path)."""

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

    def put_json(self, key: str, obj, compact: bool = False) -> str:
        """Store ``obj`` as strict JSON (UTF-8, indented unless ``compact``): NaN and infinities (e.g. an
        unmeasured camera metric) become null."""
        return self.put_bytes(key, json.dumps(json_safe(obj), ensure_ascii=False, indent=None if compact else 2,
                                              allow_nan=False).encode())

    def get_json(self, key: str):
        return json.loads(self.get_bytes(key))

    def read_jsonl(self, key: str) -> list[dict]:
        """Every record of a JSON Lines file (split at ``\\n`` only, see :func:`jsonl_lines`); [] if absent.
        Reads the whole file: for the small files of the store's own bookkeeping and for adopting a legacy
        layout, not for the dataset's records (those are per-sample documents, ``sparkle.published``)."""
        if not self.exists(key):
            return []
        return [json.loads(line) for line in jsonl_lines(self.get_bytes(key).decode()) if line.strip()]

    def read_csv(self, key: str) -> list[dict]:
        """Every row of a CSV file with a header (quoted newlines kept); [] if absent. Reads the whole file."""
        if not self.exists(key):
            return []
        return list(csv.DictReader(io.StringIO(self.get_bytes(key).decode(), newline="")))

    def publish_sample(self, moves: dict[str, str], document_key: str, document: dict) -> bool:
        """Commit an accepted sample in constant time: move its staged artifacts (``{staged key: layout key}``)
        into the layout, then write its record document at ``document_key`` (one atomic write; see
        ``sparkle.published``). Nothing shared is read or rewritten, so no lock is taken.

        Exactly once: the document is written last, so its presence means every move is done, and a
        re-delivered publish of the same sample is a no-op (returns False; True when this call published).
        A publish cut short by a crash is completed by running it again: moves already done are skipped.
        Raises KeyError if a staged artifact is neither staged nor already at its layout key.
        """
        if self.exists(document_key):
            return False
        for src, dst in moves.items():
            if self.exists(src) or not self.exists(dst):
                self.move(src, dst)
        self.put_json(document_key, document, compact=True)
        return True


def _missing_is_deleted(function, path, exc_info) -> None:
    """``shutil.rmtree`` error handler: an entry already removed (by a concurrent delete) is deleted."""
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]


def _in_folder(folder: Path, make: Callable[[], T]) -> T:
    """Create ``folder`` (and its parents), then return ``make()``, which writes into it. Retried when a
    concurrent :meth:`LocalStore._prune_empty_parents` removes the folder between the two steps (pathlib's
    mkdir then raises FileExistsError or FileNotFoundError, the write FileNotFoundError)."""
    for attempt in range(10):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return make()
        except (FileNotFoundError, FileExistsError):
            if attempt == 9:
                raise
    raise AssertionError("unreachable")


class LocalStore(ArtifactStore):
    """A directory as an artifact store (the embedded default). Writes go to a temp file, then ``os.replace``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def path(self, key: str) -> Path:
        """The file of ``key``. Raises ValueError on absolute keys or keys leaving the root."""
        pure = PurePosixPath(key)
        if pure.is_absolute() or ".." in pure.parts or not pure.parts:
            raise InvalidKey(f"invalid artifact key {key!r}: absolute, empty or leaving the store")
        return self.root.joinpath(*pure.parts)

    def _commit(self, key: str, write) -> str:
        """Write ``key`` through a temp file next to it (``write(fd, temp_path)`` fills it), then rename."""
        dst = self.path(key)
        fd, tmp = _in_folder(dst.parent, lambda: tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.",
                                                                  suffix=".part"))
        try:
            write(fd, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return key

    def put_file(self, key: str, path: str | os.PathLike) -> str:
        def write(fd: int, tmp: str) -> None:
            os.close(fd)
            shutil.copyfile(path, tmp)

        return self._commit(key, write)

    def put_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` to a temp file next to the key's file, then rename it (no copy through a temp dir)."""
        def write(fd: int, tmp: str) -> None:
            with os.fdopen(fd, "wb") as f:
                f.write(data)

        return self._commit(key, write)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None

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
        keys = []
        for folder, _, names in os.walk(base):  # no stat per file: fast on folders of 100 000 samples
            rel = Path(folder).relative_to(self.root).as_posix()
            keys += [f"{rel}/{name}" if rel != "." else name for name in names
                     if not name.endswith((".part", ".lock"))]
        return sorted(keys)

    def list_versions(self, prefix: str) -> dict[str, str]:
        """Key -> version tag (``"{mtime_ns}:{size}"``) of every file under the folder ``prefix``: what the viewer's
        index compares to find the files that changed since its last look (one ``stat`` per file)."""
        base = self.path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        out: dict[str, str] = {}
        stack = [base]
        while stack:
            try:
                entries = list(os.scandir(stack.pop()))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif not e.name.endswith((".part", ".lock")):
                    try:
                        st = e.stat()
                    except FileNotFoundError:  # replaced or removed meanwhile
                        continue
                    out[Path(e.path).relative_to(self.root).as_posix()] = f"{st.st_mtime_ns}:{st.st_size}"
        return out

    def version(self, key: str) -> str | None:
        try:
            st = self.path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return f"{st.st_mtime_ns}:{st.st_size}"

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        base = self.path(prefix.rstrip("/"))
        if base.is_dir():
            shutil.rmtree(base, onerror=_missing_is_deleted)  # another process may be deleting it too
        else:
            for k in keys:
                self.path(k).unlink(missing_ok=True)
        self._prune_empty_parents(base.parent)
        return len(keys)

    def move(self, src: str, dst: str) -> None:
        s, d = self.path(src), self.path(dst)
        if not s.is_file():
            raise KeyError(src)
        _in_folder(d.parent, lambda: os.replace(s, d))
        self._prune_empty_parents(s.parent)

    def lock(self, name: str) -> FileLock:
        lock_dir = self.root / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(lock_dir / (name.replace("/", "__") + ".lock"), timeout=120)

    def _prune_empty_parents(self, d: Path) -> None:
        """Remove ``d`` and its parents while empty (up to the root). Another thread or process may be
        pruning or filling the same folders: a folder already gone or no longer empty ends the walk (and
        writers retry a folder pruned under them, see :func:`_in_folder`)."""
        while d != self.root:
            try:
                d.rmdir()
            except OSError:  # not empty (ENOTEMPTY/EEXIST), already removed (ENOENT)
                return
            d = d.parent
