"""The HTTP gateway (orchestrator/gateway.py) without any Celery worker.

The gateway runs in-process under FastAPI's TestClient, over a real Redis (the session's private
``redis-server``, one database per test, flushed) and a real store (a LocalStore per test; an S3Store on the
session's moto server for the happy path and the presigned artifact URLs). What the gateway enqueued is read
straight from the Redis list ``sparkle.cpu``: kombu's Redis transport stores a JSON envelope whose
``headers.task`` names the task and whose base64 ``body`` is ``[args, kwargs, embed]``.

Tests after a "Regression test" comment pin defects this file found in the gateway (since fixed).
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import threading
import time
import uuid
from fractions import Fraction
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import av
import httpx
import numpy as np
import pytest
import redis
import urllib3
from fastapi.testclient import TestClient
from minio import Minio
from pydantic import SecretStr

from sparkle import layout
from sparkle.errors import InputError
from sparkle.config import ConformConfig
from sparkle.media import MAX_SIDE_PX, MIN_SIDE_PX, check_resolution, conformed_size, read_video
from sparkle.orchestrator import datasets, jobs, journey
from sparkle.orchestrator.celery_app import make_app
from sparkle.orchestrator.gateway import MULTIPART_OVERHEAD, build_gateway
from sparkle.orchestrator.local import MAX_PROMPT_CHARS
from sparkle.queues import CPU_QUEUE
from sparkle.store import LocalStore
from sparkle.store_s3 import S3Store, open_store
from tests.conftest import HANDHELD, JUGGLE, PEDESTRIANS, SNOW_PROMPT

DEAD_BROKER = "redis://127.0.0.1:1/0"
"""Nothing listens on port 1: every connection is refused at once."""

_DB = itertools.count()


# --- helpers ---------------------------------------------------------------------------------------------

def queued(r: redis.Redis) -> list[tuple[str, list, dict]]:
    """``(task, args, kwargs)`` of every message on ``sparkle.cpu``, in the order they were sent."""
    out = []
    for raw in reversed(r.lrange(CPU_QUEUE, 0, -1)):  # kombu LPUSHes; consumers BRPOP
        envelope = json.loads(raw)
        assert envelope["properties"]["body_encoding"] == "base64"
        args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        out.append((envelope["headers"]["task"], args, kwargs))
    return out


class Gateway:
    """A gateway under test: its client, store, Celery app and a Redis client on its broker database."""

    def __init__(self, settings, store, celery_app=None, raise_server_exceptions=True):
        self.settings, self.store = settings, store
        self.celery = celery_app or make_app(settings)
        self.app = build_gateway(settings, store, self.celery)
        self.client = TestClient(self.app, raise_server_exceptions=raise_server_exceptions)
        self.redis = redis.Redis.from_url(settings.broker_url)

    def queued(self) -> list[tuple[str, list, dict]]:
        return queued(self.redis)

    def post_video(self, path: Path, prompt: str | None = SNOW_PROMPT, filename: str | None = None,
                   headers: dict | None = None, **fields):
        data = {k: str(v) for k, v in fields.items()}
        if prompt is not None:
            data["prompt"] = prompt
        with Path(path).open("rb") as f:
            return self.client.post("/v1/jobs", files={"video": (filename or Path(path).name, f, "video/mp4")},
                                    data=data, headers=headers or {})

    def close(self) -> None:
        self.client.close()
        self.redis.close()
        self.celery.close()


@pytest.fixture
def broker_url(redis_url):
    """A Redis database of its own (1..15, flushed) on the session's redis-server: database 0 keeps the
    S3 store's locks of other tests."""
    db = 1 + next(_DB) % 15
    url = redis_url.rsplit("/", 1)[0] + f"/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def gw_settings(settings, broker_url, tmp_path):
    """The session's settings (moto S3 endpoint) with this test's broker database and no keys."""
    return settings.model_copy(update={"broker_url": broker_url, "gateway_api_keys": None, "manifest_root": None,
                                       "store_url": f"local:{tmp_path / 'store'}"})


@pytest.fixture
def local_store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def s3_store(gw_settings, bucket) -> S3Store:
    store = open_store(f"s3://{bucket}/gw-{uuid.uuid4().hex[:12]}", gw_settings)
    assert isinstance(store, S3Store)
    return store


@pytest.fixture
def make_gateway(gw_settings, local_store):
    """``make_gateway(store=None, celery_app=None, **settings_updates)`` -> :class:`Gateway` (closed after)."""
    made = []

    def make(store=None, celery_app=None, raise_server_exceptions=True, **updates) -> Gateway:
        if "gateway_api_keys" in updates and isinstance(updates["gateway_api_keys"], str):
            updates["gateway_api_keys"] = SecretStr(updates["gateway_api_keys"])
        s = gw_settings.model_copy(update=updates)
        gw = Gateway(s, local_store if store is None else store, celery_app, raise_server_exceptions)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.close()


@pytest.fixture
def gateway(make_gateway) -> Gateway:
    return make_gateway()


def assert_nothing_stored(store) -> None:
    keys = store.list_keys("")
    assert keys == [], f"the refused request left {keys} in the store"
    assert store.list_keys("staging/") == [] and store.list_keys("jobs/") == []


def set_state(store, sid: str, state: str, stage: str | None = "finish") -> dict:
    """Write the job document of ``sid`` in ``state`` as a worker would (from its checkpoint)."""
    cp = jobs.load_checkpoint(store, sid)
    assert cp is not None, f"no checkpoint of {sid}"
    doc = jobs.write_job(store, cp, state, stage)
    return {k: v for k, v in doc.items() if k != "owner"}  # as the API shows it


def sse_events(lines) -> list[dict]:
    return [json.loads(line[len("data:"):]) for line in lines if line.startswith("data:")]


# --- small media made on the spot ---------------------------------------------------------------------------

def write_clip(path: Path, w: int, h: int, n: int, codec: str = "mpeg4") -> Path:
    """``n`` frames of ``w x h`` (a moving gradient) at 10 fps; n = 0: the header only, no packet."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=Fraction(10))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        c.start_encoding()
        ramp = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None]
        for i in range(n):
            arr = np.broadcast_to((ramp + 17 * i).astype(np.uint8), (h, w, 3)).copy()
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_pictureless_h264(path: Path) -> Path:
    """An MP4 with an H.264 video track whose two packets hold only access-unit delimiters (no picture)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(10))
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        c.start_encoding()
        for k in range(2):
            pk = av.Packet(b"\x00\x00\x00\x02\x09\xf0")  # 4-byte length + AUD NAL
            pk.stream, pk.pts, pk.dts, pk.time_base = s, k, k, s.time_base
            c.mux(pk)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gw-media")
    out = {"small": write_clip(d / "small.mp4", 64, 48, 3),
           "tiny": write_clip(d / "tiny.mp4", 16, 16, 3),
           "no_frames": write_clip(d / "no_frames.mp4", 64, 48, 0),
           "pictureless": write_pictureless_h264(d / "pictureless.mp4")}
    h264 = write_clip(d / "h264.mp4", 64, 48, 3, codec="libx264").read_bytes()
    assert b"avc1" in h264
    (d / "zzzz.mp4").write_bytes(h264.replace(b"avc1", b"zzzz"))  # a fourcc no decoder knows
    out["unknown_codec"] = d / "zzzz.mp4"
    (d / "text.mp4").write_text("this is not a video, whatever its name says\n" * 20)
    out["text"] = d / "text.mp4"
    (d / "empty.mp4").write_bytes(b"")
    out["empty"] = d / "empty.mp4"
    return out


