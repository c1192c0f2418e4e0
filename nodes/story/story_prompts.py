"""Story text -> characters and panel prompts, and the style templates. Pure Python.

Syntax (StoryDiffusion's, in one text box; one item per line, blank lines ignored):

- ``[Bob] a man with short black hair, red coat`` defines the character Bob. A line is a
  definition when it starts with the tag of a name not defined before and has no other tag
  and no ``#``. Names use letters, digits, spaces, ``_`` and ``-``; case matters.
- Every other line is a panel, so ``[Bob] reads the paper`` after Bob's definition is a panel,
  as in the official app. A tag in a panel is replaced by the description; any number of
  characters per panel (the official app refuses more than 2 for memory; the prompt has no such
  limit, the attention nodes decide what they can afford). Definitions may follow the panels
  that use them.
- ``[NC]`` marks a panel with no character; the tag is dropped from the prompt.
- ``#`` ends the prompt; the rest of the line is the panel's caption, in which ``[Name]``
  becomes the plain name.

Because a repeated ``[Bob] ...`` line is a panel, a definition can never clash with an earlier
one. A typo such as ``[Bbo] walks`` would silently define a character instead of drawing a
panel, so a character that no panel uses is an error. Errors are ``StoryError`` and name the
line and the change to make.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, replace

from ...attention.cast import MAX_IDENTITY_PANELS, StoryCast, solo_panels
from .panel_selection import StoryError, parse_panel_selection

NO_CHARACTER = "NC"
CUSTOM_STYLE = "Custom"
DEFAULT_STYLE = "Japanese Anime"
PROMPT_SLOT = "{prompt}"

# The node's default story: the syntax at a glance, and a batch of 4 that any model can afford.
EXAMPLE_STORY = """\
[Bob] a young man with short black hair, round glasses and a red coat
[Bob] wakes up in his small attic room, morning sun through the window # Another Monday.
[Bob] drinks coffee at a busy street cafe # Then he saw it.
[Bob] picks up an old map lying under his chair # Where does this lead?
[Bob] stands at the edge of a misty forest, holding the map # The adventure begins.
"""

_TAG = re.compile(r"\[([^\[\]]*)\]")
_NAME = re.compile(r"[\w \-]+")  # \w: Unicode letters, digits and "_"
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,.;:!?])")


@dataclass(frozen=True)
class Style:
    name: str
    template: str  # contains PROMPT_SLOT
    negative: str

    def apply(self, prompt: str) -> str:
        return self.template.replace(PROMPT_SLOT, prompt)


# The nine styles of the official StoryDiffusion app (same names, our own wording).
STYLES = (
    Style("No style", PROMPT_SLOT, ""),
    Style(
        "Japanese Anime",
        "anime key visual of {prompt}, japanese animation, cel shading, crisp line work, vivid colors, "
        "detailed painted background",
        "photo, photorealistic, 3d render, realistic skin texture, western cartoon, deformed, blurry, low quality",
    ),
    Style(
        "Digital/Oil Painting",
        "oil painting of {prompt}, visible brush strokes, textured canvas, painterly light, rich color, fine art",
        "photo, photograph, 3d render, anime, flat colors, vector art, blurry, low quality",
    ),
    Style(
        "Pixar/Disney Character",
        "3d animated feature film still of {prompt}, stylized character, expressive eyes, soft global "
        "illumination, family movie look",
        "photo, photorealistic, anime, 2d, sketch, creepy, uncanny, deformed, low quality",
    ),
    Style(
        "Photographic",
        "cinematic photo of {prompt}, 35mm film, natural light, shallow depth of field, sharp focus, "
        "high detail",
        "drawing, painting, illustration, anime, cartoon, 3d render, sketch, deformed, low quality",
    ),
    Style(
        "Comic book",
        "comic book panel of {prompt}, bold ink outlines, halftone shading, dynamic composition, "
        "saturated flat colors",
        "photo, photorealistic, 3d render, muddy colors, blurry, low quality",
    ),
    Style(
        "Line art",
        "line art drawing of {prompt}, clean black ink lines on white paper, precise contours, minimal shading",
        "color, photo, photorealistic, painting, heavy shading, gradients, 3d render, blurry",
    ),
    Style(
        "Black and White Film Noir",
        "black and white film noir still of {prompt}, high contrast, hard shadows, low-key lighting, "
        "1940s cinema, film grain",
        "color, colorful, bright, cheerful, cartoon, anime, low quality",
    ),
    Style(
        "Isometric Rooms",
        "isometric cutaway diorama of {prompt}, miniature room, clean 3d render, soft lighting, tidy details",
        "photo, realistic, fisheye, perspective distortion, cluttered, blurry, low quality",
    ),
)
STYLE_NAMES = tuple(style.name for style in STYLES) + (CUSTOM_STYLE,)


@dataclass(frozen=True)
class Character:
    name: str
    description: str
    line: int


@dataclass(frozen=True)
class Panel:
    index: int  # position in the story: row of the latent batch
    line: int
    text: str  # after substitution, before the style
    prompt: str  # what is encoded: text inside the style template
    caption: str
    characters: tuple[str, ...]  # named in the prompt, in order; empty for [NC] and untagged panels


@dataclass(frozen=True)
class Story:
    panels: tuple[Panel, ...]
    characters: tuple[Character, ...]
    style: str
    negative: str  # user's negative merged with the style's
    # Characters drawn from the user's images (nodes/host/references.CharacterReference), in character order.
    references: tuple = ()
    template: str = PROMPT_SLOT  # the style's template
    # A story drawn in part (``select``): the story indices of the panels in the sampler's batch, in
    # story order (the selected panels and the identity panels of the characters they name); None =
    # every panel. ``selected``: the panels asked for; ``identity_count``: identity panels per character
    # the drawn rows were chosen for.
    drawn: tuple[int, ...] | None = None
    selected: tuple[int, ...] | None = None
    identity_count: int | None = None

    @property
    def drawn_panels(self) -> tuple[Panel, ...]:
        """The panels of the sampler's batch, in batch order: every panel, or the drawn part."""
        return self.panels if self.drawn is None else tuple(self.panels[i] for i in self.drawn)

    @property
    def partial(self) -> bool:
        return self.drawn is not None

    @property
    def panel_characters(self) -> tuple[tuple[int, ...], ...]:
        """Per panel, the indices (into ``characters``) of the characters it names, in order."""
        index = {character.name: i for i, character in enumerate(self.characters)}
        return tuple(tuple(index[name] for name in panel.characters) for panel in self.panels)

    def select(self, spec: str, identity_panels: int) -> "Story":
        """The story drawn in part: the panels ``spec`` names (see ``parse_panel_selection``) and the
        first ``identity_panels`` solo panels of every character they name; ``spec`` "" = the whole story."""
        if not 1 <= identity_panels <= MAX_IDENTITY_PANELS:
            raise StoryError(f"identity_panels must lie between 1 and {MAX_IDENTITY_PANELS}, got {identity_panels}.")
        selected = parse_panel_selection(spec, len(self.panels))
        if selected is None:
            return replace(self, drawn=None, selected=None, identity_count=identity_panels)
        panel_characters = self.panel_characters
        named = {c for panel in selected for c in panel_characters[panel]}
        drawn = set(selected).union(*(solo_panels(panel_characters, c, identity_panels) for c in named))
        return replace(self, drawn=tuple(sorted(drawn)), selected=selected, identity_count=identity_panels)

    def character_prompt(self, name: str) -> str:
        """What a reference image of ``name`` is prompted with: its description, in the story's style."""
        return self.template.replace(PROMPT_SLOT, self.character(name).description)

    @property
    def captions(self) -> tuple[str, ...]:
        """The caption of each panel of the batch."""
        return tuple(panel.caption for panel in self.drawn_panels)

    def character(self, name: str) -> Character:
        for character in self.characters:
            if character.name == name:
                return character
        raise KeyError(name)

    def cast(self, identity_panels: int) -> StoryCast:
        """Who reads whom: each character's first ``identity_panels`` single-character panels are
        its identity panels (a character never alone is an error naming it), or its reference
        images when it has some."""
        counts = {ref.name: ref.count for ref in self.references}
        return StoryCast.from_panels([c.name for c in self.characters], self.panel_characters, identity_panels,
                                     [counts.get(c.name, 0) for c in self.characters], self.drawn)

    def with_reference(self, reference) -> "Story":
        """A copy of the story in which ``reference.name`` is drawn from ``reference`` (replacing any
        earlier reference of that character); references stay in character order."""
        self.character(reference.name)  # KeyError for a name the story does not define
        order = [c.name for c in self.characters]
        kept = [ref for ref in self.references if ref.name != reference.name] + [reference]
        return replace(self, references=tuple(sorted(kept, key=lambda ref: order.index(ref.name))))

    def identity_panels(self, per_character: int) -> dict[str, tuple[int, ...]]:
        """Character name -> the story indices of its identity panels."""
        cast = self.cast(per_character)
        return dict(zip(cast.names, cast.identity))


