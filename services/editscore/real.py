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
  ``O = sqrt(SC * PQ)``, all 0..10.

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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sparkle.backends import FrameScore, ImageScore, SampleContext
from sparkle.errors import ConfigError

SCORER = "EditScore-7B"
"""Records' ``scorer``: the checkpoint (hub ``EditScore/EditScore-7B`` on ``Qwen/Qwen2.5-VL-7B-Instruct``)."""

SCORE_RANGE = 25
"""The scale the model was trained on (``EditScore(score_range=25)``, the package default and model card)."""

N_CRITERIA = 2
"""Scores per answer: SC ``[editing success, overediting]``, PQ ``[naturalness, artifacts]`` (the prompts)."""

TASKS = ("edit_background", "remove_foreground")


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

    def generate(self, requests: list[tuple[list[np.ndarray], str]]) -> list[str]:
        """One answer per ``(images, prompt)``; images ``(H, W, 3) uint8`` RGB, 1 or 2 per prompt.

        All requests go through one ``generate`` call (EditScore's template, images resized by
        ``qwen_vl_utils.process_vision_info``); answers are decoded without special tokens and stripped.
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
        torch.manual_seed(s.seed)  # seeds CUDA too; EditScore's set_seed(seed) before every generate
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=s.max_new_tokens, do_sample=True,
                                      temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        answers = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                              clean_up_tokenization_spaces=False)
        return [a.strip() for a in answers]


class EditScoreScorer:
    """The :class:`sparkle.backends.Scorer` on a judge with ``setup()`` and ``generate(requests) -> [str]``.

    ``max_batch``: prompts per ``generate`` call (8 = the 4 frames of stage 5, SC + PQ each).
    """

    def __init__(self, judge, name: str = SCORER, score_range: int = SCORE_RANGE, max_batch: int = 8):
        self.judge = judge
        self.name = name
        self.score_range = score_range
        self.max_batch = max_batch
        self.sc_prompt, self.pq_prompt = editscore_prompts(score_range)

    def setup(self) -> None:
        """Load the judge's weights (once)."""
        self.judge.setup()

    def _judge(self, pairs: list[tuple[np.ndarray, np.ndarray]], instruction: str | list[str]) -> list[dict]:
        """SC on each ``(source, edited)`` and PQ on each ``edited``, SC prompts first (as ``batch_evaluate``).

        ``instruction``: one for every pair, or one per pair (pairs of several requests judged together).
        """
        instructions = [instruction] * len(pairs) if isinstance(instruction, str) else list(instruction)
        requests = ([([a, b], self.sc_prompt.replace("<instruction>", text)) for (a, b), text in zip(pairs, instructions)]
                    + [([b], self.pq_prompt) for _, b in pairs])
        answers = []
        for i in range(0, len(requests), self.max_batch):
            answers += self.judge.generate(requests[i:i + self.max_batch])
        n = len(pairs)
        out = []
        for sc_raw, pq_raw in zip(answers[:n], answers[n:]):
            sc_crit, sc_reason = parse_judgement(sc_raw, self.score_range)
            pq_crit, pq_reason = parse_judgement(pq_raw, self.score_range)
            sc_crit, pq_crit = sc_crit or [0.0] * N_CRITERIA, pq_crit or [0.0] * N_CRITERIA
            sc_score, pq_score = min(sc_crit), min(pq_crit)
            out.append({"sc": sc_crit, "SC": sc_score, "PQ": pq_score, "O": math.sqrt(sc_score * pq_score),
                        "sc_reason": sc_reason, "pq_reason": pq_reason, "sc_raw": sc_raw, "pq_raw": pq_raw})
        return out

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
        return [ImageScore(prompt_following=r["sc"][0], consistency=r["sc"][1], perceptual_quality=r["PQ"],
                           overall=r["O"], SC_reasoning=r["sc_reason"], PQ_reasoning=r["pq_reason"]) for r in results]

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
        scores = [FrameScore(SC_score=r["SC"], PQ_score=r["PQ"], O_score=r["O"], SC_score_reasoning=r["sc_reason"],
                             PQ_score_reasoning=r["pq_reason"], SC_raw_output=r["sc_raw"], PQ_raw_output=r["pq_raw"])
                  for r in self._judge(pairs, instructions)]
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
    vLLM path writes: no ``lora/``), ``name``, ``score_range`` (25), ``max_batch`` (8), ``temperature``,
    ``top_p``, ``top_k``, ``max_new_tokens``, ``seed`` (see :class:`Sampling`). Raises ConfigError naming
    every missing path.
    """
    unknown = set(options) - {"base_dir", "lora_dir", "merged", "name", "score_range", "max_batch",
                              *Sampling.__dataclass_fields__}
    if unknown:
        raise ConfigError(f"unknown editscore options: {sorted(unknown)}")
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