def test_generated_media_are_what_the_tests_say(media):
    assert read_video(media["small"]).shape == (3, 48, 64)
    assert read_video(media["tiny"]).shape == (3, 16, 16)
    with av.open(str(media["no_frames"])) as c:  # the mp4 muxer drops a track without samples
        assert not c.streams.video
    with av.open(str(media["pictureless"])) as c:  # a video track with packets, none of them a picture
        assert c.streams.video and c.streams.video[0].frames == 2
    with av.open(str(media["unknown_codec"])) as c:
        assert c.streams.video and c.streams.video[0].codec_context is None  # no decoder for the fourcc
    for name in ("no_frames", "pictureless", "unknown_codec", "text", "empty"):
        with pytest.raises(InputError):
            read_video(media[name], max_frames=1)


# --- 1. the happy path --------------------------------------------------------------------------------------

@pytest.mark.parametrize("store_kind", ["local", "s3"])
def test_post_job_stages_the_source_and_enqueues_ingest(make_gateway, store_kind, request):
    store = request.getfixturevalue("s3_store" if store_kind == "s3" else "local_store")
    gw = make_gateway(store=store)
    r = gw.post_video(JUGGLE, filename="my juggle.MP4")
    assert r.status_code == 202, r.text
    doc = r.json()
    sid = doc["id"]
    assert sid == "Sparkle_location_000000"
    assert r.headers["location"] == f"/v1/jobs/{sid}"
    assert doc["state"] == "queued" and doc["stage"] is None and doc["error"] is None
    assert doc["prompt"] == SNOW_PROMPT and doc["edit_type"] == "location"
    assert doc["chosen_keyword"] == "custom: snowy mountain village at dusk"

    inputs = store.list_keys(f"staging/{sid}/inputs/")
    assert inputs == [f"staging/{sid}/inputs/source.mp4"]
    assert store.get_bytes(inputs[0]) == JUGGLE.read_bytes()
    assert store.exists(f"staging/{sid}/journey.json")
    cp = jobs.load_checkpoint(store, sid)
    assert cp.next == "ingest" and cp.sent is True and cp.task.source_key == inputs[0]
    assert store.get_json(f"jobs/{sid}.json") == {**doc, "owner": ""}  # the owner is stored, not shown
    assert gw.queued() == [("sparkle.stage", [sid, "ingest"], {})]

    got = gw.client.get(f"/v1/jobs/{sid}")
    assert got.status_code == 200 and got.json() == doc

    r2 = gw.post_video(PEDESTRIANS)
    assert r2.status_code == 202, r2.text
    assert r2.json()["id"] == "Sparkle_location_000001"
    assert [m[1] for m in gw.queued()] == [[sid, "ingest"], ["Sparkle_location_000001", "ingest"]]
    assert store.get_json("jobs/ids/location.json") == {"next": 2}


def test_theme_keyword_options_and_background_reach_the_checkpoint(gateway, media):
    bg = JUGGLE.with_name("static_01_juggle_frame0.png")
    with media["small"].open("rb") as v, bg.open("rb") as b:
        r = gateway.client.post("/v1/jobs", files={"video": ("clip.mov", v), "background": ("bg.PNG", b)},
                                data={"prompt": "Make it winter", "theme": "season", "chosen_keyword": "winter: snow",
                                      "force": "true", "gates": "false", "max_size": "320x640", "max_frames": "9"})
    assert r.status_code == 202, r.text
    sid = r.json()["id"]
    assert sid == "Sparkle_season_000000" and r.json()["chosen_keyword"] == "winter: snow"
    cp = jobs.load_checkpoint(gateway.store, sid)
    assert cp.task.source_key == f"staging/{sid}/inputs/source.mov"
    assert cp.task.background_key == f"staging/{sid}/inputs/background.png"
    assert gateway.store.get_bytes(cp.task.background_key) == bg.read_bytes()
    assert cp.task.force is True and cp.task.enforce_gates is False
    conform = cp.config["conform"]
    assert (conform["max_long_side"], conform["max_short_side"], conform["max_frames"]) == (640, 320, 9)


def test_the_distributed_run_defaults_to_sparkles_1280x720_at_16_fps(gateway, media, monkeypatch):
    """Without ``max_size`` a job conforms to Sparkle's released size (1280x720, portrait 720x1280), 16 fps;
    ``SPARKLE_CONFORM__*`` still overrides it, and the embedded cpu/tiny profiles keep 832x480."""
    from sparkle.config import PipelineConfig, distributed_config

    r = gateway.post_video(media["small"])
    assert r.status_code == 202, r.text
    conform = jobs.load_checkpoint(gateway.store, r.json()["id"]).config["conform"]
    assert (conform["max_long_side"], conform["max_short_side"], conform["fps"]) == (1280, 720, 16.0)
    assert conformed_size(720, 1280, ConformConfig(**conform))[2:] == (720, 1280)
    monkeypatch.setenv("SPARKLE_CONFORM__MAX_LONG_SIDE", "640")
    monkeypatch.setenv("SPARKLE_CONFORM__MAX_SHORT_SIDE", "368")
    assert distributed_config().conform.max_long_side == 640
    monkeypatch.delenv("SPARKLE_CONFORM__MAX_LONG_SIDE")
    monkeypatch.delenv("SPARKLE_CONFORM__MAX_SHORT_SIDE")
    sizes = {p: (c.conform.max_long_side, c.conform.max_short_side)
             for p, c in ((p, PipelineConfig(profile=p)) for p in ("real", "cpu", "tiny"))}
    assert sizes == {"real": (1280, 720), "cpu": (832, 480), "tiny": (832, 480)}
    assert PipelineConfig(profile="real", conform={"max_long_side": 416, "max_short_side": 240}).conform.max_long_side == 416


def test_prompt_may_be_left_out(gateway, media):
    r = gateway.post_video(media["small"], prompt=None, theme="style")
    assert r.status_code == 202, r.text
    assert r.json()["prompt"] == "" and r.json()["chosen_keyword"] is None  # written from the catalogue later


# --- 2. Idempotency-Key --------------------------------------------------------------------------------------

def test_idempotency_key_returns_the_same_job(gateway, media):
    first = gateway.post_video(media["small"], headers={"Idempotency-Key": "abc-1"})
    again = gateway.post_video(media["small"], headers={"Idempotency-Key": "abc-1"})
    assert first.status_code == 202 and again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"] == "Sparkle_location_000000"
    assert again.headers["location"] == first.headers["location"]
    assert len(gateway.queued()) == 1
    assert {k.split("/")[1] for k in gateway.store.list_keys("staging/")} == {"Sparkle_location_000000"}
    assert len(gateway.store.list_keys("jobs/idempotency/")) == 1

    other = gateway.post_video(media["small"], headers={"Idempotency-Key": "abc-2"})
    assert other.status_code == 202 and other.json()["id"] == "Sparkle_location_000001"
    assert len(gateway.queued()) == 2


