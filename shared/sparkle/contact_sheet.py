"""Contact sheets: one image that shows a published sample at a glance.

Four rows at five frames spread over the clip (0, T/4, T/2, 3T/4, T-1): the source video, the edited video,
the background video (stage 3's I2V output) and the BAIT mask over the source (foreground tinted green,
its outline drawn). Each tile is 320 px wide; the sheet is a JPEG (quality 90) under
``contact_sheets/{id}.jpg`` of the output folder, next to the Sparkle layout it illustrates.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import typer

from . import layout
from .masks import unpack_mask
from .media import read_video

TILE_W = 320
ROWS = ("source", "edited", "background", "mask over source")


def _tile(img: np.ndarray, h: int) -> np.ndarray:
    return cv2.resize(img, (TILE_W, h), interpolation=cv2.INTER_AREA)


def contact_sheet(root: Path, edit_type: str, sid: str) -> np.ndarray:
    """The sheet of published sample ``sid`` under dataset root ``root``: ``(H, W, 3) uint8`` RGB.

    Raises FileNotFoundError when one of the four artifacts is missing.
    """
    source = read_video(root / layout.source_video(edit_type, sid)).frames
    edited = read_video(root / layout.edited_video(edit_type, sid)).frames
    background = read_video(root / layout.background_video(edit_type, sid)).frames
    mask = unpack_mask((root / layout.mask(edit_type, sid)).read_bytes())
    t, h, w = mask.shape
    th = round(TILE_W * h / w)
    picks = sorted({0, t // 4, t // 2, (3 * t) // 4, t - 1})
    rows = []
    for name, frames in zip(ROWS, (source, edited, background, None)):
        tiles = []
        for i in picks:
            if frames is not None:
                tile = _tile(frames[min(i, len(frames) - 1)], th)
            else:
                m = cv2.resize(mask[i].astype(np.uint8), (TILE_W, th), interpolation=cv2.INTER_NEAREST)
                tile = _tile(source[i], th).astype(np.float32)
                tile[m > 0] = tile[m > 0] * 0.55 + np.array([0, 255, 0], np.float32) * 0.45
                tile = tile.astype(np.uint8)
                contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(tile, contours, -1, (255, 255, 0), 1)
            cv2.putText(tile, f"{name} t={i}", (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(tile, f"{name} t={i}", (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1,
                        cv2.LINE_AA)
            tiles.append(tile)
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def write_contact_sheets(root: Path, ids: list[str] | None = None) -> list[Path]:
    """Write ``contact_sheets/{id}.jpg`` for ``ids`` (default: every published sample under ``root``)."""
    from .published import published_ids
    from .store import LocalStore

    if ids is None:
        store = LocalStore(root)
        ids = [sid for et in layout.EDIT_TYPES for sid in published_ids(store, et)]
    out = []
    for sid in ids:
        edit_type, _ = layout.parse_sample_id(sid)
        sheet = contact_sheet(root, edit_type, sid)
        path = root / "contact_sheets" / f"{sid}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        out.append(path)
    return out


def contact_sheet_command(
    out: Path = typer.Argument(..., help="dataset root written by `sparkle replace` / `sparkle export`"),
    sample: list[str] = typer.Option(None, "--id", help="sample id (repeatable); default: every published one"),
) -> None:
    """Write a contact sheet per published sample (source / edited / background / mask over source) to
    OUT/contact_sheets/{id}.jpg and print their paths."""
    from rich.console import Console

    try:
        paths = write_contact_sheets(out, sample or None)
    except (FileNotFoundError, ValueError) as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1)
    for p in paths:
        typer.echo(p)
