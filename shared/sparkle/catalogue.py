"""The instruction catalogue of Sparkle's stage 1: themes, subthemes, scenes and instruction templates.

Facts (Sparkle, arXiv 2605.06535, and ``../shared/reference/formats.md``): instructions are written per
theme (``edit_type``: ``location``, ``season``, ``time``, ``style``; ``openve3m`` has no
``chosen_keyword`` and is not in the catalogue); each sample's metadata carries
``chosen_keyword = "subtheme: scene"``, e.g. ``"urban: rooftop overlooking skyline"`` (lower-case subtheme,
``": "`` separator, the scene a short noun phrase without ``": "``); Sparkle uses 21-22 subthemes and about
100 scenes (Sparkle-Bench: 4 themes, 21 subthemes, 97 scenes). The packaged default
(``sparkle/data/catalogue.json``) is this project's own list of that size.

File format (JSON)::

    {"version": 1, "source": "...optional note...",
     "themes": {"location": {"description": "...",
                             "templates": ["Replace the background with this scene: {scene}.", ...],
                             "subthemes": {"urban": {"scenes": ["rooftop overlooking skyline", ...],
                                                     "template": "...optional override..."}}}}}

Templates may use the placeholders ``{scene}`` (required) and ``{subtheme}`` only. A file may hold a subset
of the four themes.

Choosing scenes: :meth:`Catalogue.sample` draws ``n`` choices for a batch, deterministic per seed and balanced
(counts per subtheme, and per scene within a subtheme, differ by at most 1); :meth:`Catalogue.sample_one`
picks one choice from a string key (a sample id) through SHA-256, stable across processes and machines.
:func:`write_instruction` fills the chosen template: the catalogue-only instruction writer of the ``cpu``
backend.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .errors import InputError
from .layout import EDIT_TYPES, check_edit_type

CATALOGUE_THEMES: tuple[str, ...] = tuple(t for t in EDIT_TYPES if t != "openve3m")
"""Themes that carry a ``chosen_keyword`` and so may appear in a catalogue: location, season, time, style."""

KEYWORD_SEP = ": "
"""Separator of ``chosen_keyword = f"{subtheme}: {scene}"`` (formats.md)."""

PLACEHOLDERS = frozenset({"scene", "subtheme"})
_FORBIDDEN_CHARS = "{}/\\"  # braces would look like placeholders; slashes break bench output folder names


class CatalogueError(InputError, ValueError):
    """A catalogue file is missing or malformed, or a theme is not in the catalogue. Both an
    :class:`~sparkle.errors.InputError` (exit 1 / HTTP 4xx) and a ``ValueError``."""


def default_catalogue_path():
    """The packaged default, ``sparkle/data/catalogue.json`` (an ``importlib.resources`` Traversable)."""
    return resources.files("sparkle") / "data" / "catalogue.json"


def make_keyword(subtheme: str, scene: str) -> str:
    """``chosen_keyword`` of a choice: ``f"{subtheme}: {scene}"``."""
    return f"{subtheme}{KEYWORD_SEP}{scene}"


def parse_keyword(keyword: str) -> tuple[str, str]:
    """Inverse of :func:`make_keyword`: ``(subtheme, scene)``. Raises ValueError on another shape."""
    parts = keyword.split(KEYWORD_SEP)
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ValueError(f"chosen_keyword must be 'subtheme: scene', got {keyword!r}")
    return parts[0], parts[1]


def _check_text(kind: str, value: str) -> str:
    if not value.strip():
        raise ValueError(f"{kind} is empty")
    if value != value.strip():
        raise ValueError(f"{kind} {value!r} has leading or trailing whitespace")
    if any(not c.isprintable() for c in value):
        raise ValueError(f"{kind} {value!r} contains a control character or newline")
    bad = sorted({c for c in value if c in _FORBIDDEN_CHARS})
    if bad:
        raise ValueError(f"{kind} {value!r} contains {' '.join(map(repr, bad))}")
    return value


def _check_template(template: str) -> str:
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as err:
        raise ValueError(f"template {template!r} is not a valid format string: {err}") from None
    for name, spec, conv in fields:
        if name not in PLACEHOLDERS:
            raise ValueError(f"template {template!r} uses {{{name}}}; only {{scene}} and {{subtheme}} exist")
        if spec or conv:
            raise ValueError(f"template {template!r}: no format spec or conversion allowed in {{{name}}}")
    if "scene" not in {name for name, _, _ in fields}:
        raise ValueError(f"template {template!r} does not contain {{scene}}")
    if not template.strip():
        raise ValueError("template is empty")
    return template


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Subtheme(_Frozen):
    """One subtheme: its scenes (backgrounds) and an optional template overriding the theme's templates."""

    scenes: list[str] = Field(description="short lower-case noun phrases, unique, without ': '")
    template: str | None = None

    @field_validator("scenes")
    @classmethod
    def _scenes(cls, scenes: list[str]) -> list[str]:
        if not scenes:
            raise ValueError("scene list is empty")
        seen: set[str] = set()
        for scene in scenes:
            _check_text("scene", scene)
            if KEYWORD_SEP in scene:
                raise ValueError(f"scene {scene!r} contains ': ' (the chosen_keyword separator)")
            if scene in seen:
                raise ValueError(f"duplicate scene {scene!r}")
            seen.add(scene)
        return scenes

    @field_validator("template")
    @classmethod
    def _template(cls, template: str | None) -> str | None:
        return None if template is None else _check_template(template)


