"""Comic page layout maths and drawing (nodes/story/comic_layout.py), without ComfyUI."""
import itertools
import random

import numpy as np
import pytest
import torch

from harness.pack import load_pack

load_pack()
from consistent_story.nodes.story import captions, comic_layout as cl  # noqa: E402

ASPECT = 0.75  # panels 4:3 landscape, as the small test images below


def options(**changes):
    base = dict(layout=cl.GRID, columns=3, seed=0, page_width=512, panels_per_page=0, gutter=8, margin=12)
    return cl.LayoutOptions(**{**base, **changes})


def all_cells(layout):
    return [cell for page in layout.pages for cell in page]


def cell_box(cell):
    """Picture and caption band together."""
    bottom = cell.caption.bottom if cell.caption else cell.image.bottom
    return cl.Rect(cell.image.x, cell.image.y, cell.image.w, bottom - cell.image.y)


def gap(a, b):
    """Largest axis-aligned distance between two rectangles (negative when they overlap)."""
    return max(b.x - a.right, a.x - b.right, b.y - a.bottom, a.y - b.bottom)


LAYOUT_CASES = [
    dict(layout=cl.GRID, columns=1),
    dict(layout=cl.GRID, columns=3),
    dict(layout=cl.GRID, columns=4, panels_per_page=6),
    dict(layout=cl.CLASSIC, columns=3, seed=5),
    dict(layout=cl.CLASSIC, columns=4, seed=2, panels_per_page=5),
    dict(layout=cl.FOUR_PANEL),
]


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda case: f"{case['layout']}-{case.get('columns')}")
@pytest.mark.parametrize("reading_order", cl.READING_ORDERS)
@pytest.mark.parametrize("band", [0, 30])
def test_cells_inside_margins_and_apart_by_gutters(case, reading_order, band):
    opts = options(**case, reading_order=reading_order)
    layout = cl.layout_pages(opts, 11, ASPECT, band)
    for page in layout.pages:
        boxes = [cell_box(cell) for cell in page]
        for box in boxes:
            assert box.w > 0 and box.h > 0
            assert box.x >= opts.margin and box.right <= layout.width - opts.margin
            assert box.y >= opts.margin and box.bottom <= layout.height - opts.margin
        for a, b in itertools.combinations(boxes, 2):
            assert gap(a, b) >= opts.gutter
        for cell in page:
            assert (cell.caption is None) == (band == 0)
            if cell.caption:
                assert (cell.caption.x, cell.caption.w, cell.caption.y) == (cell.image.x, cell.image.w, cell.image.bottom)
                assert cell.caption.h == band


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda case: f"{case['layout']}-{case.get('columns')}")
def test_every_panel_placed_once_in_reading_order(case):
    layout = cl.layout_pages(options(**case), 11, ASPECT)
    assert [cell.panel for cell in all_cells(layout)] == list(range(11))
    for page in layout.pages:  # rows top to bottom, left to right within a row
        assert [(c.image.y, c.image.x) for c in page] == sorted((c.image.y, c.image.x) for c in page)


def test_fullest_row_fills_the_content_width_exactly():
    opts = options(page_width=517, columns=4, gutter=7, margin=11)
    first_row = cl.layout_pages(opts, 4, ASPECT).pages[0]
    assert first_row[0].image.x == opts.margin and first_row[-1].image.right == opts.page_width - opts.margin
    for left, right in zip(first_row, first_row[1:]):
        assert right.image.x - left.image.right == opts.gutter


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda case: f"{case['layout']}-{case.get('columns')}")
def test_right_to_left_mirrors_left_to_right(case):
    ltr = cl.layout_pages(options(**case), 7, ASPECT, 20)
    rtl = cl.layout_pages(options(**case, reading_order=cl.RIGHT_TO_LEFT), 7, ASPECT, 20)
    assert (rtl.width, rtl.height) == (ltr.width, ltr.height)
    for a, b in zip(all_cells(ltr), all_cells(rtl), strict=True):
        assert a.panel == b.panel
        assert b.image == a.image.mirrored(ltr.width) and b.caption == a.caption.mirrored(ltr.width)


