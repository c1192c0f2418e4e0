"""The story at a glance: each panel's role, what it reads, and its final prompt. Pure Python.

Story Prompts gives this text as an output (a Preview Any or Show Text node shows it), so a user
sees which panels make each character's identity, who reads whom, and the prompt each panel is
encoded with after the style and ``[Name]`` replacement, before anything is sampled. The roles
follow the rule of ``attention/cast.py`` (each character's first ``identity_panels`` solo
panels), numbered from 1 as the editor's badge numbers panels.
"""
from __future__ import annotations

from ...attention.cast import solo_panels
from .story_prompts import Story


def story_summary(story: Story, identity_panels: int) -> str:
    names = [character.name for character in story.characters]
    panel_characters = story.panel_characters
    identity = [solo_panels(panel_characters, c, identity_panels) for c in range(len(names))]

    def numbers(panels) -> str:
        return ", ".join(str(panel + 1) for panel in panels)

    def identity_of(c: int) -> str:
        return f"{names[c]} {numbers(identity[c])}" if identity[c] else f"{names[c]} (never alone: no identity)"

    drawn = set(range(len(story.panels)) if story.drawn is None else story.drawn)
    lines = [f"{len(story.panels)} panels · {len(names)} characters"
             + (f" · draws {len(drawn)} of them" if story.partial else "")]
    lines += [f"identity panels: {'; '.join(identity_of(c) for c in range(len(names)))}"] if names else []
    for panel, chars in zip(story.panels, panel_characters):
        owner = next((c for c in chars if panel.index in identity[c]), None)
        if owner is not None:
            others = [p for p in identity[owner] if p != panel.index]
            role = f"identity of {names[owner]}, reads {numbers(others) if others else 'nobody'}"
        elif chars:
            role = "reads " + "; ".join(identity_of(c) for c in chars)
        else:
            role = "no character, reads nobody"
        skipped = "" if panel.index in drawn else " (not drawn)"
        lines.append(f"{panel.index + 1}. {role}{skipped}: {panel.prompt}")
    return "\n".join(lines)
