"""Synthetic published samples with records of the released size, for benchmarks and format tests.

Not a test double of any model: these are the *records* a sample carries into the layout (the CSV row, the
metadata line and the five stage records of ``../shared/reference/formats.md``), filled with deterministic
text of realistic length, so that publishing and materialising can be measured and byte-compared without
running the pipeline. Sizes follow the released data: four EditScore entries with raw outputs per video
record, 11 round-2 frames (81 frames at 16 fps sampled at 2 FPS), two to three foreground labels.
"""

from __future__ import annotations

import random

from . import layout

_WORDS = ("the", "subject", "background", "edited", "frame", "lighting", "consistent", "person", "scene", "sky",
          "snow", "village", "texture", "edge", "shadow", "natural", "artifact", "instruction", "follows", "colour")
_LABELS = ("person", "dog", "bicycle", "guitar", "umbrella", "chair", "ball")
_SUBTHEMES = ("urban: rooftop overlooking skyline", "nature: alpine meadow", "coast: rocky beach at dawn",
              "winter: snowy mountain village", "night: neon-lit street")


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "."


def _box(rng: random.Random) -> list[int]:
    x1, y1 = rng.randrange(0, 600), rng.randrange(0, 600)
    return [x1, y1, x1 + rng.randrange(50, 400), y1 + rng.randrange(50, 400)]


def synthetic_sample(edit_type: str, index: int, prompt: str | None = None) -> dict:
    """The records of sample ``Sparkle_{edit_type}_{index:06d}`` as :func:`sparkle.published.sample_document` takes
    them: ``{"id", "edit_type", "prompt", "chosen_keyword", "original_scene", "records": {name: record}}``,
    every one of the five :data:`~sparkle.layout.RECORD_NAMES` present. Deterministic in (edit_type, index).

    About 8 KB of JSON per sample, most of it the four EditScore raw outputs (about 1 000 characters each).
    """
    sid = layout.sample_id(edit_type, index)
    rng = random.Random(f"{edit_type}/{index}")
    prompt = prompt if prompt is not None else f"Replace the background with {rng.choice(_SUBTHEMES).split(': ')[1]}"
    labels = rng.sample(_LABELS, rng.randrange(2, 4))
    objects = [{"bbox_2d": _box(rng), "label": label} for label in labels]

    def frame_score() -> dict:
        return {"prompt_following": rng.randrange(6, 11), "consistency": rng.randrange(6, 11),
                "perceptual_quality": rng.randrange(6, 11), "overall": round(rng.uniform(7.5, 10), 5),
                "SC_reasoning": _text(rng, 40), "PQ_reasoning": _text(rng, 30)}

    def video_score() -> dict:
        sc, pq = rng.randrange(6, 11), rng.randrange(6, 11)
        return {"SC_score": float(sc), "PQ_score": float(pq), "O_score": round((sc * pq) ** 0.5, 5),
                "SC_score_reasoning": _text(rng, 40), "PQ_score_reasoning": _text(rng, 30),
                "SC_raw_output": _text(rng, 160), "PQ_raw_output": _text(rng, 140)}

    r1 = {"id": sid, "prompt": prompt, "edit_type": edit_type, "round1_labels": labels, "round1_objects": objects}
    frames = [[{"bbox_2d": _box(rng) if rng.random() > 0.05 else [], "label": label} for label in labels]
              for _ in range(11)]
    records = {
        "edited_frame0_score": {"id": sid, "prompt": prompt, "editscore": frame_score()},
        "edited_frame0_foreground_removed_score": {"id": sid, "prompt": prompt, "editscore": frame_score()},
        "foreground_grounding_r1": r1,
        "foreground_grounding_r2": {**r1, "frame_objects": frames},
        "edited_video_score": {"id": sid, "prompt": prompt, "frame_indices": [1, 26, 51, 76],
                               "editscore": [video_score() for _ in range(4)], "scorer": "editscore-7b"},
    }
    return {"id": sid, "edit_type": edit_type, "prompt": prompt,
            "chosen_keyword": None if edit_type == "openve3m" else rng.choice(_SUBTHEMES),
            "original_scene": _text(rng, 12), "records": records}


__all__ = ["synthetic_sample"]
