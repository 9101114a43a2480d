"""``real`` EditScore backend: EditScore-7B (Qwen2.5-VL-7B-Instruct + the EditScore LoRA) judged with the
``editscore`` package's own prompts and output parser.

What comes from ``editscore`` 0.2 (read from its code, not copied):

- the prompts: ``EditScore(backbone="none", score_range=25).SC_prompt`` / ``.PQ_prompt`` (the package's
  ``vie_prompts`` with every ``10`` of the scale replaced by ``score_range``; ``<instruction>`` is replaced by
  the edit instruction), wrapped by ``editscore.mllm_tools.qwen25vl.apply_chat_template`` (its own
  ``<img1>: <|vision_start|><|image_pad|><|vision_end|>`` template) and the images resized by
  ``qwen_vl_utils.process_vision_info`` exactly as ``Qwen25VL.prepare_input`` does;
- the sampling: ``do_sample=True, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=512``, seed 42
  (``EditScore.__init__`` defaults and ``Qwen25VL.inference``); the LoRA is merged (``merge_and_unload``)
  as ``Qwen25VL.__init__`` does; bfloat16 on CUDA (float32 on CPU);
- the parser: ``editscore.json_parser.parse_vlm_output_to_dict`` (the one ``EditScore.batch_evaluate`` uses);
- the formula: ``SC = min(SC criteria) / (score_range / 10)``, ``PQ = min(PQ criteria) / (score_range / 10)``,
  ``O = sqrt(SC * PQ)``, all 0..10;
- the self-ensemble: ``num_pass`` passes (pass ``i`` sampled with seed ``seed + i``), reduced by
  ``average_last`` (every score, ``O`` included, is the mean of its per-pass values; ``average_first`` instead
  takes ``O`` from the averaged sub-scores), as ``EditScore.evaluate`` / ``batch_evaluate`` do. **Sparkle's
  records are 4-pass averages** (``NUM_PASS``): its README's example ``SC 9.0, PQ 8.5, O 8.71996`` cannot be one
  pass (``sqrt(9.0 * 8.5) = 8.746``), and 4 passes of integer 0..25 answers reproduce all five example
  records of the README exactly (``tests/services/test_editscore_models.py``); its gates (8, 8.5, mean 8) were
  set on such averages. Reasonings and raw outputs: the last pass's for image scores (``evaluate``), the first
  pass's for frame scores (``batch_evaluate``); every pass's scores are kept in ``passes``.

Why not ``EditScore(backbone="qwen25vl")`` itself: its Qwen25VL wrapper loads by hub name with
``device_map="auto"`` and moves inputs to ``"cuda"`` unconditionally, and its ``evaluate`` retries and finally
*guesses a random score* when parsing fails. Here :class:`QwenVLJudge` loads from local directories onto
``device``, scores all prompts of a call in one batched ``generate`` (left padding), and reuses the
package's prompt, template and parser functions.

Mapping onto the interface (``score_range`` = 25 by default):

- ``ImageScore.prompt_following`` = SC criterion 1 ("editing success") / 2.5, ``consistency`` = SC criterion 2
  ("degree of overediting") / 2.5, ``perceptual_quality`` = min(naturalness, artifacts) / 2.5,
  ``overall`` = sqrt(min(prompt_following, consistency) * perceptual_quality); ``SC_reasoning`` /
  ``PQ_reasoning`` = the model's ``"reasoning"`` strings (as ``EditScore.evaluate``).
- ``FrameScore``: ``SC_score``, ``PQ_score``, ``O_score``, the two reasonings and ``SC_raw_output`` /
  ``PQ_raw_output`` = the raw generated texts (as ``EditScore.batch_evaluate``).
- Both tasks use the same SC prompt (EditScore has one for every kind of edit): the orchestrator passes a
  removal instruction for ``remove_foreground``. SC sees ``[source, edited]``, PQ sees ``edited`` only.

Malformed outputs (deliberate difference from the package): an output whose parse does not give exactly
2 scores, each in ``0..score_range``, or that the parser cannot read at all, scores **0** for that half
(SC or PQ criteria all 0, hence ``O = 0``) and its reasoning starts with ``[unparsable EditScore output: ...]``.
``batch_evaluate`` would put a neutral ``score_range / 2`` there and ``evaluate`` a random guess; a quality
gate must fail closed instead.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sparkle.backends import FrameScore, ImageScore, SampleContext
from sparkle.errors import ConfigError

SCORER = "EditScore-7B"
"""Records' ``scorer``: the checkpoint (hub ``EditScore/EditScore-7B`` on ``Qwen/Qwen2.5-VL-7B-Instruct``)."""

