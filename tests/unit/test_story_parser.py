"""Story syntax, styles and errors of nodes/story/story_prompts.py (pure Python, no ComfyUI)."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.pack import load_pack

load_pack()
from consistent_story.nodes.story import story_prompts as sp  # noqa: E402

BOB = "a man with short black hair, red coat"
ALICE = "a woman in a green dress"
OFFICIAL_NAMES = (
    "No style", "Japanese Anime", "Digital/Oil Painting", "Pixar/Disney Character", "Photographic",
    "Comic book", "Line art", "Black and White Film Noir", "Isometric Rooms",
)


def plain(story: str, **kwargs):
    return sp.parse_story(story, style="No style", **kwargs)


# --- parsing and substitution ---------------------------------------------------------------

def test_definitions_and_panels_in_official_syntax():
    story = plain(f"[Bob] {BOB}\n[Alice]{ALICE}\n[Bob] at home\n[Alice] on the phone\n")
    assert [(c.name, c.description, c.line) for c in story.characters] == [("Bob", BOB, 1), ("Alice", ALICE, 2)]
    assert [(p.index, p.line, p.text, p.characters) for p in story.panels] == [
        (0, 3, f"{BOB} at home", ("Bob",)),
        (1, 4, f"{ALICE} on the phone", ("Alice",)),
    ]
    assert story.character("Alice").description == ALICE


def test_several_characters_in_one_panel_keep_order_without_duplicates():
    story = plain(f"[Bob] {BOB}\n[Alice] {ALICE}\n[Alice]and [Bob] run, [Alice] laughs\n[Bob] waits")
    panel = story.panels[0]
    assert panel.characters == ("Alice", "Bob")
    assert panel.text == f"{ALICE} and {BOB} run, {ALICE} laughs"


def test_definition_may_follow_the_panel_that_uses_it():
    story = plain(f"at dawn, [Bob] leaves home\n[Bob] {BOB}")
    assert story.panels[0].text == f"at dawn, {BOB} leaves home"
    assert len(story.panels) == 1


def test_repeating_a_definition_line_makes_a_panel_not_a_redefinition():
    story = plain(f"[Bob] {BOB}\n[Bob] a tall man in a blue coat")
    assert story.character("Bob").description == BOB
    assert story.panels[0].text == f"{BOB} a tall man in a blue coat"


def test_blank_lines_whitespace_and_crlf_are_ignored():
    story = plain(f"\r\n   [ Bob ]   {BOB}  \r\n\n\t[Bob]   sits ,   alone  \r\n  \n")
    assert story.panels[0].line == 4
    assert story.panels[0].text == f"{BOB} sits, alone"


def test_untagged_panel_has_no_characters():
    story = plain(f"[Bob] {BOB}\n[Bob] sits\na city skyline at dawn")
    assert story.panels[1].characters == ()
    assert story.panels[1].text == "a city skyline at dawn"


@pytest.mark.parametrize("tag", ["[NC]", "[nc]", "[ NC ]"])
def test_nc_marks_a_panel_without_character_and_is_removed(tag):
    story = plain(f"[Bob] {BOB}\n[Bob] sits\n{tag}, a tiger in the forest # Run!")
    panel = story.panels[1]
    assert (panel.text, panel.characters, panel.caption) == ("a tiger in the forest", (), "Run!")


# --- captions -----------------------------------------------------------------------------------

def test_caption_is_the_text_after_the_first_hash():
    story = plain(f"[Bob] {BOB}\n[Bob] at home #  He reads. #2 \n[Bob] outside")
    assert story.captions == ("He reads. #2", "")
    assert story.panels[0].text == f"{BOB} at home"


def test_caption_tags_become_names_and_other_brackets_stay():
    story = plain(f"[Bob] {BOB}\n[NC] a letter # [NC] [Bob] wrote [sigh] to [Zed]\n[Bob] waits")
    assert story.panels[0].caption == "Bob wrote [sigh] to [Zed]"


def test_example_story_has_four_captioned_panels_of_one_character():
    story = sp.parse_story(sp.EXAMPLE_STORY)
    assert len(story.panels) == 4 and [c.name for c in story.characters] == ["Bob"]
    assert all(p.caption and p.characters == ("Bob",) for p in story.panels)


# --- styles ---------------------------------------------------------------------------------------

def test_style_menu_is_the_official_nine_plus_custom_with_anime_default():
    assert sp.STYLE_NAMES == OFFICIAL_NAMES + ("Custom",)
    assert sp.DEFAULT_STYLE == "Japanese Anime"


@pytest.mark.parametrize("name", OFFICIAL_NAMES[1:])
def test_every_style_wraps_the_prompt_once_and_adds_a_negative(name):
    style = sp.get_style(name)
    assert style.template.count("{prompt}") == 1 and style.negative
    prompt = sp.parse_story(f"[Bob] {BOB}\n[Bob] sits", style=name).panels[0].prompt
    assert prompt == style.template.replace("{prompt}", f"{BOB} sits") != f"{BOB} sits"


def test_no_style_keeps_prompt_and_negative_as_written():
    story = plain(f"[Bob] {BOB}\n[Bob] sits", negative="  blurry ")
    assert story.panels[0].prompt == story.panels[0].text
    assert story.negative == "blurry"


def test_user_negative_comes_first_then_the_style_negative():
    anime = sp.get_style("Japanese Anime")
    assert sp.parse_story("a cat", negative="extra fingers").negative == f"extra fingers, {anime.negative}"
    assert sp.parse_story("a cat", negative=" ").negative == anime.negative


def test_custom_template_is_used_and_has_no_negative_of_its_own():
    story = sp.parse_story("a cat", style="Custom", custom_template=" pastel {prompt}, by {prompt} ", negative="x")
    assert story.panels[0].prompt == "pastel a cat, by a cat"
    assert (story.style, story.negative) == ("Custom", "x")


def test_custom_template_is_ignored_by_other_styles():
    assert plain("a cat", custom_template="no slot").panels[0].prompt == "a cat"


@pytest.mark.parametrize("template", ["", "watercolor", "{ prompt }"])
def test_custom_template_without_slot_is_an_error(template):
    with pytest.raises(sp.StoryError, match=r"must contain \{prompt\}"):
        sp.parse_story("a cat", style="Custom", custom_template=template)


def test_unknown_style_lists_the_choices():
    with pytest.raises(sp.StoryError, match="Choose one of: No style, Japanese Anime"):
        sp.parse_story("a cat", style="Watercolor")


# --- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "story, line, message",
    [
        ("", None, "no panels"),
        ("\n  \n\t", None, "no panels"),
        (f"[Bob] {BOB}\n\n[Bbo] walks", None, r"Line 3 defines \[Bbo\] \(did you mean \[Bob\]\?\)"),
        (f"[Bob] {BOB}\n[Bob] and [Eve] talk", 2, r"no character is named \[Eve\]\. Known characters: \[Bob\]"),
        ("[Eve] walks # caption", 1, r"\[Eve\].*Known characters: none\..*on a line of its own"),
        (f"[Bob] {BOB}\n[bob] walks # c", 2, r"did you mean \[Bob\]"),
        (f"[Bob] {BOB}\n[Bob] sits\n\n# just a caption", 4, "only a caption. Put the panel's prompt before '#'"),
        ("[Bob]\n[Bob] sits", 1, r"\[Bob\] has no description"),
        ("[Bob]  , \n[Bob] sits", 1, r"\[Bob\] has no description"),
        (f"[Bob] {BOB}\n[Bob] sits\n[Bbo] walks", 3, r"no panel uses it.*did you mean \[Bob\]"),
        (f"[Bob] {BOB}\n[NC] [Bob] sits", 2, r"\[NC\] marks a panel without characters.*\[Bob\]"),
        ("[NC] # a caption", 1, "the panel has no prompt"),
        ("a [Bob!] cat", 1, r"'\[Bob!\]' is not a character tag"),
        ("a [] cat", 1, r"'\[\]' is not a character tag"),
        ("a [Bob cat", 1, r"unmatched '\['"),
        ("a Bob] cat", 1, r"unmatched"),
    ],
)
def test_bad_story_raises_story_error_naming_line_and_fix(story, line, message):
    with pytest.raises(sp.StoryError, match=message) as caught:
        plain(story)
    assert caught.value.line == line
    assert isinstance(caught.value, ValueError)
    if line is not None:
        assert str(caught.value).startswith(f"Story line {line}: ")


def test_parsed_objects_are_frozen():
    story = plain(f"[Bob] {BOB}\n[Bob] sits")
    for obj in (story, story.panels[0], story.characters[0]):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, dataclasses.fields(obj)[0].name, None)


# --- fuzz -------------------------------------------------------------------------------------------

STORYISH = st.text(alphabet="[]#\n\t ,.NCncBobAlie_-é1", max_size=120)


@settings(max_examples=400, deadline=None)
@given(story=st.one_of(st.text(max_size=200), STORYISH), style=st.sampled_from(sp.STYLE_NAMES + ("Nope",)),
       template=st.sampled_from(["", "x {prompt} y"]))
def test_any_text_parses_or_raises_story_error(story, style, template):
    try:
        parsed = sp.parse_story(story, style=style, custom_template=template)
    except sp.StoryError:
        return
    assert [p.index for p in parsed.panels] == list(range(len(parsed.panels))) != []
    for panel in parsed.panels:
        assert panel.text and not set("[]#") & set(panel.text)
        assert panel.text in panel.prompt
        assert set(panel.characters) <= {c.name for c in parsed.characters}