def test_an_idempotency_key_reused_for_another_request_is_422_not_the_first_job(gateway, media):
    """Same key, another prompt (or another file): 422 naming the conflict, nothing new submitted; it used to
    return the first job silently, as if the new request had been accepted."""
    first = gateway.post_video(media["small"], headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 202
    keys = gateway.store.list_keys("")
    other_prompt = gateway.post_video(media["small"], prompt="Replace the background with a beach",
                                      headers={"Idempotency-Key": "k-1"})
    assert other_prompt.status_code == 422 and "different request" in other_prompt.json()["detail"]
    other_file = gateway.post_video(JUGGLE,
                                    headers={"Idempotency-Key": "k-1"})
    assert other_file.status_code == 422
    assert gateway.store.list_keys("") == keys and len(gateway.queued()) == 1
    assert gateway.post_video(media["small"], headers={"Idempotency-Key": "k-1"}).status_code == 200  # the same


def test_idempotency_key_is_scoped_to_the_api_key(make_gateway, media):
    gw = make_gateway(gateway_api_keys="k1,k2")
    a = gw.post_video(media["small"], headers={"Idempotency-Key": "same", "X-API-Key": "k1"})
    b = gw.post_video(media["small"], headers={"Idempotency-Key": "same", "X-API-Key": "k2"})
    a2 = gw.post_video(media["small"], headers={"Idempotency-Key": "same", "Authorization": "Bearer k1"})
    assert (a.status_code, b.status_code, a2.status_code) == (202, 202, 200)
    assert a.json()["id"] != b.json()["id"]
    assert a2.json()["id"] == a.json()["id"]
    assert len(gw.queued()) == 2


def test_refused_input_does_not_burn_the_idempotency_key(gateway, media):
    bad = gateway.post_video(media["text"], headers={"Idempotency-Key": "retry-me"})
    assert bad.status_code == 400
    assert_nothing_stored(gateway.store)
    good = gateway.post_video(media["small"], headers={"Idempotency-Key": "retry-me"})
    assert good.status_code == 202 and good.json()["id"] == "Sparkle_location_000000"


# --- 3. API keys ---------------------------------------------------------------------------------------------

def test_api_keys(make_gateway, media):
    gw = make_gateway(gateway_api_keys=" k1, k2 ,")
    c = gw.client
    for headers in ({}, {"X-API-Key": "nope"}, {"Authorization": "Bearer nope"}, {"Authorization": "k1x"},
                    {"X-API-Key": ""}):
        r = c.get("/v1/jobs/Sparkle_location_000000", headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert "API key" in r.json()["detail"]
    # refused before the upload is stored
    assert gw.post_video(media["small"]).status_code == 401
    assert c.post("/v1/datasets", json={"entries": [{"video_key": "x"}]}).status_code == 401
    for path in ("/v1/jobs/Sparkle_location_000000/events", "/v1/jobs/Sparkle_location_000000/artifacts",
                 "/v1/datasets/abc"):
        assert c.get(path).status_code == 401, path
    assert c.delete("/v1/jobs/Sparkle_location_000000").status_code == 401
    assert_nothing_stored(gw.store)
    assert gw.queued() == []

    assert gw.post_video(media["small"], headers={"X-API-Key": "k2"}).status_code == 202
    assert c.get("/v1/jobs/Sparkle_location_000000", headers={"Authorization": "Bearer k2"}).status_code == 200
    assert c.get("/v1/jobs/Sparkle_location_000000", headers={"X-API-Key": "k2"}).json()["state"] == "queued"
    # Another client's job is not there for k1: no read, no events, no artifacts, no cancel (B cancelled A's job).
    job = "/v1/jobs/Sparkle_location_000000"
    for method, path in (("GET", job), ("GET", job + "/events"), ("GET", job + "/artifacts"), ("DELETE", job)):
        r = c.request(method, path, headers={"X-API-Key": "k1"})
        assert r.status_code == 404, (method, path, r.text)
    assert not gw.store.exists(jobs.cancel_key("Sparkle_location_000000"))
    assert c.delete(job, headers={"X-API-Key": "k2"}).status_code == 202

    for path in ("/healthz", "/docs", "/openapi.json"):
        assert c.get(path).status_code == 200, path
    assert c.get("/healthz").json() == {"status": "alive"}
    paths = c.get("/openapi.json").json()["paths"]
    for p in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/artifacts", "/v1/jobs/{job_id}/events",
              "/v1/datasets", "/v1/datasets/{dataset_id}", "/healthz", "/readyz"):
        assert p in paths, p
    assert {"post"} <= set(paths["/v1/jobs"]) and {"get", "delete"} <= set(paths["/v1/jobs/{job_id}"])


def test_no_keys_configured_means_open(gateway, media):
    assert gateway.post_video(media["small"]).status_code == 202
    assert gateway.client.get("/v1/jobs/Sparkle_location_000000", headers={"X-API-Key": "anything"}).status_code == 200


# --- 4. bad inputs: 4xx, nothing stored, nothing queued -------------------------------------------------------

BAD_INPUTS = {
    # name: (media name or None for the small valid clip, form fields, status, words of the detail)
    "not_a_video": ("text", {}, 400, "not a decodable video"),
    "empty_file": ("empty", {}, 400, "empty"),
    "unknown_codec": ("unknown_codec", {}, 400, "not a decodable video"),
    "no_frames": ("no_frames", {}, 400, "no video stream"),
    "pictureless_track": ("pictureless", {}, 400, "video"),
    "tiny_resolution": ("tiny", {}, 400, f"16x16: each side must lie within {MIN_SIDE_PX}..{MAX_SIDE_PX} px"),
    "blank_prompt": (None, {"prompt": "   "}, 400, "prompt is empty"),
    "long_prompt": (None, {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, 400, f"{MAX_PROMPT_CHARS + 1} characters"),
    "unknown_theme": (None, {"theme": "beach"}, 400, "unknown edit_type 'beach'"),
    "bad_max_size": (None, {"max_size": "abc"}, 422, "max_size"),
    "max_frames_too_small": (None, {"max_frames": "4"}, 422, "max_frames"),
    "bad_force": (None, {"force": "perhaps"}, 422, "force"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_with_nothing_stored(gateway, media, case):
    name, fields, status, words = BAD_INPUTS[case]
    fields = {"prompt": SNOW_PROMPT, **fields}
    prompt = fields.pop("prompt")
    r = gateway.post_video(media[name or "small"], prompt=prompt, filename="clip.mp4", **fields)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert words in (detail if isinstance(detail, str) else json.dumps(detail)), detail
    assert_nothing_stored(gateway.store)
    assert gateway.queued() == []


# Regression test (a defect found by this file, since fixed):
@pytest.mark.parametrize("name", ["text", "tiny", "unknown_codec"])
def test_bad_upload_detail_names_the_uploaded_file(gateway, media, name):
    r = gateway.post_video(media[name], filename="holiday.mp4")
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert "sparkle-upload-" not in detail and "holiday.mp4" in detail, detail


def test_missing_video_field_is_422(gateway):
    r = gateway.client.post("/v1/jobs", data={"prompt": SNOW_PROMPT})
    assert r.status_code == 422
    assert any(e["loc"][-1] == "video" for e in r.json()["detail"])
    assert_nothing_stored(gateway.store)
    assert gateway.queued() == []


def test_bad_background_is_refused(gateway, media):
    with media["small"].open("rb") as v, media["text"].open("rb") as b:
        r = gateway.client.post("/v1/jobs", files={"video": ("clip.mp4", v), "background": ("bg.png", b)},
                                data={"prompt": SNOW_PROMPT})
    assert r.status_code == 400 and "image" in r.json()["detail"], r.text
    assert_nothing_stored(gateway.store)
    assert gateway.queued() == []


def test_oversized_upload_is_413(make_gateway, tmp_path):
    gw = make_gateway(max_upload_bytes=200_000)
    big = tmp_path / "big.mp4"
    big.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000 + MULTIPART_OVERHEAD + 64_000,
                                                      dtype=np.uint8).tobytes())
    r = gw.post_video(big, filename="clip.mp4")
    assert r.status_code == 413, r.text[:300]
    assert "larger than" in r.json()["detail"]
    assert_nothing_stored(gw.store)
    assert gw.queued() == []
    # the limit is per route: the same gateway still takes a small upload
    small = tmp_path / "ok.mp4"
    write_clip(small, 64, 48, 3)
    assert gw.post_video(small).status_code == 202


# Regression test (a defect found by this file, since fixed):
def test_oversized_upload_413_has_a_json_detail(make_gateway, tmp_path):
    gw = make_gateway(max_upload_bytes=200_000)
    big = tmp_path / "big.mp4"
    big.write_bytes(bytes(200_000 + MULTIPART_OVERHEAD + 64_000))
    r = gw.post_video(big, filename="clip.mp4")
    assert r.status_code == 413
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    assert "200000" in r.json()["detail"] or "bytes" in r.json()["detail"]


# Regression test (a defect found by this file, since fixed):
def test_upload_larger_than_max_upload_bytes_is_413_even_within_the_multipart_allowance(make_gateway):
    gw = make_gateway(max_upload_bytes=200_000)
    assert JUGGLE.stat().st_size > 200_000 + 300_000  # well above the limit, below limit + 1 MiB
    r = gw.post_video(JUGGLE)
    assert r.status_code == 413, r.text[:300]
    assert_nothing_stored(gw.store)


def test_check_resolution_bounds():
    check_resolution(MIN_SIDE_PX, MIN_SIDE_PX)
    check_resolution(MAX_SIDE_PX, MAX_SIDE_PX)
    check_resolution(4320, 7680)
    for h, w in ((9000, 100), (100, 9000), (9000, 9000), (MIN_SIDE_PX - 1, 640), (480, MIN_SIDE_PX - 1), (0, 0)):
        with pytest.raises(InputError, match=rf"{w}x{h}"):
            check_resolution(h, w, what="video x.mp4")


# --- 5. datasets ------------------------------------------------------------------------------------------------

@pytest.fixture
def manifest_root(tmp_path) -> Path:
    """``root/clips/{juggle,pedestrians}.mp4`` (copies), ``root/clips/out.mp4`` -> a clip outside the root
    (a symlink), and ``outside.mp4`` next to the root."""
    root = tmp_path / "manifests"
    (root / "clips").mkdir(parents=True)
    shutil.copyfile(JUGGLE, root / "clips" / "juggle.mp4")
    shutil.copyfile(PEDESTRIANS, root / "clips" / "pedestrians.mp4")
    (root / "clips" / "out.mp4").symlink_to(HANDHELD)
    shutil.copyfile(PEDESTRIANS, tmp_path / "outside.mp4")
    return root


@pytest.fixture
def ds_gateway(make_gateway, manifest_root) -> Gateway:
    return make_gateway(manifest_root=str(manifest_root))


ENTRIES = [{"video": "clips/juggle.mp4", "prompt": SNOW_PROMPT},
           {"video": "clips/pedestrians.mp4", "theme": "season"},
           {"video": "clips/../clips/juggle.mp4", "theme": "location", "force": True}]


def test_dataset_is_registered_once_and_driven_by_ticks(ds_gateway):
    gw, store = ds_gateway, ds_gateway.store
    r = gw.client.post("/v1/datasets", json={"entries": ENTRIES, "window": 2})
    assert r.status_code == 202, r.text
    ds = r.json()
    did = ds["id"]
    assert ds["total"] == 3 and ds["window"] == 2 and ds["by_edit_type"] == {"location": 2, "season": 1}
    assert ds["status"]["total"] == 3 and ds["status"]["submitted"] == 0 and ds["status"]["done"] is False
    [(name, args, kwargs)] = gw.queued()  # one tick chain, with its token
    assert (name, args, kwargs["resume"]) == ("sparkle.dataset_tick", [did], False) and kwargs["token"]
    assert datasets.dataset_samples(store, did) == ["Sparkle_location_000000", "Sparkle_season_000000",
                                                "Sparkle_location_000001"]
    ids_before = {k: store.get_json(k) for k in store.list_keys("jobs/ids/")}
    assert ids_before == {"jobs/ids/location.json": {"next": 2}, "jobs/ids/season.json": {"next": 1}}
    keys_before = store.list_keys("datasets/")
    assert store.list_keys("staging/") == [] and store.list_keys("jobs/Sparkle") == []  # nothing submitted yet

    again = gw.client.post("/v1/datasets", json={"entries": ENTRIES, "window": 2})
    assert again.status_code == 202 and again.json()["id"] == did
    assert {k: store.get_json(k) for k in store.list_keys("jobs/ids/")} == ids_before
    assert store.list_keys("datasets/") == keys_before
    assert [m[1] for m in gw.queued()] == [[did]]  # the same dataset posted again: still one tick chain

    st = gw.client.get(f"/v1/datasets/{did}")
    assert st.status_code == 200
    body = st.json()
    assert (body["id"], body["total"], body["submitted"], body["finished"], body["counts"]) == (did, 3, 0, 0, {})
    assert body["funnel"]["samples"] == 0 and "stages" in body["funnel"]
    assert len(gw.queued()) == 1  # a fresh run is not driven again by a GET

    # a run whose driver went quiet for over a minute (its chain's token expired) is driven again, resuming
    # its samples in flight; while that chain lives, further GETs send nothing
    state = store.get_json(f"datasets/{did}/state.json")
    store.put_json(f"datasets/{did}/state.json", {**state, "updated_at": time.time() - 120})
    gw.celery.backend.client.delete(datasets.chain_key(did))
    for _ in range(5):
        assert gw.client.get(f"/v1/datasets/{did}").status_code == 200
    assert len(gw.queued()) == 2
    name, args, kwargs = gw.queued()[-1]
    assert (name, args, kwargs["resume"]) == ("sparkle.dataset_tick", [did], True)


def test_dataset_name_and_store_keys(ds_gateway, media):
    store = ds_gateway.store
    store.put_file("uploads/a.mp4", media["small"])
    r = ds_gateway.client.post("/v1/datasets", json={"entries": [{"video_key": "uploads/a.mp4", "theme": "time"}],
                                                     "name": "my-set_1", "max_frames": 9})
    assert r.status_code == 202, r.text
    assert r.json()["id"] == "my-set_1" and r.json()["config"]["conform"]["max_frames"] == 9
    assert ds_gateway.client.get("/v1/datasets/my-set_1").json()["total"] == 1


BAD_ENTRIES = {
    "dotdot": ({"video": "../outside.mp4"}, "escapes the manifest root"),
    "absolute": ({"video": "/etc/passwd"}, "escapes the manifest root"),
    "absolute_inside": (None, "escapes the manifest root"),  # the root's own absolute path: still refused
    "symlink_out": ({"video": "clips/out.mp4"}, "escapes the manifest root"),
    "missing": ({"video": "clips/nope.mp4"}, "not found"),
    "unknown_key": ({"video_key": "uploads/nope.mp4"}, "is not in the store"),
    "both": ({"video": "clips/juggle.mp4", "video_key": "uploads/nope.mp4"}, "exactly one of video"),
    "neither": ({"prompt": SNOW_PROMPT}, "exactly one of video"),
    "bad_background": ({"video": "clips/juggle.mp4", "background": "../outside.mp4"}, "escapes"),
    "background_key_missing": ({"video": "clips/juggle.mp4", "background_key": "bg.png"}, "not in the store"),
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_bad_dataset_entry_is_400_naming_it(ds_gateway, manifest_root, case):
    entry, words = BAD_ENTRIES[case]
    if entry is None:
        entry = {"video": str(manifest_root / "clips" / "juggle.mp4")}
    r = ds_gateway.client.post("/v1/datasets", json={"entries": [ENTRIES[0], entry]})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "entry 2" in detail and words in detail and "entry 1" not in detail, detail
    assert_nothing_stored(ds_gateway.store)
    assert ds_gateway.queued() == []


@pytest.mark.parametrize("entry, words", [
    ({"video": "clips/juggle.mp4", "theme": "beach"}, "unknown edit_type 'beach'"),
    ({"video": "clips/juggle.mp4", "prompt": "  "}, "prompt"),
    ({"video": "clips/juggle.mp4", "colour": "red"}, "colour"),
    ({"video": "clips/juggle.mp4", "prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
])
def test_malformed_dataset_entry_is_400(ds_gateway, entry, words):
    r = ds_gateway.client.post("/v1/datasets", json={"entries": [entry]})
    assert r.status_code == 400, r.text
    assert words in r.json()["detail"]
    assert_nothing_stored(ds_gateway.store)
    assert ds_gateway.queued() == []


def test_dataset_without_manifest_root_refuses_local_paths(gateway):
    r = gateway.client.post("/v1/datasets", json={"entries": [{"video": "clips/juggle.mp4"}]})
    assert r.status_code == 400 and "no manifest root is configured" in r.json()["detail"], r.text
    assert_nothing_stored(gateway.store)
    assert gateway.queued() == []


@pytest.mark.parametrize("body", [{"entries": []}, {}, {"entries": [{}], "window": 0},
                                  {"entries": [{"video_key": "k"}], "name": "a/b"},
                                  {"entries": [{"video_key": "k"}], "max_size": "big"}])
def test_malformed_dataset_request_is_422(ds_gateway, body):
    assert ds_gateway.client.post("/v1/datasets", json=body).status_code == 422
    assert_nothing_stored(ds_gateway.store)


# Regression test (a defect found by this file, since fixed):
@pytest.mark.parametrize("name", [".", ".."])
def test_dataset_name_of_dots_is_refused(make_gateway, media, name):
    gw = make_gateway(raise_server_exceptions=False)
    gw.store.put_file("uploads/a.mp4", media["small"])
    r = gw.client.post("/v1/datasets", json={"entries": [{"video_key": "uploads/a.mp4"}], "name": name})
    assert r.status_code in (400, 422), (r.status_code, r.text[:300])
    assert gw.store.list_keys("datasets/") == []


def test_get_unknown_dataset_is_404(gateway):
    for did in ("0123456789abcdef", "nope", "..", "a..b"):
        r = gateway.client.get(f"/v1/datasets/{did}")
        assert r.status_code == 404, (did, r.status_code)


# --- 6. the job lifecycle without workers ------------------------------------------------------------------------

@pytest.fixture
def queued_job(gateway, media) -> str:
    r = gateway.post_video(media["small"])
    assert r.status_code == 202
    return r.json()["id"]


@pytest.mark.parametrize("job_id", ["Sparkle_location_000000", "Sparkle_location_999999", "Sparkle_beach_000000",
                                    "not-an-id", "..%2Fx", "%2E%2E", "Sparkle_location_000000.json"])
def test_unknown_or_malformed_job_is_404(gateway, job_id):
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/artifacts"):
        r = gateway.client.get(path)
        assert r.status_code == 404, (path, r.status_code, r.text[:200])
        assert "no job" in r.json()["detail"] or r.json()["detail"] == "Not Found"
    assert gateway.client.delete(f"/v1/jobs/{job_id}").status_code == 404
    assert_nothing_stored(gateway.store)


# Regression test (a defect found by this file, since fixed):
@pytest.mark.parametrize("job_id", ["Sparkle_location_000000", "not-an-id"])
def test_events_of_an_unknown_job_is_404(make_gateway, job_id):
    gw = make_gateway(raise_server_exceptions=False)
    r = gw.client.get(f"/v1/jobs/{job_id}/events")
    assert r.status_code == 404, (r.status_code, r.headers.get("content-type"), r.text[:200])


def test_cancel_a_queued_job(gateway, queued_job):
    r = gateway.client.delete(f"/v1/jobs/{queued_job}")
    assert r.status_code == 202, r.text
    assert r.json()["cancel_requested"] is True and r.json()["id"] == queued_job and r.json()["state"] == "queued"
    marker = gateway.store.get_json(f"jobs/{queued_job}.cancel")
    assert marker["id"] == queued_job and marker["requested_at"] <= time.time()
    assert jobs.cancel_requested(gateway.store, queued_job)
    assert gateway.client.delete(f"/v1/jobs/{queued_job}").status_code == 202  # still not final: asked again
    assert len(gateway.queued()) == 1  # cancelling sends nothing: the journey sees the marker


@pytest.mark.parametrize("state", sorted(jobs.TERMINAL))
def test_cancel_a_finished_job_is_409(gateway, queued_job, state):
    set_state(gateway.store, queued_job, state)
    r = gateway.client.delete(f"/v1/jobs/{queued_job}")
    assert r.status_code == 409 and state in r.json()["detail"], r.text
    assert not gateway.store.exists(f"jobs/{queued_job}.cancel")


@pytest.mark.parametrize("state", ["queued", "running"])
def test_artifacts_of_an_unfinished_job_are_409(gateway, queued_job, state):
    if state != "queued":
        set_state(gateway.store, queued_job, state, "ingest")
    r = gateway.client.get(f"/v1/jobs/{queued_job}/artifacts")
    assert r.status_code == 409 and state in r.json()["detail"], r.text


def _finish(store, sid: str, data: bytes = b"edited video bytes") -> str:
    key = layout.edited_video("location", sid)
    store.put_bytes(key, data)
    store.put_json(layout.report("location", sid), {"id": sid, "status": "accepted", "artifacts": {"edited_video": key}})
    set_state(store, sid, "accepted")
    return key


def test_artifacts_of_a_finished_job_local(gateway, queued_job):
    key = _finish(gateway.store, queued_job)
    r = gateway.client.get(f"/v1/jobs/{queued_job}/artifacts", params={"expires_s": 60})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == queued_job and body["state"] == "accepted" and body["expires_s"] == 60
    assert set(body["artifacts"]) == {"edited_video", "report"}
    assert body["artifacts"]["edited_video"]["key"] == key
    assert body["artifacts"]["report"]["key"] == f"reports/location/{queued_job}.json"
    for art in body["artifacts"].values():
        url = urlsplit(art["url"])
        assert url.scheme == "file"
        assert Path(unquote(url.path)).read_bytes() == gateway.store.get_bytes(art["key"])
    for bad in (0, -1, 7 * 24 * 3600 + 1, "soon"):
        assert gateway.client.get(f"/v1/jobs/{queued_job}/artifacts", params={"expires_s": bad}).status_code == 422


def test_artifacts_of_a_finished_job_s3_are_presigned(make_gateway, s3_store, media, gw_settings):
    gw = make_gateway(store=s3_store)
    r = gw.post_video(media["small"])
    assert r.status_code == 202, r.text
    sid = r.json()["id"]
    assert gw.client.get(f"/v1/jobs/{sid}/artifacts").status_code == 409
    key = _finish(s3_store, sid, b"the edited video")
    r = gw.client.get(f"/v1/jobs/{sid}/artifacts", params={"expires_s": 900})
    assert r.status_code == 200, r.text
    arts = r.json()["artifacts"]
    assert arts["edited_video"]["key"] == key
    for art in arts.values():
        url = urlsplit(art["url"])
        q = parse_qs(url.query)
        assert url.scheme == "http" and url.netloc == gw_settings.s3_endpoint
        assert q["X-Amz-Expires"] == ["900"] and q["X-Amz-Signature"][0]
        assert url.path.endswith(s3_store.object_name(art["key"]))
        got = httpx.get(art["url"], timeout=10)
        assert got.status_code == 200 and got.content == s3_store.get_bytes(art["key"])
    assert httpx.get(arts["edited_video"]["url"], timeout=10).content == b"the edited video"
    default = gw.client.get(f"/v1/jobs/{sid}/artifacts").json()
    assert default["expires_s"] == 900
    assert parse_qs(urlsplit(default["artifacts"]["report"]["url"]).query)["X-Amz-Expires"] == ["900"]
    # A link valid for 7 days was accepted; the longest is SPARKLE_PRESIGN_MAX_S (1 h by default).
    r = gw.client.get(f"/v1/jobs/{sid}/artifacts", params={"expires_s": 7 * 24 * 3600})
    assert r.status_code == 422 and "SPARKLE_PRESIGN_MAX_S" in r.json()["detail"]
    assert gw.client.get(f"/v1/jobs/{sid}/artifacts", params={"expires_s": 3600}).status_code == 200


# Regression test (a defect found by this file, since fixed):
@pytest.mark.parametrize("what", ["no_report", "missing_artifact"])
def test_artifacts_of_a_finished_job_without_files_is_4xx(make_gateway, media, what):
    gw = make_gateway(raise_server_exceptions=False)
    sid = gw.post_video(media["small"]).json()["id"]
    if what == "no_report":
        set_state(gw.store, sid, "failed")
    else:
        _finish(gw.store, sid)
        gw.store.delete_prefix(layout.edited_video("location", sid))
    r = gw.client.get(f"/v1/jobs/{sid}/artifacts")
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])


# --- 7. server-sent events -------------------------------------------------------------------------------------

def test_events_of_a_finished_job_is_one_event(gateway, queued_job):
    doc = set_state(gateway.store, queued_job, "rejected")
    with gateway.client.stream("GET", f"/v1/jobs/{queued_job}/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(list(r.iter_lines()))
    assert events == [doc]


def test_events_follow_the_job_until_it_is_final(gateway, queued_job):
    store = gateway.store

    def later(delay: float, state: str, stage: str) -> threading.Timer:
        t = threading.Timer(delay, lambda: set_state(store, queued_job, state, stage))
        t.daemon = True
        t.start()
        return t

    timers: list[threading.Timer] = []
    events: list[dict] = []
    start = time.monotonic()
    try:
        with gateway.client.stream("GET", f"/v1/jobs/{queued_job}/events", params={"poll_s": 0.5}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                events += sse_events([line])
                if len(events) == 1 and not timers:  # the stream is open: the "worker" moves the job on
                    timers += [later(0.3, "running", "ingest"), later(1.5, "accepted", "finish"),
                               later(20.0, "failed", "watchdog")]  # ends a stream that would miss 'accepted'
    finally:
        for t in timers:
            t.cancel()
    states = [e["state"] for e in events]
    assert states[0] == "queued" and states[-1] == "accepted", states
    assert "running" in states and len(events) >= 3
    assert len({e["updated_at"] for e in events}) == len(events)  # one event per change, no repeats
    assert time.monotonic() - start < 10


def test_events_poll_interval_is_bounded(gateway, queued_job):
    for poll in (0.01, 0.1, 31, "x"):  # 0.1: 20 streams made 273 store reads a second
        assert gateway.client.get(f"/v1/jobs/{queued_job}/events", params={"poll_s": poll}).status_code == 422


# --- 8. readiness and an unreachable broker ---------------------------------------------------------------------

@pytest.mark.parametrize("store_kind", ["local", "s3"])
def test_readyz_with_broker_and_store(make_gateway, store_kind, request):
    store = request.getfixturevalue("s3_store" if store_kind == "s3" else "local_store")
    r = make_gateway(store=store).client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}, r.text


def dead_broker_app(settings):
    """A Celery app on a port nothing listens on, with every retry bounded (tests stay fast)."""
    app = make_app(settings.model_copy(update={"broker_url": DEAD_BROKER}))
    app.conf.broker_connection_retry = False
    app.conf.broker_connection_max_retries = 0
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "socket_connect_timeout": 1}
    app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0, "interval_step": 0.1,
                                          "interval_max": 0.1}
    app.conf.result_backend_transport_options = {"retry_policy": {"max_retries": 1, "interval_start": 0,
                                                                  "interval_step": 0.1, "interval_max": 0.1}}
    return app


def test_readyz_with_unreachable_broker_is_503(make_gateway, gw_settings):
    gw = make_gateway(celery_app=dead_broker_app(gw_settings))
    start = time.monotonic()
    r = gw.client.get("/readyz")
    assert r.status_code == 503, r.text
    assert r.json()["status"] == "unavailable" and "127.0.0.1:1" in r.json()["error"]
    assert time.monotonic() - start < 10


def test_readyz_with_the_default_retry_settings_answers_quickly(make_gateway, gw_settings):
    gw = make_gateway(celery_app=make_app(gw_settings.model_copy(update={"broker_url": DEAD_BROKER})))
    start = time.monotonic()
    assert gw.client.get("/readyz").status_code == 503
    assert time.monotonic() - start < 10


def test_readyz_with_unreachable_store_is_503(make_gateway):
    client = Minio("127.0.0.1:1", access_key="testing", secret_key="testing", secure=False, region="us-east-1",
                   http_client=urllib3.PoolManager(retries=urllib3.Retry(total=0), timeout=2))
    gw = make_gateway(store=S3Store(client, "nobucket"))
    r = gw.client.get("/readyz")
    assert r.status_code == 503, r.text


def test_submit_with_unreachable_broker_keeps_nothing_staged(make_gateway, gw_settings, media):
    gw = make_gateway(celery_app=dead_broker_app(gw_settings), raise_server_exceptions=False)
    start = time.monotonic()
    r = gw.post_video(media["small"])
    assert r.status_code >= 500, r.text
    assert time.monotonic() - start < 15
    assert gw.store.list_keys("staging/") == []
    assert not gw.store.exists("jobs/Sparkle_location_000000.json")
    # the id counter stays (ids only grow: one id is skipped), nothing else
    assert gw.store.list_keys("") == ["jobs/ids/location.json"]
    assert gw.queued() == []


# Regression test (a defect found by this file, since fixed):
@pytest.mark.parametrize("what", ["job", "dataset"])
def test_unreachable_broker_is_503(make_gateway, gw_settings, media, what):
    gw = make_gateway(celery_app=dead_broker_app(gw_settings), raise_server_exceptions=False)
    if what == "job":
        r = gw.post_video(media["small"])
    else:
        gw.store.put_file("uploads/a.mp4", media["small"])
        r = gw.client.post("/v1/datasets", json={"entries": [{"video_key": "uploads/a.mp4"}]})
    assert r.status_code == 503, (r.status_code, r.text[:300])
    assert r.headers.get("retry-after") == "5" and "queue unavailable" in r.json()["detail"]


def test_a_decompression_bomb_is_refused_with_413_before_anything_is_decoded_or_stored(gateway, tmp_path):
    """A few-KB MP4 declaring 4096x2304 frames (over the 3840x2160 budget): 413 from its header, quickly, and
    nothing published or staged. (An 8192x4320 one used to be accepted and cost 2.58 GB on the worker.)"""
    from sparkle.media import write_video

    bomb = write_video(tmp_path / "bomb.mp4", np.zeros((2, 2304, 4096, 3), np.uint8), 16)
    started = time.perf_counter()
    r = gateway.post_video(bomb, filename="bomb.mp4")
    assert r.status_code == 413 and "4096x2304" in r.json()["detail"], r.text
    assert time.perf_counter() - started < 2.0
    assert_nothing_stored(gateway.store)


@pytest.mark.parametrize("filename", ["..", ".", "x" * 300 + ".mp4", "a/../.."])
def test_odd_upload_names_are_not_a_500(gateway, media, filename):
    """A file named ``..`` or longer than a file system allows was an HTTP 500; the upload is kept under a safe
    name and judged by its content."""
    r = gateway.post_video(media["small"], filename=filename)
    assert r.status_code == 202, r.text


def test_keywords_and_labels_are_bounded(gateway, media, manifest_root):
    """A 500 000-character ``chosen_keyword`` used to be published as metadata: the gateway refuses one over
    200 characters (422), a manifest entry too (400), the grounding service a label over 100 (422), and a
    model's runaway label is cut."""
    from sparkle.backends import MAX_KEYWORD_CHARS, MAX_LABEL_CHARS
    from sparkle.services.grounding import real
    from sparkle.services.grounding.app import Round2Request

    r = gateway.post_video(media["small"], chosen_keyword="urban: " + "x" * MAX_KEYWORD_CHARS)
    assert r.status_code == 422 and "chosen_keyword" in r.text
    assert_nothing_stored(gateway.store)
    with pytest.raises(InputError, match="chosen_keyword"):
        datasets.parse_manifest(json.dumps({"video": "clips/juggle.mp4", "chosen_keyword": "y" * 201}))
    with pytest.raises(ValueError):
        Round2Request.model_validate({"sample": {"sample_id": "Sparkle_location_000000", "prompt": "p",
                                                 "source_video": "s"}, "frame_indices": [0],
                                      "labels": ["z" * (MAX_LABEL_CHARS + 1)]})
    [(label, _)] = real.parse_objects('[{"bbox_2d": [1, 2, 3, 4], "label": "%s"}]' % ("w" * 5000))
    assert label == "w" * MAX_LABEL_CHARS


def test_a_chunked_body_over_the_limit_is_413_not_400(make_gateway):
    """Without a Content-Length (chunked transfer), the body is counted as it streams: over the limit it is a
    413 with a JSON detail (the multipart parser turned the cut into a 400 before), and nothing is stored."""
    gw = make_gateway(max_upload_bytes=200_000)
    boundary = "sparkleboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"clip.mp4\"\r\n"
            "Content-Type: video/mp4\r\n\r\n").encode()

    def chunks():
        yield head
        for _ in range(30):
            yield bytes(64_000)  # 1.9 MB in all, streamed
        yield f"\r\n--{boundary}--\r\n".encode()

    r = gw.client.post("/v1/jobs", content=chunks(),
                       headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, (r.status_code, r.text[:200])
    assert "larger than" in r.json()["detail"]
    assert_nothing_stored(gw.store)


# --- 9. issue 15: ownership, auth before the body, rate limits, slow bodies --------------------------------------

def test_datasets_belong_to_the_key_that_made_them(make_gateway, media):
    gw = make_gateway(gateway_api_keys="k1,k2")
    gw.store.put_file("uploads/a.mp4", media["small"])
    body = {"entries": [{"video_key": "uploads/a.mp4", "prompt": SNOW_PROMPT}]}
    mine = gw.client.post("/v1/datasets", json=body, headers={"X-API-Key": "k1"}).json()["id"]
    theirs = gw.client.post("/v1/datasets", json=body, headers={"X-API-Key": "k2"}).json()["id"]
    assert mine != theirs  # the same manifest from two clients: two datasets, each its owner's
    assert gw.client.get(f"/v1/datasets/{mine}", headers={"X-API-Key": "k1"}).status_code == 200
    assert gw.client.get(f"/v1/datasets/{mine}", headers={"X-API-Key": "k2"}).status_code == 404
    assert "owner" not in gw.client.get(f"/v1/datasets/{mine}", headers={"X-API-Key": "k1"}).json()


def test_a_dataset_cannot_name_another_clients_staged_upload(make_gateway, media):
    gw = make_gateway(gateway_api_keys="k1,k2")
    sid = gw.post_video(media["small"], headers={"X-API-Key": "k1"}).json()["id"]
    [staged] = [k for k in gw.store.list_keys(f"staging/{sid}/inputs/")]
    for key in (staged, f"jobs/{sid}.json", "datasets/x/state.json", "./staging/" + staged.split("/", 1)[1]):
        r = gw.client.post("/v1/datasets", json={"entries": [{"video_key": key}]}, headers={"X-API-Key": "k2"})
        assert r.status_code == 400 and "private area" in r.json()["detail"], (key, r.text)


async def _asgi(app, method: str, path: str, headers: list, body_chunks: list[bytes], delay_s: float = 0.0):
    """Drive an ASGI app by hand: ``(status, body, chunks the app read)``; the body arrives ``delay_s`` s apart."""
    import asyncio

    read, sent = [], []

    async def receive():
        if delay_s:
            await asyncio.sleep(delay_s)
        if len(read) < len(body_chunks):
            read.append(body_chunks[len(read)])
            return {"type": "http.request", "body": read[-1], "more_body": len(read) < len(body_chunks)}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers, "query_string": b"",
             "client": ("127.0.0.1", 1), "server": ("test", 80), "scheme": "http", "root_path": "",
             "http_version": "1.1", "app": app}
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), len(read)