class Theme(_Frozen):
    """One theme (``edit_type``): a description, instruction templates and its subthemes (file order)."""

    description: str = ""
    templates: list[str]
    subthemes: dict[str, Subtheme]

    @field_validator("templates")
    @classmethod
    def _templates(cls, templates: list[str]) -> list[str]:
        if not templates:
            raise ValueError("template list is empty")
        if len(set(templates)) != len(templates):
            raise ValueError("duplicate template")
        return [_check_template(t) for t in templates]

    @field_validator("subthemes")
    @classmethod
    def _subthemes(cls, subthemes: dict[str, Subtheme]) -> dict[str, Subtheme]:
        if not subthemes:
            raise ValueError("subtheme list is empty")
        for name in subthemes:
            _check_text("subtheme name", name)
            if ":" in name:
                raise ValueError(f"subtheme name {name!r} contains ':'")
        return subthemes

    def templates_for(self, subtheme: str) -> list[str]:
        """The templates a choice of ``subtheme`` draws from: its override, else the theme's."""
        override = self.subthemes[subtheme].template
        return [override] if override is not None else list(self.templates)


class Choice(_Frozen):
    """One catalogue choice for a sample: what stage 1 writes into the metadata and the instruction."""

    edit_type: str
    subtheme: str
    scene: str
    chosen_keyword: str = Field(description="'subtheme: scene'")
    template: str


class ThemeStats(_Frozen):
    subthemes: int
    scenes: int


class CatalogueStats(_Frozen):
    """Counts per theme and in total (Sparkle-Bench for comparison: 4 themes, 21 subthemes, 97 scenes)."""

    themes: dict[str, ThemeStats]
    subthemes: int
    scenes: int


