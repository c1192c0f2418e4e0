"""Draw the template browser's thumbnails of the example workflows (workflows/Consistent Story - <title>.jpg).

    python scripts/draw_thumbnails.py            # every workflow listed in THUMBNAILS

A thumbnail is a little comic page in the pack's caption font: a title, a subtitle, and one cell
per panel of the workflow's story (simple figures in each character's colours, or a landscape for
[NC] panels) with its caption. No model is involved: the real workflows need real weights.
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO_ROOT = Path(__file__).resolve().parents[1]
FONT = REPO_ROOT / "nodes" / "story" / "fonts" / "ComicNeue-Bold.otf"
SIZE = (400, 300)
PAPER, INK = (250, 247, 240), (30, 30, 30)
SKIES = [(150, 190, 220), (240, 200, 150), (200, 160, 120), (170, 210, 170), (230, 180, 200)]
GROUNDS = [(90, 120, 80), (120, 100, 80), (160, 120, 90), (200, 180, 120)]

# A figure per character: ("person", hair, body) or ("animal", fur).
MIA, KIT = ("person", (200, 80, 40), (60, 150, 70)), ("animal", (235, 140, 50))
BOB, ALICE = ("person", (40, 40, 40), (200, 50, 50)), ("person", (210, 90, 40), (70, 160, 90))
TOM, REX = ("person", (60, 90, 200), (230, 190, 60)), ("animal", (140, 95, 60))
TOBY = ("animal", (150, 100, 60))
ANN = ("person", (30, 30, 30), (240, 200, 40))
NIA = ("person", (200, 200, 210), (50, 90, 170))
# The Flux workflows' story, drawn alike on every DiT family's page.
NIA_STORY = [([NIA], "The Swallow would fly again."), ([NIA], "Today was the day."), ([], "Airborne."),
             ([NIA], "Nothing but sky.")]

THUMBNAILS = {
    "Comic page (SD1.5)": ("Consistent Story - SD1.5", "7 panels, two characters and a street: classic page", [2, 3, 2], [
        ([MIA], "A rainy Tuesday."), ([KIT], "Someone was waiting."), ([MIA], "Oh! Hello there."),
        ([MIA, KIT], "Coming with me."), ([KIT], "Safe and dry."), ([], "The storm passed."),
        ([MIA, KIT], "Best friends."),
    ]),
    "Two characters (SDXL)": ("Two characters - SDXL", "each panel reads only the characters it shows", [3, 3], [
        ([BOB], "Always early."), ([ALICE], "Never early."), ([BOB], "Ten minutes late."),
        ([ALICE], "Made it!"), ([], "The long way north."), ([BOB, ALICE], "Same as ever."),
    ]),
    "Character from your image (SD1.5)": ("Your own character - SD1.5", "Mia drawn from one picture of her", [3, 3], [
        ([MIA], "A rainy Tuesday."), ([KIT], "Someone was waiting."), ([MIA, KIT], "Coming with me."),
        ([KIT], "Safe and dry."), ([], "The storm passed."), ([MIA, KIT], "Best friends."),
    ]),
    "Character LoRA (SDXL)": ("A character LoRA - SDXL", "a DreamBooth LoRA + Consistent Self-Attention", [2, 2], [
        ([TOBY], "Winter again."), ([TOBY], "Wheee!"), ([], "Everyone was asleep."), ([TOBY], "Best part of winter."),
    ]),
    "PhotoMaker face (SDXL)": ("PhotoMaker story - SDXL", "a face from a photo, a consistent look", [2, 2], [
        ([ANN], "Her first night."), ([ANN], "Better than the guide."), ([], "The city never sleeps."),
        ([ANN], "A new friend."),
    ]),
    "Comic page (Flux)": ("Consistent Story - Flux", "image tokens shared in the single-stream blocks", [2, 2],
                          NIA_STORY),
    "Comic page (Flux.2 klein)": ("Consistent Story - Flux.2 klein", "the Flux story on Flux.2 klein, single-stream",
                                  [2, 2], NIA_STORY),
    "Comic page (Qwen-Image)": ("Consistent Story - Qwen-Image", "image tokens shared in the late joint blocks",
                                [2, 2], NIA_STORY),
    "Comic page (Z-Image)": ("Consistent Story - Z-Image", "image tokens shared in the late layers, 8 steps",
                             [2, 2], NIA_STORY),
    "Long story of 24 panels (SD1.5)": ("A long story - SD1.5", "24 panels in one sampler, 4 per model call", [4, 4, 4], [
        ([TOM], ""), ([REX], ""), ([TOM, REX], ""), ([], ""), ([TOM], ""), ([TOM, REX], ""),
        ([REX], ""), ([], ""), ([TOM, REX], ""), ([TOM], ""), ([REX], ""), ([TOM, REX], ""),
    ]),
}


def draw_figure(draw: ImageDraw.ImageDraw, figure, x: int, ground: int, scale: float) -> None:
    kind, *colours = figure
    if kind == "person":
        hair, body = colours
        w, h, head = int(14 * scale), int(26 * scale), int(11 * scale)
        draw.rectangle([x - w // 2, ground - h, x + w // 2, ground], fill=body, outline=INK)
        cy = ground - h - head
        draw.ellipse([x - head, cy - head, x + head, cy + head], fill=(245, 205, 170), outline=INK)
        draw.chord([x - head, cy - head, x + head, cy + head], 180, 360, fill=hair, outline=INK)
    else:
        (fur,) = colours
        w, h = int(22 * scale), int(12 * scale)
        draw.ellipse([x - w, ground - h, x + w // 2, ground], fill=fur, outline=INK)
        draw.ellipse([x + w // 3, ground - 2 * h, x + w, ground - h // 2], fill=fur, outline=INK)
        draw.line([x - w, ground - h // 2, x - w - int(8 * scale), ground - h], fill=fur, width=max(2, int(3 * scale)))


def draw_cell(page: Image.Image, box, figures, caption: str, index: int, font) -> None:
    draw = ImageDraw.Draw(page)
    left, top, right, bottom = box
    caption_h = 16 if caption else 0
    art_bottom = bottom - caption_h
    ground = top + int((art_bottom - top) * 0.72)
    draw.rectangle([left, top, right, ground], fill=SKIES[index % len(SKIES)])
    draw.rectangle([left, ground, right, art_bottom], fill=GROUNDS[index % len(GROUNDS)])
    if not figures:  # a landscape: sun and hills
        r = (art_bottom - top) // 7
        draw.ellipse([right - 4 * r, top + r, right - 2 * r, top + 3 * r], fill=(245, 170, 60))
        draw.polygon([(left, ground), ((left + right) // 2, top + (ground - top) // 2), (right, ground)],
                     fill=(110, 140, 110))
    scale = min(1.0, (art_bottom - top) / 80)
    for i, figure in enumerate(figures):
        x = left + (right - left) * (i + 1) // (len(figures) + 1)
        draw_figure(draw, figure, x, ground + int(4 * scale), scale)
    draw.rectangle([left, top, right, art_bottom], outline=INK, width=2)
    if caption:
        draw.text(((left + right) // 2, bottom - caption_h // 2), caption, font=font, fill=INK, anchor="mm")


def draw_thumbnail(title: str, subtitle: str, rows: list[int], panels) -> Image.Image:
    page = Image.new("RGB", SIZE, PAPER)
    draw = ImageDraw.Draw(page)
    draw.text((12, 6), title, font=ImageFont.truetype(str(FONT), 24), fill=INK)
    draw.text((14, 36), subtitle, font=ImageFont.truetype(str(FONT), 13), fill=(90, 90, 90))
    caption_font = ImageFont.truetype(str(FONT), 11)
    top, margin, gutter = 58, 10, 8
    row_h = (SIZE[1] - top - margin - gutter * (len(rows) - 1)) // len(rows)
    index = 0
    for row, count in enumerate(rows):
        y = top + row * (row_h + gutter)
        cell_w = (SIZE[0] - 2 * margin - gutter * (count - 1)) // count
        for column in range(count):
            x = margin + column * (cell_w + gutter)
            figures, caption = panels[index]
            draw_cell(page, (x, y, x + cell_w, y + row_h), figures, caption, index, caption_font)
            index += 1
    return page


def main(argv=None) -> int:
    for name, (title, subtitle, rows, panels) in THUMBNAILS.items():
        assert sum(rows) == len(panels), name
        path = REPO_ROOT / "workflows" / f"Consistent Story - {name}.jpg"
        draw_thumbnail(title, subtitle, rows, panels).save(path, quality=88)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
