"""S3Store (shared/sparkle/store_s3.py) against an S3-compatible server, and open_store / download_url.

The server is moto's standalone S3 server (``python -m moto.server``; MinIO's server cannot be installed in
the test environment), started once per session on a free loopback port. A private ``redis-server`` (no
persistence) serves the distributed lock. The store tests run the same assertions against LocalStore and
S3Store, so both implement one contract.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from minio import Minio

from sparkle.settings import DistributedSettings
from sparkle.store import LocalStore
from sparkle.store_s3 import S3Store, download_url, open_store
from tests.infra import BUCKET, free_port  # noqa: F401

@pytest.fixture
def s3_store(settings, bucket) -> S3Store:
    """An S3Store under a fresh key prefix of the shared bucket, locking through Redis."""
    store = open_store(f"s3://{bucket}/t-{uuid.uuid4().hex[:12]}", settings)
    assert isinstance(store, S3Store) and store.lock_url == settings.broker_url
    return store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return request.getfixturevalue("s3_store")


# --- one contract, two stores ------------------------------------------------------------------------------

def test_publish_sample_is_atomic_and_exactly_once(store):
    store.put_bytes("staging/S/a/x.bin", b"1")
    store.put_bytes("staging/S/a/y.bin", b"2")
    assert store.list_keys("a/") == []
    moves = {"staging/S/a/x.bin": "a/x.bin", "staging/S/a/y.bin": "a/y.bin"}
    store.move("staging/S/a/x.bin", "a/x.bin")  # a publish cut short after one move
    assert store.publish_sample(moves, "published/S.json", {"id": "S", "prompt": "p, with \u2028", "v": float("nan")})
    assert store.get_bytes("a/x.bin") == b"1" and store.get_bytes("a/y.bin") == b"2"
    assert store.list_keys("staging/") == []
    assert store.get_bytes("published/S.json") == '{"id": "S", "prompt": "p, with \u2028", "v": null}'.encode()
    # re-delivered: a no-op that reads nothing staged and writes nothing
    assert not store.publish_sample({"staging/S/a/z.bin": "a/z.bin"}, "published/S.json", {"id": "S", "v": 2})
    assert store.get_json("published/S.json")["v"] is None
    assert sorted(store.list_keys("")) == store.list_keys("") == ["a/x.bin", "a/y.bin", "published/S.json"]


def test_put_get_exists_list_delete_move(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x00payload\xff")
    assert store.put_file("v/b/2.bin", src) == "v/b/2.bin"
    store.put_bytes("v/a/1.bin", b"one")
    store.put_bytes("vx/3.bin", b"three")
    store.put_json("v/meta.json", {"fps": 16, "name": "é"})
    assert store.exists("v/a/1.bin") and not store.exists("v/a/missing.bin") and not store.exists("v/a")
    assert store.get_file("v/b/2.bin", tmp_path / "out.bin").read_bytes() == b"\x00payload\xff"
    assert store.get_json("v/meta.json") == {"fps": 16, "name": "é"}
    with pytest.raises(KeyError):
        store.get_file("v/nope.bin", tmp_path / "nope.bin")
    with pytest.raises(KeyError):
        store.get_bytes("nope")
    assert not (tmp_path / "nope.bin").exists()
    # a prefix names a folder (or one key), never a string prefix of a sibling
    assert store.list_keys("v") == store.list_keys("v/") == ["v/a/1.bin", "v/b/2.bin", "v/meta.json"]
    assert store.list_keys("v/a/1.bin") == ["v/a/1.bin"]
    assert store.list_keys("w/") == []
    store.put_bytes("v/a/1.bin", b"replaced")
    assert store.get_bytes("v/a/1.bin") == b"replaced"
    store.move("v/a/1.bin", "done/1.bin")
    assert store.get_bytes("done/1.bin") == b"replaced" and not store.exists("v/a/1.bin")
    with pytest.raises(KeyError):
        store.move("v/a/1.bin", "done/again.bin")
    assert store.delete_prefix("v/") == 2
    assert store.list_keys("v") == [] and store.list_keys("vx") == ["vx/3.bin"]
    assert store.delete_prefix("nothing/") == 0
    assert store.read_jsonl("none.jsonl") == [] and store.read_csv("none.csv") == []
    for bad in ("../escape", "/abs", "", "a/../../b"):
        with pytest.raises(ValueError):
            store.put_file(bad, src)
    with pytest.raises(ValueError):
        store.delete_prefix("")


def test_lock_excludes_threads(store):
    inside, worst, errors = [0], [0], []
    guard = threading.Lock()

    def work(i: int) -> None:
        try:
            for j in range(5):
                with store.lock("shared"):
                    with guard:
                        inside[0] += 1
                        worst[0] = max(worst[0], inside[0])
                    time.sleep(0.002)
                    with guard:
                        inside[0] -= 1
                with store.lock("counter"):  # a read-modify-write, as the sample-id counters do
                    n = store.get_json("n.json")["n"] if store.exists("n.json") else 0
                    store.put_json("n.json", {"n": n + 1})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and worst[0] == 1
    assert store.get_json("n.json") == {"n": 20}


# --- S3 only ------------------------------------------------------------------------------------------------

def test_multipart_upload_round_trip(s3_store, tmp_path):
    # 6 MiB > minio's 5 MiB MIN_PART_SIZE: uploaded as a multipart upload, visible once completed
    data = os.urandom(6 * 1024 * 1024)
    (tmp_path / "big.bin").write_bytes(data)
    s3_store.put_file("big/big.bin", tmp_path / "big.bin")
    s3_store.move("big/big.bin", "big/moved.bin")
    assert s3_store.get_bytes("big/moved.bin") == data
    assert s3_store.list_keys("big") == ["big/moved.bin"]
    assert not list(tmp_path.glob("*.part.minio"))


def test_prefix_isolates_stores(settings, bucket):
    a = open_store(f"s3://{bucket}/iso-{uuid.uuid4().hex[:8]}/a", settings)
    b = open_store(f"s3://{bucket}/iso-{uuid.uuid4().hex[:8]}/b", settings)
    a.put_bytes("k.txt", b"a")
    assert a.list_keys("") == ["k.txt"] and b.list_keys("") == [] and not b.exists("k.txt")
    assert a.object_name("k.txt").endswith("/a/k.txt")


_WRITER = textwrap.dedent("""
    import sys, time
    from sparkle.settings import DistributedSettings
    from sparkle.store_s3 import open_store
    endpoint, redis_url, url, tag, n, start = sys.argv[1:7]
    store = open_store(url, DistributedSettings(s3_endpoint=endpoint, s3_access_key="testing",
                                                s3_secret_key="testing", broker_url=redis_url))
    time.sleep(max(0.0, float(start) - time.time()))
    for i in range(int(n)):
        with store.lock("shared"):  # read-modify-write of one shared document
            seen = store.get_json("shared.json") if store.exists("shared.json") else []
            store.put_json("shared.json", seen + [f"{tag}-{i}"])
