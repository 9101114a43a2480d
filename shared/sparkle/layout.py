"""The released Sparkle dataset layout: every artifact's key (path relative to the dataset root).

Fields and folders: ``../shared/reference/formats.md``. Keys use ``/`` on every platform; the artifact
store maps them to files (local) or objects (MinIO).
"""

from __future__ import annotations

import re

EDIT_TYPES = ("location", "season", "time", "style", "openve3m")
"""Sparkle themes (``edit_type``); ``openve3m`` samples have no ``chosen_keyword``."""

RECORD_NAMES = (
    "edited_frame0_score",
    "edited_frame0_foreground_removed_score",
    "foreground_grounding_r1",
    "foreground_grounding_r2",
    "edited_video_score",
)
"""The five per-stage JSONL records, each at ``intermediate_data/{edit_type}/{name}.jsonl``."""

CSV_COLUMNS = ("prompt", "src_video", "tgt_video", "task")

_ID_RE = re.compile(r"^Sparkle_(?P<edit_type>[a-z0-9]+)_(?P<index>\d{6,})$")


def check_edit_type(edit_type: str) -> str:
    """Return ``edit_type`` if it is a Sparkle theme. Raises ValueError naming the valid ones."""
    if edit_type not in EDIT_TYPES:
        raise ValueError(f"unknown edit_type {edit_type!r}; expected one of {', '.join(EDIT_TYPES)}")
    return edit_type


def sample_id(edit_type: str, index: int) -> str:
    """``Sparkle_{edit_type}_{index:06d}``, e.g. ``Sparkle_location_000000``."""
    return f"Sparkle_{check_edit_type(edit_type)}_{index:06d}"


def parse_sample_id(sid: str) -> tuple[str, int]:
    """Inverse of :func:`sample_id`. Raises ValueError on another shape."""
    m = _ID_RE.match(sid)
    if not m:
        raise ValueError(f"not a Sparkle sample id: {sid!r}")
    return m["edit_type"], int(m["index"])


def source_video(edit_type: str, sid: str) -> str:
    return f"{edit_type}/source_video/{sid}.mp4"


def edited_video(edit_type: str, sid: str) -> str:
    return f"{edit_type}/edited_video/{sid}.mp4"


def intermediate(edit_type: str, folder: str, sid: str, ext: str) -> str:
    return f"intermediate_data/{edit_type}/{folder}/{sid}.{ext}"


def source_frame0(edit_type: str, sid: str) -> str:
    return intermediate(edit_type, "source_frame0", sid, "png")


def edited_frame0(edit_type: str, sid: str) -> str:
    return intermediate(edit_type, "edited_frame0", sid, "png")


def clean_plate(edit_type: str, sid: str) -> str:
    """Stage 3's foreground-removed edited frame 0 (the clean plate)."""
    return intermediate(edit_type, "edited_frame0_foreground_removed", sid, "png")


def background_video(edit_type: str, sid: str) -> str:
    return intermediate(edit_type, "edited_background_video", sid, "mp4")


def mask(edit_type: str, sid: str) -> str:
    return intermediate(edit_type, "source_video_mask", sid, "npz")


def canny_video(edit_type: str, sid: str) -> str:
    return intermediate(edit_type, "edited_video_canny", sid, "mp4")


def record(edit_type: str, name: str) -> str:
    """``intermediate_data/{edit_type}/{name}.jsonl`` for one of :data:`RECORD_NAMES`."""
    if name not in RECORD_NAMES:
        raise ValueError(f"unknown record {name!r}")
    return f"intermediate_data/{edit_type}/{name}.jsonl"


def prompts_csv(edit_type: str) -> str:
    return f"prompts/{edit_type}_train.csv"


def prompts_metadata(edit_type: str) -> str:
    return f"prompts/{edit_type}_train_metadata.jsonl"


PUBLISHED_PREFIX = "published/"
"""Where the per-sample record documents live (our addition, ignored by Sparkle readers)."""


def document(edit_type: str, sid: str) -> str:
    """``published/{edit_type}/{id}.json``: the record document of a published sample (its CSV row, metadata
    line and five stage records), written once by the publish; the commit point of the sample."""
    return f"{PUBLISHED_PREFIX}{edit_type}/{sid}.json"


def layout_files(edit_type: str) -> list[str]:
    """The seven shared text files of a theme, materialised from the record documents: the CSV, the metadata
    JSONL and the five record JSONL files."""
    return [prompts_csv(edit_type), prompts_metadata(edit_type)] + [record(edit_type, n) for n in RECORD_NAMES]


def report(edit_type: str, sid: str) -> str:
    """Our own addition (ignored by Sparkle readers): the per-sample summary, accepted or rejected."""
    return f"reports/{edit_type}/{sid}.json"
