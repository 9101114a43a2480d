"""The server shell (sparkle.serving) and the six services' HTTP operations on their cpu backends."""

from __future__ import annotations


import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient


from sparkle.artifacts import ArtifactIO
from sparkle.backends import load_backend
from sparkle.config import ConformConfig
from sparkle.masks import unpack_mask
from sparkle.media import conform, read_image, read_video
from sparkle.service import OpResponse, ServiceAPI, Strict, operation
from sparkle.serving import ServeSettings, build_app
from sparkle.store import LocalStore

from ..conftest import PEDESTRIANS

SETTINGS = ServeSettings(load_in_background=False)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A 17-frame, 208x160 conformed pedestrians clip and its frame 0 in a local store."""
    root = tmp_path_factory.mktemp("store")
    store = LocalStore(root)
    io = ArtifactIO(store)
    video = conform(read_video(PEDESTRIANS, max_frames=17), ConformConfig(max_frames=17, max_long_side=208,
                                                                           max_short_side=160))
    io.put_video("staging/Sparkle_location_000000/source.mp4", video.frames, video.fps)
    io.put_image("staging/Sparkle_location_000000/frame0.png", video.frames[0])
    ref = {"sample_id": "Sparkle_location_000000", "prompt": "Replace the background with a night city",
           "source_video": "staging/Sparkle_location_000000/source.mp4"}
    return store, io, ref, video


def client_for(service: str, store, settings=SETTINGS) -> TestClient:
    import importlib

    api = importlib.import_module(f"sparkle.services.{service}.app").API(load_backend(service, "cpu"), store)
    return TestClient(build_app(api, settings))


def test_six_services_answer_every_operation_on_cpu(sample):
    store, io, ref, video = sample
    t, h, w = video.shape
    with client_for("grounding", store) as c:
        assert c.get("/readyz").json()["backend"] == "cpu-motion-grounder"
        text = c.post("/v1/describe", json={"sample": ref, "image": "staging/Sparkle_location_000000/frame0.png"}).json()["text"]
        assert "fixed-camera" in text
        r1 = c.post("/v1/ground_round1", json={"sample": ref, "source_frame0": "staging/Sparkle_location_000000/frame0.png",
                                                "edited_frame0": "staging/Sparkle_location_000000/frame0.png"}).json()
        assert r1["objects"] and all(0 <= v <= 1000 for o in r1["objects"] for v in o["bbox_2d"])
        labels = [o["label"] for o in r1["objects"]]
        r2 = c.post("/v1/ground_round2", json={"sample": ref, "frame_indices": [0, 5, 10, 15], "labels": labels}).json()
        assert len(r2["frame_objects"]) == 4 and all([o["label"] for o in f] == labels for f in r2["frame_objects"])
        assert set(r2["timings"]) >= {"queue", "run", "total"}
        r = c.post("/v1/check_camera_motion", json={"sample": ref, "frame_indices": [0, 5, 10, 15]}).json()
        assert r["camera_motion"] is False and "no residual camera motion" in r["reason"]
        r = c.post("/v1/write_instruction", json={"sample": ref, "image": "staging/Sparkle_location_000000/frame0.png", "edit_type": "location",
                                                  "chosen_keyword": "urban: rooftop overlooking skyline"}).json()
        assert "rooftop overlooking skyline" in r["text"]
    with client_for("image_edit", store) as c:
        r = c.post("/v1/edit_background", json={"sample": ref, "image": "staging/Sparkle_location_000000/frame0.png",
                                                "instruction": ref["prompt"], "output": "staging/Sparkle_location_000000/edited0.png"}).json()
        assert (r["width"], r["height"]) == (w, h) and read_image(store.path("staging/Sparkle_location_000000/edited0.png")).shape == (h, w, 3)
        r = c.post("/v1/remove_foreground", json={"sample": ref, "image": "staging/Sparkle_location_000000/edited0.png", "objects": r1["objects"],
                                                  "output": "staging/Sparkle_location_000000/plate.png"}).json()
        assert r["image"] == "staging/Sparkle_location_000000/plate.png" and store.exists("staging/Sparkle_location_000000/plate.png")
    with client_for("i2v", store) as c:
        r = c.post("/v1/animate", json={"sample": ref, "image": "staging/Sparkle_location_000000/plate.png", "prompt": ref["prompt"],
                                        "num_frames": t, "fps": video.fps, "output": "staging/Sparkle_location_000000/bg.mp4"}).json()
        assert (r["num_frames"], r["height"], r["width"]) == (t, h, w)
        assert read_video(store.path("staging/Sparkle_location_000000/bg.mp4")).shape == (t, h, w)
    with client_for("tracking", store) as c:
        anchors = [{"frame_index": 0, "boxes": [{"label": "p", "box": [60, 40, 100, 120]}]},
                   {"frame_index": 8, "boxes": [{"label": "p", "box": [60, 40, 100, 120]}]}]
        r = c.post("/v1/bait", json={"sample": ref, "anchors": anchors, "output": "staging/Sparkle_location_000000/mask.npz"}).json()
        assert r["shape"] == [t, h, w] and r["passes"] == 2
        mask = unpack_mask(store.get_bytes("staging/Sparkle_location_000000/mask.npz"))
        assert mask.shape == (t, h, w) and r["foreground_fraction"] == pytest.approx(mask.mean(), abs=1e-5)
    io.put_video("staging/Sparkle_location_000000/control.mp4", np.zeros((t, h, w, 3), np.uint8), video.fps)
    with client_for("control", store) as c:
        r = c.post("/v1/synthesize", json={"sample": {**ref, "mask": "staging/Sparkle_location_000000/mask.npz"}, "control_video": "staging/Sparkle_location_000000/control.mp4",
                                           "background_video": "staging/Sparkle_location_000000/bg.mp4", "first_frame": "staging/Sparkle_location_000000/edited0.png",
                                           "prompt": ref["prompt"], "output": "staging/Sparkle_location_000000/edited.mp4"}).json()
        assert r["num_frames"] == t and read_video(store.path("staging/Sparkle_location_000000/edited.mp4")).shape == (t, h, w)
    with client_for("editscore", store) as c:
        r = c.post("/v1/score_image", json={"sample": ref, "source": "staging/Sparkle_location_000000/frame0.png", "edited": "staging/Sparkle_location_000000/edited0.png",
                                            "instruction": ref["prompt"], "task": "edit_background"}).json()
        assert r["scorer"] == "cpu-proxy-v2" and 0 <= r["score"]["overall"] <= 10
        r = c.post("/v1/score_frames", json={"sample": {**ref, "mask": "staging/Sparkle_location_000000/mask.npz"}, "edited_video": "staging/Sparkle_location_000000/edited.mp4",
                                             "frame_indices": [1, 6, 11, 16], "instruction": ref["prompt"]}).json()
        assert len(r["scores"]) == 4 and all(0 <= s["O_score"] <= 10 for s in r["scores"])


def test_bad_requests_get_4xx_with_a_reason(sample):
    store, io, ref, video = sample
    with client_for("grounding", store, ServeSettings(load_in_background=False, max_body_bytes=4096)) as c:
        r = c.post("/v1/describe", json={"sample": ref, "image": "staging/Sparkle_location_000000/frame0.png", "colour": "red"})
        assert r.status_code == 422 and "colour" in r.text
        r = c.post("/v1/describe", json={"sample": ref, "image": "staging/Sparkle_location_000000/nope.png"})
        assert r.status_code == 404 and "staging/Sparkle_location_000000/nope.png" in r.json()["detail"]
        r = c.post("/v1/ground_round2", json={"sample": ref, "frame_indices": [0, 99], "labels": ["a"]})
        assert r.status_code == 400 and "frame_indices" in r.json()["detail"]
        r = c.post("/v1/describe", json={"sample": {**ref, "prompt": "x" * 3990}, "image": "staging/Sparkle_location_000000/frame0.png"})
        assert r.status_code == 413
        r = c.post("/v1/describe", content=b"{" + b" " * 5000 + b"}", headers={"content-type": "application/json"})
        assert r.status_code == 413


def test_oversized_artifacts_are_refused_with_413(sample, tmp_path):
    store, io, ref, video = sample
    big = ArtifactIO(LocalStore(tmp_path))
    big.put_video("v.mp4", np.zeros((85, 32, 32, 3), np.uint8), 16)  # 85 > 81 frames
    with client_for("grounding", LocalStore(tmp_path)) as c:
        r = c.post("/v1/describe", json={"sample": {**ref, "source_video": "v.mp4"}, "image": "v.mp4"})
        assert r.status_code == 413 and "more than 81 frames" in r.json()["detail"]


class EchoRequest(Strict):
    value: int


class EchoResponse(OpResponse):
    value: int
    batch: int


class EchoBackend:
    name = "echo-double"

    def setup(self):
        pass


class SlowEchoAPI(ServiceAPI):
    """Test double: echoes values, records batch sizes, with a controllable setup and predict delay."""

    service = "echo"

    def __init__(self, setup_gate: threading.Event | None = None, predict_s: float = 0.0, fail_setup: bool = False):
        self.backend = EchoBackend()
        self.setup_gate, self.predict_s, self.fail_setup = setup_gate, predict_s, fail_setup
        self.batches: list[int] = []

    def setup(self):
        if self.setup_gate:
            self.setup_gate.wait(10)
        if self.fail_setup:
            raise FileNotFoundError("/models/missing")

    @operation(batch=True)
    def echo(self, reqs: list[EchoRequest]) -> list[EchoResponse]:
        """Echo each value with the size of the batch it was served in."""
        self.batches.append(len(reqs))
        time.sleep(self.predict_s)
        return [EchoResponse(value=r.value, batch=len(reqs)) for r in reqs]


def test_readiness_follows_setup_and_a_failed_load_is_reported():
    gate = threading.Event()
    with TestClient(build_app(SlowEchoAPI(setup_gate=gate), ServeSettings())) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert c.post("/v1/echo", json={"value": 1}).status_code == 503
        gate.set()
        for _ in range(100):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.02)
        assert c.post("/v1/echo", json={"value": 7}).json()["value"] == 7
    with TestClient(build_app(SlowEchoAPI(fail_setup=True), SETTINGS)) as c:
        r = c.get("/healthz")
        assert r.status_code == 500 and "/models/missing" in r.json()["error"]
        assert c.get("/readyz").status_code == 503


def test_batching_and_back_pressure():
    api = SlowEchoAPI(predict_s=0.3)
    settings = ServeSettings(load_in_background=False, max_batch_size=4, batch_timeout_s=0.1, max_pending=6)
    with TestClient(build_app(api, settings)) as c, ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda v: c.post("/v1/echo", json={"value": v}), range(10)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(503) >= 1 and codes.count(200) >= 4  # at most 6 admitted at once, the rest told to retry
    refused = [r for r in responses if r.status_code == 503]
    assert all(r.headers["retry-after"] == "5" and "full" in r.json()["detail"] for r in refused)
    ok = [r.json() for r in responses if r.status_code == 200]
    assert all(o["value"] in range(10) for o in ok)
    assert max(api.batches) > 1 and max(api.batches) <= 4  # requests were batched, never beyond the limit


def test_api_key_and_metrics():
    settings = ServeSettings(load_in_background=False, api_key="s3cret")
    with TestClient(build_app(SlowEchoAPI(), settings)) as c:
        assert c.post("/v1/echo", json={"value": 1}).status_code == 401
        assert c.post("/v1/echo", json={"value": 1}, headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.post("/v1/echo", json={"value": 2}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/v1/echo", json={"value": 3}, headers={"X-API-Key": "s3cret"}).status_code == 200
        text = c.get("/metrics").text
        assert c.get("/healthz").status_code == 200  # probes need no key
    assert 'sparkle_requests_total{operation="echo",service="echo",status="401"} 2.0' in text
    assert 'sparkle_requests_total{operation="echo",service="echo",status="200"} 2.0' in text
    assert 'sparkle_batch_size_count{operation="echo",service="echo"} 2.0' in text
    assert "sparkle_request_latency_seconds_bucket" in text and "sparkle_queue_depth" in text


def test_openapi_documents_every_operation(sample):
    store = sample[0]
    with client_for("editscore", store) as c:
        spec = c.get("/openapi.json").json()
    assert set(spec["paths"]) >= {"/v1/score_image", "/v1/score_frames", "/healthz", "/readyz", "/metrics"}
    assert "Score one image edit" in spec["paths"]["/v1/score_image"]["post"]["description"]




@pytest.mark.parametrize("args, message", [
    (["tracking", "--backend", "real", "--model-dir", "/nonexistent/sam3"], "/nonexistent/sam3"),
    (["weather", "--backend", "cpu"], "unknown service"),
    (["tracking", "--backend", "large"], "has no 'large' backend"),
    (["i2v", "--backend", "cpu", "--option", "no-equals-sign"], "KEY=VALUE"),
    (["i2v", "--backend", "cpu"], "a model server needs an API key"),  # it was served open to anyone
])
def test_serve_fails_at_start_with_a_clear_message(args, message, tmp_path):
    from ..conftest import sparkle

    proc = sparkle("serve", *args, "--store", tmp_path, "--port", "0", env={"SPARKLE_SERVE_API_KEY": ""})
    assert proc.returncode == 1
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_option_values_are_typed():
    from sparkle.orchestrator.cli import _option_value

    assert [_option_value(v) for v in ("true", "False", "3", "0.5", "/models/x")] == [True, False, 3, 0.5, "/models/x"]


def test_every_service_declares_its_operations_once(sample):
    """Each service folder's app.py declares its operations (request and response models next to them); the
    shell builds exactly those routes, and the client reaches only declared operations."""
    import inspect

    from sparkle.orchestrator.clients import APIS
    from sparkle.service import OpRequest, OpResponse, ServiceClient

    store = sample[0]
    expected = {"grounding": {"describe", "ground_round1", "ground_round2", "check_camera_motion",
                              "write_instruction", "caption"},
                "image_edit": {"edit_background", "remove_foreground"}, "i2v": {"animate"}, "tracking": {"bait"},
                "control": {"synthesize"}, "editscore": {"score_image", "score_frames"}}
    for service, api in APIS.items():
        ops = api.operations()
        assert set(ops) == expected[service], service
        for spec in ops.values():
            assert issubclass(spec.request, OpRequest) and issubclass(spec.response, OpResponse)
            assert ("output" in spec.request.model_fields) == bool(spec.request.output_suffix), spec.name
            assert spec.doc, f"{service}.{spec.name} has no docstring for its OpenAPI description"
        assert {spec.name for spec in ops.values() if spec.batch} == (
            {"score_image", "score_frames"} if service == "editscore" else set())
        with client_for(service, store) as c:
            paths = {p for p in c.get("/openapi.json").json()["paths"] if p.startswith("/v1/")}
        assert paths == {f"/v1/{op}" for op in expected[service]}
        module = inspect.getmodule(api)
        assert issubclass(module.Client, ServiceClient) and module.Client.api is api
        called = set()
        for name, fn in inspect.getmembers(module.Client, inspect.isfunction):
            called |= {op for op in expected[service] if f'"{op}"' in inspect.getsource(fn)}
        assert called == expected[service], f"{service}: operations without a client call"


def test_an_operation_may_not_shadow_the_base_class():
    class Broken(ServiceAPI):
        service = "broken"

        @operation
        def health(self, req: EchoRequest) -> EchoResponse:
            """Shadows ServiceAPI.health."""

    with pytest.raises(TypeError, match="shadow"):
        Broken.operations()


def test_model_servers_write_only_in_the_calling_samples_staging_area(sample):
    """One unauthenticated request could overwrite ``prompts/location_train.csv`` or a published video: an
    ``output`` outside ``staging/{sample_id}/`` (or climbing out of it with ``..``) is a 422 and nothing is
    written; a traversal key to read (``../x``) is a 400, not a 500; a sample id that is not one path segment
    is a 422."""
    store, io, ref, video = sample
    before = sorted(store.list_keys(""))
    image = "staging/Sparkle_location_000000/frame0.png"
    with client_for("image_edit", store) as c:
        for output in ("prompts/location_train.csv", "location/edited_video/Sparkle_location_000000.mp4",
                       "staging/Sparkle_location_000001/x.png", "staging/Sparkle_location_000000/../../evil.png"):
            r = c.post("/v1/edit_background", json={"sample": ref, "image": image, "instruction": "x",
                                                    "output": output})
            assert r.status_code == 422 and "staging area" in r.text, (output, r.status_code, r.text[:200])
        r = c.post("/v1/edit_background", json={"sample": ref, "image": "../../etc/passwd", "instruction": "x",
                                                "output": "staging/Sparkle_location_000000/ok.png"})
        assert r.status_code == 400 and "invalid artifact key" in r.json()["detail"], r.text[:200]
        r = c.post("/v1/edit_background", json={"sample": {**ref, "sample_id": "../prompts"}, "image": image,
                                                "instruction": "x", "output": "staging/../prompts/a.png"})
        assert r.status_code == 422
    assert sorted(store.list_keys("")) == before


def test_a_model_server_with_a_key_writes_nothing_for_an_unauthenticated_request(sample, tmp_path):
    """One unauthenticated request each overwrote the prompts CSV and published videos: a server with a key
    (here from a file, as the pod's init container writes it) answers 401 and writes nothing."""
    store, io, ref, video = sample
    key_file = tmp_path / "serve-api-key"
    key_file.write_text("pod-secret\n")
    settings = ServeSettings(load_in_background=False, api_key_file=key_file)
    out = "staging/Sparkle_location_000000/ops/unauthenticated.png"
    body = {"sample": ref, "image": "staging/Sparkle_location_000000/frame0.png", "instruction": ref["prompt"],
            "output": out}
    before = sorted(store.list_keys(""))
    with client_for("image_edit", store, settings) as c:
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer pod-secret-"}):
            assert c.post("/v1/edit_background", json=body, headers=headers).status_code == 401
        assert sorted(store.list_keys("")) == before
        assert c.post("/v1/edit_background", json=body, headers={"X-API-Key": "pod-secret"}).status_code == 200
    assert store.exists(out)
    store.delete_prefix(out)


def test_an_empty_or_missing_key_file_is_a_config_error(tmp_path):
    from sparkle.errors import ConfigError

    (tmp_path / "empty").write_text("\n")
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ConfigError):
            ServeSettings(api_key_file=path).key()


