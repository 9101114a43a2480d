"""Liveness of the messages in flight (orchestrator/liveness.py): the reaper, the waiting stage's check of its
service call, one tick chain per dataset, and a worker surviving a Redis restart.

The recovery tests run at the shipped settings (visibility timeout 2 h, lease 20 s, stall 15 s): before the
reaper, a SIGKILLed worker's journey waited for the visibility timeout.
"""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest
import redis
from fastapi.testclient import TestClient

from sparkle.orchestrator import datasets, jobs, journey, liveness
from sparkle.orchestrator.celery_app import make_app
from sparkle.orchestrator.cluster import DOUBLES, REDIS_SERVER, Cluster, free_port, wait_port
from sparkle.orchestrator.gateway import build_gateway
from sparkle.queues import CPU_QUEUE, SERVICE_QUEUES
from sparkle.settings import DistributedSettings
from sparkle.store_s3 import open_store
from tests.conftest import JUGGLE, SNOW_PROMPT
from tests.test_distributed import SMALL_CONFIG, wait_terminal

QUEUES = list(SERVICE_QUEUES.values())


@pytest.fixture
def client(redis_url):
    db = 1 + int(uuid.uuid4().int % 14)
    c = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{db}")
    c.flushdb()
    yield c
    c.flushdb()


def test_the_reaper_resends_only_journeys_neither_queued_nor_running(client):
    now = 1_000_000.0
    names = ("queued", "running", "lost", "over", "fresh", "held_by_live", "held_by_dead")
    for sid in names:
        liveness.journey_seen(client, sid, now - (1 if sid == "fresh" else 60))
    for sid in ("queued", "held_by_live", "held_by_dead"):
        liveness.mark_queued(client, f"stage:{sid}", 100)
    client.set(liveness.sample_lease("running"), "token", ex=100)
    # Two worker processes received a message each (prefetched); one of them has since died (no heartbeat).
    client.set(liveness.heartbeat_key("1@live"), 1, ex=10)
    liveness.received(client, "stage:held_by_live", "1@live", 30)
    liveness.received(client, "stage:held_by_dead", "2@dead", 30)
    liveness.received(client, "stage:lost", "1@live", 30)  # no mark to name: stays absent (xx)
    assert 20 < client.ttl(liveness.queued("stage:held_by_dead")) <= 30  # until a little after it is due
    asked = []

    def resend(sid):
        asked.append(sid)
        return sid != "over"  # "over": its checkpoint is gone (the journey ended)

    assert sorted(liveness.reap(client, resend, stall_s=15, now=now)) == ["held_by_dead", "lost"]
    assert sorted(asked) == ["held_by_dead", "lost", "over"]
    scores = {k.decode(): v for k, v in client.zrange(liveness.JOURNEYS, 0, -1, withscores=True)}
    assert "over" not in scores  # forgotten
    assert {scores[n] for n in names if n not in ("over", "fresh")} == {now}  # seen alive (or re-sent) just now
    assert scores["fresh"] == now - 1
    # Within the next stall period nothing is checked again.
    assert liveness.reap(client, resend, stall_s=15, now=now + 10) == [] and len(asked) == 3


def test_a_queued_mark_expires_so_a_lost_message_is_resent_after_queued_max_s(client):
    liveness.mark_queued(client, "op:abc", 0.2)
    assert liveness.op_alive(client, "abc")
    time.sleep(0.3)
    assert not liveness.op_alive(client, "abc")
    client.set(liveness.op_lease("abc"), "t", ex=10)
    assert liveness.op_alive(client, "abc")


def test_one_tick_chain_per_dataset_however_often_it_is_posted_or_polled(settings, bucket, redis_url, tmp_path):
    """20 POSTs of one manifest and 50 GETs of an idle dataset sent 20 and 50 tick messages; now one chain."""
    db = 1 + int(uuid.uuid4().int % 14)
    broker = redis_url.rsplit("/", 1)[0] + f"/{db}"
    r = redis.Redis.from_url(broker)
    r.flushdb()
    s = settings.model_copy(update={"broker_url": broker, "store_url": f"s3://{bucket}/chain-{uuid.uuid4().hex[:8]}",
                                    "gateway_rate_limit": "1000/second"})
    store = open_store(s.store_url, s)
    store.put_file("uploads/a.mp4", JUGGLE)
    app = make_app(s)
    gw = TestClient(build_gateway(s, store, app))
    body = {"entries": [{"video_key": "uploads/a.mp4", "prompt": SNOW_PROMPT}]}
    ids = {gw.post("/v1/datasets", json=body).json()["id"] for _ in range(20)}
    assert len(ids) == 1 and r.llen(CPU_QUEUE) == 1
    did = ids.pop()
    state_key = f"datasets/{did}/state.json"
    store.put_json(state_key, {**store.get_json(state_key), "updated_at": time.time() - 3600})  # idle an hour
    for _ in range(50):
        assert gw.get(f"/v1/datasets/{did}").status_code == 200
    assert r.llen(CPU_QUEUE) == 1
    # The chain went quiet (its message lost with a worker): the reaper's revive starts one new chain.
    r.delete(CPU_QUEUE, datasets.chain_key(did))
    assert datasets.revive_chains(app) == [did] and datasets.revive_chains(app) == []
    assert r.llen(CPU_QUEUE) == 1
    app.close()


