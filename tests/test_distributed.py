"""The distributed run end to end: Celery workers (separate processes) over a real redis-server, artifacts
in an S3-compatible server (moto) on loopback, the gateway over HTTP, and the crashes it must survive.

Backends: ``cpu`` (the real classical algorithms, on the real clips) for the full pipeline, and the
explicitly named test doubles (``--backend double``: ``services/<name>/double.py``) where a test needs a
service to be slow on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from sparkle import layout, published
from sparkle.backends import load_backends
from sparkle.config import PipelineConfig
from sparkle.errors import ServiceRejected
from sparkle.masks import unpack_mask
from sparkle.orchestrator import datasets, jobs, journey
from sparkle.orchestrator.celery_app import make_app
from sparkle.orchestrator.gateway import build_gateway
from sparkle.orchestrator.local import replace_one
from sparkle.settings import DistributedSettings
from sparkle.store_s3 import open_store
from sparkle.orchestrator.cluster import DOUBLES, SPARKLE, Cluster, free_port
from sparkle.queues import SERVICE_QUEUES
from tests.conftest import HANDHELD, JUGGLE, PEDESTRIANS, SNOW_PROMPT

QUEUES = list(SERVICE_QUEUES.values())

SMALL = {"max_size": "320x192", "max_frames": "17"}
SMALL_CONFIG = PipelineConfig(conform={"max_long_side": 320, "max_short_side": 192, "max_frames": 17})


@pytest.fixture
def run(settings, bucket, redis_url, tmp_path):
    """A fresh distributed run: its own store prefix and Redis database, settings for processes and clients."""
    db = 1 + int(uuid.uuid4().int % 14)
    broker = redis_url.rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(broker).flushdb()
    store_url = f"s3://{bucket}/dist-{uuid.uuid4().hex[:10]}"
    s = settings.model_copy(update={"broker_url": broker, "store_url": store_url, "sample_lease_s": 4.0,
                                    "op_backoff_s": 0.2, "op_backoff_max_s": 1.0})
    env = {"SPARKLE_BROKER_URL": broker, "SPARKLE_STORE_URL": store_url, "SPARKLE_S3_ENDPOINT": s.s3_endpoint,
           "SPARKLE_S3_ACCESS_KEY": "testing", "SPARKLE_S3_SECRET_KEY": "testing", "SPARKLE_SAMPLE_LEASE_S": "4",
           "SPARKLE_OP_BACKOFF_S": "0.2", "SPARKLE_OP_BACKOFF_MAX_S": "1", "SPARKLE_VISIBILITY_TIMEOUT_S": "3600"}
    store = open_store(store_url, s)
    app = make_app(s)
    with Cluster(env, tmp_path / "logs") as cluster:
        yield {"settings": s, "store": store, "app": app, "cluster": cluster, "env": env, "store_url": store_url}
    app.close()


def wait_terminal(store, ids, timeout_s=240.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        docs = {i: jobs.read_job(store, i) for i in ids}
        if all(d["state"] in jobs.TERMINAL for d in docs.values()):
            return docs
        assert time.monotonic() < deadline, {i: (d["state"], d["stage"]) for i, d in docs.items()}
        time.sleep(0.2)


def published_ids(store, edit_type="location") -> list[str]:
    return published.published_ids(store, edit_type)


def record_of(store, sid: str, name: str, edit_type: str = "location") -> dict:
    """The stage record ``name`` of a published sample, from its record document."""
    return published.read_document(store, edit_type, sid)["records"][name]


def test_full_pipeline_over_celery_workers_matches_the_embedded_default(run, tmp_path):
    """Gateway -> stage messages on sparkle.cpu -> service calls on six queues (one through a model server
    over HTTP) -> the published Sparkle layout, identical in content to the in-process run of the same clip."""
    c = run["cluster"]
    c.worker("cpu", ["sparkle.cpu"], "--pool", "threads", "--concurrency", "4")
    five = [q for q in QUEUES if q != "sparkle.i2v"]
    c.worker("services", five, "--backend", "cpu", "--concurrency", "2")
    port = c.server("i2v-server", "i2v", "cpu", run["store_url"])
    c.worker("i2v", ["sparkle.i2v"], "--service-url", f"http://127.0.0.1:{port}", "--concurrency", "1")

    client = TestClient(build_gateway(run["settings"], run["store"], run["app"]))
    ids = {}
    for clip in (JUGGLE, HANDHELD):  # a location edit with the user's background (the cpu profile's honest case)
        with clip.open("rb") as f, PEDESTRIANS.open("rb") as bg:
            r = client.post("/v1/jobs", files={"video": (clip.name, f, "video/mp4"),
                                               "background": (PEDESTRIANS.name, bg, "video/mp4")},
                            data={"prompt": SNOW_PROMPT, **SMALL})
        assert r.status_code == 202, r.text
        ids[clip.name] = r.json()["id"]
    docs = wait_terminal(run["store"], ids.values())
    store = run["store"]

    juggle = docs[ids[JUGGLE.name]]
    assert juggle["state"] == "accepted", juggle
    assert [d["name"] for d in juggle["stages"]] == ["ingest", "camera_filter", "camera_filter_fine", "instruction",
                                                      "frame0_edit", "background_video", "bait", "synthesis"]
    handheld = docs[ids[HANDHELD.name]]
    assert handheld["state"] == "rejected" and handheld["stage"] == "camera_filter", handheld
    assert published_ids(store) == [juggle["id"]]
    assert store.list_keys("staging/") == []

    # The same clip in-process (embedded default, same config) gives the same records and mask.
    task, local = replace_one(JUGGLE, SNOW_PROMPT, tmp_path / "local", config=SMALL_CONFIG,
                              backends=load_backends("cpu"), background=PEDESTRIANS)
    assert task.status == "accepted"
    sid, lid = juggle["id"], task.id
    for name in ("foreground_grounding_r1", "foreground_grounding_r2"):
        local_rec = [r for r in local.read_jsonl(layout.record("location", name)) if r["id"] == lid]  # materialised
        assert len(local_rec) == 1 and {**record_of(store, sid, name), "id": lid} == local_rec[0], name
    # Scores agree up to OpenCV's GrabCut, whose k-means initialisation draws from a per-process RNG.
    for name in ("edited_frame0_score", "edited_frame0_foreground_removed_score"):
        remote_rec = record_of(store, sid, name)["editscore"]
        [local_rec] = [r["editscore"] for r in local.read_jsonl(layout.record("location", name)) if r["id"] == lid]
        assert remote_rec["prompt_following"] is None and local_rec["prompt_following"] is None  # not measured
        for key in ("consistency", "perceptual_quality", "overall"):
            assert abs(remote_rec[key] - local_rec[key]) <= 0.25, (name, key, remote_rec, local_rec)
    remote_mask = unpack_mask(store.get_bytes(layout.mask("location", sid)))
    local_mask = unpack_mask(local.get_bytes(layout.mask("location", lid)))
    assert remote_mask.shape == local_mask.shape == (17, 176, 320)  # 320x180 conformed to 16-px multiples
    assert (remote_mask == local_mask).mean() > 0.99

    # Artifacts come back as presigned URLs; the export holds the sample once.
    urls = client.get(f"/v1/jobs/{sid}/artifacts").json()["artifacts"]
    assert {"edited_video", "source_video", "mask", "report"} <= set(urls)
    assert "X-Amz-Signature" in urls["edited_video"]["url"]
    # One service call went through the model server: its worker logged the HTTP executor's tasks.
    assert "sparkle.op" in c.log("i2v") and "succeeded" in c.log("i2v")


def test_sigkill_of_a_service_worker_mid_stage_still_gives_exactly_one_result(run):
    """The control worker's pool process is SIGKILLed in the middle of synthesis: its parent requeues the
    message (acks_late + reject_on_worker_lost), a new pool process runs it again, the sample is published
    once."""
    c = run["cluster"]
    c.worker("cpu", ["sparkle.cpu"], "--pool", "threads", "--concurrency", "2")
    c.worker("services", [q for q in QUEUES if q != "sparkle.control"], "--backend", DOUBLES,
             "--concurrency", "1")
    c.worker("control", ["sparkle.control"], "--backend", DOUBLES, "--option", "delay_s=3", "--concurrency", "1")
    doc = journey.submit_files(run["app"], run["store"], JUGGLE, SNOW_PROMPT, config=SMALL_CONFIG)
    sid = doc["id"]
    deadline = time.monotonic() + 120
    while jobs.read_job(run["store"], sid)["stage"] != "synthesis":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.5)  # the control call is running (it sleeps 3 s)
    [child] = c.pool_children("control")
    assert "control.synthesize" in c.log("control") and "received" in c.log("control")
    subprocess.run(["kill", "-9", str(child)], check=True)

    final = wait_terminal(run["store"], [sid])[sid]
    assert final["state"] == "accepted", final
    assert "WorkerLostError" in c.log("control") or "Process" in c.log("control")
    store = run["store"]
    assert published_ids(store) == [sid]
    doc = published.read_document(store, "location", sid)
    assert set(doc["records"]) == set(layout.RECORD_NAMES) and doc["metadata"]["id"] == sid
    assert store.list_keys("location/edited_video/") == [layout.edited_video("location", sid)]
    # The call that finished was made by a new pool process, not the killed one.
    result = run["app"].AsyncResult(next(k.decode().removeprefix("celery-task-meta-") for k in
                                         redis.Redis.from_url(run["env"]["SPARKLE_BROKER_URL"]).keys(
                                             "celery-task-meta-*control.synthesize*")))
    assert result.get(timeout=5)["worker"]["pid"] != child


def _manifest(path, n):
    clips = [JUGGLE, PEDESTRIANS]
    lines = []
    for i in range(n):
        clip = clips[i % 2]
        (path.parent / clip.name).exists() or shutil.copy(clip, path.parent / clip.name)  # a symlink would leave the root
        lines.append(json.dumps({"video": clip.name, "prompt": f"Replace the background with scene number {i}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_killing_the_orchestrator_mid_bulk_run_and_restarting_exports_every_sample_once(run, tmp_path):
    """`sparkle enqueue` and the orchestrator worker are SIGKILLed in the middle of a bulk run; both are started
    again with the same manifest; the export holds every sample exactly once, under the same ids."""
    c = run["cluster"]
    c.worker("cpu", ["sparkle.cpu"], "--pool", "threads", "--concurrency", "3")
    c.worker("services", QUEUES, "--backend", DOUBLES, "--option", "delay_s=0.15", "--concurrency", "2")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    manifest = _manifest(inputs / "manifest.jsonl", 6)
    args = [SPARKLE, "enqueue", str(manifest), "--window", "2", "--max-size", "320x192", "--max-frames", "17",
            "--poll-s", "0.2"]
    enqueue = subprocess.Popen(args, env=c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    store = run["store"]
    deadline = time.monotonic() + 180
    while len(published_ids(store)) < 1 or not store.list_keys("staging/"):
        assert enqueue.poll() is None, enqueue.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    enqueue.send_signal(signal.SIGKILL)
    enqueue.wait()
    c.kill("cpu")  # journeys in the middle of a stage lose their worker
    [dataset] = [k.split("/")[1] for k in store.list_keys("datasets/") if k.endswith("dataset.json")]
    before = datasets.dataset_samples(store, dataset)
    assert len(published_ids(store)) < 6

    c.worker("cpu2", ["sparkle.cpu"], "--pool", "threads", "--concurrency", "3")
    again = subprocess.run(args[:-2] + ["--poll-s", "0.2", "--json"], env=c.env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    status = json.loads(again.stdout)
    assert status["id"] == dataset and status["total"] == 6 and status["done"]
    assert datasets.dataset_samples(store, dataset) == before  # deterministic ids: nothing re-allocated

    out = tmp_path / "export"
    proc = subprocess.run([SPARKLE, "export", str(out), "--store", run["store_url"], "--json"], env=c.env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = (out / "prompts" / "location_train.csv").read_text().splitlines()[1:]
    assert sorted(r.rsplit(",", 1)[1] for r in rows) == sorted(before)
    for name in layout.RECORD_NAMES:
        ids = [json.loads(line)["id"] for line in (out / layout.record("location", name)).read_text().splitlines()]
        assert sorted(ids) == sorted(before), name
    assert sorted(p.stem for p in (out / "location" / "edited_video").iterdir()) == sorted(before)
    assert store.list_keys("staging/") == []


def test_cancel_stops_at_the_next_stage_boundary_and_leaves_nothing(run):
    c = run["cluster"]
    c.worker("cpu", ["sparkle.cpu"], "--pool", "threads", "--concurrency", "2")
    c.worker("services", QUEUES, "--backend", DOUBLES, "--option", "delay_s=0.5", "--concurrency", "1")
    client = TestClient(build_gateway(run["settings"], run["store"], run["app"]))
    with JUGGLE.open("rb") as f:
        sid = client.post("/v1/jobs", files={"video": ("a.mp4", f)}, data={"prompt": SNOW_PROMPT, **SMALL}).json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{sid}").json()["stage"] not in ("frame0_edit", "background_video"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.delete(f"/v1/jobs/{sid}").status_code == 202
    final = wait_terminal(run["store"], [sid])[sid]
    assert final["state"] == "cancelled" and final["error"]["reason"].endswith("cancelled by the user")
    store = run["store"]
    assert store.list_keys("staging/") == [] and published_ids(store) == []
    assert store.list_keys("location/") == [] and store.list_keys("intermediate_data/") == []
    assert store.get_json(layout.report("location", sid))["status"] == "cancelled"
    assert client.delete(f"/v1/jobs/{sid}").status_code == 409


def test_transient_service_outage_is_retried_and_a_bad_video_fails_with_its_stage(run, tmp_path):
    """A service worker whose model server is down retries with back-off until the server comes up; an
    undecodable source fails at ingest with the reason recorded, and the other samples are unaffected."""
    c = run["cluster"]
    c.worker("cpu", ["sparkle.cpu"], "--pool", "threads", "--concurrency", "2")
    c.worker("services", [q for q in QUEUES if q != "sparkle.i2v"], "--backend", DOUBLES)

    port = free_port()
    c.worker("i2v", ["sparkle.i2v"], "--service-url", f"http://127.0.0.1:{port}")
    store = run["store"]
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    store.put_file("uploads/bad.mp4", bad)
    good = journey.submit_files(run["app"], store, JUGGLE, SNOW_PROMPT, config=SMALL_CONFIG)["id"]
    task = jobs.new_task(layout.sample_id("location", 900), "location", SNOW_PROMPT, None, "uploads/bad.mp4", None,
                         False, True)
    broken = journey.start_journey(run["app"], store, task, SMALL_CONFIG)["id"]
    assert wait_terminal(store, [broken])[broken]["state"] == "failed"
    deadline = time.monotonic() + 60
    while "Retry in" not in c.log("i2v"):  # the i2v call is being retried against the missing server
        assert time.monotonic() < deadline, c.log("i2v")
        time.sleep(0.1)
    assert jobs.read_job(store, good)["state"] == "running"
    c.env["SPARKLE_SERVE_LOAD_IN_BACKGROUND"] = "false"
    proc = subprocess.Popen([SPARKLE, "serve", "i2v", "--backend", DOUBLES, "--port", str(port), "--store",
                             run["store_url"]], env=c.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    c.procs["i2v-server"] = proc
    assert wait_terminal(store, [good])[good]["state"] == "accepted"
    failed = jobs.read_job(store, broken)
    assert failed["error"]["stage"] == "ingest" and "not a decodable video" in failed["error"]["reason"]
    assert store.get_json(layout.report("location", broken))["status"] == "failed"
    assert published_ids(store) == [good]


def test_http_executor_maps_status_codes(tmp_path):
    """4xx is terminal (ServiceRejected); 503 is transient and honours Retry-After; 500 has few retries."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from sparkle.orchestrator.calls import HttpExecutor
    from sparkle.orchestrator.celery_app import TransientError, is_transient
    from tests.loopback import LoopbackServer

    class Double(LoopbackServer):
        def __init__(self):
            api = FastAPI()

            @api.post("/v1/{op}")
            async def op(op: str):
                code = {"ok": 200, "missing": 404, "busy": 503, "crash": 500}[op]
                return JSONResponse({"detail": op, "text": "fine"}, status_code=code,
                                    headers={"Retry-After": "7"} if code == 503 else {})

            self.serve(api)

    with Double() as server:
        ex = HttpExecutor(f"http://127.0.0.1:{server.port}", 5)
        assert ex("grounding", "ok", {})["text"] == "fine"
        with pytest.raises(ServiceRejected, match="HTTP 404"):
            ex("grounding", "missing", {})
        with pytest.raises(TransientError) as busy:
            ex("grounding", "busy", {})
        assert busy.value.retry_after == 7 and busy.value.max_retries is None
        with pytest.raises(TransientError) as crash:
            ex("grounding", "crash", {})
        assert crash.value.max_retries == 2
    down = HttpExecutor(f"http://127.0.0.1:{server.port}", 1)
    with pytest.raises(TransientError):
        down("grounding", "ok", {})
    assert is_transient(ConnectionRefusedError()) and not is_transient(ServiceRejected("x"))
    assert not is_transient(ValueError("a bug"))


