"""Shared fixtures: the real clips in ../shared/data/videos and end-to-end runs of the embedded default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VIDEOS = Path(os.environ.get("SPARKLE_TEST_VIDEOS", REPO.parent / "shared" / "data" / "videos"))
JUGGLE = VIDEOS / "static_01_juggle.mp4"
PEDESTRIANS = VIDEOS / "static_03_pedestrians_vtest.mp4"
HANDHELD = VIDEOS / "moving_01_bedroom.mp4"
SNOW_PROMPT = "Replace the background with a snowy mountain village at dusk, with softly falling snow"


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
    missing = [p for p in (JUGGLE, PEDESTRIANS, HANDHELD) if not p.is_file()]
    if missing:
        raise pytest.UsageError(f"test clips missing: {missing} (set SPARKLE_TEST_VIDEOS)")


@pytest.fixture(scope="session")
def juggle_run(tmp_path_factory):
    """The README's main job on the juggle clip, through the CLI with --json: (summary, out_dir)."""
    out = tmp_path_factory.mktemp("juggle")
    proc = sparkle("replace", JUGGLE, SNOW_PROMPT, "-o", out, "--json", check=True)
    return json.loads(proc.stdout), out
