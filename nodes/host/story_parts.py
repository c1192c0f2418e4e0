"""A story drawn in parts on several servers and joined again: the rows that travel between them.

A distributed engine (ComfyUI-Distributed: each server draws its own ``panels`` and a collector
concatenates the servers' image batches on the master) moves IMAGE batches only, as 8-bit PNGs
it rounds down (``int(255 * x)``), in an order the pack does not choose. So each server's part
travels as a batch the master can read without being told the ranges:

- a **header row** first: an image whose pixels hold a marker, a digest of the whole story (every
  panel's saved-panel key, see ``story_panels.panel_keys``) and the story index of each row that
  follows;
- then the drawn panels, as the 8-bit pixels Comic Page saves and lays out (``to_rgb_uint8``, which
  rounds), each an exact multiple of 1/255 so that the engine's rounding down keeps it.

``join_parts`` reads any number of such parts in any order, refuses a part of another story and a
panel two servers drew differently, and returns the panels in story order with the story drawn in
the union of the parts, for Comic Page. Pure torch/numpy: no ComfyUI import.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from ..story.comic_layout import from_rgb_uint8, to_rgb_uint8
from .story_panels import panel_keys

MARKER = b"ConsistentStoryPart\x01"
DIGEST_BYTES = 16
INDEX_BYTES = 4
HEAD_BYTES = len(MARKER) + DIGEST_BYTES + INDEX_BYTES  # marker, digest, row count


def story_digest(story) -> bytes:
    """What the panels' images depend on in the whole story (every panel's saved-panel key), so a
    part of another story, or of this story with other identity panels, is never joined to it."""
    text = json.dumps([story.identity_count or 2, panel_keys(story)])
    return hashlib.sha256(text.encode("utf-8")).digest()[:DIGEST_BYTES]


def tag_part(story, images: torch.Tensor) -> torch.Tensor:
    """``images`` (row i = ``story.drawn_panels[i]``) as one part: a header row, then the panels
    as 8-bit values."""
    drawn = tuple(panel.index for panel in story.drawn_panels)
    pixels = to_rgb_uint8(images)  # refuses anything but an IMAGE batch
    if len(pixels) != len(drawn):
        raise ValueError(f"images holds {len(pixels)} pictures but Story Prompts draws {len(drawn)} panels: connect "
                         "the decoded panels of the sampler that takes this story's prompts (VAE Decode after it), "
                         "nothing in between.")
    body = MARKER + story_digest(story) + len(drawn).to_bytes(INDEX_BYTES, "big")
    body += b"".join(index.to_bytes(INDEX_BYTES, "big") for index in drawn)
    capacity = pixels[0].size
    if len(body) > capacity:
        raise ValueError(f"A part of {len(drawn)} panels does not fit in one {pixels.shape[2]}x{pixels.shape[1]} "
                         "header row: draw fewer panels on this server (Story Prompts' panels).")
    header = np.zeros(capacity, dtype=np.uint8)
    header[:len(body)] = np.frombuffer(body, dtype=np.uint8)
    rows = np.concatenate([header.reshape(pixels.shape[1:])[None], pixels])
    return from_rgb_uint8(rows)


def _read_header(row: np.ndarray, position: int) -> tuple[bytes, tuple[int, ...]]:
    data = row.reshape(-1).tobytes()
    if not data.startswith(MARKER):
        raise ValueError(f"Image {position} of images is not the first row of a story part: every server's decoded "
                         "panels must reach the collector through Tag Story Part, and Join Story Parts must take the "
                         "collector's images directly.")
    digest = data[len(MARKER):len(MARKER) + DIGEST_BYTES]
    count = int.from_bytes(data[HEAD_BYTES - INDEX_BYTES:HEAD_BYTES], "big")
    end = HEAD_BYTES + count * INDEX_BYTES
    indices = tuple(int.from_bytes(data[i:i + INDEX_BYTES], "big") for i in range(HEAD_BYTES, end, INDEX_BYTES))
    return digest, indices


def join_parts(story, images: torch.Tensor):
    """The parts in ``images`` (``tag_part`` batches, concatenated in any order) -> (the panels in
    story order, ``story`` drawn in the union of the parts: the whole story when they cover it)."""
    pixels = to_rgb_uint8(images)
    digest, panels, row = story_digest(story), {}, 0
    while row < len(pixels):
        part_digest, indices = _read_header(pixels[row], row + 1)
        if part_digest != digest:
            raise ValueError(f"The part that starts at image {row + 1} was drawn from another story (or another "
                             "identity_panels): give every server the same workflow, only Story Prompts' panels "
                             "differing.")
        if row + 1 + len(indices) > len(pixels):
            raise ValueError(f"The part that starts at image {row + 1} lists {len(indices)} panels but only "
                             f"{len(pixels) - row - 1} images follow: a server's images did not all arrive.")
        for offset, index in enumerate(indices, start=row + 1):
            if index in panels and not np.array_equal(panels[index], pixels[offset]):
                raise ValueError(f"Panel {index + 1} came from two servers with different pixels: give every "
                                 "server the same checkpoint, seed, sampler and attention settings, and Consistent "
                                 "Self-Attention panels_per_call 1 for results equal to the bit.")
            panels[index] = pixels[offset]
        row += 1 + len(indices)
    if not panels:
        raise ValueError("images holds no story part: connect the collector that takes Tag Story Part's images.")
    drawn = sorted(panels)
    numbers = "" if len(drawn) == len(story.panels) else ", ".join(str(index + 1) for index in drawn)
    joined = story.select(numbers, story.identity_count or 2)
    if joined.drawn is not None and list(joined.drawn) != drawn:  # every part brings its identity panels
        missing = ", ".join(str(index + 1) for index in sorted(set(joined.drawn) - set(drawn)))
        raise ValueError(f"The parts lack identity panels {missing} of the panels they hold: tag each server's "
                         "whole decoded batch.")
    return from_rgb_uint8(panels[index] for index in drawn), joined
