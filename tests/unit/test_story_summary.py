"""Story Prompts' summary: each panel's role, what it reads and its final prompt (pure Python)."""
from __future__ import annotations

from harness.pack import load_pack
from harness.stories import BOB_AND_ALICE

load_pack()
from consistent_story.nodes.story.story_prompts import parse_story  # noqa: E402
from consistent_story.nodes.story.story_summary import story_summary  # noqa: E402

BOB, ALICE = "a man in a red coat", "a woman in a green dress"


def test_each_panel_says_its_role_what_it_reads_and_its_final_prompt():
    story = parse_story(BOB_AND_ALICE, "Comic book")
    lines = story_summary(story, 2).splitlines()
    assert lines[:2] == ["7 panels · 2 characters", "identity panels: Bob 1, 3; Alice 2, 6"]
    # Who reads whom, as StoryDiffusion's rule gives it for this story (the engine's tests check the
    # same sources token by token), and the prompt inside the style's template.
    roles = ["identity of Bob, reads 3", "identity of Alice, reads 6", "identity of Bob, reads 1",
             "no character, reads nobody", "reads Bob 1, 3; Alice 2, 6", "identity of Alice, reads 2", "reads Bob 1, 3"]
    texts = [f"{BOB} walks in the park", f"{ALICE} reads a book", f"{BOB} runs to the station",
             "a quiet forest at dawn", f"{BOB} and {ALICE} talk at a cafe", f"{ALICE} sleeps on the sofa",
             f"{BOB} eats an apple"]
    for number, (line, role, text) in enumerate(zip(lines[2:], roles, texts), start=1):
        assert line.startswith(f"{number}. {role}: comic book panel of {text}, bold ink outlines"), line
    assert len(lines) == 9


def test_a_part_of_the_story_marks_what_is_not_drawn_and_one_identity_panel_reads_nobody():
    part = story_summary(parse_story(BOB_AND_ALICE, "No style").select("7", 2), 2).splitlines()
    assert part[0] == "7 panels · 2 characters · draws 3 of them"
    assert [line.split(":")[0] for line in part[2:]] == [
        "1. identity of Bob, reads 3", "2. identity of Alice, reads 6 (not drawn)", "3. identity of Bob, reads 1",
        "4. no character, reads nobody (not drawn)", "5. reads Bob 1, 3; Alice 2, 6 (not drawn)",
        "6. identity of Alice, reads 2 (not drawn)", "7. reads Bob 1, 3"]
    one = story_summary(parse_story(BOB_AND_ALICE, "No style"), 1).splitlines()
    assert one[1] == "identity panels: Bob 1; Alice 2"
    assert one[2].startswith("1. identity of Bob, reads nobody: ") and one[4].startswith("3. reads Bob 1: ")


def test_a_character_never_alone_is_named_without_an_identity():
    story = parse_story("[Bob] a man\n[Eve] a woman\n[Bob] sits\n[Eve] and [Bob] talk", "No style")
    lines = story_summary(story, 2).splitlines()
    assert lines[1] == "identity panels: Bob 1; Eve (never alone: no identity)"
    assert lines[3] == "2. reads Eve (never alone: no identity); Bob 1: a woman and a man talk"
