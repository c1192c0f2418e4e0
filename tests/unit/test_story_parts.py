"""A story drawn in parts on several servers: the parts' rows survive a distributed engine's 8-bit
transfer (rounding down) and join, in any order, into the whole story's panels (pure torch)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.pack import load_pack
from harness.stories import BOB_AND_ALICE

load_pack()
from consistent_story.nodes.host import story_parts  # noqa: E402
from consistent_story.nodes.story.comic_layout import to_rgb_uint8  # noqa: E402
from consistent_story.nodes.story.story_prompts import parse_story  # noqa: E402

WHOLE = parse_story(BOB_AND_ALICE, style="No style").select("", 2)  # identity panels: Bob 1, 3; Alice 2, 6
PANELS = torch.rand(7, 16, 24, 3, generator=torch.Generator().manual_seed(0))  # the whole story's decoded panels


def part(spec: str, story=WHOLE) -> torch.Tensor:
    drawn = story.select(spec, 2)
    return story_parts.tag_part(drawn, PANELS[list(drawn.drawn or range(7))])


def sent(images: torch.Tensor) -> torch.Tensor:
    """What ComfyUI-Distributed's collector gives the master for a worker's batch: an 8-bit PNG made with
    ``(255 * x).astype(uint8)`` (rounding down), read back as ``k / 255``."""
    return torch.from_numpy((255 * images.numpy()).astype(np.uint8).astype(np.float32) / 255.0)


def test_parts_in_any_order_join_into_the_whole_storys_panels_as_comic_page_saves_them():
    master, worker = part("1-4"), part("5-7")  # both carry identity panels 1, 2, 3 and 6
    assert master.shape[0] == 1 + 5 and worker.shape[0] == 1 + 6  # panel 6, Alice's identity, on both
    for collected in (torch.cat([master, sent(worker)]), torch.cat([sent(worker), master])):
        panels, story = story_parts.join_parts(WHOLE.select("1-4", 2), collected)
        assert not story.partial and story.identity_count == 2
        assert np.array_equal(to_rgb_uint8(panels), to_rgb_uint8(PANELS)), "the whole run's 8-bit panels"


def test_parts_that_leave_panels_out_give_a_story_drawn_in_part():
    panels, story = story_parts.join_parts(WHOLE, torch.cat([part("7"), sent(part("4"))]))  # Bob's; the [NC] one
    assert story.drawn == story.selected == (0, 2, 3, 6) and story.partial
    assert np.array_equal(to_rgb_uint8(panels), to_rgb_uint8(PANELS[[0, 2, 3, 6]]))


def test_a_part_of_another_story_a_differing_panel_and_untagged_images_are_errors():
    other = parse_story(BOB_AND_ALICE.replace("eats an apple", "reads a letter"), style="No style").select("", 2)
    with pytest.raises(ValueError, match="drawn from another story"):
        story_parts.join_parts(WHOLE, torch.cat([part("1"), part("1", story=other)]))
    changed = part("3")
    changed[1] = 1.0 - changed[1]  # panel 1 (Bob's identity panel) drawn otherwise on this server
    with pytest.raises(ValueError, match="Panel 1 came from two servers with different pixels"):
        story_parts.join_parts(WHOLE, torch.cat([part("1"), changed]))
    with pytest.raises(ValueError, match="Image 1 of images is not the first row of a story part"):
        story_parts.join_parts(WHOLE, PANELS)
    with pytest.raises(ValueError, match="lists 2 panels but only 1 images follow"):
        story_parts.join_parts(WHOLE, part("3")[:2])
    with pytest.raises(ValueError, match="images holds 7 pictures but Story Prompts draws 2 panels"):
        story_parts.tag_part(WHOLE.select("3", 2), PANELS)
