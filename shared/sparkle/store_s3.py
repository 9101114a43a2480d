"""The artifact store of the cluster: an S3 bucket (MinIO) through the ``minio`` SDK, plus :func:`open_store`.

:class:`S3Store` implements :class:`~sparkle.store.ArtifactStore` and keeps the two rules of that interface:

- **an artifact becomes visible only when complete.** S3 has no partial objects: a single ``PUT`` is committed
  when the server has the whole body, and a multipart upload (``minio`` switches to it above 5 MiB, its
  ``MIN_PART_SIZE``) becomes an object only at ``CompleteMultipartUpload``; on an error the SDK aborts the upload
  (``Minio.put_object``, minio 7.2.20), so a reader sees the previous object or the new one, never a prefix.
  :meth:`S3Store.put_file` therefore uploads straight to the final key: no temp object, nothing to rename.
  Downloads (``fget_object``) are written to ``DEST.<etag>.part.minio`` and renamed onto ``DEST`` by the SDK.
- **publish moves staged artifacts.** S3 has no rename: :meth:`S3Store.move` is a server-side ``CopyObject``
  (multipart ``UploadPartCopy`` via ``compose_object`` above 5 GiB, done by ``Minio.copy_object`` itself) and
  then ``DeleteObject`` of the source. The destination appears complete or not at all (a copy is committed
  like a ``PUT``); a crash between the two leaves the source *and* the destination, and re-running the move
  (idempotent re-runs of a sample) converges.

Keys are the relative POSIX paths of the Sparkle layout (``..``, absolute and empty keys are refused with
ValueError, as :class:`~sparkle.store.LocalStore` does); an optional key prefix puts a whole store under
``PREFIX/`` of the bucket (``s3://BUCKET/PREFIX``).

Read-modify-write of shared files (sample-id counters, dataset state, the funnel; never a publish) is guarded
by :meth:`S3Store.lock`: a Redis lock on the broker (``SPARKLE_BROKER_URL``) when a Redis URL is given, shared
by every process of the cluster; otherwise a lock local to this process, only safe with one writer process.
"""

from __future__ import annotations

import os
import threading
from contextlib import AbstractContextManager
from datetime import timedelta
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from minio import Minio
from minio.commonconfig import CopySource
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from .store import ArtifactStore, LocalStore

#: S3 error codes meaning "this object is not there" (``NoSuchKey`` for GET and, as the SDK maps a body-less
#: 404 of a HEAD on an object, for ``stat_object``; ``ResourceNotFound`` for other body-less 404s).
_MISSING = frozenset({"NoSuchKey", "NoSuchObject", "ResourceNotFound"})

#: Longest expiry of a SigV4 presigned URL, in seconds (7 days; the SDK raises ValueError beyond it).
MAX_PRESIGN_S = 7 * 24 * 3600


def _clean_key(key: str) -> str:
    """``key`` normalised (``a//b``, ``./a`` collapse). Raises ValueError on absolute, empty or ``..`` keys."""
    pure = PurePosixPath(key)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise ValueError(f"invalid artifact key {key!r}")
    return "/".join(pure.parts)


class _LocalLock(AbstractContextManager):
    """A process-local named lock with a wait limit (seconds); raises TimeoutError when it expires."""

    _registry: dict[str, threading.Lock] = {}
    _registry_guard = threading.Lock()

    def __init__(self, name: str, wait_s: float):
        with self._registry_guard:
            self._lock = self._registry.setdefault(name, threading.Lock())
        self.name, self.wait_s = name, wait_s

    def __enter__(self):
        if not self._lock.acquire(timeout=self.wait_s):
            raise TimeoutError(f"lock {self.name!r} not acquired within {self.wait_s} s")
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


