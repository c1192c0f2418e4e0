"""Comic pages from story panels: layout maths and Pillow drawing, no ComfyUI import.

Decisions the Comic Page node documents to its users:

- **Page height is derived, never chosen.** Every row of panels is as tall as a panel of the
  layout's reference width at the images' aspect ratio, plus a caption band when any panel has a
  caption. All pages of one call take the height of the tallest page so they stack into one IMAGE
  batch; a page with fewer panels (usually the last) leaves the rest blank.
- **Panels fill their cells by centre-crop** (scale to cover the cell, cut the overflow evenly),
  as drawn comic panels do. Grid and four-panel cells have the images' own aspect ratio, so
  nothing is cut there; only the classic layout's wider and narrower cells crop.
- **Captions sit in a band under each panel**, wrapped to the panel's width and centred. The band
  is as tall as the longest caption of the call needs, so rows line up across pages.
- **Right-to-left (manga) order mirrors each page**: panel 1 is at the top right, rows still go
  top to bottom.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from .captions import (
    MIN_AUTO_FONT, auto_font_size, caption_lines, caption_padding, line_height, load_font, parse_captions, parse_color,
    text_color, wrap_text,
)

GRID = "grid"
CLASSIC = "classic comic"
FOUR_PANEL = "four-panel strip"
LAYOUTS = (GRID, CLASSIC, FOUR_PANEL)

LEFT_TO_RIGHT = "left to right"
RIGHT_TO_LEFT = "right to left (manga)"
READING_ORDERS = (LEFT_TO_RIGHT, RIGHT_TO_LEFT)

MIN_CELL_WIDTH = 16
MAX_PAGE_SIDE = 16384  # ComfyUI's MAX_RESOLUTION


# ----------------------------------------------------------------------------------------------
# Layout maths
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    w: int
    h: int

    @property
    def right(self) -> int:
        return self.x + self.w

    @property
    def bottom(self) -> int:
        return self.y + self.h

    def mirrored(self, page_width: int) -> Rect:
        return replace(self, x=page_width - self.right)


@dataclass(frozen=True)
class Cell:
    """Where one panel goes: its picture, and its caption band (None when the call has none)."""

    panel: int
    image: Rect
    caption: Rect | None


@dataclass(frozen=True)
class ComicLayout:
    width: int
    height: int
    pages: tuple[tuple[Cell, ...], ...]  # cells of each page, in reading order


@dataclass(frozen=True)
class LayoutOptions:
    layout: str = GRID
    columns: int = 3
    seed: int = 0
    reading_order: str = LEFT_TO_RIGHT
    page_width: int = 1024
    panels_per_page: int = 0
    gutter: int = 16
    margin: int = 24

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout '{self.layout}' is unknown: choose one of {', '.join(LAYOUTS)}.")
        if self.reading_order not in READING_ORDERS:
            raise ValueError(
                f"reading_order '{self.reading_order}' is unknown: choose one of {', '.join(READING_ORDERS)}."
            )
        for name, least in (("columns", 1), ("page_width", 1), ("panels_per_page", 0), ("gutter", 0), ("margin", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} is {getattr(self, name)}: set it to {least} or more.")

    @property
    def right_to_left(self) -> bool:
        return self.reading_order == RIGHT_TO_LEFT

    @property
    def max_per_row(self) -> int:
        return 2 if self.layout == FOUR_PANEL else self.columns

    @property
    def per_page(self) -> int:
        """Panels on a full page; 0 means all panels on one page."""
        return 4 if self.layout == FOUR_PANEL else self.panels_per_page

    @property
    def reference_per_row(self) -> int:
        """Row width whose cells have the images' aspect ratio: grid rows, or a middling classic row."""
        return math.ceil((1 + self.columns) / 2) if self.layout == CLASSIC else self.max_per_row


def split_pages(panel_count: int, per_page: int) -> list[range]:
    """Panel indices of each page; per_page 0 puts everything on one page."""
    step = per_page or panel_count
    return [range(start, min(start + step, panel_count)) for start in range(0, panel_count, step)]


def classic_row_counts(panel_count: int, max_per_row: int, rng: random.Random) -> list[int]:
    """Panels per row for one classic page: 1..max_per_row each, the split drawn from rng.

    The row count depends only on the panel count (about (1 + max) / 2 panels a row), so all full
    pages of a call are equally tall; rng only decides which rows get the extra panels.
    """
    rows = math.ceil(2 * panel_count / (1 + max_per_row))
    counts = [1] * rows
    for _ in range(panel_count - rows):
        counts[rng.choice([i for i, c in enumerate(counts) if c < max_per_row])] += 1
    return counts


