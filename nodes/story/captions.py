"""Captions and the text on a page: captions and colours given as text, the caption font and its
word wrap (Comic Neue Bold, OFL, in ``fonts/``). No ComfyUI import."""
from __future__ import annotations

import re
from pathlib import Path

from PIL import ImageFont

from .wiring import BATCH_WIRING

MIN_AUTO_FONT = 8  # the automatic caption size is never smaller
FONT_PATH = Path(__file__).resolve().parent / "fonts" / "ComicNeue-Bold.otf"


# ----------------------------------------------------------------------------------------------
# Inputs given as text
# ----------------------------------------------------------------------------------------------
def parse_captions(text: str, panel_count: int) -> list[str]:
    """One caption per panel per line; an empty line is a panel without caption.

    Trailing empty lines are ignored (a final newline is not a panel). Fewer lines than panels
    leave the last panels uncaptioned.
    """
    lines = caption_lines(text)
    if len(lines) > panel_count:
        raise ValueError(
            f"captions has {len(lines)} lines but images has only {panel_count} panels. If the captions "
            f"come from Story Prompts, the story has {len(lines)} panels and the sampler made "
            f"{panel_count} images. {BATCH_WIRING} (Consistent Self-Attention stops such a run before "
            f"sampling.) Typed captions: give at most one line per panel (an empty line for a panel "
            f"without caption)."
        )
    return lines + [""] * (panel_count - len(lines))


def caption_lines(text: str) -> list[str]:
    """One stripped caption per line; trailing empty lines dropped (a final newline is not a panel)."""
    lines = [line.strip() for line in (text or "").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


_HEX_COLOR = re.compile(r"#?([0-9a-fA-F]{3}|[0-9a-fA-F]{6})")


def parse_color(text: str) -> tuple[int, int, int]:
    """'#RRGGBB', 'RRGGBB', '#RGB' or 'RGB' to an RGB triple."""
    match = _HEX_COLOR.fullmatch((text or "").strip())
    if not match:
        raise ValueError(
            f"background_color '{text}' is not a hex colour: write it like #FFFFFF (white) or #1A1A1A."
        )
    digits = match.group(1)
    if len(digits) == 3:
        digits = "".join(d * 2 for d in digits)
    return tuple(int(digits[i : i + 2], 16) for i in (0, 2, 4))


def load_font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_PATH), size)


def auto_font_size(page_width: int, narrowest_cell: int) -> int:
    """1/32 of the page width, capped so the narrowest panel is 12 sizes wide; never under 8 px."""
    return max(MIN_AUTO_FONT, round(min(page_width / 32, narrowest_cell / 12)))


def caption_padding(font_size: int) -> int:
    return max(2, font_size // 3)


def line_height(font: ImageFont.FreeTypeFont) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent


def wrap_text(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word wider than a line is broken between letters."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
            continue
        piece = ""
        for char in word:
            if piece and font.getlength(piece + char) > width:
                lines.append(piece)
                piece = ""
            piece += char
        lines.append(piece)
    return lines


def text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)