class SlowTrackerDouble:
    """TEST DOUBLE of a tracking backend: an empty mask per anchor, 0.2 s each, counting its passes."""

    name = "slow-tracker-double"

    def __init__(self):
        self.passes = 0

    def setup(self):
        pass

    def warmup(self):
        pass

    def track(self, ctx, frames, anchors):
        for _ in anchors:
            time.sleep(0.2)
            self.passes += 1
            yield np.zeros(frames.shape[:3], bool)


def test_a_bait_request_stops_at_its_deadline_and_anchors_are_bounded(sample):
    """One bait request cost 210 s of CPU and ran on after its 504: it now stops at the next pass after its
    time-out, and a request is at most 24 anchors on distinct frames (it was 81 x 32 boxes)."""
    from sparkle.services.tracking.app import MAX_ANCHORS, TrackingAPI

    store, io, ref, video = sample
    tracker = SlowTrackerDouble()
    settings = ServeSettings(load_in_background=False, request_timeout_s=0.5)
    box = {"label": "person", "box": [0, 0, 10, 10]}
    body = {"sample": ref, "anchors": [{"frame_index": i, "boxes": [box]} for i in range(12)],
            "output": "staging/Sparkle_location_000000/ops/slow.npz"}
    with TestClient(build_app(TrackingAPI(tracker, store), settings)) as c:
        assert c.post("/v1/bait", json=body).status_code == 504
        time.sleep(1.0)
        stopped_at = tracker.passes
        time.sleep(0.6)
        assert tracker.passes == stopped_at and stopped_at <= 5, stopped_at  # 12 passes would be 2.4 s
        assert not store.exists(body["output"])
        too_many = {**body, "anchors": [{"frame_index": i, "boxes": [box]} for i in range(MAX_ANCHORS + 1)]}
        assert c.post("/v1/bait", json=too_many).status_code == 422
        repeated = {**body, "anchors": [{"frame_index": 0, "boxes": [box]}] * 2}
        r = c.post("/v1/bait", json=repeated)
        assert r.status_code == 400 and "repeat" in r.json()["detail"]