ENV_URL = "SPARKLE_EDITSCORE_URL"
"""An OpenAI-compatible server (``vllm serve``) to score with instead of a local checkpoint (``url`` option)."""

ENV_MODEL = "SPARKLE_EDITSCORE_MODEL"
SCORER_SERVED = "EditScore/EditScore-7B"
"""The served model name the server is asked for by default (``--served-model-name``; ``model`` option)."""

SCORE_RANGE = 25
"""The scale the model was trained on (``EditScore(score_range=25)``, the package default and model card)."""

N_CRITERIA = 2
"""Scores per answer: SC ``[editing success, overediting]``, PQ ``[naturalness, artifacts]`` (the prompts)."""

TASKS = ("edit_background", "remove_foreground")

NUM_PASS = 4
"""Passes averaged per score: Sparkle's records are 4-pass averages (EditScore's ``num_pass=4``, see above)."""

REDUCTIONS = ("average_last", "average_first")
"""EditScore's ``reduction``: ``average_last`` (default) averages per-pass ``O``; ``average_first`` recomputes
``O`` from the averaged sub-scores."""


@dataclass(frozen=True)
class Sampling:
    """Generation parameters of ``editscore.mllm_tools.qwen25vl.Qwen25VL.inference`` and ``EditScore`` defaults."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 20
    max_new_tokens: int = 512
    seed: int = 42


def _import_editscore():
    """Import ``editscore`` and drop the relative ``"editscore"`` entry its ``__init__`` puts first on
    ``sys.path`` (``sys.path.insert(0, 'editscore')``): from a working directory holding a folder of that
    name (e.g. ``services/``), it would make that folder's modules importable as top-level ones."""
    import editscore

    while "editscore" in sys.path:
        sys.path.remove("editscore")
    return editscore


def editscore_prompts(score_range: int = SCORE_RANGE) -> tuple[str, str]:
    """``(SC_prompt, PQ_prompt)`` exactly as ``editscore.EditScore`` builds them; SC holds ``<instruction>``.

    ``backbone="none"`` matches no branch of ``EditScore.__init__``, so no model is created.
    """
    scorer = _import_editscore().EditScore(backbone="none", score_range=score_range)
    return scorer.SC_prompt, scorer.PQ_prompt


def parse_judgement(text: str, score_range: int = SCORE_RANGE) -> tuple[list[float] | None, str]:
    """Parse one model answer with ``editscore.json_parser.parse_vlm_output_to_dict``.

    Returns ``(criteria, reasoning)``: ``criteria`` = the 2 scores rescaled to 0..10 (``/ (score_range / 10)``),
    or None when the answer is malformed (parser error, not exactly 2 scores, a score outside
    ``0..score_range``); ``reasoning`` then starts with ``[unparsable EditScore output: why]``.
    """
    from editscore.json_parser import parse_vlm_output_to_dict

    try:
        parsed = parse_vlm_output_to_dict(text)
        raw = [float(s) for s in parsed["score"]]
        reasoning = str(parsed.get("reasoning") or "")
    except Exception as exc:  # noqa: BLE001 - the parser raises ValueError on e.g. "score": ["high", 3]
        return None, f"[unparsable EditScore output: {exc.__class__.__name__}: {exc}] {text}"
    if len(raw) != N_CRITERIA:
        return None, f"[unparsable EditScore output: {len(raw)} scores {raw}, expected {N_CRITERIA}] {reasoning}"
    if not all(0.0 <= s <= score_range for s in raw):  # also refuses nan
        return None, f"[unparsable EditScore output: scores {raw} outside 0..{score_range}] {reasoning}"
    return [s / (score_range / 10) for s in raw], reasoning