def test_manga_order_starts_top_right():
    opts = options(columns=3, reading_order=cl.RIGHT_TO_LEFT)
    page = cl.layout_pages(opts, 3, ASPECT).pages[0]
    assert page[0].image.right == opts.page_width - opts.margin
    assert page[0].image.x > page[1].image.x > page[2].image.x


def test_grid_cells_keep_the_panel_aspect_ratio():
    layout = cl.layout_pages(options(columns=3), 5, ASPECT)
    for cell in all_cells(layout):
        assert abs(cell.image.h - cell.image.w * ASPECT) <= 1
    short_row = layout.pages[0][3:]  # panels 4 and 5 keep the full rows' cell width
    assert [c.image.w for c in short_row] == [c.image.w for c in layout.pages[0][:2]]


def test_classic_rows_hold_one_to_columns_panels():
    for seed in range(20):
        for count in range(1, 13):
            rows = cl.page_row_counts(options(layout=cl.CLASSIC, columns=3, seed=seed), count)
            assert len(rows) == 1 and sum(rows[0]) == count
            assert all(1 <= k <= 3 for k in rows[0])


def test_classic_layout_is_fixed_by_its_seed():
    random.seed(1)
    a = cl.layout_pages(options(layout=cl.CLASSIC, seed=42, panels_per_page=6), 14, ASPECT, 12)
    random.seed(2)
    b = cl.layout_pages(options(layout=cl.CLASSIC, seed=42, panels_per_page=6), 14, ASPECT, 12)
    assert a == b, "the page's seed fixes it, not Python's global generator"


def test_classic_layout_varies_with_the_seed():
    patterns = {tuple(map(tuple, cl.page_row_counts(options(layout=cl.CLASSIC, seed=s), 8))) for s in range(10)}
    assert len(patterns) > 2
    layouts = {cl.layout_pages(options(layout=cl.CLASSIC, seed=s), 8, ASPECT) for s in range(10)}
    assert len(layouts) > 2


def test_classic_full_pages_have_equal_row_counts():
    rows = cl.page_row_counts(options(layout=cl.CLASSIC, seed=3, panels_per_page=7), 30)
    assert [sum(r) for r in rows] == [7, 7, 7, 7, 2]
    assert len({len(r) for r in rows[:-1]}) == 1


def test_classic_row_counts_use_the_given_generator_only():
    assert cl.classic_row_counts(9, 3, random.Random(1)) == cl.classic_row_counts(9, 3, random.Random(1))


@pytest.mark.parametrize(
    "count, per_page, sizes",
    [(10, 4, [4, 4, 2]), (10, 0, [10]), (8, 4, [4, 4]), (3, 5, [3]), (1, 1, [1])],
)
def test_panels_split_over_pages(count, per_page, sizes):
    layout = cl.layout_pages(options(panels_per_page=per_page), count, ASPECT)
    assert [len(page) for page in layout.pages] == sizes


def test_four_panel_strip_is_two_by_two_whatever_columns_and_per_page_say():
    layout = cl.layout_pages(options(layout=cl.FOUR_PANEL, columns=5, panels_per_page=9), 9, ASPECT)
    assert [len(page) for page in layout.pages] == [4, 4, 1]
    first = layout.pages[0]
    assert len({c.image.x for c in first}) == 2 and len({c.image.y for c in first}) == 2


def test_page_height_comes_from_the_fullest_page():
    opts = options(columns=2, panels_per_page=6, gutter=10, margin=20)
    layout = cl.layout_pages(opts, 7, ASPECT, 25)
    image_h = layout.pages[0][0].image.h
    assert layout.height == 2 * 20 + 3 * (image_h + 25) + 2 * 10


@pytest.mark.parametrize(
    "changes, names",
    [
        (dict(columns=40), ["columns", "page_width"]),
        (dict(margin=256), ["margin", "page_width"]),
        (dict(gutter=230), ["gutter", "page_width"]),
        (dict(layout=cl.FOUR_PANEL, margin=250), ["margin", "page_width"]),
    ],
)
def test_layout_that_cannot_fit_says_what_to_change(changes, names):
    with pytest.raises(ValueError, match="does not fit") as error:
        cl.layout_pages(options(**changes), 4, ASPECT)
    assert all(name in str(error.value) for name in names)