def test_backoff_is_jittered_bounded_and_respects_retry_after():
    from sparkle.orchestrator.celery_app import backoff_s

    s = DistributedSettings(op_backoff_s=1.0, op_backoff_max_s=10.0)
    delays = [backoff_s(r, settings=s) for r in range(8) for _ in range(50)]
    assert 0 <= min(delays) and max(delays) <= 10.0
    assert len({round(d, 6) for d in delays}) > 300  # jittered, not a fixed schedule
    assert np.mean([backoff_s(0, settings=s) for _ in range(400)]) < 0.7  # first retries are short: U(0, 1)
    assert backoff_s(0, retry_after=30, settings=s) == 30


def test_enqueue_refuses_a_bad_manifest_with_a_clear_error_and_writes_nothing(tmp_path, redis_url):
    """Paths escaping the manifest root, unknown themes and empty prompts: exit 1 naming the entries."""
    root = tmp_path / "inputs"
    root.mkdir()
    shutil.copy(JUGGLE, root / "ok.mp4")
    (tmp_path / "outside.mp4").write_bytes(JUGGLE.read_bytes())
    store_dir = tmp_path / "store"
    env = {"SPARKLE_STORE_URL": f"local:{store_dir}", "SPARKLE_BROKER_URL": redis_url.rsplit("/", 1)[0] + "/15"}
    cases = {"../outside.mp4": "escapes the manifest root", "/etc/hostname": "escapes the manifest root",
             "missing.mp4": "not found"}
    for video, why in cases.items():
        manifest = root / "m.jsonl"
        manifest.write_text(json.dumps({"video": "ok.mp4"}) + "\n" + json.dumps({"video": video}) + "\n")
        proc = subprocess.run([SPARKLE, "enqueue", str(manifest)], env={**os.environ, **env},
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "entry 2" in proc.stderr and why in proc.stderr, proc.stderr
    for line, why in ((json.dumps({"video": "ok.mp4", "theme": "beach"}), "unknown edit_type"),
                      (json.dumps({"video": "ok.mp4", "prompt": "  "}), "prompt is empty"),
                      ("not json", "not JSON")):
        (root / "m.jsonl").write_text(line + "\n")
        proc = subprocess.run([SPARKLE, "enqueue", str(root / "m.jsonl")], env={**os.environ, **env},
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "line 1" in proc.stderr and why in proc.stderr, proc.stderr
    assert not store_dir.exists() or [p for p in store_dir.rglob("*") if p.is_file() and ".locks" not in p.parts] == []
