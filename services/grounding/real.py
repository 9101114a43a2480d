"""``real`` grounding backend: Qwen3-VL-32B-Instruct, through vLLM's OpenAI-compatible API or in-process.

Production runs the model in vLLM (``vllm serve Qwen/Qwen3-VL-32B-Instruct``) and this backend is an
*adapter*: it holds the prompt templates, sends each question as one chat completion (temperature 0, images
as base64 PNG data URLs) with the ``openai`` SDK and parses the answers. :func:`make_backend` picks the path:

- ``url`` option or ``SPARKLE_GROUNDING_URL`` set (e.g. ``http://vllm:8000/v1``): the HTTP adapter
  (:class:`OpenAIChat`), model name from the ``model`` option or ``SPARKLE_GROUNDING_MODEL``
  (default ``Qwen/Qwen3-VL-32B-Instruct``, the name ``vllm serve`` gives it), optional key
  ``SPARKLE_GROUNDING_API_KEY``. The URL wins over ``model_dir``.
- otherwise ``model_dir``: the same prompts and parser on ``transformers``'
  ``Qwen3VLForConditionalGeneration`` in this process (:class:`TransformersChat`), loaded from the local
  directory with ``local_files_only=True``. This is also the path of the ``tiny`` backend.

Boxes follow Qwen3-VL: ``bbox_2d = [x1, y1, x2, y2]`` relative to the image, 0..1000. The parser
(:func:`parse_objects`, :func:`parse_round2`) never raises on model text: whatever cannot be read gives no
object (round 1) or ``bbox_2d = []`` (round 2).

The prompt templates are this project's wording of the questions Sparkle (arXiv 2605.06535) asks Qwen3-VL
(scene description, round-1 foreground subjects on frame 0 of the source and the edited frame, round-2
re-location on frames sampled at 2 FPS, the fine camera-motion check, instruction writing); the answer
format (fenced JSON list of ``{"bbox_2d", "label"}``) is Qwen3-VL's grounding convention.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from sparkle.backends import (GROUNDING_MAX_IMAGE_PIXELS, GROUNDING_MAX_IMAGES, MAX_LABEL_CHARS, GroundedObject,
                              SampleContext)
from sparkle.captions import Captions, captions_from_instruction
from sparkle.errors import ConfigError

MODEL_ID = "Qwen/Qwen3-VL-32B-Instruct"
"""Hub name of the checkpoint, and the model name ``vllm serve Qwen/Qwen3-VL-32B-Instruct`` serves it under."""

ENV_URL = "SPARKLE_GROUNDING_URL"
ENV_MODEL = "SPARKLE_GROUNDING_MODEL"
ENV_API_KEY = "SPARKLE_GROUNDING_API_KEY"

COORD_MAX = 1000
"""Qwen3-VL boxes are relative, 0..1000 (``../shared/reference/formats.md``)."""

CAMERA_SAMPLE_FPS = 2.0
"""Frames of the fine camera-motion check are sampled at 2 FPS (Sparkle; ``CameraFilterConfig.sample_fps``)."""

# --- prompt templates -------------------------------------------------------------------------------------

DESCRIBE_PROMPT = (
    "Describe the scene in this video frame in one sentence: the setting, the lighting and the main "
    "foreground subjects. Answer with the sentence only."
)
"""Scene description of source frame 0 (metadata ``original_scene``). One image."""

ROUND1_PROMPT = (
    "The first image is frame 0 of a video. The second image is the same frame after its background was "
    "replaced.\n"
    "Find the foreground subjects that must be preserved: the people, animals and objects in front of the "
    "background that appear in both images, including what they hold, carry or ride. Do not list the "
    "scenery (buildings, walls, ground, sky, trees, roads).\n"
    "Report the bounding box of each subject on the first image, in relative coordinates from 0 to 1000, "
    "as a JSON list:\n"
    '```json\n[{"bbox_2d": [x1, y1, x2, y2], "label": "person"}]\n```\n'
    'Give every subject a distinct short label ("person 1", "person 2" when there are several of a kind). '
    "If there is no such subject, answer with an empty list: ```json\n[]\n```"
)
"""Round 1: foreground subjects to preserve, boxed on source frame 0. Two images: source, edited frame 0."""

ROUND2_PROMPT = (
    "Locate each of these objects in the image: {labels}.\n"
    "Answer with a JSON list holding exactly one entry per object, in the same order, with its label copied "
    "unchanged and its bounding box in relative coordinates from 0 to 1000:\n"
    '```json\n[{{"bbox_2d": [x1, y1, x2, y2], "label": {first}}}]\n```\n'
    'If an object is not visible in the image, give it "bbox_2d": [].'
)
"""Round 2: every round-1 label re-located on one frame sampled at 2 FPS. ``{labels}``: JSON list of labels."""

CAMERA_MOTION_PROMPT = (
    "These {n} frames were sampled in order at {fps:g} frames per second from one video clip.\n"
    "Is there any residual camera motion (pan, tilt, zoom, rotation, shake or a travelling camera), apart "
    "from the motion of the subjects in the scene?\n"
    'Answer with JSON only: {{"camera_motion": "yes" or "no", "reason": "one short sentence"}}'
)
"""Fine camera-motion check after the optical-flow filter. ``n`` images, oldest first."""

INSTRUCTION_PROMPT = (
    "This image is the first frame of a video. Write an instruction for a video editing model that replaces "
    "the background of this video.\n"
    "Theme: {edit_type}. {target}\n"
    "The instruction must keep every foreground subject unchanged and replace only the background. Describe "
    "the new background concretely and give it natural motion (for example drifting clouds, falling snow, "
    "flowing water or swaying leaves) so that it looks alive. Write one to three sentences in the "
    'imperative, starting like "Replace the background with". Answer with the instruction only.'
)
"""Instruction writing for a theme (``edit_type``) and ``chosen_keyword`` "subtheme: scene". One image."""

CAPTION_PROMPT = (
    "A video editing model will replace the background of a video as this instruction says:\n"
    "{instruction}\n"
    "The foreground subjects that stay are: {labels}.\n"
    "Write two captions for video generation models, as JSON only: "
    '{{"background": "...", "video": "..."}}.\n'
    '"background": the new background alone, without the foreground subjects, with the natural motion the '
    "instruction implies (for example drifting snow, swaying trees, flowing water, moving clouds), seen from a "
    "fixed camera. One or two sentences describing the scene, not an instruction.\n"
    '"video": the final video: the foreground subjects in front of that background, with the same motion, seen '
    "from a fixed camera. One or two sentences."
)
"""Captions for I2V (the empty plate) and Fun-Control (the final video) from the instruction; text only."""

INSTRUCTION_TARGET = "Subtheme: {subtheme}. Scene: {scene}."
INSTRUCTION_FREE_TARGET = "Choose a new background that suits the subjects."

MAX_TOKENS = {"describe": 128, "round1": 1024, "round2": 512, "camera": 256, "instruction": 256, "caption": 256}
"""Answer length caps (tokens): a round-1 list of up to 32 objects is about 25 tokens each."""


# --- answer parsing ---------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)
_OPEN = re.compile(r"[\[{]")
_LABEL_KEYS = ("label", "name", "object", "category")


def _strict_values(piece: str) -> list[Any]:
    """Every JSON value that parses strictly, scanning ``piece`` left to right from each ``[`` or ``{``."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while (m := _OPEN.search(piece, i)) is not None:
        try:
            value, i = decoder.raw_decode(piece, m.start())
            values.append(value)
        except (ValueError, RecursionError):
            i = m.start() + 1
    return values


def _outermost(piece: str) -> str | None:
    """From the first ``[``/``{`` to the last ``]``/``}`` (or to the end when unclosed)."""
    m = _OPEN.search(piece)
    if m is None:
        return None
    end = max(piece.rfind("]"), piece.rfind("}"))
    return piece[m.start():end + 1] if end > m.start() else piece[m.start():]


def extract_json(text: str) -> Any:
    """The JSON list or object of a model answer (fenced or not, amid prose, repaired if malformed); else None.

    Looks in the fenced blocks first, then in the whole text: a strictly valid list of objects (or an empty
    list) wins, then strictly valid objects (several become a list), then ``json_repair.loads`` of the
    outermost brackets (trailing commas, single quotes, unclosed brackets).
    """
    import json_repair

    if not isinstance(text, str):
        return None
    pieces = [m.group(1) for m in _FENCE.finditer(text) if m.group(1).strip()] + [text]
    for piece in pieces:
        values = _strict_values(piece)
        lists = [v for v in values if isinstance(v, list) and (not v or any(isinstance(x, dict) for x in v))]
        if lists:
            return lists[0]
        dicts = [v for v in values if isinstance(v, dict)]
        if dicts:
            return dicts[0] if len(dicts) == 1 else dicts
    for piece in pieces:
        span = _outermost(piece)
        if span is None:
            continue
        try:
            value = json_repair.loads(span)
        except Exception:  # noqa: BLE001 - json_repair on arbitrary model text
            continue
        if isinstance(value, (list, dict)):
            return value
    return None


def normalise_box(value: Any) -> list[int]:
    """A model box to ``[x1, y1, x2, y2]`` ints in 0..1000, corners ordered; ``[]`` if it is not a usable box.

    Accepts 4 numbers, numeric strings, a string holding 4 numbers or ``[[x1, y1], [x2, y2]]``; rounds,
    clamps each coordinate to 0..1000 and orders the corners. Wrong lengths, non-numbers, non-finite values
    and boxes of zero width or height give ``[]``.
    """
    if isinstance(value, str):
        value = re.findall(r"[-+]?\d+(?:\.\d+)?", value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (list, tuple)) for v in value):
        value = [*value[0], *value[1]]
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return []
    coords = []
    for v in value:
        if isinstance(v, bool):
            return []
        try:
            f = float(v)
        except (TypeError, ValueError):
            return []
        if not math.isfinite(f):
            return []
        coords.append(min(max(int(round(f)), 0), COORD_MAX))
    x1, x2 = sorted(coords[0::2])
    y1, y2 = sorted(coords[1::2])
    if x2 <= x1 or y2 <= y1:
        return []
    return [x1, y1, x2, y2]


def _label_of(entry: dict) -> str | None:
    """The entry's label, stripped and cut to :data:`~sparkle.backends.MAX_LABEL_CHARS` (a label is a few words;
    a runaway answer must not become the dataset's metadata), or None."""
    for key in _LABEL_KEYS:
        v = entry.get(key)
        if isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip():
            return str(v).strip()[:MAX_LABEL_CHARS].strip()
    return None


def _entries(value: Any) -> list[dict]:
    """The ``{"bbox_2d", "label"}`` entries of a parsed answer: a list, one entry, or a dict wrapping them."""
    if isinstance(value, dict):
        if any(k in value for k in ("bbox_2d", "bbox", *_LABEL_KEYS)):
            return [value]
        lists = [v for v in value.values() if isinstance(v, list) and any(isinstance(x, dict) for x in v)]
        if lists:
            return _entries(lists[0])
        # {"person": [x1, y1, x2, y2], ...}
        return [{"label": k, "bbox_2d": v} for k, v in value.items() if isinstance(v, (list, tuple))]
    if isinstance(value, list):
        out = []
        for x in value:
            if isinstance(x, dict):
                out.append(x)
            elif isinstance(x, list) and all(isinstance(y, dict) for y in x):
                out.extend(x)
        return out
    return []


def parse_objects(text: str) -> list[tuple[str | None, list[int]]]:
    """Every ``(label or None, bbox_2d)`` of a model answer, in answer order; ``bbox_2d`` normalised (or ``[]``).

    The answer is a JSON list ``[{"bbox_2d": [x1, y1, x2, y2], "label": str}]`` in 0..1000, fenced or not,
    possibly malformed; ``bbox`` is accepted for ``bbox_2d`` and ``name``/``object``/``category`` for
    ``label``. Unreadable text gives ``[]``.
    """
    out = []
    for entry in _entries(extract_json(text)):
        box = entry.get("bbox_2d", entry.get("bbox"))
        out.append((_label_of(entry), normalise_box(box)))
    return out


def parse_round1(text: str) -> list[GroundedObject]:
    """Round-1 answer to objects with a usable box, labels made unique (``"person"``, ``"person 2"``).

    Entries without a usable box are dropped (they name nothing to preserve); a missing label becomes
    ``"object"``. Round 2 re-locates objects by label, hence the unique labels.
    """
    objects, used = [], set()
    for label, box in parse_objects(text):
        if not box:
            continue
        base = label = label or "object"
        k = 1
        while label.casefold() in used:
            k += 1
            label = f"{base} {k}"
        used.add(label.casefold())
        objects.append(GroundedObject(bbox_2d=box, label=label))
    return objects


def parse_round2(text: str, labels: Sequence[str]) -> list[GroundedObject]:
    """Round-2 answer to exactly one object per label, in ``labels`` order (``bbox_2d = []`` if not found).

    Entries are matched to labels by their label (case and surrounding space ignored), first usable box
    wins; entries without a label then fill the labels still unmatched, in order. Entries naming another
    label are ignored.
    """
    boxes: dict[int, list[int]] = {}
    index = {}
    for i, label in enumerate(labels):
        index.setdefault(label.strip().casefold(), i)
    unlabelled = []
    for label, box in parse_objects(text):
        if label is None:
            unlabelled.append(box)
            continue
        i = index.get(label.casefold())
        if i is not None and box and i not in boxes:
            boxes[i] = box
    free = [i for i in range(len(labels)) if i not in boxes]
    for i, box in zip(free, unlabelled):
        if box:
            boxes[i] = box
    return [GroundedObject(bbox_2d=boxes.get(i, []), label=label) for i, label in enumerate(labels)]


def parse_camera_motion(text: str) -> tuple[bool, str]:
    """``(residual camera motion?, reason)`` from a yes/no answer (JSON or plain text).

    Reads ``{"camera_motion": "yes"|"no"|true|false, "reason": str}``, else a leading yes/no word. An
    answer that says neither counts as motion (``True``): the check is a filter, and a clip is kept only
    when the model says the camera is fixed.
    """
    value = extract_json(text)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        flag = next((value[k] for k in ("camera_motion", "answer", "motion") if k in value), None)
        reason = str(value.get("reason", "")).strip()
        if isinstance(flag, bool):
            return flag, reason
        if isinstance(flag, str) and flag.strip().lower() in ("yes", "no"):
            return flag.strip().lower() == "yes", reason
    m = re.match(r"\W*(yes|no)\b[\W]*(.*)", text or "", re.IGNORECASE | re.DOTALL)
    if m:
        return m.group(1).lower() == "yes", " ".join(m.group(2).split())
    return True, f"unreadable answer, counted as camera motion: {(text or '').strip()[:200]!r}"


def parse_captions(text: str, instruction: str, labels: Sequence[str]) -> Captions:
    """:class:`~sparkle.captions.Captions` from a ``{"background", "video"}`` answer (fenced or not), each
    cleaned to one line; an answer without both as non-empty strings gives the rule-based captions
    (``source="rules"``), since the generators need a prompt either way."""
    value = extract_json(text)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        background, video = (clean_text(str(value.get(k) or "")) for k in ("background", "video"))
        if background and video:
            return Captions(background=background, video=video, source="vlm")
    return captions_from_instruction(instruction, list(labels))


def clean_text(text: str) -> str:
    """A free-text answer on one line: fences, surrounding quotes and a leading ``Instruction:`` removed."""
    text = re.sub(r"```[a-zA-Z]*", "", text or "")
    text = " ".join(text.split())
    text = re.sub(r"^(instruction|description|answer)\s*:\s*", "", text, flags=re.IGNORECASE)
    return text.strip().strip('"\'“”').strip()


def split_keyword(chosen_keyword: str | None) -> tuple[str, str]:
    """``"subtheme: scene"`` to ``(subtheme, scene)``; a keyword without ``": "`` is all scene."""
    if not chosen_keyword:
        return "", ""
    subtheme, sep, scene = chosen_keyword.partition(":")
    return (subtheme.strip(), scene.strip()) if sep else ("", chosen_keyword.strip())


# --- chat engines -----------------------------------------------------------------------------------------

Part = str | np.ndarray
"""One piece of a user message: text, or an image ``(H, W, 3) uint8`` RGB."""


def png_data_url(image: np.ndarray) -> str:
    """``(H, W, 3) uint8`` RGB to a ``data:image/png;base64,...`` URL (lossless)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def check_image_count(parts: Sequence[Part]) -> None:
    """ValueError when ``parts`` hold more than :data:`~sparkle.backends.GROUNDING_MAX_IMAGES` images (vLLM
    refuses such a request; the backend subsamples or splits before asking)."""
    n = sum(isinstance(p, np.ndarray) for p in parts)
    if n > GROUNDING_MAX_IMAGES:
        raise ValueError(f"{n} images in one grounding request; at most {GROUNDING_MAX_IMAGES}")


def bound_image_tokens(processor, max_pixels: int = GROUNDING_MAX_IMAGE_PIXELS) -> None:
    """Cap the image processor's pixels per image at ``max_pixels`` (in-process, as vLLM's
    ``--mm-processor-kwargs '{"max_pixels": ...}'`` does on the server): ``size["longest_edge"]``, the
    transformers 5 name of Qwen-VL's ``max_pixels``. A checkpoint whose own cap is lower keeps it."""
    ip = processor.image_processor
    size = dict(ip.size or {})
    size["longest_edge"] = min(int(size.get("longest_edge") or max_pixels), max_pixels)
    ip.size = size
    if hasattr(ip, "max_pixels"):
        ip.max_pixels = size["longest_edge"]


