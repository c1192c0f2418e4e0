"""Drawing part of a story: Story Prompts' ``panels`` selection and the drawn cast (pure Python)."""
from __future__ import annotations

import pytest

from harness.pack import load_pack
from harness.stories import BOB_AND_ALICE

load_pack()
from consistent_story.attention import ConsistentAttentionError  # noqa: E402
from consistent_story.nodes.story import story_prompts as sp  # noqa: E402

STORY = BOB_AND_ALICE  # panels 1-7; identity panels (2 each): Bob 1, 3; Alice 2, 6


def story(panels="", identity_panels=2):
    return sp.parse_story(STORY, style="No style").select(panels, identity_panels)


@pytest.mark.parametrize("spec, chosen", [
    ("", None), ("  ", None), ("3", (2,)), ("3, 5-7", (2, 4, 5, 6)), ("7,1,1, 2 - 3,", (0, 1, 2, 6)),
])
def test_numbers_and_ranges_as_the_badge_numbers_panels(spec, chosen):
    assert sp.parse_panel_selection(spec, 7) == chosen


@pytest.mark.parametrize("spec, message", [
    ("8", r"panels: '8' is outside the story, whose panels are numbered 1 to 7"),
    ("0", "outside the story"),
    ("5-9", "outside the story"),
    ("6-4", "runs backwards. Write it as '4-6'"),
    ("three", "'three' is not a panel number or range"),
    ("1;2", "'1;2' is not a panel number"),
    ("-2", "'-2' is not a panel number"),
    (",", "names no panel"),
])
def test_bad_selections_name_the_input_and_the_fix(spec, message):
    with pytest.raises(sp.StoryError, match=message):
        sp.parse_panel_selection(spec, 7)


@pytest.mark.parametrize("spec, drawn", [
    ("4", (3,)),  # [NC]: nobody to read, drawn alone
    ("7", (0, 2, 6)),  # Bob eats an apple: Bob's identity panels
    ("5", (0, 1, 2, 4, 5)),  # Bob and Alice: both identities
    ("1", (0, 2)),  # an identity panel reads its character's other one
    ("", None),
])
def test_drawn_rows_are_the_selection_and_the_identity_panels_it_reads(spec, drawn):
    part = story(spec)
    assert part.drawn == drawn
    assert [p.index for p in part.drawn_panels] == list(drawn if drawn is not None else range(7))
    cast, whole = part.cast(2), story().cast(2)
    # The whole story's cast: same identity panels, slots and sources; only the batch is smaller.
    assert (cast.identity, cast.panel_characters) == (whole.identity, whole.panel_characters)
    assert cast.batch == (drawn if drawn is not None else tuple(range(7)))


@pytest.mark.parametrize("per_call", [1, 2, 3])
def test_a_part_runs_the_whole_runs_calls_restricted_to_its_panels(per_call):
    whole = story().cast(2).call_plan(per_call)
    part = story("5, 7").cast(2)
    drawn = set(part.batch)
    assert part.batch == (0, 1, 2, 4, 5, 6)
    planned = part.call_plan(per_call)
    assert sorted(p for call in planned for p in call) == sorted(drawn)
    if per_call == 1:  # every call of a part is a call of the whole run: the same rows, computed alike
        assert set(planned) <= set(whole)


def test_a_part_drawn_for_fewer_identity_panels_than_the_attention_reads_is_refused():
    with pytest.raises(ConsistentAttentionError, match=r"without identity panels \[3\].*identity_panels"):
        story("7", identity_panels=1).cast(2)
    assert story("5", identity_panels=3).cast(2).batch == (0, 1, 2, 4, 5, 6)  # more than read is harmless