def get_style(name: str, custom_template: str = "") -> Style:
    """The named style; "Custom" wraps ``custom_template``, which must contain ``{prompt}``."""
    if name == CUSTOM_STYLE:
        template = custom_template.strip()
        if PROMPT_SLOT not in template:
            raise StoryError(
                f"The custom style must contain {PROMPT_SLOT} where the panel's prompt goes, e.g. "
                f"'watercolor storybook illustration of {PROMPT_SLOT}, soft pastel colors'; got {template!r}."
            )
        return Style(CUSTOM_STYLE, template, "")
    for style in STYLES:
        if style.name == name:
            return style
    raise StoryError(f"Unknown style {name!r}. Choose one of: {', '.join(STYLE_NAMES)}.")


def merge_negatives(*negatives: str) -> str:
    return ", ".join(part.strip() for part in negatives if part.strip())


def parse_story(text: str, style: str = DEFAULT_STYLE, custom_template: str = "", negative: str = "") -> Story:
    """Parse the story, substitute characters and apply the style; raise StoryError on bad input."""
    chosen = get_style(style, custom_template)
    characters: dict[str, Character] = {}
    panel_lines: list[tuple[int, str, str, list[str]]] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        prompt, has_caption, caption = (part.strip() for part in line.partition("#"))
        names = _tag_names(prompt, number)
        definition = _definition(prompt, names, has_caption, characters, number)
        if definition is not None:
            characters[definition.name] = definition
        else:
            panel_lines.append((number, prompt, caption, names))
    if not panel_lines:
        defined = "".join(
            f" Line {c.line} defines [{c.name}]{_suggestion(c.name, characters)}." for c in characters.values()
        )
        raise StoryError(
            "The story has no panels: every non-blank line that is not a character definition is a panel."
            f"{defined} Add panel lines such as '[Bob] walks in the park # A sunny day.'"
        )
    panels = tuple(
        _panel(index, number, prompt, caption, names, characters, chosen)
        for index, (number, prompt, caption, names) in enumerate(panel_lines)
    )
    _check_all_used(characters, panels)
    return Story(panels, tuple(characters.values()), chosen.name, merge_negatives(negative, chosen.negative),
                 template=chosen.template)