def evenly(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``0..n-1``, first and last included (all of them when ``n <= k``)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


class OpenAIChat:
    """Chat completions over an OpenAI-compatible server (vLLM serving Qwen3-VL), one user turn per question.

    ``base_url``: the server's API root (``/v1`` is appended when missing). Requests: ``temperature=0``
    (greedy), images as base64 PNG data URLs before the text. ``setup()`` waits up to ``startup_timeout_s``
    for the server (vLLM loads a 32B model for minutes) and checks that it serves ``model``.
    """

    def __init__(self, base_url: str, model: str = MODEL_ID, api_key: str | None = None, timeout_s: float = 300.0,
                 startup_timeout_s: float = 900.0, max_concurrency: int = 8):
        base_url = base_url.rstrip("/")
        self.base_url = base_url if base_url.endswith("/v1") else base_url + "/v1"
        self.model = model
        self.api_key = api_key or "EMPTY"  # vLLM accepts any key unless started with --api-key
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.max_concurrency = max_concurrency
        self.client = None

    def setup(self) -> None:
        import openai

        self.client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout_s,
                                    max_retries=2)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            try:
                served = [m.id for m in self.client.models.list()]
                break
            except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError) as exc:
                if time.monotonic() >= deadline:
                    raise ConfigError(f"grounding server {self.base_url} not reachable after "
                                      f"{self.startup_timeout_s:g} s: {exc}") from exc
                time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
        if self.model not in served:
            raise ConfigError(f"grounding server {self.base_url} serves {served}, not {self.model!r} "
                              f"(set {ENV_MODEL})")

    def complete(self, parts: Sequence[Part], max_tokens: int) -> str:
        """The answer text to one user message made of ``parts``."""
        if self.client is None:
            raise RuntimeError("OpenAIChat.setup() was not called")
        check_image_count(parts)
        content = [{"type": "image_url", "image_url": {"url": png_data_url(p)}} if isinstance(p, np.ndarray)
                   else {"type": "text", "text": p} for p in parts]
        response = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=max_tokens)
        return response.choices[0].message.content or ""