def test_the_key_is_checked_before_any_of_the_body_is_read(make_gateway):
    """The gateway read a whole upload before refusing a missing key: now 401 with 0 chunks read."""
    import asyncio

    gw = make_gateway(gateway_api_keys="k1")
    headers = [(b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"1000000")]
    status, body, read = asyncio.run(_asgi(gw.app, "POST", "/v1/jobs", headers, [b"x" * 1000] * 1000))
    assert (status, read) == (401, 0) and "API key" in body["detail"]


def test_a_slow_body_is_cut_with_408(make_gateway):
    """20 of 20 slow uploads were held open for ever: a body that stalls for idle_s is answered 408."""
    import asyncio

    from sparkle.serving import BodyLimit

    gw = make_gateway()
    slow = BodyLimit(gw.app, limit=10**9, idle_s=0.2, min_rate=1.0, grace_s=60)
    headers = [(b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"100000")]
    status, body, read = asyncio.run(_asgi(slow, "POST", "/v1/jobs", headers, [b"x" * 10] * 100, delay_s=0.5))
    assert status == 408 and "too slow" in body["detail"] and read == 0
    # Under the average rate after the grace period: cut as well, though each chunk came within idle_s.
    trickle = BodyLimit(gw.app, limit=10**9, idle_s=5, min_rate=1000.0, grace_s=0.3)
    head = b'--x\r\nContent-Disposition: form-data; name="video"; filename="a.mp4"\r\n\r\n'
    status, body, read = asyncio.run(_asgi(trickle, "POST", "/v1/jobs", headers, [head] + [b"x"] * 100, delay_s=0.1))
    assert status == 408 and 1 <= read < 10
    assert_nothing_stored(gw.store)