class QwenVLJudge:
    """The VLM: Qwen2.5-VL (+ merged LoRA) and its processor, generating EditScore answers in batches.

    ``load`` returns ``(model, processor)`` (model on ``device``, eval mode); it runs once, in ``setup()``.
    """

    def __init__(self, load: Callable[[], tuple], device: str, sampling: Sampling = Sampling()):
        self._load = load
        self.device = device
        self.sampling = sampling
        self.model = None
        self.processor = None

    def setup(self) -> None:
        if self.model is None:
            self.model, self.processor = self._load()
            self.processor.tokenizer.padding_side = "left"  # batched generation continues on the right

    def generate(self, requests: list[tuple[list[np.ndarray], str]], seed: int | None = None) -> list[str]:
        """One answer per ``(images, prompt)``; images ``(H, W, 3) uint8`` RGB, 1 or 2 per prompt.

        All requests go through one ``generate`` call (EditScore's template, images resized by
        ``qwen_vl_utils.process_vision_info``), sampled after seeding with ``seed`` (default
        ``sampling.seed``); answers are decoded without special tokens and stripped.
        """
        import torch
        from editscore.mllm_tools.qwen25vl import apply_chat_template
        from PIL import Image
        from qwen_vl_utils import process_vision_info

        texts, images = [], []
        for frames, prompt in requests:
            pils = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
            messages = [{"role": "user", "content": [{"type": "image", "image": im} for im in pils]
                         + [{"type": "text", "text": prompt}]}]
            texts.append(apply_chat_template(prompt, num_images=len(pils)))
            images.extend(process_vision_info(messages)[0])
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        inputs = inputs.to(self.model.device)
        s = self.sampling
        torch.manual_seed(s.seed if seed is None else seed)  # seeds CUDA too; EditScore's set_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=s.max_new_tokens, do_sample=True,
                                      temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        answers = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                              clean_up_tokenization_spaces=False)
        return [a.strip() for a in answers]


