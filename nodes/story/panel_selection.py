"""Which panels of a story to draw: the Story Prompts ``panels`` input. Pure Python.

Panels are numbered from 1 as the editor's badge numbers them (character definitions are not
panels): numbers and ranges separated by commas, e.g. "37" or "3, 9-12"; "" = every panel.
"""
from __future__ import annotations

import re


class StoryError(ValueError):
    """A story or style the user has to fix; ``line`` is 1-based, None when no line is at fault."""

    __module__ = "consistent_story"  # as ConsistentAttentionError's: the type ComfyUI shows reads as a name

    def __init__(self, message: str, line: int | None = None):
        super().__init__(f"Story line {line}: {message}" if line is not None else message)
        self.line = line


_ITEM = re.compile(r"(\d+)\s*(?:-\s*(\d+))?")
PANELS_EXAMPLE = "'37' or '3, 9-12'"


def parse_panel_selection(spec: str, count: int) -> tuple[int, ...] | None:
    """Story indices (0-based, sorted, once each) of the panels ``spec`` names, or None for "" (every
    panel). ``spec`` numbers panels from 1 as the editor's badge does (definition lines not counted):
    numbers and ranges separated by commas, e.g. "3, 9-12"."""
    if not spec.strip():
        return None
    chosen: set[int] = set()
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        match = _ITEM.fullmatch(item)
        if match is None:
            raise StoryError(
                f"panels: '{item}' is not a panel number or range. Write panel numbers and ranges separated by "
                f"commas, e.g. {PANELS_EXAMPLE}, or leave panels empty to draw the whole story."
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        if first > last:
            raise StoryError(f"panels: the range '{item}' runs backwards. Write it as '{last}-{first}'.")
        if first < 1 or last > count:
            raise StoryError(
                f"panels: '{item}' is outside the story, whose panels are numbered 1 to {count} (as the badge on "
                "the node counts them; character definitions are not panels). Pick numbers in that range."
            )
        chosen.update(range(first - 1, last))
    if not chosen:
        raise StoryError(f"panels: '{spec}' names no panel. Write e.g. {PANELS_EXAMPLE}, or leave it empty.")
    return tuple(sorted(chosen))