@pytest.fixture
def shipped(settings, bucket, redis_url, tmp_path):
    """A distributed run at the shipped liveness settings (only the retry back-off shortened)."""
    db = 1 + int(uuid.uuid4().int % 14)
    broker = redis_url.rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(broker).flushdb()
    store_url = f"s3://{bucket}/live-{uuid.uuid4().hex[:10]}"
    env = {"SPARKLE_BROKER_URL": broker, "SPARKLE_STORE_URL": store_url, "SPARKLE_S3_ENDPOINT": settings.s3_endpoint,
           "SPARKLE_S3_ACCESS_KEY": "testing", "SPARKLE_S3_SECRET_KEY": "testing"}
    s = settings.model_copy(update={"broker_url": broker, "store_url": store_url})
    assert s.visibility_timeout_s == 7200 and s.sample_lease_s == 20 and s.stall_s == 15
    app = make_app(s)
    with Cluster(env, tmp_path / "logs") as cluster:
        yield {"store": open_store(store_url, s), "app": app, "cluster": cluster, "settings": s}
    app.close()


def _wait_stage(store, sid, stages, timeout_s=60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while (doc := jobs.read_job(store, sid))["stage"] not in stages:
        assert time.monotonic() < deadline and doc["state"] not in jobs.TERMINAL, doc
        time.sleep(0.05)
    return doc["stage"]


def test_a_sigkilled_orchestrator_worker_is_recovered_within_a_minute_at_shipped_settings(shipped):
    """The only orchestrator worker is SIGKILLed while a stage waits on a slow call; a new worker comes up.
    Before: the journey waited for the visibility timeout (2 h). Now: the reaper re-sends it after the dead
    lease expires (<= 20 + 15 + 5 s)."""
    c, store = shipped["cluster"], shipped["store"]
    c.worker("cpu", [CPU_QUEUE], "--pool", "threads", "--concurrency", "2")
    c.worker("services", QUEUES, "--backend", DOUBLES, "--option", "delay_s=1.5", "--concurrency", "2")
    sid = journey.submit_files(shipped["app"], store, JUGGLE, SNOW_PROMPT, config=SMALL_CONFIG)["id"]
    stage = _wait_stage(store, sid, {"frame0_edit", "background_video"})
    c.kill("cpu")
    killed = time.monotonic()
    c.worker("cpu2", [CPU_QUEUE], "--pool", "threads", "--concurrency", "2")
    deadline = killed + 60
    while (doc := jobs.read_job(store, sid))["stage"] == stage and doc["state"] not in jobs.TERMINAL:
        assert time.monotonic() < deadline, f"{sid} still at {stage} 60 s after its worker was killed"
        time.sleep(0.2)
    recovered = time.monotonic() - killed
    assert "its next stage was sent again" in c.log("cpu2")
    assert wait_terminal(store, [sid], 120)[sid]["state"] == "accepted"
    print(f"orchestrator worker SIGKILL: journey moved on {recovered:.1f} s later")


def test_a_sigkilled_service_worker_is_recovered_by_the_waiting_stage_at_shipped_settings(shipped):
    """The whole service worker (not just a pool child) is SIGKILLed in the middle of a call: its message
    stays unacknowledged for the visibility timeout (2 h). The waiting stage sees the call neither queued nor
    running and sends it again (<= op_lease_s + 2 x op_check_s = 30 s)."""
    c, store = shipped["cluster"], shipped["store"]
    c.worker("cpu", [CPU_QUEUE], "--pool", "threads", "--concurrency", "2")
    c.worker("services", QUEUES, "--backend", DOUBLES, "--option", "delay_s=4", "--concurrency", "1")
    sid = journey.submit_files(shipped["app"], store, JUGGLE, SNOW_PROMPT, config=SMALL_CONFIG)["id"]
    _wait_stage(store, sid, {"frame0_edit"})
    time.sleep(1.0)  # the edit call is running (4 s)
    c.kill("services")
    killed = time.monotonic()
    c.worker("services2", QUEUES, "--backend", DOUBLES, "--option", "delay_s=0.2", "--concurrency", "1")
    _wait_stage(store, sid, {"background_video", "bait", "synthesis"}, timeout_s=60)
    recovered = time.monotonic() - killed
    assert "was neither queued nor running" in c.log("cpu")
    assert wait_terminal(store, [sid], 120)[sid]["state"] == "accepted"
    print(f"service worker SIGKILL: call answered {recovered:.1f} s later")


def test_workers_survive_a_redis_restart_and_finish_their_journeys(settings, bucket, tmp_path):
    """Redis (AOF) is stopped for 5 s under busy workers. Before: kombu's restore of unacknowledged messages
    raised AttributeError ('hostname') with the connection gone and the worker exited (2 of 2). Now every
    process stays up and every journey finishes."""
    port = free_port()
    argv = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes", "--save", "",
            "--dir", str(tmp_path)]
    log = (tmp_path / "redis.log").open("ab")
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    wait_port(port, server, "redis-server")
    broker = f"redis://127.0.0.1:{port}/0"
    store_url = f"s3://{bucket}/restart-{uuid.uuid4().hex[:10]}"
    env = {"SPARKLE_BROKER_URL": broker, "SPARKLE_STORE_URL": store_url, "SPARKLE_S3_ENDPOINT": settings.s3_endpoint,
           "SPARKLE_S3_ACCESS_KEY": "testing", "SPARKLE_S3_SECRET_KEY": "testing"}
    s = settings.model_copy(update={"broker_url": broker, "store_url": store_url})
    store, app = open_store(store_url, s), make_app(s)
    try:
        with Cluster(env, tmp_path / "logs") as c:
            c.worker("cpu", [CPU_QUEUE], "--pool", "threads", "--concurrency", "4")
            c.worker("services", QUEUES, "--backend", DOUBLES, "--option", "delay_s=1.0", "--concurrency", "2")
            ids = [journey.submit_files(app, store, JUGGLE, SNOW_PROMPT, config=SMALL_CONFIG)["id"] for _ in range(3)]
            _wait_stage(store, ids[0], {"frame0_edit", "background_video"})
            server.terminate()
            server.wait()
            time.sleep(5)
            server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            wait_port(port, server, "redis-server")
            docs = wait_terminal(store, ids, 150)
            assert {d["state"] for d in docs.values()} == {"accepted"}
            dead = {n: p.returncode for n, p in c.procs.items() if p.poll() is not None}
            assert dead == {}, {n: c.log(n)[-3000:] for n in dead}
    finally:
        app.close()
        server.kill()
        server.wait()


