"""The stage-1 instruction catalogue (sparkle.catalogue and the packaged sparkle/data/catalogue.json).

Facts checked against: chosen_keyword is "subtheme: scene" (formats.md); Sparkle uses 21-22 subthemes and
about 100 scenes over four themes (Sparkle-Bench: 4 themes, 21 subthemes, 97 scenes); openve3m has none.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sparkle.catalogue import (
    CATALOGUE_THEMES,
    Catalogue,
    CatalogueError,
    Choice,
    default_catalogue_path,
    load_catalogue,
    parse_keyword,
    write_instruction,
)
from sparkle.errors import InputError

CAT = load_catalogue()

MINIMAL = {
    "version": 1,
    "themes": {
        "location": {
            "description": "test",
            "templates": ["Replace the background with {subtheme} scenery: {scene}."],
            "subthemes": {
                "urban": {"scenes": ["rooftop overlooking skyline", "busy street"]},
                "nature": {"scenes": ["pine forest"], "template": "Put the subject in a {scene}."},
            },
        }
    },
}


def write(tmp_path: Path, data, name: str = "cat.json") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return p


# --- the packaged default -------------------------------------------------------------------------------

def test_default_is_packaged_resource():
    res = default_catalogue_path()
    assert res.name == "catalogue.json" and res.is_file()
    assert "packaged default" in CAT.origin


def test_default_stats():
    st = CAT.stats()
    assert set(st.themes) == set(CATALOGUE_THEMES) == {"location", "season", "time", "style"}
    assert 21 <= st.subthemes <= 22
    assert 90 <= st.scenes <= 110
    assert st.subthemes == sum(t.subthemes for t in st.themes.values())
    assert st.scenes == sum(t.scenes for t in st.themes.values())
    assert set(CAT.themes["season"].subthemes) == {"spring", "summer", "autumn", "winter"}
    for theme in CAT.themes.values():
        assert theme.description and len(theme.templates) >= 2
        for sub in theme.subthemes.values():
            assert 4 <= len(sub.scenes) <= 6


def test_default_keywords_form_and_uniqueness():
    form = re.compile(r"^[a-z][a-z0-9 -]*: [a-z0-9][a-z0-9 ,'-]*$")
    all_keywords = []
    for t in CATALOGUE_THEMES:
        kws = CAT.keywords(t)
        assert len(kws) == len(set(kws)) == CAT.stats().themes[t].scenes
        for kw in kws:
            assert form.match(kw), kw
            sub, scene = parse_keyword(kw)
            assert kw.count(": ") == 1 and sub in CAT.themes[t].subthemes
            assert scene in CAT.themes[t].subthemes[sub].scenes and len(scene.split()) <= 7
        all_keywords += kws
    assert "urban: rooftop overlooking skyline" in CAT.keywords("location")
    # no scene appears twice anywhere in the default catalogue
    scenes = [parse_keyword(k)[1] for k in all_keywords]
    assert len(scenes) == len(set(scenes))


def test_openve3m_and_unknown_theme_refused():
    with pytest.raises(CatalogueError, match="openve3m.*chosen_keyword"):
        CAT.keywords("openve3m")
    with pytest.raises(ValueError, match="unknown edit_type 'weather'"):
        CAT.sample("weather", 3, 0)


# --- sample: determinism and balance --------------------------------------------------------------------

def test_sample_deterministic_per_seed_and_different_across_seeds():
    for t in CATALOGUE_THEMES:
        a = CAT.sample(t, 40, seed=7)
        assert a == CAT.sample(t, 40, seed=7)
        assert a != CAT.sample(t, 40, seed=8)
        assert CAT.sample(t, 40, seed="7") == CAT.sample(t, 40, seed="7")
    assert CAT.sample("location", 0, 1) == []
    with pytest.raises(ValueError):
        CAT.sample("location", -1, 1)


def test_sample_does_not_use_global_random_state():
    import random

    random.seed(1)
    a = CAT.sample("time", 30, seed=3)
    random.seed(2)
    random.random()
    assert CAT.sample("time", 30, seed=3) == a


def test_sample_stable_across_processes():
    code = ("import json; from sparkle.catalogue import load_catalogue; "
            "print(json.dumps([c.chosen_keyword for c in load_catalogue().sample('season', 25, seed=11)]))")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(h), "PATH": ""}).stdout for h in (1, 2)]
    here = [c.chosen_keyword for c in CAT.sample("season", 25, seed=11)]
    assert json.loads(outs[0]) == json.loads(outs[1]) == here


def test_sample_is_prefix_stable():
    full = CAT.sample("style", 50, seed=5)
    for n in (1, 6, 17, 49):
        assert CAT.sample("style", n, seed=5) == full[:n]


@pytest.mark.parametrize("n", [1, 3, 5, 7, 13, 22, 23, 50, 107, 250, 333])
@pytest.mark.parametrize("theme", CATALOGUE_THEMES)
def test_sample_balanced(theme, n):
    choices = CAT.sample(theme, n, seed=n * 31 + 1)
    assert len(choices) == n
    th = CAT.themes[theme]
    per_sub = Counter(c.subtheme for c in choices)
    counts = [per_sub.get(s, 0) for s in th.subthemes]
    assert max(counts) - min(counts) <= 1, per_sub
    for name, sub in th.subthemes.items():
        per_scene = Counter(c.scene for c in choices if c.subtheme == name)
        sc = [per_scene.get(s, 0) for s in sub.scenes]
        assert max(sc) - min(sc) <= 1, (name, per_scene)
        tmpl = th.templates_for(name)
        per_tmpl = Counter(c.template for c in choices if c.subtheme == name)
        tc = [per_tmpl.get(x, 0) for x in tmpl]
        assert max(tc) - min(tc) <= 1
    for c in choices:
        assert isinstance(c, Choice) and c.edit_type == theme
        assert c.chosen_keyword == f"{c.subtheme}: {c.scene}"
        assert c.template in th.templates_for(c.subtheme)


def test_sample_larger_than_scene_count_covers_every_scene():
    for t in CATALOGUE_THEMES:
        n = 3 * len(CAT.keywords(t)) + 1
        seen = {c.chosen_keyword for c in CAT.sample(t, n, seed=0)}
        assert seen == set(CAT.keywords(t))


# --- sample_one ---------------------------------------------------------------------------------------

def test_sample_one_stable_and_spread():
    for t in CATALOGUE_THEMES:
        ids = [f"Sparkle_{t}_{i:06d}" for i in range(600)]
        picks = [CAT.sample_one(t, sid) for sid in ids]
        assert picks == [CAT.sample_one(t, sid) for sid in ids]
        assert {p.subtheme for p in picks} == set(CAT.themes[t].subthemes)
        assert len({p.chosen_keyword for p in picks}) >= 0.9 * len(CAT.keywords(t))
        assert len({p.chosen_keyword for p in picks[:50]}) > 1
    # known value, pinned: a change of the hashing would silently reshuffle existing datasets
    c = CAT.sample_one("location", "Sparkle_location_000000")
    assert c.chosen_keyword == "fantasy: enchanted glowing forest"
    assert c.template == "Replace the background with {subtheme} scenery: {scene}."


def test_sample_pinned_values():
    # a change of the seeding would silently reshuffle batches drawn with an old seed
    assert [c.chosen_keyword for c in CAT.sample("location", 3, seed=0)] == [
        "indoor: sunlit art gallery", "desert: red rock canyon", "urban: quiet residential sidewalk"]


def test_sample_one_stable_across_processes():
    code = ("from sparkle.catalogue import load_catalogue; c = load_catalogue(); "
            "print('|'.join(c.sample_one('time', f'Sparkle_time_{i:06d}').chosen_keyword for i in range(20)))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(h), "PATH": ""}).stdout.strip() for h in (3, 4)}
    here = "|".join(CAT.sample_one("time", f"Sparkle_time_{i:06d}").chosen_keyword for i in range(20))
    assert outs == {here}


# --- write_instruction ----------------------------------------------------------------------------------

def test_write_instruction_every_keyword_and_template():
    for t in CATALOGUE_THEMES:
        theme = CAT.themes[t]
        for name, sub in theme.subthemes.items():
            for scene in sub.scenes:
                for tmpl in theme.templates_for(name):
                    text = write_instruction(CAT.choice(t, name, scene, tmpl))
                    assert text.strip() and scene in text
                    assert "{" not in text and "}" not in text
                    assert text[0].isupper() and text.endswith(".")
                    assert len(text) < 200


def test_write_instruction_example():
    c = CAT.choice("location", "urban", "rooftop overlooking skyline",
                   "Replace the background with {subtheme} scenery: {scene}.")
    assert write_instruction(c) == "Replace the background with urban scenery: rooftop overlooking skyline."
    with pytest.raises(CatalogueError, match="not in theme"):
        CAT.choice("location", "urban", "moon base")


# --- user catalogues ------------------------------------------------------------------------------------

def test_load_user_catalogue(tmp_path):
    p = write(tmp_path, MINIMAL)
    cat = load_catalogue(p)
    assert cat.origin == str(p)
    assert cat.keywords("location") == ["urban: rooftop overlooking skyline", "urban: busy street",
                                        "nature: pine forest"]
    assert cat.stats().subthemes == 2 and cat.stats().scenes == 3
    nature = [c for c in cat.sample("location", 4, seed=0) if c.subtheme == "nature"]
    assert len(nature) == 2 and all(write_instruction(c) == "Put the subject in a pine forest." for c in nature)
    with pytest.raises(CatalogueError, match=f"'season' is not in the catalogue {re.escape(str(p))}"):
        cat.sample("season", 1, 0)
    assert load_catalogue(str(p)) == cat  # str paths too


def _mutated(**changes):
    data = copy.deepcopy(MINIMAL)
    loc = data["themes"]["location"]
    for key, value in changes.items():
        if key == "theme_name":
            data["themes"][value] = data["themes"].pop("location")
        elif key == "scenes":
            loc["subthemes"]["urban"]["scenes"] = value
        elif key == "templates":
            loc["templates"] = value
        elif key == "subtheme_name":
            loc["subthemes"][value] = loc["subthemes"].pop("urban")
        elif key == "top":
            data.update(value)
    return data


@pytest.mark.parametrize(("data", "message"), [
    (_mutated(theme_name="weather"), r"themes: unknown theme 'weather'"),
    (_mutated(theme_name="openve3m"), r"'openve3m' has no chosen_keyword"),
    (_mutated(scenes=[]), r"themes\.location\.subthemes\.urban\.scenes: scene list is empty"),
    (_mutated(scenes=["city: rooftop"]), r"scene 'city: rooftop' contains ': '"),
    (_mutated(scenes=["busy street", "pier", "busy street"]), r"duplicate scene 'busy street'"),
    (_mutated(scenes=["  "]), r"scene is empty"),
    (_mutated(scenes=[" pier"]), r"leading or trailing whitespace"),
    (_mutated(scenes=["a/b"]), r"contains '/'"),
    (_mutated(subtheme_name="ur:ban"), r"subtheme name 'ur:ban' contains ':'"),
    (_mutated(templates=[]), r"template list is empty"),
    (_mutated(templates=["Replace with {place}."]), r"uses \{place\}"),
    (_mutated(templates=["Replace with {subtheme}."]), r"does not contain \{scene\}"),
    (_mutated(templates=["Replace with {scene"]), r"not a valid format string"),
    (_mutated(templates=["Replace with {scene!r}."]), r"no format spec or conversion"),
    (_mutated(top={"themes": {}}), r"themes: no themes"),
    (_mutated(top={"version": 2}), r"version"),
    (_mutated(top={"extra": 1}), r"extra: Extra inputs are not permitted"),
    ({"version": 1, "themes": {"location": {"templates": ["{scene}"], "subthemes": {}}}},
     r"subtheme list is empty"),
    ({"version": 1, "themes": {"location": {"templates": ["{scene}"],
                                            "subthemes": {"urban": {"scene": ["x"]}}}}}, r"scenes: Field required"),
])
def test_malformed_user_catalogue(tmp_path, data, message):
    p = write(tmp_path, data)
    with pytest.raises(CatalogueError, match=message) as info:
        load_catalogue(p)
    assert str(p) in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, InputError)


def test_unreadable_user_files(tmp_path):
    with pytest.raises(CatalogueError, match="catalogue file not found"):
        load_catalogue(tmp_path / "missing.json")
    p = write(tmp_path, '{"version": 1, "themes": ')
    with pytest.raises(CatalogueError, match=f"{re.escape(str(p))}: not valid JSON"):
        load_catalogue(p)
    p = write(tmp_path, "[1, 2]", "list.json")
    with pytest.raises(CatalogueError, match="JSON object at the top level"):
        load_catalogue(p)
    dup = json.dumps(MINIMAL).replace('"nature":', '"urban":')
    p = write(tmp_path, dup, "dup.json")
    with pytest.raises(CatalogueError, match="duplicate key 'urban'"):
        load_catalogue(p)


def test_model_validation_directly():
    cat = Catalogue.model_validate(MINIMAL)
    assert cat.origin == "<memory>" and cat.stats().scenes == 3
    with pytest.raises(ValueError):
        Catalogue.model_validate(_mutated(scenes=[]))