def test_too_tall_page_asks_for_panels_per_page():
    with pytest.raises(ValueError, match="panels_per_page"):
        cl.layout_pages(options(columns=1, page_width=4096), 40, ASPECT)


@pytest.mark.parametrize(
    "changes, name",
    [(dict(layout="spiral"), "layout"), (dict(reading_order="up"), "reading_order"), (dict(gutter=-1), "gutter"),
     (dict(columns=0), "columns"), (dict(panels_per_page=-2), "panels_per_page")],
)
def test_bad_options_name_the_input(changes, name):
    with pytest.raises(ValueError, match=name):
        options(**changes)


def test_no_panels_is_an_error():
    with pytest.raises(ValueError, match="images"):
        cl.layout_pages(options(), 0, ASPECT)


def test_captions_one_line_per_panel():
    assert captions.parse_captions("a\n\n c \n", 4) == ["a", "", "c", ""]
    assert captions.parse_captions("", 2) == ["", ""]
    assert captions.parse_captions("a\n\nc\n\n\n", 3) == ["a", "", "c"]  # trailing empty lines are no panels
    with pytest.raises(ValueError, match="captions has 3 lines but images has only 2 panels"):
        captions.parse_captions("a\nb\nc", 2)


@pytest.mark.parametrize("text, rgb", [("#FFFFFF", (255, 255, 255)), ("1a2b3c", (26, 43, 60)), (" #f00 ", (255, 0, 0))])
def test_colour_parsing(text, rgb):
    assert captions.parse_color(text) == rgb


@pytest.mark.parametrize("text", ["white", "#12345", "#GGGGGG", ""])
def test_invalid_colour_names_the_input(text):
    with pytest.raises(ValueError, match="background_color"):
        captions.parse_color(text)


# ---- drawing -------------------------------------------------------------------------------------
def panels(count=5, height=48, width=64, seed=0):
    return torch.rand(count, height, width, 3, generator=torch.Generator().manual_seed(seed))


def test_font_and_its_licence_ship_with_the_pack():
    assert captions.FONT_PATH.is_file() and (captions.FONT_PATH.parent / "OFL.txt").is_file()
    assert captions.load_font(20).getlength("Hello") > 0