class Catalogue(_Frozen):
    """The whole catalogue; load it with :func:`load_catalogue`."""

    version: Literal[1] = 1
    source: str = ""
    themes: dict[str, Theme]

    _origin: str = PrivateAttr("<memory>")

    @field_validator("themes")
    @classmethod
    def _themes(cls, themes: dict[str, Theme]) -> dict[str, Theme]:
        if not themes:
            raise ValueError("no themes")
        for name in themes:
            if name == "openve3m":
                raise ValueError("theme 'openve3m' has no chosen_keyword and cannot be in the catalogue")
            if name not in CATALOGUE_THEMES:
                raise ValueError(f"unknown theme {name!r}; expected some of {', '.join(CATALOGUE_THEMES)}")
        return themes

    @property
    def origin(self) -> str:
        """Where the catalogue was loaded from (a path, or ``<memory>``)."""
        return self._origin

    def theme(self, edit_type: str) -> Theme:
        """The theme ``edit_type``. Raises :class:`CatalogueError` if it is not a Sparkle theme or not here."""
        try:
            check_edit_type(edit_type)
        except ValueError as err:
            raise CatalogueError(str(err)) from None
        if edit_type not in self.themes:
            why = " (it has no chosen_keyword)" if edit_type == "openve3m" else ""
            raise CatalogueError(f"theme {edit_type!r} is not in the catalogue {self._origin}{why}; "
                                 f"it has {', '.join(self.themes)}")
        return self.themes[edit_type]

    def keywords(self, edit_type: str) -> list[str]:
        """Every ``chosen_keyword`` (``"subtheme: scene"``) of a theme, in file order."""
        theme = self.theme(edit_type)
        return [make_keyword(name, scene) for name, sub in theme.subthemes.items() for scene in sub.scenes]

    def choice(self, edit_type: str, subtheme: str, scene: str, template: str | None = None) -> Choice:
        """The :class:`Choice` of a given subtheme and scene (``template``: default the first one)."""
        theme = self.theme(edit_type)
        if subtheme not in theme.subthemes or scene not in theme.subthemes[subtheme].scenes:
            raise CatalogueError(f"{make_keyword(subtheme, scene)!r} is not in theme {edit_type!r} "
                                 f"of the catalogue {self._origin}")
        return Choice(edit_type=edit_type, subtheme=subtheme, scene=scene,
                      chosen_keyword=make_keyword(subtheme, scene),
                      template=template if template is not None else theme.templates_for(subtheme)[0])

    def sample(self, edit_type: str, n: int, seed: int | str = 0) -> list[Choice]:
        """``n`` choices for a batch of one theme: deterministic per ``seed``, balanced and prefix-stable.

        Subthemes are visited in rounds, each round in a fresh seeded order, so that counts per subtheme
        differ by at most 1 for any ``n``; each subtheme cycles through its scenes (and templates) in a
        fresh seeded order per cycle, so that counts per scene within a subtheme differ by at most 1.
        ``sample(t, n, s)`` is a prefix of ``sample(t, n + 1, s)``. Uses its own ``random.Random`` seeded
        from a string (SHA-512 seeding: stable across processes), never the global generator.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        theme = self.theme(edit_type)
        rng = random.Random(f"sparkle-catalogue|{edit_type}|{seed!r}")
        names = list(theme.subthemes)
        scene_queue: dict[str, list[str]] = {name: [] for name in names}
        template_queue: dict[str, list[str]] = {name: [] for name in names}
        round_queue: list[str] = []
        out: list[Choice] = []
        for _ in range(n):
            if not round_queue:
                round_queue = rng.sample(names, len(names))
            name = round_queue.pop()
            if not scene_queue[name]:
                scene_queue[name] = rng.sample(theme.subthemes[name].scenes, len(theme.subthemes[name].scenes))
            if not template_queue[name]:
                templates = theme.templates_for(name)
                template_queue[name] = rng.sample(templates, len(templates))
            out.append(self.choice(edit_type, name, scene_queue[name].pop(), template_queue[name].pop()))
        return out

    def sample_one(self, edit_type: str, key: str) -> Choice:
        """One choice picked from ``key`` (e.g. a sample id) via SHA-256: the same key always gives the same
        choice, in any process or machine (not Python's salted ``hash()``). The subtheme is uniform over the
        theme's subthemes, then the scene uniform over its scenes, then the template."""
        theme = self.theme(edit_type)
        digest = hashlib.sha256(f"sparkle-catalogue|{edit_type}|{key}".encode()).digest()
        a, b, c = (int.from_bytes(digest[i:i + 8], "big") for i in (0, 8, 16))
        names = list(theme.subthemes)
        name = names[a % len(names)]
        scenes = theme.subthemes[name].scenes
        templates = theme.templates_for(name)
        return self.choice(edit_type, name, scenes[b % len(scenes)], templates[c % len(templates)])

    def stats(self) -> CatalogueStats:
        """Counts of subthemes and scenes per theme and in total."""
        per = {name: ThemeStats(subthemes=len(t.subthemes), scenes=sum(len(s.scenes) for s in t.subthemes.values()))
               for name, t in self.themes.items()}
        return CatalogueStats(themes=per, subthemes=sum(s.subthemes for s in per.values()),
                              scenes=sum(s.scenes for s in per.values()))


def write_instruction(choice: Choice) -> str:
    """The instruction of a choice: its template with ``{scene}`` and ``{subtheme}`` filled in (the ``cpu``
    backend's catalogue-only writer; a VLM backend may write a better one from the source frame)."""
    return choice.template.format(scene=choice.scene, subtheme=choice.subtheme)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_catalogue(text: str, origin: str = "<memory>") -> Catalogue:
    """Parse and validate catalogue JSON text; errors name ``origin`` and each problem's location."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as err:
        raise CatalogueError(f"catalogue {origin}: not valid JSON: {err}") from None
    except ValueError as err:  # duplicate key
        raise CatalogueError(f"catalogue {origin}: {err}") from None
    if not isinstance(data, dict):
        raise CatalogueError(f"catalogue {origin}: expected a JSON object at the top level")
    try:
        cat = Catalogue.model_validate(data)
    except ValidationError as err:
        raise CatalogueError(f"catalogue {origin} is malformed:\n{_format_errors(err)}") from None
    cat._origin = origin
    return cat


def load_catalogue(path: str | Path | None = None) -> Catalogue:
    """Load a catalogue: the packaged default when ``path`` is None, else the user's JSON file.

    Raises :class:`CatalogueError` (an ``InputError`` and a ``ValueError``) naming the file and the problem.
    """
    if path is None:
        res = default_catalogue_path()
        return parse_catalogue(res.read_text(encoding="utf-8"), origin=f"{res} (packaged default)")
    p = Path(path)
    if not p.is_file():
        raise CatalogueError(f"catalogue file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CatalogueError(f"catalogue {p}: cannot read: {err}") from None
    return parse_catalogue(text, origin=str(p))