def test_requests_and_event_streams_are_rate_limited_per_client(make_gateway, queued_job):
    gw = make_gateway(gateway_rate_limit="5/second")
    codes = [gw.client.get("/v1/jobs/Sparkle_location_000099").status_code for _ in range(8)]
    assert codes[:5] == [404] * 5 and codes[5:] == [429] * 3
    time.sleep(1.1)
    assert gw.client.get("/v1/jobs/Sparkle_location_000099").status_code == 404  # the window moved on


def test_open_event_streams_per_client_are_bounded(make_gateway, media):
    import threading

    gw = make_gateway(gateway_max_streams=2)
    sid = gw.post_video(media["small"]).json()["id"]
    opened, stop = [], threading.Event()

    def hold():
        with gw.client.stream("GET", f"/v1/jobs/{sid}/events") as r:
            opened.append(r.status_code)
            for _ in r.iter_lines():
                if stop.is_set():
                    break

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(opened) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    third = gw.client.get(f"/v1/jobs/{sid}/events")
    assert opened == [200, 200] and third.status_code == 429
    stop.set()
    set_state(gw.store, sid, "rejected")  # ends the two streams
    for t in threads:
        t.join(10)


def test_a_response_streamed_after_the_body_is_not_cut_by_the_body_timeouts():
    """The body time-outs first also timed the wait for a disconnect that an event stream keeps open: an SSE
    stream was cut after idle_s with a second (408) response. They end with the body now."""
    import asyncio

    from starlette.responses import StreamingResponse

    from sparkle.serving import BodyLimit

    async def chunks():
        for i in range(5):
            await asyncio.sleep(0.1)
            yield f"event {i}\n".encode()

    async def stream(scope, receive, send):
        await StreamingResponse(chunks())(scope, receive, send)

    app = BodyLimit(stream, limit=10**6, idle_s=0.2)
    headers = [(b"content-type", b"application/json")]
    sent = []

    async def run():
        read = []

        async def receive():
            if not read:
                read.append(1)
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.sleep(3600)  # a client that stays connected

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/v1/jobs/x/events", "headers": headers,
                 "query_string": b"", "asgi": {"version": "3.0", "spec_version": "2.3"}}
        await app(scope, receive, send)

    asyncio.run(run())
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [200]
    assert b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").count(b"event") == 5