class OpenAIJudge:
    """The VLM behind an OpenAI-compatible server (``vllm serve`` of EditScore-7B, the LoRA merged or served with
    ``--lora-modules``): the same answers :class:`QwenVLJudge` generates, over HTTP.

    Each request is one user message rendering exactly EditScore's own template
    (``editscore.mllm_tools.qwen25vl.apply_chat_template``): ``"<img1>: "``, image 1, ``"<img2>: "``, image 2,
    then the prompt, which Qwen2.5-VL's chat template turns into ``<img1>: <|vision_start|><|image_pad|>
    <|vision_end|>...`` after the default system turn. Sampling as EditScore's vLLM backend
    (``qwen25vl_vllm.Qwen25VL.batch_inference``): temperature 0.7, top_p 0.9, top_k 20, 512 tokens, ``seed``.
    The requests of one call are sent concurrently (``max_concurrency``), so the server batches them.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 300.0,
                 sampling: Sampling = Sampling(), max_concurrency: int = 16):
        base_url = base_url.rstrip("/")
        self.base_url = base_url if base_url.endswith("/v1") else base_url + "/v1"
        self.model, self.api_key, self.timeout_s = model, api_key or "EMPTY", timeout_s
        self.sampling, self.max_concurrency = sampling, max_concurrency
        self.client = None

    def setup(self) -> None:
        """Connect and check that the server serves ``model`` (ConfigError otherwise)."""
        import openai

        self.client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout_s,
                                    max_retries=2)
        try:
            served = [m.id for m in self.client.models.list()]
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            raise ConfigError(f"EditScore server {self.base_url} not reachable: {exc}") from exc
        if self.model not in served:
            raise ConfigError(f"EditScore server {self.base_url} serves {served}, not {self.model!r}")

    @staticmethod
    def content(frames: list[np.ndarray], prompt: str) -> list[dict]:
        """The message parts of one request (see the class docstring); images as PNG data URLs."""
        import base64
        import io

        from PIL import Image

        parts: list[dict] = []
        for i, frame in enumerate(frames, 1):
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(frame)).save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
            parts += [{"type": "text", "text": f"<img{i}>: "}, {"type": "image_url", "image_url": {"url": url}}]
        return parts + [{"type": "text", "text": prompt}]

    def generate(self, requests: list[tuple[list[np.ndarray], str]], seed: int | None = None) -> list[str]:
        """One answer per ``(images, prompt)``, sampled with ``seed`` (default ``sampling.seed``), stripped."""
        from concurrent.futures import ThreadPoolExecutor

        if self.client is None:
            raise RuntimeError("OpenAIJudge.setup() was not called")
        s = self.sampling

        def one(request) -> str:
            frames, prompt = request
            response = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": self.content(frames, prompt)}],
                temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                seed=s.seed if seed is None else seed, extra_body={"top_k": s.top_k})
            return (response.choices[0].message.content or "").strip()

        with ThreadPoolExecutor(max(1, min(self.max_concurrency, len(requests)))) as pool:
            return list(pool.map(one, requests))


class EditScoreScorer:
    """The :class:`sparkle.backends.Scorer` on a judge with ``setup()`` and ``generate(requests) -> [str]``.

    ``max_batch``: prompts per ``generate`` call (8 = the 4 frames of stage 5, SC + PQ each). ``num_pass``:
    passes averaged per score (:data:`NUM_PASS`); ``reduction``: one of :data:`REDUCTIONS`; ``seed``: pass
    ``i`` is sampled with ``seed + i`` (default: the judge's sampling seed, EditScore's 42). Raises
    ValueError for ``num_pass < 1`` or an unknown reduction.
    """

    def __init__(self, judge, name: str = SCORER, score_range: int = SCORE_RANGE, max_batch: int = 8,
                 num_pass: int = NUM_PASS, reduction: str = "average_last", seed: int | None = None):
        if int(num_pass) < 1:
            raise ValueError(f"num_pass must be >= 1, got {num_pass}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.judge = judge
        self.name = name
        self.score_range = score_range
        self.max_batch = max_batch
        self.num_pass, self.reduction = int(num_pass), reduction
        self.seed = seed if seed is not None else getattr(getattr(judge, "sampling", None), "seed", Sampling.seed)
        self.sc_prompt, self.pq_prompt = editscore_prompts(score_range)

    def setup(self) -> None:
        """Load the judge's weights (once)."""
        self.judge.setup()

    def _judge(self, pairs: list[tuple[np.ndarray, np.ndarray]],
               instruction: str | list[str]) -> list[list[dict]]:
        """SC on each ``(source, edited)`` and PQ on each ``edited``, SC prompts first (as ``batch_evaluate``),
        ``num_pass`` times.

        ``instruction``: one for every pair, or one per pair (pairs of several requests judged together).
        Returns one list per pair: its ``num_pass`` passes in order, each ``{"sc": [2 criteria], "SC", "PQ",
        "O", "sc_reason", "pq_reason", "sc_raw", "pq_raw"}`` (0..10).
        """
        instructions = [instruction] * len(pairs) if isinstance(instruction, str) else list(instruction)
        requests = ([([a, b], self.sc_prompt.replace("<instruction>", text)) for (a, b), text in zip(pairs, instructions)]
                    + [([b], self.pq_prompt) for _, b in pairs])
        n = len(pairs)
        out: list[list[dict]] = [[] for _ in pairs]
        for p in range(self.num_pass):
            answers = []
            for i in range(0, len(requests), self.max_batch):
                answers += self.judge.generate(requests[i:i + self.max_batch], seed=self.seed + p)
            for k, (sc_raw, pq_raw) in enumerate(zip(answers[:n], answers[n:])):
                sc_crit, sc_reason = parse_judgement(sc_raw, self.score_range)
                pq_crit, pq_reason = parse_judgement(pq_raw, self.score_range)
                sc_crit, pq_crit = sc_crit or [0.0] * N_CRITERIA, pq_crit or [0.0] * N_CRITERIA
                sc_score, pq_score = min(sc_crit), min(pq_crit)
                out[k].append({"sc": sc_crit, "SC": sc_score, "PQ": pq_score, "O": math.sqrt(sc_score * pq_score),
                               "sc_reason": sc_reason, "pq_reason": pq_reason, "sc_raw": sc_raw, "pq_raw": pq_raw})
        return out

    def image_score(self, passes: list[dict]) -> ImageScore:
        """Reduce one image's passes as ``EditScore.evaluate``: sub-scores and ``overall`` are per-pass means
        (``average_first``: ``overall = sqrt(prompt_following * perceptual_quality)`` of the means, as there);
        reasonings of the last pass. ``passes`` keeps every pass's four scores."""
        per_pass = [{"prompt_following": p["sc"][0], "consistency": p["sc"][1], "perceptual_quality": p["PQ"],
                     "overall": p["O"]} for p in passes]
        mean = {k: float(np.mean([p[k] for p in per_pass])) for k in per_pass[0]}
        if self.reduction == "average_first":
            mean["overall"] = math.sqrt(mean["prompt_following"] * mean["perceptual_quality"])
        return ImageScore(**mean, SC_reasoning=passes[-1]["sc_reason"], PQ_reasoning=passes[-1]["pq_reason"],
                          passes=per_pass)

    def frame_score(self, passes: list[dict]) -> FrameScore:
        """Reduce one frame's passes as ``EditScore.batch_evaluate``: ``SC_score``, ``PQ_score``, ``O_score``
        are per-pass means (``average_first``: ``O = sqrt(SC * PQ)`` of the means); reasonings and raw outputs
        of the first pass. ``passes`` keeps every pass's three scores."""
        per_pass = [{"SC_score": p["SC"], "PQ_score": p["PQ"], "O_score": p["O"]} for p in passes]
        mean = {k: float(np.mean([p[k] for p in per_pass])) for k in per_pass[0]}
        if self.reduction == "average_first":
            mean["O_score"] = math.sqrt(mean["SC_score"] * mean["PQ_score"])
        first = passes[0]
        return FrameScore(**mean, SC_score_reasoning=first["sc_reason"], PQ_score_reasoning=first["pq_reason"],
                          SC_raw_output=first["sc_raw"], PQ_raw_output=first["pq_raw"], passes=per_pass)

    def score_image(self, ctx: SampleContext, source: np.ndarray, edited: np.ndarray,
                    instruction: str, task: str) -> ImageScore:
        """Score one edit of ``source`` into ``edited`` (``(H, W, 3) uint8``, sizes may differ); scores 0..10.

        ``task``: ``"edit_background"`` or ``"remove_foreground"`` (else ValueError); both use EditScore's one
        SC prompt, the instruction says what the edit was (a removal instruction for ``remove_foreground``).
        """
        return self.score_image_batch([(ctx, source, edited, instruction, task)])[0]

    def score_image_batch(self, items: list[tuple]) -> list[ImageScore]:
        """:meth:`score_image` of several requests ``(ctx, source, edited, instruction, task)``, their SC and PQ
        prompts generated together (``max_batch`` at a time)."""
        for *_, task in items:
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        results = self._judge([(source, edited) for _, source, edited, _, _ in items], [i[3] for i in items])
        return [self.image_score(passes) for passes in results]

    def score_frames(self, ctx: SampleContext, source: np.ndarray, edited: np.ndarray,
                     frame_indices: list[int], instruction: str) -> list[FrameScore]:
        """One :class:`FrameScore` per index (source and edited ``(T, H, W, 3) uint8``), batched generation."""
        return self.score_frames_batch([(ctx, source, edited, frame_indices, instruction)])[0]

    def score_frames_batch(self, items: list[tuple]) -> list[list[FrameScore]]:
        """:meth:`score_frames` of several requests ``(ctx, source, edited, frame_indices, instruction)``, all
        their frames' SC and PQ prompts generated together (``max_batch`` at a time)."""
        pairs, instructions, counts = [], [], []
        for _, source, edited, frame_indices, instruction in items:
            if any(not 0 <= i < len(edited) for i in frame_indices):
                raise ValueError(f"frame_indices {frame_indices} outside 0..{len(edited) - 1}")
            pairs += [(source[i], edited[i]) for i in frame_indices]
            instructions += [instruction] * len(frame_indices)
            counts.append(len(frame_indices))
        scores = [self.frame_score(passes) for passes in self._judge(pairs, instructions)]
        out, start = [], 0
        for n in counts:
            out.append(scores[start:start + n])
            start += n
        return out


