"""Registering bulk runs at scale (orchestrator/datasets.py): streamed manifests, stable dataset ids,
resumable registration, bounded progress documents."""

from __future__ import annotations

import hashlib
import json
import tracemalloc

import pytest
import redis

from sparkle import layout
from sparkle.capacity import plan
from sparkle.config import PipelineConfig
from sparkle.errors import InputError
from sparkle.orchestrator import datasets
from sparkle.store import LocalStore


def write_manifest(path, n: int, prompt: str = "Replace the background with a beach\u2028at dusk") -> None:
    (path.parent / "clip.mp4").write_bytes(b"not decoded at registration")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"video": "clip.mp4", "prompt": f"{prompt} {i}",
                                "theme": ("location", "season")[i % 2]}, ensure_ascii=False) + "\n")


def test_the_dataset_id_is_the_one_earlier_versions_computed(tmp_path):
    write_manifest(tmp_path / "m.jsonl", 30)
    entries = datasets.parse_manifest((tmp_path / "m.jsonl").read_text(encoding="utf-8"))
    config = PipelineConfig()
    body = json.dumps({"entries": [e.model_dump() for e in entries], "root": str(tmp_path.resolve()),
                       "config": config.model_dump(mode="json")}, sort_keys=True)  # the old, in-memory recipe
    ds = datasets.create_dataset(LocalStore(tmp_path / "s"), datasets.ManifestFile(tmp_path / "m.jsonl"), tmp_path,
                                 config)
    assert ds["id"] == hashlib.sha256(body.encode()).hexdigest()[:16] and ds["total"] == 30
    assert ds["by_edit_type"] == {"location": 15, "season": 15}


class FailingStore(LocalStore):
    """Fails the write of manifest chunk ``fail_at`` once (a crash of the registering process)."""

    def __init__(self, root, fail_at: int):
        super().__init__(root)
        self.fail_at = fail_at

    def put_bytes(self, key: str, data: bytes) -> str:
        if key.endswith(f"samples/{self.fail_at:06d}.jsonl"):
            self.fail_at = -1
            raise ConnectionError("store went away")
        return super().put_bytes(key, data)


def test_an_interrupted_registration_resumes_with_the_same_ids(tmp_path):
    write_manifest(tmp_path / "m.jsonl", 2 * datasets.CHUNK + 10)
    store = FailingStore(tmp_path / "s", fail_at=1)
    manifest = datasets.ManifestFile(tmp_path / "m.jsonl")
    with pytest.raises(ConnectionError):
        datasets.create_dataset(store, manifest, tmp_path)
    [dataset_dir] = (tmp_path / "s" / "datasets").iterdir()
    assert not (dataset_dir / "dataset.json").exists()  # not registered: nothing will be submitted
    ds = datasets.create_dataset(store, manifest, tmp_path)
    ids = datasets.dataset_samples(store, ds["id"])
    assert len(ids) == ds["total"] == len(set(ids))
    by_theme = {et: sorted(layout.parse_sample_id(i)[1] for i in ids if i.startswith(f"Sparkle_{et}_"))
                for et in ("location", "season")}
    assert by_theme == {et: list(range(len(v))) for et, v in by_theme.items()}  # the first allocation, reused
    assert store.get_json("jobs/ids/location.json") == {"next": len(by_theme["location"])}
    assert datasets.create_dataset(store, manifest, tmp_path) == ds  # registered once


def test_a_bad_line_anywhere_writes_nothing(tmp_path):
    write_manifest(tmp_path / "m.jsonl", 50)
    with open(tmp_path / "m.jsonl", "a", encoding="utf-8") as f:
        f.write('{"video": "missing.mp4"}\n{"video": "clip.mp4", "theme": "winter"}\nnot json\n')
    store = LocalStore(tmp_path / "s")
    with pytest.raises(InputError) as exc:
        datasets.create_dataset(store, datasets.ManifestFile(tmp_path / "m.jsonl"), tmp_path)
    assert "line 52: theme" in str(exc.value) and "line 53: not JSON" in str(exc.value)
    assert store.list_keys("") == []


def test_registration_memory_does_not_grow_with_the_manifest(tmp_path):
    """Peak Python allocations while registering 2 000 and 8 000 entries: a streamed manifest holds one chunk."""
    peaks = []
    for n in (2000, 8000):
        write_manifest(tmp_path / f"m{n}.jsonl", n)
        store = LocalStore(tmp_path / f"s{n}")
        tracemalloc.start()
        datasets.create_dataset(store, datasets.ManifestFile(tmp_path / f"m{n}.jsonl"), tmp_path)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.5 * peaks[0], peaks  # four times the entries, not four times the memory


