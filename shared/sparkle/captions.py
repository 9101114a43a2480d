"""Captions for the two video generators, made from the editing instruction.

Sparkle extracts the target background's caption from the editing prompt before it animates the clean plate.
An instruction ("Replace the background with a snowy village at dusk; keep every foreground subject unchanged")
is the wrong prompt for both generators: Wan2.2-I2V animates an *empty* plate, and an instruction that names
subjects invites it to paint them back in; Wan2.2-Fun-Control's prompt describes the *final video*, not an edit.
So the grounding service writes two captions (:class:`Captions`):

- ``background``: the new background alone, with the motion the instruction implies (drifting snow, swaying
  trees), seen from a fixed camera (the sources passed the fixed-camera filter): the I2V prompt;
- ``video``: the foreground subjects (round-1 labels) in front of that background: Fun-Control's prompt.

:func:`captions_from_instruction` is the rule-based writer: the cpu backend's, the test double's, and the real
backend's fallback when the VLM's answer cannot be read. It removes the imperative lead ("Replace the background
with", "Change the scene to", ...) and any clause that keeps the foreground ("keeping the person unchanged",
"; keep every foreground subject ..."), and keeps everything else of the instruction, its motion words included.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field

FIXED_CAMERA = "seen from a fixed camera"

_LEAD = re.compile(
    r"^\s*(?:please\s+)?(?:replace|change|swap|switch|shift|turn|transform|transport|move|set|put|place|make|"
    r"convert|update|edit)\b[^.;:]*?\b(?:with|to|into|by|as|for|in)\s+", re.IGNORECASE)
"""An imperative lead up to the word before the new scene: "Replace the background with ", "Change it to "."""

_KEEP = re.compile(
    r"\s*(?:[,;.]|\band\b|\bwhile\b|\bbut\b)?\s*(?:while\s+|and\s+|but\s+)?(?:keep|keeping|preserve|preserving|"
    r"leave|leaving|retain|retaining|maintain|maintaining|do\s+not\s+(?:change|alter|modify|touch)|don't\s+"
    r"(?:change|alter|modify|touch)|without\s+(?:changing|altering|modifying|touching))\b.*$",
    re.IGNORECASE | re.DOTALL)
"""A clause that keeps the foreground, to the end: it describes the edit, not the scene."""

_NUMBERED = re.compile(r"\s+\d+$")


class Captions(BaseModel):
    """The generators' prompts for one sample (see the module docstring). ``source``: ``"vlm"`` (the grounding
    model wrote them) or ``"rules"`` (:func:`captions_from_instruction`)."""

    background: str = Field(min_length=1, description="I2V prompt: the new background alone, with its motion")
    video: str = Field(min_length=1, description="Fun-Control prompt: the subjects in front of that background")
    source: Literal["vlm", "rules"] = "rules"


def scene_of(instruction: str) -> str:
    """The new scene an instruction asks for, without its imperative lead or foreground-keeping clause
    (``"Replace the background with a beach at dusk, keeping the man unchanged."`` -> ``"a beach at dusk"``).
    An instruction with neither is returned stripped of its final punctuation."""
    text = " ".join(instruction.split())
    text = _LEAD.sub("", text, count=1)
    text = _KEEP.sub("", text)
    return text.strip().rstrip(".;,:!").strip() or " ".join(instruction.split()).rstrip(".")


def subjects_of(labels: list[str]) -> str:
    """Round-1 labels as a phrase: numbering dropped, repeats counted (``["person 1", "person 2", "ball"]``
    -> ``"2 persons and a ball"``); ``""`` without labels."""
    counts: dict[str, int] = {}
    for label in labels:
        base = _NUMBERED.sub("", " ".join(str(label).split())).strip()
        if base:
            counts[base] = counts.get(base, 0) + 1
    words = [f"{n} {base}s" if n > 1 else f"{'an' if base[0].lower() in 'aeiou' else 'a'} {base}"
             for base, n in counts.items()]
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _sentence(text: str) -> str:
    text = text.strip()
    return (text[0].upper() + text[1:]).rstrip(".") + "." if text else text


def captions_from_instruction(instruction: str, labels: list[str]) -> Captions:
    """Rule-based :class:`Captions` from an editing ``instruction`` and the round-1 ``labels`` (see the module
    docstring). Raises ValueError for an empty instruction."""
    if not instruction.strip():
        raise ValueError("an empty instruction has no scene to caption")
    scene = scene_of(instruction)
    if re.match(r"(?:A|An|The)\s", scene):  # mid-sentence below
        scene = scene[0].lower() + scene[1:]
    subjects = subjects_of(labels)
    background = _sentence(f"{scene}, {FIXED_CAMERA}")
    video = _sentence(f"{subjects} in front of {scene}, {FIXED_CAMERA}") if subjects else background
    return Captions(background=background, video=video, source="rules")