""")


def test_redis_lock_keeps_every_record_of_two_processes(s3_store, settings):
    n = 15
    url = f"s3://{s3_store.bucket}/{s3_store.prefix.rstrip('/')}"
    start = time.time() + 2.0  # both processes begin their upserts at the same moment
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, settings.s3_endpoint, settings.broker_url, url,
                               tag, str(n), str(start)], stderr=subprocess.PIPE) for tag in ("p", "q")]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    want = sorted(f"{t}-{i}" for t in ("p", "q") for i in range(n))
    assert sorted(s3_store.get_json("shared.json")) == want


def test_redis_lock_blocks_a_second_holder_and_frees_on_exit(s3_store):
    s3_store.lock_wait_s = 0.3
    with s3_store.lock("x"):
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            with s3_store.lock("x"):
                pass
        assert time.monotonic() - t0 >= 0.15  # redis-py polls every 0.1 s up to the wait
        with s3_store.lock("other"):  # names are independent
            pass
    with s3_store.lock("x"):
        pass


def test_redis_lock_lease_is_renewed_while_held(s3_store):
    s3_store.lock_lease_s, s3_store.lock_wait_s = 0.6, 0.2
    with s3_store.lock("long"):
        time.sleep(1.5)  # > 2 leases: held only because the renewer extends it
        with pytest.raises(TimeoutError):
            with s3_store.lock("long"):
                pass


def test_process_local_lock_without_redis(s3_store):
    local = S3Store(s3_store.client, s3_store.bucket, s3_store.prefix, lock_url=None, lock_wait_s=0.2)
    with local.lock("y"):
        with pytest.raises(TimeoutError):
            with S3Store(s3_store.client, s3_store.bucket, s3_store.prefix, lock_wait_s=0.2).lock("y"):
                pass
    with local.lock("y"):
        pass


def test_presigned_url(s3_store, s3_endpoint):
    import httpx

    s3_store.put_bytes("clips/a b+c.mp4", b"video bytes")
    url = s3_store.presigned_url("clips/a b+c.mp4", expires_s=900)
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert parts.scheme == "http" and parts.netloc == s3_endpoint
    assert unquote(parts.path) == f"/{s3_store.bucket}/{s3_store.prefix}clips/a b+c.mp4"
    assert query["X-Amz-Expires"] == ["900"] and len(query["X-Amz-Signature"][0]) == 64
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and query["X-Amz-Credential"][0].startswith("testing/")
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == b"video bytes"
    assert download_url(s3_store, "clips/a b+c.mp4", 60) != url  # a fresh URL with its own expiry
    assert parse_qs(urlsplit(download_url(s3_store, "clips/a b+c.mp4", 60)).query)["X-Amz-Expires"] == ["60"]
    with pytest.raises(KeyError):
        download_url(s3_store, "clips/missing.mp4")
    for bad in (0, 7 * 24 * 3600 + 1):
        with pytest.raises(ValueError):
            s3_store.presigned_url("clips/a b+c.mp4", bad)


def test_download_url_of_a_local_store(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes("a/x.bin", b"x")
    url = download_url(store, "a/x.bin", 60)
    assert url.startswith("file://") and Path(unquote(urlsplit(url).path)).read_bytes() == b"x"
    with pytest.raises(KeyError):
        download_url(store, "a/missing.bin")
    with pytest.raises(TypeError):
        download_url(object(), "a/x.bin")


def test_ensure_bucket_is_idempotent(settings):
    name = f"sparkle-eb-{uuid.uuid4().hex[:8]}"
    store = open_store(f"s3://{name}", settings)
    assert store.ensure_bucket() is True
    assert store.ensure_bucket() is False
    assert Minio(settings.s3_endpoint, "testing", "testing", secure=False).bucket_exists(name)


def test_open_store_parses_urls(tmp_path, settings):
    local = open_store(f"local:{tmp_path}")
    assert isinstance(local, LocalStore) and local.root == tmp_path.resolve()
    plain = open_store("s3://bkt", settings)
    assert isinstance(plain, S3Store) and plain.bucket == "bkt" and plain.prefix == ""
    nested = open_store("s3://bkt/runs/2024/", settings)
    assert nested.prefix == "runs/2024/" and nested.object_name("a/b.mp4") == "runs/2024/a/b.mp4"
    assert nested.lock_url == settings.broker_url
    no_redis = open_store("s3://bkt", settings.model_copy(update={"broker_url": "amqp://x"}))
    assert no_redis.lock_url is None
    tls = open_store("s3://bkt", settings.model_copy(update={"s3_endpoint": "https://minio.example:9000"}))
    assert tls.client._base_url.is_https and tls.client._base_url.host == "minio.example:9000"
    for bad in ("gs://bkt", "/data", "s3://", "s3:///prefix", "local:", "minio://bkt"):
        with pytest.raises(ValueError):
            open_store(bad, settings)


def test_open_store_reads_the_environment(monkeypatch, s3_endpoint, redis_url):
    monkeypatch.setenv("SPARKLE_S3_ENDPOINT", s3_endpoint)
    monkeypatch.setenv("SPARKLE_S3_REGION", "eu-west-1")
    monkeypatch.setenv("SPARKLE_BROKER_URL", redis_url)
    store = open_store("s3://from-env/p")
    assert store.client._base_url.region == "eu-west-1" and store.lock_url == redis_url and store.prefix == "p/"