# --- webhooks, dead-letter: what the gateway checks before anything is queued -----------------------------------

def test_callback_urls_are_checked_and_signing_secrets_are_per_key(make_gateway, media):
    from sparkle.serving import key_principal
    from sparkle.webhooks import signing_secret

    closed = make_gateway()
    r = closed.post_video(media["small"], callback_url="http://127.0.0.1:9/hook")
    assert r.status_code == 400 and "SPARKLE_WEBHOOK_SIGNING_KEY" in r.json()["detail"]
    assert closed.client.get("/v1/webhooks/secret").status_code == 404

    gw = make_gateway(gateway_api_keys="k1,k2", webhook_signing_key=SecretStr("master"))
    a, b = {"X-API-Key": "k1"}, {"X-API-Key": "k2"}
    for url in ("http://169.254.169.254/latest/meta-data/", "http://metadata.google.internal/", "file:///etc/passwd"):
        r = gw.post_video(media["small"], headers=a, callback_url=url)
        assert r.status_code == 400 and "callback_url" in r.json()["detail"], url
    r = gw.client.post("/v1/datasets", headers=a, json={"entries": [{"video_key": "x"}],
                                                        "callback_url": "http://[fe80::1]/hook"})
    assert r.status_code == 400
    assert_nothing_stored(gw.store)
    assert gw.queued() == []

    ok = gw.post_video(media["small"], headers=a, callback_url="http://127.0.0.1:9/hook")
    assert ok.status_code == 202 and ok.json()["callback_url"] == "http://127.0.0.1:9/hook"
    secret_a = gw.client.get("/v1/webhooks/secret", headers=a).json()
    secret_b = gw.client.get("/v1/webhooks/secret", headers=b).json()
    assert secret_a["secret"] == signing_secret("master", key_principal(b"k1")) != secret_b["secret"]
    assert secret_a["replay_window_s"] == 300