def default_device(device: str | None) -> str:
    """``device`` or ``"cuda"`` when available, else ``"cpu"``."""
    if device:
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


BASE_FILES = (("config.json",), ("*.safetensors", "*.bin"), ("preprocessor_config.json", "processor_config.json"),
              ("tokenizer.json", "vocab.json"))
"""What ``model_dir/base`` must hold (each tuple: one of these names or patterns)."""

LORA_FILES = (("adapter_config.json",), ("adapter_model.safetensors", "adapter_model.bin"))
"""What ``model_dir/lora`` must hold (peft ``save_pretrained`` output)."""


def _check_dir(path: Path, what: str, needs: tuple[tuple[str, ...], ...]) -> None:
    """ConfigError naming ``path`` or its missing files unless each group of ``needs`` has a match."""
    if not path.is_dir():
        raise ConfigError(f"EditScore {what} directory not found: {path}")
    missing = [str(path / group[0]) for group in needs if not any(any(path.glob(g)) for g in group)]
    if missing:
        raise ConfigError(f"EditScore {what} directory {path} is incomplete; missing: {', '.join(missing)}")


def load_qwen25vl(base_dir: Path, lora_dir: Path | None, device: str, dtype=None) -> tuple:
    """Qwen2.5-VL from ``base_dir`` (+ the LoRA in ``lora_dir``, merged) on ``device``, and its processor.

    Local files only, loaded straight onto ``device`` (the LoRA is merged there). ``dtype``: bfloat16 on CUDA
    (``Qwen25VL.__init__``), float32 on CPU, unless given.
    """
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, dtype=dtype, device_map=device,
                                                               local_files_only=True)
    if lora_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(lora_dir)).merge_and_unload()
    processor = AutoProcessor.from_pretrained(base_dir, local_files_only=True)
    return model.eval(), processor