class TransformersChat:
    """The same questions answered in-process by ``Qwen3VLForConditionalGeneration`` + ``Qwen3VLProcessor``.

    Either ``model_dir`` (a local checkpoint: loaded in ``setup()`` with ``local_files_only=True``) or
    ``build`` (a function returning ``(model, processor)``, used by the tiny backend). Greedy decoding
    (``do_sample=False``, the equivalent of temperature 0); ``max_new_tokens`` caps every answer's length.
    bf16 on CUDA, fp32 on CPU.
    """

    max_concurrency = 1

    def __init__(self, model_dir: str | Path | None = None, device: str | None = None,
                 build: Callable[[], tuple[Any, Any]] | None = None, max_new_tokens: int | None = None):
        if model_dir is None and build is None:
            raise ConfigError("TransformersChat needs model_dir or build")
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.device = device
        self.build = build
        self.max_new_tokens = max_new_tokens
        self.model = None
        self.processor = None

    def setup(self) -> None:
        if self.model is not None:
            return
        import torch
        from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if str(self.device).startswith("cuda") else torch.float32
        if self.build is not None:
            model, self.processor = self.build()
            model = model.to(device=self.device, dtype=dtype)
        else:
            self.processor = AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
            bound_image_tokens(self.processor)
            model = Qwen3VLForConditionalGeneration.from_pretrained(
                self.model_dir, local_files_only=True, dtype=dtype, device_map=self.device)
        self.model = model.eval()

    def complete(self, parts: Sequence[Part], max_tokens: int) -> str:
        """The answer text to one user message made of ``parts`` (greedy, at most ``max_tokens`` new tokens)."""
        import torch

        if self.model is None:
            raise RuntimeError("TransformersChat.setup() was not called")
        check_image_count(parts)
        content = [{"type": "image", "image": Image.fromarray(np.ascontiguousarray(p, dtype=np.uint8))}
                   if isinstance(p, np.ndarray) else {"type": "text", "text": p} for p in parts]
        inputs = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt")
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)
        n = min(max_tokens, self.max_new_tokens) if self.max_new_tokens else max_tokens
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=n, do_sample=False, temperature=None, top_p=None,
                                      top_k=None)
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new, skip_special_tokens=True)[0]