class RedisLock(AbstractContextManager):
    """A ``redis.lock.Lock`` whose lease is renewed while it is held.

    The lease (``lease_s`` seconds, Redis key TTL) only bounds how long a *dead* holder blocks the others: a
    thread renews it every ``lease_s / 3`` seconds (``Lock.reacquire``), so a long critical section (a source
    upload under the sample-id lock) keeps it. Waiting longer than ``wait_s`` seconds raises TimeoutError. If
    the lease was lost anyway (Redis unreachable longer than the lease), leaving the block raises RuntimeError,
    since another writer may have entered.
    """

    def __init__(self, client, key: str, lease_s: float, wait_s: float):
        # thread_local=False: the renewing thread must see the token taken by the acquiring thread.
        self._lock = client.lock(key, timeout=lease_s, blocking_timeout=wait_s, thread_local=False)
        self.key, self.lease_s, self.wait_s = key, lease_s, wait_s
        self._stop = threading.Event()
        self._lost: BaseException | None = None
        self._renewer: threading.Thread | None = None

    def _renew(self) -> None:
        from redis.exceptions import LockError

        while not self._stop.wait(self.lease_s / 3):
            try:
                self._lock.reacquire()
            except LockError as exc:  # the key expired (or another holder has it): the lease is gone
                self._lost = exc
                return
            except Exception as exc:  # noqa: BLE001 - Redis unreachable: keep trying while the lease may hold
                self._lost = exc

    def acquire(self) -> bool:
        """Take the lock within ``wait_s`` seconds (then renew it until :meth:`release`); False if it stayed
        taken. Raises redis errors when Redis is unreachable."""
        if not self._lock.acquire():
            return False
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name=f"renew {self.key}", daemon=True)
        self._renewer.start()
        return True

    def release(self, quiet: bool = False) -> None:
        """Stop renewing and release. Raises RuntimeError if the lease was lost while held. ``quiet`` (the caller
        is already failing) raises nothing: a lost lease, or Redis unreachable (the key then expires by itself)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        from redis.exceptions import LockNotOwnedError

        try:
            self._lock.release()
        except LockNotOwnedError as err:
            if not quiet:
                raise RuntimeError(f"lease of lock {self.key!r} was lost while held ({self._lost!r})") from err
        except Exception:  # noqa: BLE001 - Redis away
            if not quiet:
                raise

    def __enter__(self):
        if not self.acquire():
            raise TimeoutError(f"lock {self.key!r} not acquired within {self.wait_s} s")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(quiet=exc_type is not None)


class S3Store(ArtifactStore):
    """An S3 bucket (MinIO in the cluster) as an artifact store; see the module docstring for the semantics.

    ``client`` is a ``minio.Minio`` (thread-safe; one per process is enough). ``prefix`` puts every key under
    ``PREFIX/`` in the bucket (keys given to and returned by this class never include it). ``lock_url`` is a
    ``redis://`` URL (the broker) for :meth:`lock`; without it locks are local to this process.
    ``lock_lease_s`` and ``lock_wait_s`` are seconds (the wait matches LocalStore's 120 s FileLock timeout); the
    lease, renewed every third of it while the holder lives, is how long a killed holder (a SIGKILLed
    ``sparkle enqueue`` in a dataset tick) blocks the next one: 20 s (it was 60 s; 43 s were measured).
    """

    def __init__(self, client: Minio, bucket: str, prefix: str = "", lock_url: str | None = None,
                 lock_lease_s: float = 20.0, lock_wait_s: float = 120.0):
        self.client, self.bucket = client, bucket
        self.prefix = _clean_key(prefix) + "/" if prefix.strip("/") else ""
        self.lock_url, self.lock_lease_s, self.lock_wait_s = lock_url, lock_lease_s, lock_wait_s
        self._redis = None
        self._redis_guard = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store(s3://{self.bucket}/{self.prefix}, lock={'redis' if self.lock_url else 'process'})"

    def object_name(self, key: str) -> str:
        """The S3 object name of ``key`` (``PREFIX/key``). Raises ValueError on invalid keys."""
        return self.prefix + _clean_key(key)

    # --- bucket -------------------------------------------------------------------------------------------

    def ensure_bucket(self) -> bool:
        """Create the bucket if missing; returns True if this call created it. Idempotent and race-safe:
        ``BucketAlreadyOwnedByYou`` (another process created it between the check and the create) counts as
        success; ``BucketAlreadyExists`` (someone else's bucket) is raised."""
        if self.client.bucket_exists(self.bucket):
            return False
        try:
            self.client.make_bucket(self.bucket)
        except S3Error as err:
            if err.code == "BucketAlreadyOwnedByYou":
                return False
            raise
        return True

    # --- the abstract operations --------------------------------------------------------------------------

    def put_file(self, key: str, path: str | os.PathLike) -> str:
        """Upload the file at ``path`` to ``key`` (one PUT, or a multipart upload above 5 MiB): the object
        appears only when complete, replacing any previous one atomically; returns ``key``."""
        self.client.fput_object(self.bucket, self.object_name(key), os.fspath(path))
        return key

    def get_file(self, key: str, dest: str | os.PathLike) -> Path:
        """Download ``key`` to ``dest`` (via ``dest.<etag>.part.minio``, then a rename). KeyError if absent."""
        try:
            self.client.fget_object(self.bucket, self.object_name(key), os.fspath(dest))
        except S3Error as err:
            if err.code in _MISSING:
                raise KeyError(key) from None
            raise
        return Path(dest)

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, self.object_name(key))
        except S3Error as err:
            if err.code in _MISSING:
                return False
            raise
        return True

    def list_keys(self, prefix: str) -> list[str]:
        """All keys under ``prefix``, sorted. As in LocalStore, ``prefix`` names a folder (``a`` and ``a/``
        list ``a/...``, not ``ab``) or a single key; ``""`` lists the whole store."""
        if not prefix.strip("/"):
            names = self._list(self.prefix)
        else:
            base = self.object_name(prefix.rstrip("/"))
            names = self._list(base + "/")
            if not prefix.endswith("/") and self._exists_object(base):
                names.append(base)
        return sorted(name[len(self.prefix):] for name in names)

    def list_versions(self, prefix: str) -> dict[str, str]:
        """Key -> ETag of every object under the folder ``prefix`` (one LIST call per 1 000 keys)."""
        base = self.prefix + (prefix.strip("/") + "/" if prefix.strip("/") else "")
        return {o.object_name[len(self.prefix):]: (o.etag or "") + f":{o.size}"
                for o in self.client.list_objects(self.bucket, prefix=base, recursive=True) if not o.is_dir}

    def version(self, key: str) -> str | None:
        """The ETag and size of one object (a HEAD request), or None when it is absent."""
        try:
            st = self.client.stat_object(self.bucket, self.object_name(key))
        except S3Error as err:
            if err.code in _MISSING:
                return None
            raise
        return (st.etag or "") + f":{st.size}"

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix`` (folder or single key, as :meth:`list_keys`); returns how many.
        Raises ValueError on an empty prefix (as LocalStore does), never emptying the whole store."""
        _clean_key(prefix)
        keys = self.list_keys(prefix)
        if keys:
            # remove_objects is lazy: nothing is deleted until its iterator of errors is consumed.
            errors = list(self.client.remove_objects(
                self.bucket, (DeleteObject(self.object_name(k)) for k in keys)))
            if errors:
                raise RuntimeError(f"could not delete {len(errors)} objects under {prefix!r}: {errors[:3]}")
        return len(keys)

    def move(self, src: str, dst: str) -> None:
        """Server-side copy ``src`` -> ``dst``, then delete ``src``. ``dst`` appears complete or not at all;
        KeyError if ``src`` is absent."""
        s, d = self.object_name(src), self.object_name(dst)
        if s == d:
            if not self._exists_object(s):
                raise KeyError(src)
            return
        try:
            self.client.copy_object(self.bucket, d, CopySource(self.bucket, s))
        except S3Error as err:
            if err.code in _MISSING:
                raise KeyError(src) from None
            raise
        self.client.remove_object(self.bucket, s)

    def copy(self, src: str, dst: str) -> str:
        """Server-side ``CopyObject`` (no download); KeyError if ``src`` is absent."""
        try:
            self.client.copy_object(self.bucket, self.object_name(dst), CopySource(self.bucket, self.object_name(src)))
        except S3Error as err:
            if err.code in _MISSING:
                raise KeyError(src) from None
            raise
        return dst

    def lock(self, name: str) -> AbstractContextManager:
        """A lock named ``name`` in this store (bucket + prefix). With ``lock_url``: a Redis lock
        (``sparkle:lock:BUCKET/PREFIXname``) shared by all processes; without: process-local, only safe
        when a single process writes the store. Raises TimeoutError after ``lock_wait_s`` seconds."""
        scoped = f"{self.bucket}/{self.prefix}{name}"
        if not self.lock_url:
            return _LocalLock(scoped, self.lock_wait_s)
        return RedisLock(self._redis_client(), f"sparkle:lock:{scoped}", self.lock_lease_s, self.lock_wait_s)

    # --- S3 only -------------------------------------------------------------------------------------------

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        """A presigned GET URL of ``key`` valid for ``expires_s`` seconds (1 s to 7 days, SigV4 limit).

        Computed locally (no request when the client was built with a region). The host is the client's
        endpoint, so it is only useful to callers that can reach that endpoint. Does not check that ``key``
        exists (a GET then answers 404 NoSuchKey).
        """
        if not 1 <= expires_s <= MAX_PRESIGN_S:
            raise ValueError(f"expires_s must be within 1..{MAX_PRESIGN_S} seconds, got {expires_s}")
        return self.client.presigned_get_object(self.bucket, self.object_name(key),
                                                expires=timedelta(seconds=expires_s))

    # --- internals -----------------------------------------------------------------------------------------

    def _list(self, object_prefix: str) -> list[str]:
        return [o.object_name for o in self.client.list_objects(self.bucket, prefix=object_prefix, recursive=True)
                if not o.is_dir]

    def _exists_object(self, name: str) -> bool:
        try:
            self.client.stat_object(self.bucket, name)
        except S3Error as err:
            if err.code in _MISSING:
                return False
            raise
        return True

    def _redis_client(self):
        with self._redis_guard:
            if self._redis is None:
                import redis

                self._redis = redis.Redis.from_url(self.lock_url)
            return self._redis


def _endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """``host:port`` and TLS flag from SPARKLE_S3_ENDPOINT; an ``http://``/``https://`` scheme, if given,
    sets the flag (the minio SDK wants a bare ``host:port``)."""
    parts = urlsplit(endpoint) if "://" in endpoint else None
    if parts is None:
        return endpoint.rstrip("/"), secure
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
        raise ValueError(f"invalid S3 endpoint {endpoint!r}: expected host:port")
    return parts.netloc, parts.scheme == "https"


def open_store(url: str, settings=None) -> ArtifactStore:
    """The store named by ``url`` (SPARKLE_STORE_URL).

    - ``local:DIR`` -> :class:`~sparkle.store.LocalStore` on ``DIR``;
    - ``s3://BUCKET`` or ``s3://BUCKET/PREFIX`` -> :class:`S3Store`, with endpoint, credentials, TLS and region
      from ``settings`` (a :class:`~sparkle.settings.DistributedSettings`; read from the
      environment when None) and its ``broker_url`` for locks when that is a ``redis://``/``rediss://``/
      ``unix://`` URL. The bucket is not created here: call :meth:`S3Store.ensure_bucket` once at start-up.

    Raises ValueError on any other scheme or a URL without a bucket/directory.
    """
    if url.startswith("local:"):
        root = url[len("local:"):]
        if root.startswith("//"):  # local://DIR
            root = root[2:]
        if not root:
            raise ValueError(f"store URL {url!r} names no directory: expected local:DIR")
        return LocalStore(root)
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise ValueError(f"unsupported store URL {url!r}: expected local:DIR or s3://BUCKET[/PREFIX]")
    if not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"invalid store URL {url!r}: expected s3://BUCKET[/PREFIX]")
    if settings is None:
        from .settings import DistributedSettings

        settings = DistributedSettings()
    endpoint, secure = _endpoint(settings.s3_endpoint, settings.s3_secure)
    access_key, secret_key = settings.s3_credentials()
    client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure,
                   region=settings.s3_region or None)
    broker = settings.broker_url or ""
    lock_url = broker if urlsplit(broker).scheme in ("redis", "rediss", "unix") else None
    return S3Store(client, parts.netloc, prefix=parts.path.strip("/"), lock_url=lock_url)


def download_url(store: ArtifactStore, key: str, expires_s: int = 3600) -> str:
    """A URL a client can fetch ``key`` from: a presigned GET URL valid ``expires_s`` seconds for
    :class:`S3Store`; a ``file://`` URL of the artifact's file for :class:`~sparkle.store.LocalStore` (which
    has no presigned URLs: it never expires and only works on the machine holding the directory).

    Raises KeyError if ``key`` is absent, TypeError for other stores.
    """
    if isinstance(store, S3Store):
        if not store.exists(key):
            raise KeyError(key)
        return store.presigned_url(key, expires_s)
    if isinstance(store, LocalStore):
        if not store.exists(key):
            raise KeyError(key)
        return store.path(key).as_uri()
    raise TypeError(f"no download URL for {type(store).__name__}")