def page_row_counts(options: LayoutOptions, panel_count: int) -> list[list[int]]:
    """Panels per row, for each page."""
    pages = split_pages(panel_count, options.per_page)
    if options.layout == CLASSIC:
        rng = random.Random(options.seed)
        return [classic_row_counts(len(page), options.max_per_row, rng) for page in pages]
    k = options.max_per_row
    return [[min(k, len(page) - start) for start in range(0, len(page), k)] for page in pages]


def row_widths(content_width: int, cells: int, gutter: int) -> list[int]:
    """Widths of `cells` equal cells filling content_width; the first cells take the odd pixels."""
    free = content_width - (cells - 1) * gutter
    base, extra = divmod(free, cells)
    return [base + (i < extra) for i in range(cells)]


def _fit_hint(options: LayoutOptions) -> str:
    if options.layout == FOUR_PANEL:
        return "lower gutter or margin, or raise page_width"
    return "lower columns, gutter or margin, or raise page_width"


def check_width_fits(options: LayoutOptions) -> None:
    """Refuse a page whose fullest row cannot give each panel MIN_CELL_WIDTH pixels."""
    k = options.max_per_row
    content = options.page_width - 2 * options.margin
    narrowest = min(row_widths(content, k, options.gutter)) if content > 0 else content
    if narrowest < MIN_CELL_WIDTH:
        raise ValueError(
            f"The page does not fit: page_width {options.page_width} minus 2 x margin {options.margin} and "
            f"{k - 1} x gutter {options.gutter} leaves {max(narrowest, 0)} px per panel for {k} panels in a "
            f"row ({MIN_CELL_WIDTH} px needed): {_fit_hint(options)}."
        )


def layout_pages(options: LayoutOptions, panel_count: int, panel_aspect: float, caption_band: int = 0) -> ComicLayout:
    """Cells of every page. panel_aspect is the images' height / width; caption_band in pixels."""
    if panel_count < 1:
        raise ValueError("images is empty: connect at least one image.")
    check_width_fits(options)
    content = options.page_width - 2 * options.margin
    reference = row_widths(content, options.reference_per_row, options.gutter)[0]
    image_h = max(1, round(reference * panel_aspect))
    row_h = image_h + caption_band
    counts = page_row_counts(options, panel_count)
    rows = max(len(page) for page in counts)
    height = 2 * options.margin + rows * row_h + (rows - 1) * options.gutter
    if height > MAX_PAGE_SIDE:
        if caption_band > image_h:  # the captions, not the panels, make the page too tall
            raise ValueError(
                f"A page would be {height} px tall (at most {MAX_PAGE_SIDE}): its captions take {caption_band} px "
                f"per row, more than the panels ({image_h} px). Lower caption_font_size, or shorten the captions."
            )
        raise ValueError(
            f"A page would be {height} px tall (at most {MAX_PAGE_SIDE}): set panels_per_page to split the "
            f"story over several pages, or lower page_width."
        )
    grid_widths = options.layout != CLASSIC  # short grid rows keep the full rows' cell widths
    pages, panel = [], 0
    for page in counts:
        cells = []
        for row, k in enumerate(page):
            widths = row_widths(content, options.max_per_row if grid_widths else k, options.gutter)[:k]
            y, x = options.margin + row * (row_h + options.gutter), options.margin
            for w in widths:
                image = Rect(x, y, w, image_h)
                caption = Rect(x, y + image_h, w, caption_band) if caption_band > 0 else None
                if options.right_to_left:
                    image = image.mirrored(options.page_width)
                    caption = caption.mirrored(options.page_width) if caption else None
                cells.append(Cell(panel, image, caption))
                x, panel = x + w + options.gutter, panel + 1
        pages.append(tuple(cells))
    return ComicLayout(options.page_width, height, tuple(pages))


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------
def fit_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover width x height and cut the overflow evenly from both sides."""
    scale = max(width / image.width, height / image.height)
    crop_w, crop_h = width / scale, height / scale
    left, top = (image.width - crop_w) / 2, (image.height - crop_h) / 2
    return image.resize((width, height), Image.Resampling.LANCZOS, box=(left, top, left + crop_w, top + crop_h))


def draw_caption(lines: list[str], rect: Rect, font, padding: int, background, color) -> Image.Image:
    """The caption band as its own image, so text can never spill outside it."""
    band = Image.new("RGB", (rect.w, rect.h), background)
    draw = ImageDraw.Draw(band)
    step = line_height(font)
    for i, line in enumerate(lines):
        x = (rect.w - font.getlength(line)) / 2
        draw.text((x, padding + i * step), line, font=font, fill=color)
    return band


@dataclass(frozen=True)
class PagePlan:
    """The final layout and what each caption band holds."""

    layout: ComicLayout
    lines: tuple[tuple[str, ...], ...]  # wrapped caption lines of each panel
    font_size: int


def plan_pages(options: LayoutOptions, panel_aspect: float, captions: list[str], font_size: int = 0) -> PagePlan:
    """Lay out len(captions) panels; the caption band is as tall as the longest wrapped caption.

    Cell widths do not depend on the band, so a layout without band gives the widths to wrap to.
    """
    plain = layout_pages(options, len(captions), panel_aspect)
    widths = {cell.panel: cell.image.w for page in plain.pages for cell in page}
    size = font_size or auto_font_size(options.page_width, min(widths.values()))
    lines, band = wrap_captions(captions, [widths[i] for i in range(len(captions))], size)
    return PagePlan(layout_pages(options, len(captions), panel_aspect, band), lines, size)


def wrap_captions(captions: list[str], widths: list[int], size: int) -> tuple[tuple[tuple[str, ...], ...], int]:
    """Each caption wrapped to its cell's width at font ``size``, and the band the longest needs."""
    font, padding = load_font(size), caption_padding(size)
    lines = tuple(tuple(wrap_text(text, font, width - 2 * padding)) for text, width in zip(captions, widths))
    most = max((len(panel_lines) for panel_lines in lines), default=0)
    return lines, most * line_height(font) + 2 * padding if most else 0