# --- the backend ------------------------------------------------------------------------------------------

class QwenGrounder:
    """Grounder (:class:`sparkle.backends.Grounder`) on Qwen3-VL: prompt templates + answer parser over a chat engine.

    ``engine``: :class:`OpenAIChat` (production, vLLM) or :class:`TransformersChat` (in-process; ``tiny``).
    Images are ``(H, W, 3) uint8`` RGB; boxes ``[x1, y1, x2, y2]`` in 0..1000 or ``[]``.
    """

    def __init__(self, engine: OpenAIChat | TransformersChat, name: str):
        self.engine = engine
        self.name = name

    @property
    def max_concurrency(self) -> int:
        """Requests the service may run at once: many against a vLLM server (continuous batching), one for a
        model in this process. The server shell reads it (``SPARKLE_SERVE_MAX_CONCURRENCY`` overrides it)."""
        return self.engine.max_concurrency

    def setup(self) -> None:
        """Load the model (in-process) or connect to the server (HTTP), once."""
        self.engine.setup()

    def _ask(self, parts: Sequence[Part], kind: str) -> str:
        return self.engine.complete(parts, MAX_TOKENS[kind])

    def describe_scene(self, ctx: SampleContext, image: np.ndarray) -> str:
        """One sentence describing ``image`` ``(H, W, 3) uint8`` (metadata ``original_scene``)."""
        return clean_text(self._ask([image, DESCRIBE_PROMPT], "describe"))

    def ground_round1(self, ctx: SampleContext, source_frame0: np.ndarray,
                      edited_frame0: np.ndarray) -> list[GroundedObject]:
        """Foreground subjects to preserve, boxed on ``source_frame0`` (both ``(H, W, 3) uint8``); unique labels."""
        return parse_round1(self._ask([source_frame0, edited_frame0, ROUND1_PROMPT], "round1"))

    def round2_prompt(self, labels: Sequence[str]) -> str:
        """The round-2 question for ``labels``."""
        return ROUND2_PROMPT.format(labels=json.dumps(list(labels), ensure_ascii=False),
                                    first=json.dumps(labels[0] if labels else "person", ensure_ascii=False))

    def ground_round2(self, ctx: SampleContext, frames: np.ndarray, frame_indices: list[int],
                      labels: list[str]) -> list[list[GroundedObject]]:
        """Every label re-located on each of ``frames`` ``(N, H, W, 3) uint8``: N lists of ``len(labels)`` objects.

        One question per frame (sent concurrently to a server). With no labels, N empty lists.
        """
        if not labels:
            return [[] for _ in range(len(frames))]
        prompt = self.round2_prompt(labels)

        def one(frame: np.ndarray) -> list[GroundedObject]:
            return parse_round2(self._ask([frame, prompt], "round2"), labels)

        workers = min(self.engine.max_concurrency, len(frames))
        if workers <= 1:
            return [one(f) for f in frames]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, frames))

    def check_camera_motion(self, ctx: SampleContext, frames: np.ndarray,
                            sample_fps: float = CAMERA_SAMPLE_FPS) -> tuple[bool, str]:
        """Fine camera-motion check on ``frames`` ``(N, H, W, 3) uint8`` sampled at ``sample_fps``.

        Returns ``(True, reason)`` when the model sees residual camera motion (or gives no readable answer). More
        than :data:`~sparkle.backends.GROUNDING_MAX_IMAGES` frames (a clip over 7.5 s at 2 FPS) are subsampled
        evenly, first and last kept, and the prompt states their actual rate.
        """
        keep = evenly(len(frames), GROUNDING_MAX_IMAGES)  # at most 16 images a request: spread over the clip
        fps = sample_fps * (len(keep) - 1) / (len(frames) - 1) if len(frames) > 1 else sample_fps
        prompt = CAMERA_MOTION_PROMPT.format(n=len(keep), fps=fps)
        return parse_camera_motion(self._ask([*frames[keep], prompt], "camera"))

    def write_instruction(self, ctx: SampleContext, frame0: np.ndarray, edit_type: str,
                          chosen_keyword: str | None) -> str:
        """A background-replacement instruction for ``frame0`` ``(H, W, 3) uint8``, theme ``edit_type``.

        ``chosen_keyword``: ``"subtheme: scene"`` (e.g. ``"urban: rooftop overlooking skyline"``), or None for
        ``openve3m`` samples, which have none.
        """
        subtheme, scene = split_keyword(chosen_keyword)
        target = INSTRUCTION_TARGET.format(subtheme=subtheme or edit_type, scene=scene) if scene \
            else INSTRUCTION_FREE_TARGET
        return clean_text(self._ask([frame0, INSTRUCTION_PROMPT.format(edit_type=edit_type, target=target)],
                                    "instruction"))

    def caption(self, ctx: SampleContext, instruction: str, labels: list[str]) -> Captions:
        """The I2V and Fun-Control prompts for ``instruction`` and the round-1 ``labels`` (text only; see
        :mod:`sparkle.captions`); an unreadable answer falls back to the rule-based captions."""
        prompt = CAPTION_PROMPT.format(instruction=instruction, labels=", ".join(labels) or "none")
        return parse_captions(self._ask([prompt], "caption"), instruction, labels)


