"""The sample viewer (orchestrator/viewer) as a user sees it: ``sparkle view OUT`` served on loopback and driven in
a real headless Chromium (Debian's ``chromium``, through Playwright pointed at that executable), plus the list's
filters, pages and index over a synthetic store, and the gateway's ``/ui/`` behind API keys.

Screenshots are saved to ``test-artifacts/viewer/`` (``$SPARKLE_TEST_ARTIFACTS`` to change it).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sparkle import layout
from sparkle.masks import unpack_mask
from sparkle.orchestrator import jobs
from sparkle.orchestrator.cluster import serving
from sparkle.orchestrator.pipeline import SampleTask, StageDecision
from sparkle.orchestrator.viewer import build_viewer
from sparkle.orchestrator.viewer.index import Filters, SampleIndex
from sparkle.store import LocalStore
from tests.conftest import REPO

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("SPARKLE_TEST_ARTIFACTS", REPO / "test-artifacts")) / "viewer"
SPARKLE = str(Path(sys.executable).with_name("sparkle"))


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's package; Playwright's own browser download cannot work here)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"chromium not found at {CHROMIUM}: apt-get install chromium (make test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        yield b
        b.close()


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def wait_for(predicate, timeout_s: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def view(tmp_path):
    """``view(out)`` -> base URL of ``sparkle view OUT`` on a free loopback port (stopped after the test)."""
    stack = []

    def start(out: Path) -> str:
        ctx = serving(lambda port: [SPARKLE, "view", str(out), "--port", str(port)], "sparkle view",
                      tmp_path / f"view-{len(stack)}.log")
        port = ctx.__enter__()
        stack.append(ctx)
        return f"http://127.0.0.1:{port}"

    yield start
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


# --- a folder made by `sparkle replace`, in Chromium ------------------------------------------------------

def test_a_replaced_sample_plays_in_sync_with_its_mask_drawn_and_its_records_shown(juggle_run, view, browser):
    summary, out = juggle_run
    sid = summary["id"]
    base = view(out)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.goto(f"{base}/ui/")
    row = page.locator(f"table.samples a[href$='/samples/{sid}']")
    assert row.count() == 1
    assert page.locator("table.samples .state").first.inner_text() == "accepted"
    shot(page, "list")
    row.click()
    page.wait_for_url(f"**/ui/samples/{sid}")

    # Both videos play, and the edited one follows the source's clock.
    def times():
        return page.evaluate("[document.getElementById('source').currentTime, "
                             "document.getElementById('edited_video').currentTime]")
    first = wait_for(lambda: (t := times())[0] > 0.2 and t[1] > 0.2 and t, what="videos to start")
    time.sleep(2.0)
    later = times()
    assert later[0] > first[0] + 0.3 and later[1] > first[1] + 0.3, (first, later)
    assert abs(later[0] - later[1]) < 0.3, later
    assert page.evaluate("document.getElementById('background_video').currentTime") > 0.2

    # The mask overlay: the canvas is painted exactly where the npz's mask is, on the frame it says it drew.
    page.evaluate("document.getElementById('source').pause()")
    time.sleep(0.3)
    wait_for(lambda: page.evaluate("window.sparkleMask.drawn >= 0"), what="the mask to be drawn")
    painted = page.evaluate("""() => {
        const c = document.getElementById('mask'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let s = ''; for (let i = 3; i < d.length; i += 4) s += d[i] > 0 ? '1' : '0';
        return [window.sparkleMask.drawn, c.width, c.height, s]; }""")
    frame, w, h, bits = painted
    mask = unpack_mask((out / layout.mask("location", sid)).read_bytes())
    assert (h, w) == mask.shape[1:]
    canvas = np.frombuffer(bits.encode(), np.uint8).reshape(h, w) == ord("1")
    assert mask[frame].any() and canvas.any()
    assert np.array_equal(canvas, mask[frame]), f"canvas differs from mask frame {frame} on {np.sum(canvas != mask[frame])} px"

    # Frames, decisions with timings, the five records.
    for name in ("source_frame0", "edited_frame0", "clean_plate"):
        assert page.evaluate(f"document.getElementById('{name}').naturalWidth") == w
    report = LocalStore(out).get_json(layout.report("location", sid))
    rows = page.locator("#stages tbody tr")
    assert rows.count() == len(report["stages"])
    assert [rows.nth(i).locator("td").nth(1).inner_text() for i in range(rows.count())] == \
        [d["name"] for d in report["stages"]]
    assert page.locator("details.record").evaluate_all("els => els.map(e => e.dataset.name)") == list(layout.RECORD_NAMES)
    page.locator("details.record[data-name='edited_video_score'] summary").click()
    text = page.locator("details.record[data-name='edited_video_score'] pre").inner_text()
    assert '"frame_indices"' in text and sid in text
    shot(page, "sample")
    assert not errors, errors

    page.goto(f"{base}/ui/funnel")
    stages = page.locator("svg#funnel g.stage")
    assert stages.count() == len(report["stages"])
    assert stages.first.get_attribute("data-in") == "1"
    shot(page, "funnel")
    page.close()


def _write_running(store: LocalStore, sid: str, stage: str, decisions: list[StageDecision]) -> None:
    task = SampleTask(id=sid, edit_type="season", prompt="Make it a snowy winter evening", source_key="x.mp4",
                      decisions=decisions)
    cp = jobs.Checkpoint(task=task, config={}, next=stage, submitted_at=time.time())
    jobs.write_job(store, cp, "running", stage)


def test_a_running_job_page_updates_live_when_its_stage_changes(tmp_path, view, browser):
    """The job document is written the way the journey writes it (jobs.write_job); the open page follows it
    over server-sent events, without reloading."""
    store = LocalStore(tmp_path / "out")
    sid = layout.sample_id("season", 7)
    ingest = StageDecision(stage=0, name="ingest", accepted=True, reason="conformed", seconds=0.5)
    _write_running(store, sid, "camera_filter", [ingest])
    base = view(tmp_path / "out")
    page = browser.new_page()
    page.goto(f"{base}/ui/samples/{sid}")
    assert page.locator("#stage").inner_text() == "camera_filter"
    assert page.locator("#state").inner_text() == "running"
    page.evaluate("window.__sameDocument = true")

    camera = StageDecision(stage=1, name="camera_filter", accepted=True, reason="fixed camera", seconds=0.25)
    _write_running(store, sid, "frame0_edit", [ingest, camera])
    page.wait_for_function("document.getElementById('stage').textContent === 'frame0_edit'", timeout=15000)
    assert page.evaluate("window.__sameDocument === true")  # updated in place, not reloaded
    assert page.locator("#stages tbody tr").count() == 2
    assert page.locator("#total-s").inner_text() == "0.75"
    shot(page, "live")
    page.close()


# --- the list: filters, pages, the index ------------------------------------------------------------------

def _job(store, sid: str, state: str, mean_o: float | None, refused: str | None = None, dataset=None, owner=""):
    decisions = [StageDecision(stage=0, name="ingest", accepted=True, reason="ok", seconds=1.0)]
    if refused == "frame0_edit":
        decisions.append(StageDecision(stage=2, name="frame0_edit", accepted=False, reason="EditScore overall 5 < 8"))
    elif mean_o is not None:
        decisions.append(StageDecision(stage=5, name="synthesis", accepted=state == "accepted",
                                       reason="mean O_score", scores={"mean_O_score": mean_o}, seconds=2.0))
    et, _ = layout.parse_sample_id(sid)
    task = SampleTask(id=sid, edit_type=et, prompt=f"prompt of {sid}", source_key="x.mp4", decisions=decisions,
                      status=state if state in ("accepted", "rejected", "failed") else "running")
    if state == "failed":
        task.failed_stage, task.reason = "bait", "bait: ServiceRejected"
    cp = jobs.Checkpoint(task=task, config={}, next="finish", submitted_at=time.time(), dataset=dataset, owner=owner)
    jobs.write_job(store, cp, state, decisions[-1].name)


def test_the_list_filters_pages_and_follows_the_store(tmp_path):
    store = LocalStore(tmp_path / "s")
    for i in range(60):
        _job(store, layout.sample_id("location", i), "accepted", 8 + (i % 20) / 10)
    for i in range(25):
        _job(store, layout.sample_id("season", i), "rejected", 5.0 + i / 10)
    for i in range(15):
        _job(store, layout.sample_id("time", i), "rejected", None, refused="frame0_edit", dataset="d1")
    _job(store, layout.sample_id("style", 0), "failed", None)
    index = SampleIndex(store, ":memory:", min_interval_s=0)
    client = TestClient(_mounted(build_viewer(store, index=index)))

    listed = client.get("/ui/api/samples").json()
    assert listed["total"] == 101 and listed["pages"] == 3 and len(listed["samples"]) == 50
    page3 = client.get("/ui/api/samples", params={"page": 3}).json()
    ids = {s["id"] for p in (1, 2, 3) for s in client.get("/ui/api/samples", params={"page": p}).json()["samples"]}
    assert len(ids) == 101 and len(page3["samples"]) == 1
    assert client.get("/ui/api/samples", params={"theme": "season"}).json()["total"] == 25
    assert client.get("/ui/api/samples", params={"state": "failed"}).json()["samples"][0]["refused_stage"] == "bait"
    scored = client.get("/ui/api/samples", params={"min_score": 9.0, "max_score": 9.45}).json()
    assert scored["total"] == 15 and all(9.0 <= s["mean_o"] <= 9.45 for s in scored["samples"])
    refused = client.get("/ui/api/samples", params={"refused": "frame0_edit"}).json()
    assert refused["total"] == 15 and {s["dataset"] for s in refused["samples"]} == {"d1"}
    assert client.get("/ui/api/samples", params={"q": "season_000003"}).json()["total"] == 1
    assert client.get("/ui/api/samples", params={"q": "PROMPT OF sparkle_time"}).json()["total"] == 15
    assert client.get("/ui/api/samples", params={"q": "00"}).json()["total"] == 101  # under 3 characters: a scan
    assert client.get("/ui/api/samples", params={"theme": "nope"}).status_code == 422
    html = client.get("/ui/", params={"theme": "season", "page": 1}).text
    assert "25 samples, page 1 of 1" in html and "Sparkle_location_" not in html

    funnel = {s["name"]: (s["in"], s["out"]) for s in index.funnel(Filters())}
    assert funnel == {"ingest": (101, 101), "frame0_edit": (15, 0), "synthesis": (85, 60)}

    # The index follows the store: a changed document is re-read, a removed one drops its sample.
    _job(store, layout.sample_id("season", 0), "accepted", 9.9)
    store.delete_prefix(jobs.job_key(layout.sample_id("time", 0)))
    after = client.get("/ui/api/samples", params={"theme": "season", "state": "accepted"}).json()
    assert after["total"] == 1 and after["samples"][0]["mean_o"] == 9.9
    assert client.get("/ui/api/samples").json()["total"] == 100
    assert client.get(f"/ui/samples/{layout.sample_id('time', 0)}").status_code == 404


def _mounted(viewer) -> FastAPI:
    app = FastAPI()
    app.mount("/ui", viewer)
    return app


def test_the_index_reads_only_what_changed_and_survives_a_restart(tmp_path):
    store = LocalStore(tmp_path / "s")
    for i in range(30):
        _job(store, layout.sample_id("location", i), "accepted", 9.0)
    db = tmp_path / "index.sqlite"
    first = SampleIndex(store, db, min_interval_s=0)
    assert first.refresh(force=True) == 30
    assert first.refresh(force=True) == 0  # nothing changed: nothing re-read
    first.close()
    _job(store, layout.sample_id("location", 3), "rejected", 4.0)
    again = SampleIndex(store, db, min_interval_s=0)
    assert again.refresh(force=True) == 1
    assert again.page(Filters(state="rejected"))["samples"][0]["id"] == layout.sample_id("location", 3)


# --- the gateway's /ui/: behind the API keys --------------------------------------------------------------

def test_the_gateways_viewer_needs_a_key_and_shows_each_key_its_own_samples(settings, tmp_path):
    from sparkle.orchestrator.celery_app import make_app
    from sparkle.orchestrator.gateway import VIEWER_COOKIE, build_gateway
    from sparkle.serving import key_principal

    from pydantic import SecretStr

    store = LocalStore(tmp_path / "store")
    mine, theirs = layout.sample_id("location", 1), layout.sample_id("location", 2)
    _job(store, mine, "accepted", 9.5, owner=key_principal(b"key-a"))
    _job(store, theirs, "accepted", 9.0, owner=key_principal(b"key-b"))
    s = settings.model_copy(update={"gateway_api_keys": SecretStr("key-a,key-b"), "store_url": f"local:{tmp_path}"})
    celery = make_app(s)
    client = TestClient(build_gateway(s, store, celery), follow_redirects=False)

    assert client.get("/ui/api/samples").status_code == 401
    page = client.get("/ui/", headers={"Accept": "text/html"})
    assert page.status_code == 303 and page.headers["location"].startswith("/ui/login?next=")
    assert client.get("/ui/static/viewer.js").status_code == 401
    assert client.get("/ui/login").status_code == 200

    a = {"X-API-Key": "key-a"}
    assert [r["id"] for r in client.get("/ui/api/samples", headers=a).json()["samples"]] == [mine]
    assert client.get(f"/ui/samples/{mine}", headers=a).status_code == 200
    assert client.get(f"/ui/samples/{theirs}", headers=a).status_code == 404  # another key's sample
    assert client.get(f"/ui/samples/{theirs}/events", headers=a).status_code == 404

    wrong = client.post("/ui/login", content="key=nope&next=/ui/", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert wrong.status_code == 401 and VIEWER_COOKIE not in wrong.cookies
    login = client.post("/ui/login", content="key=key-b&next=https://evil.example/",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert login.status_code == 303 and login.headers["location"] == "/ui/"  # never sent off-site
    cookie = login.cookies[VIEWER_COOKIE]
    client.cookies.set(VIEWER_COOKIE, cookie)
    assert [r["id"] for r in client.get("/ui/api/samples").json()["samples"]] == [theirs]
    assert "httponly" in login.headers["set-cookie"].lower()
    celery.close()


def test_the_viewer_serves_an_s3_stores_artifacts_with_range_requests(settings, bucket, tmp_path):
    """Behind the gateway the store is S3: an artifact is fetched once into a cache (keyed by its ETag) and
    served with Range support (a video's seek); a changed object is fetched again."""
    import uuid

    from sparkle.store_s3 import open_store

    store = open_store(f"s3://{bucket}/viewer-{uuid.uuid4().hex[:8]}", settings)
    sid = layout.sample_id("location", 5)
    key = layout.source_video("location", sid)
    store.put_bytes(key, bytes(range(256)) * 40)
    _job(store, sid, "accepted", 9.0)
    doc = store.get_json(jobs.job_key(sid))
    store.put_json(jobs.job_key(sid), {**doc, "artifacts": {"source_video": key}})
    client = TestClient(_mounted(build_viewer(store, index=SampleIndex(store, ":memory:", min_interval_s=0))))
    url = f"/ui/samples/{sid}/files/source_video"
    part = client.get(url, headers={"Range": "bytes=256-511"})
    assert part.status_code == 206 and part.content == bytes(range(256))
    assert client.get(url).content == bytes(range(256)) * 40
    store.put_bytes(key, b"changed")
    assert client.get(url).content == b"changed"
    assert [s["id"] for s in client.get("/ui/api/samples").json()["samples"]] == [sid]


def test_a_folder_made_before_job_documents_is_listed_from_its_reports(tmp_path):
    from sparkle.orchestrator.pipeline import summary

    store = LocalStore(tmp_path / "s")
    sid = layout.sample_id("style", 3)
    task = SampleTask(id=sid, edit_type="style", prompt="Turn it into a watercolour", source_key="x.mp4",
                      status="rejected", reason="stage 5 (synthesis): mean O_score 6.50 < 8", decisions=[
                          StageDecision(stage=0, name="ingest", accepted=True, reason="ok", seconds=1.0),
                          StageDecision(stage=5, name="synthesis", accepted=False, reason="mean O_score 6.50 < 8",
                                        scores={"mean_O_score": 6.5}, seconds=3.0)])
    store.put_json(layout.report("style", sid), summary(task))
    client = TestClient(_mounted(build_viewer(store, index=SampleIndex(store, ":memory:", min_interval_s=0))))
    (row,) = client.get("/ui/api/samples").json()["samples"]
    assert (row["id"], row["state"], row["refused_stage"], row["mean_o"], row["seconds"]) == \
        (sid, "rejected", "synthesis", 6.5, 4.0)
    page = client.get(f"/ui/samples/{sid}").text
    assert "mean O_score 6.50 &lt; 8" in page and "not kept (rejected)" in page