def test_wrapped_lines_fit_and_keep_every_word():
    font = captions.load_font(14)
    text = "a hero walks into the dark forest Pneumonoultramicroscopicsilicovolcanoconiosis today"
    lines = captions.wrap_text(text, font, 90)
    assert len(lines) > 2 and all(font.getlength(line) <= 90 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")


def test_fit_cover_fills_the_cell_from_the_centre():
    from PIL import Image

    strip = np.zeros((10, 30, 3), np.uint8)
    strip[:, 10:20] = 255  # white centre third between black sides
    out = np.asarray(cl.fit_cover(Image.fromarray(strip), 20, 20))
    assert out.shape == (20, 20, 3)
    assert out[:, 10].min() == 255 and out.mean() > 200  # centre kept, sides cut, no bars added


def test_pages_are_an_image_batch_of_the_planned_size():
    opts = options(panels_per_page=2)
    pages = cl.compose_pages(panels(5), "one\ntwo", opts)
    plan = cl.plan_pages(opts, 48 / 64, ["one", "two", "", "", ""])
    assert pages.shape == (3, plan.layout.height, plan.layout.width, 3) and pages.dtype == torch.float32
    assert 0 <= pages.min() and pages.max() <= 1
    assert plan.layout.pages[0][0].caption.h > 0 and plan.lines[:3] == (("one",), ("two",), ())


def test_auto_font_size_scales_with_the_page():
    small = cl.plan_pages(options(page_width=256), ASPECT, ["hi"] * 3)
    large = cl.plan_pages(options(page_width=1024), ASPECT, ["hi"] * 3)
    assert 8 <= small.font_size < large.font_size
    assert cl.plan_pages(options(page_width=1024), ASPECT, ["hi"] * 3, font_size=13).font_size == 13


def test_panels_fill_their_cells_exactly():
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    images = colours[:, None, None, :].expand(3, 30, 50, 3)
    opts = options(layout=cl.CLASSIC, seed=1, columns=3)
    page = cl.compose_pages(images, "", opts)[0]
    for cell in cl.layout_pages(opts, 3, 30 / 50).pages[0]:
        r = cell.image
        assert torch.equal(page[r.y : r.bottom, r.x : r.right], colours[cell.panel].expand(r.h, r.w, 3))


def test_background_colour_surrounds_the_panels():
    page = cl.compose_pages(panels(2), "", options(margin=10), background="#336699")[0]
    rgb = torch.tensor([0x33, 0x66, 0x99]) / 255
    assert torch.allclose(page[:10].reshape(-1, 3), rgb.expand(10 * 512, 3))
    assert torch.allclose(page[-10:, -10:].reshape(-1, 3), rgb.expand(100, 3))


def test_captions_change_pixels_only_in_their_band():
    opts = options(panels_per_page=3)
    images = panels(5)
    base = cl.compose_pages(images, "Once upon a time", opts)
    captioned = cl.compose_pages(images, "Once upon a time\n\n\nThe end", opts)
    plan = cl.plan_pages(opts, 48 / 64, ["Once upon a time", "", "", "The end", ""])
    band = plan.layout.pages[1][0].caption  # panel 4, the first of page 2
    inside = torch.zeros(base.shape[:3], dtype=torch.bool)
    inside[1, band.y : band.bottom, band.x : band.right] = True
    changed = (base != captioned).any(dim=-1)
    assert changed.any() and not (changed & ~inside).any()


def test_caption_text_contrasts_with_the_background():
    band = cl.plan_pages(options(columns=1), 48 / 64, ["Hello"]).layout.pages[0][0].caption
    for colour, ink_is_dark in (("#FFFFFF", True), ("#000000", False)):
        page = cl.compose_pages(panels(1), "Hello", options(columns=1), background=colour)[0]
        text = page[band.y : band.bottom, band.x : band.right].mean(dim=-1)
        assert (text.min() < 0.2) if ink_is_dark else (text.max() > 0.8)


def test_same_inputs_same_pages():
    opts = options(layout=cl.CLASSIC, seed=9, panels_per_page=3)
    a = cl.compose_pages(panels(7), "a\nb\nc", opts, font_size=11)
    b = cl.compose_pages(panels(7), "a\nb\nc", opts, font_size=11)
    assert torch.equal(a, b)


def test_grey_and_rgba_images_are_accepted():
    grey = cl.compose_pages(torch.rand(2, 32, 32, 1), "", options())
    rgba = cl.compose_pages(torch.rand(2, 32, 32, 4), "", options())
    assert grey.shape == rgba.shape and grey.shape[-1] == 3


def test_negative_font_size_is_an_error():
    with pytest.raises(ValueError, match="caption_font_size"):
        cl.compose_pages(panels(1), "", options(), font_size=-3)


@pytest.mark.parametrize("layout", cl.LAYOUTS)
def test_caption_check_before_panels_refuses_only_pages_that_cannot_fit(layout):
    """check_captions_fit (captions and settings, no panels yet) is a lower bound: what it refuses,
    every panel count from the caption lines on and every panel shape refuses too; below the bound
    the same captions are laid out."""
    options = cl.LayoutOptions(layout=layout, columns=3, page_width=512, panels_per_page=0, gutter=8, margin=16)
    captions = "\n".join(f"panel {i} where the hero walks a long way home" for i in range(6))
    for size in (24, 400):
        try:
            cl.check_captions_fit(options, captions, size)
        except ValueError as error:
            assert "whatever the panels" in str(error) and f"caption_font_size {size}" in str(error)
            for panels, aspect in itertools.product((6, 7, 12), (0.25, 1.0, 2.0)):
                lines = captions.split("\n") + [""] * (panels - 6)
                with pytest.raises(ValueError, match="tall"):
                    cl.plan_pages(options, aspect, lines, size)
            continue
        assert size == 24, "font 400 in 512 px pages must be refused before any panel"
        cl.plan_pages(options, 0.25, captions.split("\n"), size)
    cl.check_captions_fit(options, "\n\n", 512)  # no caption: no band