def test_the_progress_document_does_not_grow_with_the_manifest(tmp_path):
    """state.json holds the cursor, the window in flight, counts and the funnel: never the manifest; the
    largest object of a dataset is one chunk of the manifest."""
    sizes = {}
    for n in (300, 3000):
        write_manifest(tmp_path / f"m{n}.jsonl", n)
        store = LocalStore(tmp_path / f"s{n}")
        ds = datasets.create_dataset(store, datasets.ManifestFile(tmp_path / f"m{n}.jsonl"), tmp_path, window=8)
        state = json.loads(store.get_bytes(f"datasets/{ds['id']}/state.json"))
        sizes[n] = len(json.dumps({k: v for k, v in state.items() if k != "updated_at"}))
        chunks = [len(store.get_bytes(k)) for k in store.list_keys(f"datasets/{ds['id']}/samples/")]
        assert len(chunks) == -(-n // datasets.CHUNK) and max(chunks) < 200 * datasets.CHUNK
    assert sizes[300] == sizes[3000] < 200


def test_the_plan_counts_write_instruction_only_for_entries_without_a_prompt():
    written = plan(prompts_given=0.0)["services"]["grounding"]["gpu_s_per_accepted"]
    given = plan(prompts_given=1.0)["services"]["grounding"]["gpu_s_per_accepted"]
    half = plan(prompts_given=0.5)["services"]["grounding"]["gpu_s_per_accepted"]
    assert given < half < written and half == pytest.approx((written + given) / 2)
    assert plan(prompts_given=1.0)["services"]["control"] == plan()["services"]["control"]
    with pytest.raises(ValueError, match="0..1"):
        plan(prompts_given=1.5)


def test_collecting_a_finished_sample_removes_the_staging_area_its_killed_worker_left(tmp_path):
    """A worker SIGKILLed between writing the terminal job and dropping ``staging/{id}/`` leaves the area
    behind; the dataset tick that collects the sample removes it (and only that sample's)."""
    write_manifest(tmp_path / "m.jsonl", 2)
    store = LocalStore(tmp_path / "s")
    ds = datasets.create_dataset(store, datasets.ManifestFile(tmp_path / "m.jsonl"), tmp_path)
    done, running = datasets.dataset_samples(store, ds["id"])
    for sid, state in ((done, "accepted"), (running, "running")):
        store.put_bytes(f"staging/{sid}/ops/control.synthesize.0.mp4", b"video")
        store.put_json(f"jobs/{sid}.json", {"id": sid, "edit_type": layout.parse_sample_id(sid)[0], "state": state})
    prefix = f"datasets/{ds['id']}/"
    store.put_json(prefix + "state.json", {**store.get_json(prefix + "state.json"), "cursor": 2,
                                           "in_flight": [done, running]})
    state = datasets.dataset_tick(None, store, ds["id"])
    assert state["in_flight"] == [running] and state["counts"] == {"accepted": 1}
    assert store.list_keys("staging/") == [f"staging/{running}/ops/control.synthesize.0.mp4"]


class RecordingApp:
    """TEST DOUBLE of the Celery app: records the messages sent (``send_task``); its result backend's Redis
    client (where the liveness marks go) is ``client``."""

    def __init__(self, client):
        from types import SimpleNamespace

        self.sent: list[tuple[str, list]] = []
        self.backend = SimpleNamespace(client=client)

    def send_task(self, name, args=None, **_):
        self.sent.append((name, list(args or [])))


def test_a_submission_cut_short_before_the_tick_recorded_it_is_resumed_not_lost(tmp_path, redis_url):
    """The enqueue process was killed inside a tick after a sample's checkpoint and ``queued`` job were written
    but before its first message went out and before ``state.json`` moved the cursor past it. The next tick
    finds the job (so it does not submit the sample twice) and must send its next stage, or the sample waits
    forever (the bulk kill test hung on this once in CI and once here)."""
    from sparkle.orchestrator import jobs
    from sparkle.orchestrator.pipeline import SampleTask

    write_manifest(tmp_path / "m.jsonl", 2)
    store = LocalStore(tmp_path / "s")
    ds = datasets.create_dataset(store, datasets.ManifestFile(tmp_path / "m.jsonl"), tmp_path)
    first, _ = datasets.dataset_samples(store, ds["id"])
    task = SampleTask(id=first, edit_type=layout.parse_sample_id(first)[0], prompt="p", source_key="k")
    cp = jobs.Checkpoint(task=task, config=PipelineConfig().model_dump(mode="json"), next="ingest", submitted_at=0.0,
                         dataset=ds["id"])
    jobs.save_checkpoint(store, cp)  # sent=False: the message never left
    jobs.write_job(store, cp, "queued", None)
    app = RecordingApp(redis.Redis.from_url(redis_url))
    state = datasets.dataset_tick(app, store, ds["id"], window=1)
    assert state["in_flight"] == [first]
    assert app.sent == [("sparkle.stage", [first, "ingest"])]


def test_enqueue_rides_out_a_redis_restart_and_resumes_on_its_first_good_tick(monkeypatch):
    """``sparkle enqueue``'s loop (``datasets.follow``): Redis going away mid-run (two ticks fail with a
    connection error) is waited out with back-off, not a crash, and the samples in flight are resumed by the
    first tick that gets through; a non-transient error still ends the run. (It died on the first blip.)"""
    import redis

    calls, sleeps, shown = [], [], []
    script = [redis.ConnectionError("Connection refused"), redis.ConnectionError("Connection refused"),
              {"done": False}, {"done": True}]

    def tick(app, store, did, window, resume):
        calls.append(resume)
        step = script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    monkeypatch.setattr(datasets, "dataset_tick", tick)
    final = datasets.follow(None, None, "d", poll_s=0.5, on_state=shown.append, sleep=sleeps.append)
    assert final == {"done": True}
    assert calls == [True, True, True, False]  # resume until a tick succeeds, then plain ticks
    assert sleeps == [0.5, 1.0, 0.5] and shown == [{"done": False}, {"done": True}]

    monkeypatch.setattr(datasets, "dataset_tick", lambda *a, **k: (_ for _ in ()).throw(KeyError("no dataset")))
    with pytest.raises(KeyError):
        datasets.follow(None, None, "d", sleep=sleeps.append)