# --- construction -----------------------------------------------------------------------------------------

def check_model_dir(model_dir: str | Path | None) -> Path:
    """Return ``model_dir`` if it holds a transformers Qwen3-VL checkpoint; else ConfigError naming what is missing.

    Needs ``config.json``, a tokenizer (``tokenizer.json`` or ``tokenizer_config.json``), a processor config
    (``preprocessor_config.json`` or ``processor_config.json``) and the weights (``*.safetensors``, every
    shard named in ``model.safetensors.index.json``).
    """
    if model_dir is None:
        raise ConfigError(f"grounding real backend: set {ENV_URL} (a vLLM server, e.g. http://vllm:8000/v1) "
                          f"or give --model-dir (a local {MODEL_ID} checkpoint)")
    d = Path(model_dir)
    if not d.is_dir():
        raise ConfigError(f"grounding model directory not found: {d}")
    missing = [str(d / "config.json")] if not (d / "config.json").is_file() else []
    for what, names in (("tokenizer", ("tokenizer.json", "tokenizer_config.json")),
                        ("processor config", ("preprocessor_config.json", "processor_config.json"))):
        if not any((d / n).is_file() for n in names):
            missing.append(f"{d / names[0]} (or {names[1]}: the {what})")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing += [str(d / s) for s in shards if not (d / s).is_file()]
    elif not any(d.glob("*.safetensors")):
        missing.append(f"{d / 'model.safetensors'} (the weights)")
    if missing:
        raise ConfigError(f"incomplete grounding checkpoint in {d}: missing {', '.join(missing)}")
    return d


