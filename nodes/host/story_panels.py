"""A story's panels saved under names that find them again, so a story drawn in part (Story
Prompts' ``panels``) is laid out whole with the other panels of an earlier run.

A panel's file is named by what its image depends on in the story: its number (its noise), its
prompt, the negative prompt, and the number and prompt of every identity panel it reads. Editing
panel 37's line changes only panel 37's name (and, when 37 is an identity panel, those of the panels
reading it), so every other panel of the earlier run is still found. What the story does not hold
(checkpoint, seed, sampler, attention settings) is not in the name: ``name`` keeps the panels of
different settings apart. Files are PNGs in ComfyUI's output folder, ``consistent_story_panels/<name>/``,
marked as this pack's (a file without the mark is never overwritten). A whole story's run writes
every panel; a part adds only panels that have no file yet and lays out the saved pictures, so a
panel keeps one picture for as long as its name holds.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ...attention.cast import solo_panels
from ..story.comic_layout import from_rgb_uint8, to_rgb_uint8

FOLDER = "consistent_story_panels"
MARK = "consistent_story_panel"  # PNG text chunk: the panel's key, so a file not written here is refused
_NAME = re.compile(r"[\w \-]+")


def panel_keys(story) -> list[str]:
    """One key per panel of the whole story (see the module's docstring)."""
    characters = story.panel_characters
    count = story.identity_count or 2
    keys = []
    for panel in story.panels:
        reads = sorted({p for c in characters[panel.index] for p in solo_panels(characters, c, count)} - {panel.index})
        text = json.dumps([panel.index, panel.prompt, story.negative, count,
                           [[p, story.panels[p].prompt] for p in reads]], ensure_ascii=False)
        keys.append(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16])
    return keys


def panel_folder(name: str) -> Path:
    import folder_paths

    if not _NAME.fullmatch(name) or not name.strip():
        raise ValueError(f"name '{name}' must use letters, digits, spaces, '_' and '-' only (it names a folder).")
    return Path(folder_paths.get_output_directory()) / FOLDER / name.strip()


def panel_path(folder: Path, number: int, key: str) -> Path:
    return folder / f"panel_{number:03d}_{key}.png"


def save_panels(story, images: torch.Tensor, folder: Path) -> None:
    """Save the drawn panels (``images`` row i = ``story.drawn_panels[i]``). A whole story writes every
    panel (a panel's earlier file is replaced); a part writes only the panels that have no file yet, so
    a panel whose name is unchanged keeps the picture it has on the pages already."""
    keys = panel_keys(story)
    folder.mkdir(parents=True, exist_ok=True)
    for panel, pixels in zip(story.drawn_panels, to_rgb_uint8(images)):
        path = panel_path(folder, panel.index + 1, keys[panel.index])
        if path.exists():
            read_panel(path, keys[panel.index])  # refuses a file that is not this panel's
            if story.partial:
                continue
        info = PngInfo()
        info.add_text(MARK, keys[panel.index])
        Image.fromarray(pixels).save(path, pnginfo=info)


def read_panel(path: Path, key: str) -> np.ndarray:
    """The saved panel's pixels; a file this pack did not write for this panel is an error."""
    try:
        with Image.open(path) as image:
            if getattr(image, "text", {}).get(MARK) == key:
                return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError):
        pass
    raise ValueError(f"{path} is not a panel saved by Comic Page (or was edited): move it away; it is never "
                     "overwritten.")


def whole_story(story, images: torch.Tensor, folder: Path) -> torch.Tensor:
    """Every panel of the story, in story order, after ``save_panels``: a whole story's are ``images``;
    a part's are the saved files (the new panels among them). A missing panel is an error naming the
    panels to draw."""
    if not story.partial:
        return images
    keys = panel_keys(story)
    size = tuple(images.shape[1:3])
    panels, missing = [], []
    for panel in story.panels:
        path = panel_path(folder, panel.index + 1, keys[panel.index])
        if not path.exists():
            missing.append(panel.index + 1)
            continue
        picture = read_panel(path, keys[panel.index])
        if picture.shape[:2] != size:
            raise ValueError(f"{path.name} is {picture.shape[1]}x{picture.shape[0]} px but the new panels are "
                             f"{size[1]}x{size[0]}: draw the whole story at this size (panels empty).")
        panels.append(picture)
    if missing:
        listed = ", ".join(map(str, missing))
        raise ValueError(
            f"Panels {listed} of this story have no saved image in {folder} (never drawn, or their line or an "
            f"identity panel they read changed since). Add them to Story Prompts' panels ('{listed}'), or draw "
            "the whole story once (panels empty)."
        )
    return from_rgb_uint8(panels)