def _tag_names(prompt: str, number: int) -> list[str]:
    """Normalised names of the prompt's tags, in order; any other bracket is an error."""
    names = []
    for match in _TAG.finditer(prompt):
        name = _tag_name(match)
        if not _NAME.fullmatch(name):
            raise StoryError(
                f"'{match.group(0)}' is not a character tag. Names use letters, digits, spaces, '_' and '-': "
                "fix the name, or remove the brackets.",
                number,
            )
        names.append(name)
    leftover = _TAG.sub("", prompt)
    if "[" in leftover or "]" in leftover:
        raise StoryError("unmatched '[' or ']'. Close the tag, e.g. '[Bob]', or remove the bracket.", number)
    return names


def _tag_name(match: re.Match) -> str:
    """The tag's name with whitespace collapsed; [nc] in any case is [NC]."""
    name = " ".join(match.group(1).split())
    return NO_CHARACTER if name.upper() == NO_CHARACTER else name


def _definition(prompt, names, has_caption, characters, number) -> Character | None:
    """A Character when the line defines one: it starts with the only tag, a new name, no '#'."""
    if has_caption or len(names) != 1 or not prompt.startswith("[") or names[0] in characters:
        return None
    name = names[0]
    if name == NO_CHARACTER:
        return None
    description = _clean(_TAG.sub("", prompt, count=1))
    if not description:
        raise StoryError(
            f"[{name}] has no description. Describe the character after the tag, e.g. "
            f"'[{name}] a man with short black hair, red coat'.",
            number,
        )
    return Character(name, description, number)