def check_captions_fit(options: LayoutOptions, captions: str, font_size: int = 0) -> None:
    """Before any panel exists (the captions and settings only): refuse captions that make a page
    too tall whatever the panels are. A lower bound: at least one panel per caption line, each panel
    1 px tall, each caption in the widest cell the layout has, the automatic font at its smallest."""
    texts = caption_lines(captions)
    if not any(texts) or font_size < 0:  # a negative size is named by validation and compose_pages
        return
    check_width_fits(options)
    content = options.page_width - 2 * options.margin
    widest = content if options.layout == CLASSIC else row_widths(content, options.max_per_row, options.gutter)[0]
    _, band = wrap_captions(texts, [widest] * len(texts), font_size or MIN_AUTO_FONT)
    rows = max(len(page) for page in page_row_counts(options, len(texts)))
    least = 2 * options.margin + rows * (1 + band) + (rows - 1) * options.gutter
    if least > MAX_PAGE_SIDE:
        font = f"caption_font_size {font_size}" if font_size else f"the smallest automatic font ({MIN_AUTO_FONT} px)"
        raise ValueError(
            f"A page would be at least {least} px tall (at most {MAX_PAGE_SIDE}) whatever the panels: its captions "
            f"take {band} px per row at {font}, in {rows} row(s). Lower caption_font_size, shorten the captions, "
            "or set panels_per_page to split the story over several pages."
        )


def render_pages(
    panels: np.ndarray, captions: list[str], options: LayoutOptions, font_size: int, background: tuple[int, int, int]
) -> list[Image.Image]:
    """panels: uint8 [B, H, W, 3]; captions: one per panel ('' = none); font_size 0 = automatic."""
    plan = plan_pages(options, panels.shape[1] / panels.shape[2], captions, font_size)
    font, padding, color = load_font(plan.font_size), caption_padding(plan.font_size), text_color(background)
    pages = []
    for cells in plan.layout.pages:
        page = Image.new("RGB", (plan.layout.width, plan.layout.height), background)
        for cell in cells:
            picture = fit_cover(Image.fromarray(panels[cell.panel]), cell.image.w, cell.image.h)
            page.paste(picture, (cell.image.x, cell.image.y))
            if cell.caption and plan.lines[cell.panel]:
                band = draw_caption(plan.lines[cell.panel], cell.caption, font, padding, background, color)
                page.paste(band, (cell.caption.x, cell.caption.y))
        pages.append(page)
    return pages


def to_rgb_uint8(images: torch.Tensor) -> np.ndarray:
    """ComfyUI IMAGE [B, H, W, C] float in [0, 1] to uint8 RGB; grey is repeated, alpha dropped."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be an IMAGE batch [B, H, W, 3]; got shape {tuple(images.shape)}.")
    rgb = images[..., :3] if images.shape[-1] != 1 else images.expand(-1, -1, -1, 3)
    return (rgb.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def from_rgb_uint8(pixels) -> torch.Tensor:
    """uint8 RGB pictures ([B, H, W, 3] array, or a list of [H, W, 3]) to a ComfyUI IMAGE batch."""
    return torch.from_numpy(np.stack(list(pixels))).float() / 255.0


def compose_pages(
    images: torch.Tensor, captions: str, options: LayoutOptions, font_size: int = 0, background: str = "#FFFFFF"
) -> torch.Tensor:
    """IMAGE batch + newline-separated captions -> pages as an IMAGE batch [pages, H, W, 3]."""
    if font_size < 0:
        raise ValueError(f"caption_font_size is {font_size}: use 0 for automatic or a size in pixels.")
    color = parse_color(background)
    panels = to_rgb_uint8(images)
    pages = render_pages(panels, parse_captions(captions, len(panels)), options, font_size, color)
    return from_rgb_uint8(np.asarray(page) for page in pages)
