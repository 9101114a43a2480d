"""Dead-letter, re-drive and webhooks through the distributed run: Celery workers (separate processes) over a
real redis-server, the store on the S3-compatible server, the gateway in-process, and a model server that is
broken, then fixed.

The i2v service's worker calls a loopback model server that refuses every call (HTTP 422: a terminal error,
not a gate's refusal); samples fail at stage 3, are listed by ``GET /v1/failures`` and ``sparkle failures``,
then, once a working i2v server runs on the same port, ``sparkle retry`` re-runs them from stage 3: the earlier
stages are not run again and each sample is published once. The jobs' webhooks go to a loopback receiver.
"""

from __future__ import annotations

import json
import subprocess
import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import SecretStr

from sparkle import layout
from sparkle.orchestrator import failures, jobs
from sparkle.orchestrator.cluster import DOUBLES, SPARKLE, free_port
from sparkle.orchestrator.gateway import build_gateway
from sparkle.serving import key_principal
from sparkle.store import staging_prefix
from tests.conftest import JUGGLE, SNOW_PROMPT, sparkle
from tests.loopback import LoopbackServer
from tests.test_distributed import QUEUES, SMALL, published_ids, run, wait_terminal  # noqa: F401 - run: fixture
from tests.test_webhooks import Receiver

MASTER = "webhook-master-key"


class BrokenModelServer(LoopbackServer):
    """TEST DOUBLE of a model server with a broken model: ready, but every call is refused with HTTP 422."""

    def __init__(self, port: int):
        app = FastAPI()
        self.calls = 0

        @app.get("/readyz")
        def ready():
            return {"status": "ready"}

        @app.post("/v1/{op}")
        def refuse(op: str):
            self.calls += 1
            return JSONResponse({"detail": f"{op}: the model weights are corrupt"}, status_code=422)

        self.serve(app, port)  # the port the i2v worker's --service-url names


def _stage_names(doc: dict) -> list[str]:
    return [d["name"] for d in doc["stages"]]