def test_settings_bound_recovery_below_a_minute():
    s = DistributedSettings()
    assert s.sample_lease_s + s.stall_s + s.reap_interval_s <= 60
    assert s.op_lease_s + 2 * s.op_check_s <= 60


def test_a_service_call_retries_an_outage_by_time_not_by_count(client, tmp_path, monkeypatch):
    """8 retries (208 s measured) failed a sample during a 3.5 min server outage, while Kubernetes gives a model
    server 30 min to start. Now a call retries until op_wait_s after it was sent, however many retries."""
    from sparkle.errors import ServiceUnavailable
    from sparkle.orchestrator import calls
    from sparkle.orchestrator.celery_app import TransientError, resources

    failures = {"left": 12}

    def flaky(service, op, request):
        if failures["left"]:
            failures["left"] -= 1
            raise TransientError(f"{service}: connection refused (server starting)")
        return {"ok": True}

    url = client.connection_pool.connection_kwargs
    broker = f"redis://{url['host']}:{url['port']}/{url['db']}"
    for key, value in {"SPARKLE_BROKER_URL": broker, "SPARKLE_STORE_URL": f"local:{tmp_path}",
                       "SPARKLE_OP_BACKOFF_S": "0.001", "SPARKLE_OP_BACKOFF_MAX_S": "0.001"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(resources(), "_made", {})  # this process's resources, from the variables above
    monkeypatch.setattr(calls, "_worker", calls.WorkerConfig(("i2v",), flaky))
    app = make_app(DistributedSettings())
    app.conf.task_always_eager = True  # retries run at once, in this thread
    task = app.tasks[calls.service_op.name]
    cache = "staging/Sparkle_location_000000/ops/i2v.animate.abc.json"
    answer = task.apply(args=["i2v", "animate", {}, cache], kwargs={"deadline": time.time() + 600}).get()
    assert answer["ok"] and failures["left"] == 0  # 12 retries: more than the old limit of 8
    failures["left"] = 1
    with pytest.raises(ServiceUnavailable, match="gave up"):  # the deadline is past: no retry
        task.apply(args=["i2v", "animate", {}, cache + "2"], kwargs={"deadline": time.time() - 1}).get()
    app.close()
