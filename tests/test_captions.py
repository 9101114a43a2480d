"""The rule-based captions (sparkle.captions): what the generators are prompted with when no VLM writes them."""

from __future__ import annotations

import pytest

from sparkle.captions import captions_from_instruction, scene_of, subjects_of


@pytest.mark.parametrize("instruction, scene", [
    ("Replace the background with a snowy mountain village at dusk, with softly falling snow",
     "a snowy mountain village at dusk, with softly falling snow"),
    ("Shift the background to a rooftop overlooking a modern city skyline at dusk, with clouds drifting slowly; "
     "keep every foreground subject unchanged.", "a rooftop overlooking a modern city skyline at dusk, with clouds "
                                                 "drifting slowly"),
    ("Change the scene into a cherry blossom park in spring while keeping the woman unchanged",
     "a cherry blossom park in spring"),
    ("Turn the setting into a neon-lit street at night, and do not change the dancer.", "a neon-lit street at night"),
    ("A beach at sunset with rolling waves.", "A beach at sunset with rolling waves"),
])
def test_the_scene_is_the_instruction_without_its_lead_and_keep_clause(instruction, scene):
    assert scene_of(instruction) == scene


def test_captions_name_the_subjects_only_in_the_video_caption():
    c = captions_from_instruction("Replace the background with a beach at dusk, keeping them unchanged",
                                  ["person 1", "person 2", "umbrella", "apple"])
    assert c.background == "A beach at dusk, seen from a fixed camera."
    assert c.video == "2 persons, an umbrella and an apple in front of a beach at dusk, seen from a fixed camera."
    assert captions_from_instruction("A forest.", []).video == "A forest, seen from a fixed camera."
    assert subjects_of(["dog"]) == "a dog" and subjects_of([]) == ""
    with pytest.raises(ValueError):
        captions_from_instruction("  ", ["person"])