def test_retrying_a_job_that_did_not_fail_is_a_409_and_failures_are_per_key(make_gateway, media):
    gw = make_gateway(gateway_api_keys="k1,k2")
    a = {"X-API-Key": "k1"}
    sid = gw.post_video(media["small"], headers=a).json()["id"]
    r = gw.client.post(f"/v1/jobs/{sid}/retry", headers=a)
    assert r.status_code == 409 and "dead-letter" in r.json()["detail"]
    assert gw.client.post(f"/v1/jobs/{sid}/retry", headers={"X-API-Key": "k2"}).status_code == 404
    assert gw.client.get("/v1/failures", headers=a).json() == {"failures": [], "count": 0}


def test_a_retry_the_broker_refuses_leaves_the_failure_as_it_was(make_gateway, gw_settings):
    """503, and the job is still failed, listed and retryable: its checkpoint and job document are put back."""
    from sparkle.orchestrator import failures
    from sparkle.orchestrator.pipeline import SampleTask

    gw = make_gateway(celery_app=dead_broker_app(gw_settings), raise_server_exceptions=False)
    sid = layout.sample_id("location", 3)
    task = SampleTask(id=sid, edit_type="location", prompt=SNOW_PROMPT, source_key="x.mp4", status="failed",
                      failed_stage="bait", reason="bait: ServiceRejected: tracking: HTTP 422")
    cp = jobs.Checkpoint(task=task, config={}, next="bait", submitted_at=time.time(), failed=True)
    jobs.save_checkpoint(gw.store, cp)
    before = jobs.write_job(gw.store, cp, "failed", "bait")
    failures.record_failure(gw.store, cp, "bait", "ServiceRejected: tracking: HTTP 422")

    assert gw.client.post(f"/v1/jobs/{sid}/retry").status_code == 503
    assert jobs.read_job(gw.store, sid) == before
    kept = jobs.load_checkpoint(gw.store, sid)
    assert kept.failed and kept.retries == 0 and kept.next == "bait"
    assert [e["id"] for e in gw.client.get("/v1/failures").json()["failures"]] == [sid]
