"""Shared fixtures: the real clips in ../shared/data/videos and end-to-end runs of the embedded default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparkle.settings import DistributedSettings
from sparkle.store_s3 import open_store
from tests.infra import BUCKET, REDIS_SERVER, serving

REPO = Path(__file__).resolve().parents[1]
VIDEOS = Path(os.environ.get("SPARKLE_TEST_VIDEOS", REPO.parent / "shared" / "data" / "videos"))
JUGGLE = VIDEOS / "static_01_juggle.mp4"
PEDESTRIANS = VIDEOS / "static_03_pedestrians_vtest.mp4"
HANDHELD = VIDEOS / "moving_01_bedroom.mp4"
REFERENCE = Path(os.environ.get("SPARKLE_REFERENCE", REPO.parent / "shared" / "reference" / "sparkle"))
RELEASED = Path(os.environ.get("SPARKLE_RELEASED_PAIRS", REPO.parent / "shared" / "data" / "sparkle"))
"""Four released Sparkle pairs (``*_source.mp4``, ``*_edited.mp4``: 1280x720, 16 fps, 81 frames; see SOURCES.md)."""
SNOW_PROMPT = "Replace the background with a snowy mountain village at dusk, with softly falling snow"
DEMO_PROMPT = "Replace the background with a busy town square with people walking by"
"""The README's main job (``make demo``): the juggler over the pedestrians clip, a real replacement (the cpu
profile refuses a location edit it would have to paint from words)."""
BG_IMAGE = VIDEOS / "static_01_juggle_frame0.png"
"""A user background image for cpu runs of location edits."""


def sparkle(*args: str | Path, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``sparkle`` console command (as a user would) and capture its output.

    ``env`` adds variables to the inherited environment.
    """
    exe = Path(sys.executable).with_name("sparkle")
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"sparkle {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def pytest_configure(config):
    # The viewer's index files (a cache outside the dataset) go to a folder of this run, not to ~/.cache.
    import tempfile

    os.environ.setdefault("SPARKLE_VIEWER_CACHE", tempfile.mkdtemp(prefix="sparkle-viewer-cache-"))
    missing = [p for p in (JUGGLE, PEDESTRIANS, HANDHELD) if not p.is_file()]
    if missing:
        raise pytest.UsageError(f"test clips missing: {missing} (set SPARKLE_TEST_VIDEOS)")


@pytest.fixture(scope="session")
def juggle_run(tmp_path_factory):
    """The README's main job on the juggle clip, through the CLI with --json: (summary, out_dir)."""
    out = tmp_path_factory.mktemp("juggle")
    proc = sparkle("replace", JUGGLE, DEMO_PROMPT, "--background", PEDESTRIANS, "-o", out, "--json", check=True)
    return json.loads(proc.stdout), out


# --- an S3-compatible server and Redis on loopback (the distributed run's infrastructure) ---------------------

@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """``127.0.0.1:PORT`` of a moto S3 server (any credentials are accepted; signatures are not checked)."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with serving(lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                 "moto server", log) as port:
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """``redis://127.0.0.1:PORT/0`` of a private redis-server without persistence."""
    if not Path(REDIS_SERVER).is_file():
        pytest.fail(f"redis-server not found at {REDIS_SERVER}: install Debian's redis-server (apt-get install redis-server)")
    log = tmp_path_factory.mktemp("redis") / "redis.log"
    with serving(lambda port: [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], "redis-server", log) as port:
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture(scope="session")
def settings(s3_endpoint, redis_url):
    return DistributedSettings(s3_endpoint=s3_endpoint, s3_access_key="testing", s3_secret_key="testing",
                               s3_secure=False, s3_region="us-east-1", broker_url=redis_url,
                               store_url=f"s3://{BUCKET}")


@pytest.fixture(scope="session")
def bucket(settings):
    store = open_store(f"s3://{BUCKET}", settings)
    store.ensure_bucket()
    return BUCKET