def make_backend(model_dir=None, device=None, **options) -> EditScoreScorer:
    """The EditScore-7B backend, checked (not loaded) here; ``setup()`` loads it.

    Layout: ``model_dir/base/`` = ``Qwen/Qwen2.5-VL-7B-Instruct`` (config, weights, processor and tokenizer
    files) and ``model_dir/lora/`` = ``EditScore/EditScore-7B`` (``adapter_config.json`` + adapter weights).
    Options: ``base_dir`` / ``lora_dir`` (override the two folders; then ``model_dir`` may be None),
    ``merged=True`` (``base_dir``/``model_dir`` already holds the LoRA merged in, e.g. the folder EditScore's
    vLLM path writes: no ``lora/``), ``name``, ``score_range`` (25), ``max_batch`` (8), ``num_pass`` (4),
    ``reduction`` (``average_last``), ``temperature``,
    ``top_p``, ``top_k``, ``max_new_tokens``, ``seed`` (see :class:`Sampling`). Raises ConfigError naming
    every missing path.

    ``url`` (or ``SPARKLE_EDITSCORE_URL``): score through an OpenAI-compatible server instead
    (:class:`OpenAIJudge`; ``vllm serve`` of EditScore-7B with the LoRA merged), ``model`` its served name
    (``SPARKLE_EDITSCORE_MODEL``, default ``EditScore/EditScore-7B``), ``api_key``; ``model_dir`` is then unused.
    """
    unknown = set(options) - {"base_dir", "lora_dir", "merged", "name", "score_range", "max_batch", "num_pass",
                              "reduction", "url", "model", "api_key", *Sampling.__dataclass_fields__}
    if unknown:
        raise ConfigError(f"unknown editscore options: {sorted(unknown)}")
    url = options.pop("url", None) or os.environ.get(ENV_URL)
    if url:  # a vLLM (OpenAI-compatible) server: nothing is loaded here
        for local in ("base_dir", "lora_dir", "merged"):
            options.pop(local, None)
        model = options.pop("model", None) or os.environ.get(ENV_MODEL, SCORER_SERVED)
        api_key = options.pop("api_key", None)
        sampling = Sampling(**{k: options.pop(k) for k in list(options) if k in Sampling.__dataclass_fields__})
        return EditScoreScorer(OpenAIJudge(url, model, api_key, sampling=sampling), **options)
    options.pop("model", None)
    options.pop("api_key", None)
    merged = bool(options.pop("merged", False))
    base_dir, lora_dir = options.pop("base_dir", None), options.pop("lora_dir", None)
    if model_dir is None and base_dir is None:
        raise ConfigError("the real editscore backend needs --model-dir (with base/ and lora/) or base_dir")
    root = Path(model_dir) if model_dir is not None else None
    if root is not None and not root.is_dir():
        raise ConfigError(f"EditScore model directory not found: {root}")
    base = Path(base_dir) if base_dir else (root if merged else root / "base")
    lora = None if merged else Path(lora_dir) if lora_dir else (root / "lora" if root is not None else None)
    if not merged and lora is None:
        raise ConfigError("the real editscore backend needs lora_dir (EditScore/EditScore-7B) or merged=True")
    _check_dir(base, "base model", BASE_FILES)
    if lora is not None:
        _check_dir(lora, "LoRA", LORA_FILES)
    dev = default_device(device)
    sampling = Sampling(**{k: options.pop(k) for k in list(options) if k in Sampling.__dataclass_fields__})
    return EditScoreScorer(QwenVLJudge(lambda: load_qwen25vl(base, lora, dev), dev, sampling), **options)