def _panel(index, number, prompt, caption, names, characters, style) -> Panel:
    named = tuple(dict.fromkeys(name for name in names if name != NO_CHARACTER))
    for name in named:
        if name not in characters:
            raise StoryError(_unknown_name_message(name, characters), number)
    if named and NO_CHARACTER in names:
        raise StoryError(
            f"[{NO_CHARACTER}] marks a panel without characters, but the line also names "
            f"{', '.join(f'[{n}]' for n in named)}. Remove one or the other.",
            number,
        )

    def substitute(match: re.Match) -> str:
        name = _tag_name(match)
        return "" if name == NO_CHARACTER else f" {characters[name].description} "

    text = _clean(_TAG.sub(substitute, prompt))
    if not text:
        if not prompt:
            raise StoryError(
                "the line has only a caption. Put the panel's prompt before '#', e.g. "
                "'[Bob] walks in the park # " + (caption or "A sunny day.") + "'.",
                number,
            )
        raise StoryError("the panel has no prompt. Describe the scene, e.g. '[NC] a forest at night'.", number)
    return Panel(index, number, text, style.apply(text), _caption(caption, characters), named)


def _caption(caption: str, characters) -> str:
    def name_only(match: re.Match) -> str:
        name = _tag_name(match)
        if name == NO_CHARACTER:
            return ""
        return name if name in characters else match.group(0)

    return " ".join(_TAG.sub(name_only, caption).split())


def _check_all_used(characters, panels) -> None:
    used = {name for panel in panels for name in panel.characters}
    for character in characters.values():
        if character.name not in used:
            raise StoryError(
                f"[{character.name}] is defined here but no panel uses it. If this line is meant as a panel, "
                f"use a defined name{_suggestion(character.name, characters)}; otherwise delete the line or "
                f"use [{character.name}] in a panel.",
                character.line,
            )


def _unknown_name_message(name: str, characters) -> str:
    known = ", ".join(f"[{n}]" for n in characters) or "none"
    return (
        f"no character is named [{name}]{_suggestion(name, characters)}. Known characters: {known}. "
        f"Fix the name, or define it on a line of its own (no '#', no other tag), e.g. "
        f"'[{name}] a woman with red hair, green dress'."
    )


def _suggestion(name: str, characters) -> str:
    others = [n for n in characters if n != name]
    folded = {n.casefold(): n for n in others}
    close = folded.get(name.casefold()) or next(iter(difflib.get_close_matches(name, others, n=1)), None)
    return f" (did you mean [{close}]?)" if close else ""


def _clean(text: str) -> str:
    """One space between words, none before punctuation, no stray commas at the ends."""
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", " ".join(text.split()))
    return text.strip(" ,")