def make_backend(model_dir: str | Path | None = None, device: str | None = None, **options) -> QwenGrounder:
    """The production grounder (not set up).

    Options: ``url`` (else ``SPARKLE_GROUNDING_URL``): the vLLM server, which wins over ``model_dir``;
    ``model`` (else ``SPARKLE_GROUNDING_MODEL``, default ``Qwen/Qwen3-VL-32B-Instruct``); ``api_key`` (else
    ``SPARKLE_GROUNDING_API_KEY``); ``timeout_s`` (per request, default 300), ``startup_timeout_s``
    (default 900), ``max_concurrency`` (round-2 frames in flight, default 8). Without a URL, ``model_dir``
    is a local checkpoint run in-process on ``device`` (default cuda if available). Raises ConfigError when
    neither is given or the directory is incomplete.
    """
    url = options.get("url") or os.environ.get(ENV_URL)
    if url:
        model = options.get("model") or os.environ.get(ENV_MODEL) or MODEL_ID
        engine = OpenAIChat(url, model, options.get("api_key") or os.environ.get(ENV_API_KEY),
                            timeout_s=float(options.get("timeout_s", 300.0)),
                            startup_timeout_s=float(options.get("startup_timeout_s", 900.0)),
                            max_concurrency=int(options.get("max_concurrency", 8)))
        return QwenGrounder(engine, name=f"qwen3-vl-openai:{model}")
    d = check_model_dir(model_dir)
    engine = TransformersChat(d, device=device, max_new_tokens=options.get("max_new_tokens"))
    return QwenGrounder(engine, name=f"qwen3-vl-transformers:{d.name}")