def test_a_sample_failed_by_a_service_is_listed_retried_once_after_the_fix_and_published_once(run, tmp_path):
    c, store = run["cluster"], run["store"]
    c.env.update({"SPARKLE_WEBHOOK_SIGNING_KEY": MASTER, "SPARKLE_WEBHOOK_BACKOFF_S": "0.2",
                  "SPARKLE_WEBHOOK_BACKOFF_MAX_S": "1"})
    c.worker("cpu", ["sparkle.cpu"], "--pool", "threads", "--concurrency", "4")
    c.worker("services", [q for q in QUEUES if q != "sparkle.i2v"], "--backend", DOUBLES)
    port = free_port()
    c.worker("i2v", ["sparkle.i2v"], "--service-url", f"http://127.0.0.1:{port}")
    settings = run["settings"].model_copy(update={"gateway_api_keys": SecretStr("key-a"),
                                                  "webhook_signing_key": SecretStr(MASTER)})
    gw = TestClient(build_gateway(settings, store, run["app"]))
    key = {"X-API-Key": "key-a"}
    secret = gw.get("/v1/webhooks/secret", headers=key).json()["secret"]

    with BrokenModelServer(port) as broken, Receiver(secret, answers=[500]) as rx:
        with JUGGLE.open("rb") as f:
            posted = gw.post("/v1/jobs", headers=key, files={"video": ("juggle.mp4", f, "video/mp4")},
                             data={"prompt": SNOW_PROMPT, "callback_url": rx.url, **SMALL})
        assert posted.status_code == 202, posted.text
        sid = posted.json()["id"]
        failed = wait_terminal(store, [sid], 120)[sid]
        assert broken.calls >= 1
        assert failed["state"] == "failed" and failed["error"]["stage"] == "background_video"
        assert "weights are corrupt" in failed["error"]["reason"]
        before = _stage_names(failed)
        assert before[:2] == ["ingest", "camera_filter"] and "background_video" not in before

        # Listed (API and CLI), with what it had kept: the checkpoint at stage 3 and the earlier stages' files.
        listed = gw.get("/v1/failures", headers=key).json()["failures"]
        assert [(e["id"], e["stage"]) for e in listed] == [(sid, "background_video")]
        assert "weights are corrupt" in listed[0]["reason"] and "owner" not in listed[0]
        cli = sparkle("failures", "--json", env=run["env"], check=True)
        assert [e["id"] for e in json.loads(cli.stdout)] == [sid]
        assert jobs.load_checkpoint(store, sid).next == "background_video"
        assert store.exists(staging_prefix(sid) + layout.edited_frame0("location", sid))
        assert published_ids(store) == []

        # The failure was POSTed, signed, after one 500: delivered on the second attempt.
        deadline = time.monotonic() + 30
        while not rx.handled:
            assert time.monotonic() < deadline, rx.requests
            time.sleep(0.1)
        assert [r["status"] for r in rx.requests] == [500, 200] and all(r["ok"] for r in rx.requests)
        (event_doc,) = rx.handled.values()
        assert event_doc["id"] == sid and event_doc["state"] == "failed" and "owner" not in event_doc
        shown = gw.get(f"/v1/jobs/{sid}", headers=key).json()["webhook"]
        assert [a["status"] for a in shown["events"][0]["attempts"]] == [500, 200]
        assert gw.get(f"/ui/samples/{sid}.json", headers=key).json()["webhook"] == shown  # the viewer's: the same
        assert "owner" not in shown and "document" not in shown["events"][0]

        # The service is fixed: a working i2v server on the same port.
        broken.__exit__(None, None, None)
        c.env["SPARKLE_SERVE_LOAD_IN_BACKGROUND"] = "false"
        c.procs["i2v-server"] = subprocess.Popen(
            [SPARKLE, "serve", "i2v", "--backend", DOUBLES, "--port", str(port), "--store", run["store_url"]],
            env=c.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

        retried = sparkle("retry", sid, env=run["env"])
        assert retried.returncode == 0, retried.stderr
        assert "again from background_video" in retried.stdout
        again = gw.post(f"/v1/jobs/{sid}/retry", headers=key)  # a second re-drive: refused, the first runs once
        assert again.status_code == 409
        done = wait_terminal(store, [sid], 120)[sid]
        assert done["state"] == "accepted" and done["retries"] == 1
        after = _stage_names(done)
        assert after[:len(before)] == before and after.count("ingest") == 1 and after.count("background_video") == 1
        assert published_ids(store) == [sid]
        assert gw.get("/v1/failures", headers=key).json()["count"] == 0
        assert not store.exists(failures.failure_key(sid))

        # The second terminal state is a new event (a new webhook-id), delivered once.
        deadline = time.monotonic() + 30
        while len(rx.handled) < 2:
            assert time.monotonic() < deadline, rx.requests
            time.sleep(0.1)
        assert sorted(d["state"] for d in rx.handled.values()) == ["accepted", "failed"]
        assert len(rx.requests) == 3
        assert key_principal(b"key-a") not in json.dumps(list(rx.handled.values()))
    gw.close()


def test_a_datasets_failures_are_redriven_with_sparkle_retry_dataset_and_it_completes_again(run, tmp_path):
    """Both samples of a dataset fail at stage 3; the dataset ends (2 failed) and its webhook says so. After the
    fix, ``sparkle retry --dataset ID`` puts them back in its window: the dataset completes again with 2
    accepted and no failure left, its funnel counts each sample once, and a second ``done`` event is delivered."""
    c, store = run["cluster"], run["store"]
    c.env.update({"SPARKLE_WEBHOOK_SIGNING_KEY": MASTER, "SPARKLE_WEBHOOK_BACKOFF_S": "0.2"})
    c.worker("cpu", ["sparkle.cpu"], "--pool", "threads", "--concurrency", "4")
    c.worker("services", [q for q in QUEUES if q != "sparkle.i2v"], "--backend", DOUBLES)
    port = free_port()
    c.worker("i2v", ["sparkle.i2v"], "--service-url", f"http://127.0.0.1:{port}")
    settings = run["settings"].model_copy(update={"webhook_signing_key": SecretStr(MASTER)})
    gw = TestClient(build_gateway(settings, store, run["app"]))
    secret = gw.get("/v1/webhooks/secret").json()["secret"]
    store.put_file("uploads/juggle.mp4", JUGGLE)
    entries = [{"video_key": "uploads/juggle.mp4", "prompt": SNOW_PROMPT},
               {"video_key": "uploads/juggle.mp4", "prompt": SNOW_PROMPT + ", at night"}]

    with BrokenModelServer(port) as broken, Receiver(secret) as rx:
        r = gw.post("/v1/datasets", json={"entries": entries, "callback_url": rx.url, "max_size": "320x192",
                                          "max_frames": 17})
        assert r.status_code == 202, r.text
        did = r.json()["id"]

        def status(until, timeout_s=120.0):
            deadline = time.monotonic() + timeout_s
            while not until(s := gw.get(f"/v1/datasets/{did}").json()):
                assert time.monotonic() < deadline, s
                time.sleep(0.3)
            return s

        first = status(lambda s: s["done"])
        assert first["counts"] == {"failed": 2}
        listed = json.loads(sparkle("failures", "--dataset", did, "--json", env=run["env"], check=True).stdout)
        assert len(listed) == 2 and {e["stage"] for e in listed} == {"background_video"}
        deadline = time.monotonic() + 30
        while len(rx.handled) < 1:
            assert time.monotonic() < deadline, rx.requests
            time.sleep(0.1)
        (done_event,) = rx.handled.values()
        assert done_event["id"] == did and done_event["counts"] == {"failed": 2}

        broken.__exit__(None, None, None)
        c.env["SPARKLE_SERVE_LOAD_IN_BACKGROUND"] = "false"
        c.procs["i2v-server"] = subprocess.Popen(
            [SPARKLE, "serve", "i2v", "--backend", DOUBLES, "--port", str(port), "--store", run["store_url"]],
            env=c.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        retried = sparkle("retry", "--dataset", did, env=run["env"])
        assert retried.returncode == 0 and retried.stdout.count("again from background_video") == 2, retried

        second = status(lambda s: s["done"] and s["counts"].get("accepted") == 2)
        assert second["counts"] == {"accepted": 2}
        funnel = {s["name"]: (s["in"], s["out"]) for s in second["funnel"]["stages"]}
        assert funnel["ingest"] == (2, 2) and funnel["synthesis"] == (2, 2)
        assert second["funnel"]["failed"] == 0 and second["funnel"]["accepted"] == 2
        assert sorted(published_ids(store)) == sorted(e["id"] for e in listed)
        deadline = time.monotonic() + 30
        while len(rx.handled) < 2:
            assert time.monotonic() < deadline, rx.requests
            time.sleep(0.1)
        assert [d["counts"] for d in rx.handled.values()] == [{"failed": 2}, {"accepted": 2}]
    gw.close()
