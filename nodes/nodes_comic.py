"""Comic Page node: lays a story's panels and their captions out on comic pages."""
import dataclasses

from comfy_api.v0_0_2 import io

from .host.input_limits import out_of_limits
from .host.story_panels import panel_folder, save_panels, whole_story
from .schema import CATEGORY, StoryType
from .story.captions import parse_color
from .story.comic_layout import (
    CLASSIC, LAYOUTS, LEFT_TO_RIGHT, READING_ORDERS, LayoutOptions, check_captions_fit, check_width_fits, compose_pages,
)

DEFAULT_NAME = "story"


class ComicPage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConsistentStoryComicPage",
            display_name="Comic Page",
            category=CATEGORY,
            description=(
                "Lays story panels out on comic pages with a caption under each captioned panel. "
                "Panels are centre-cropped to fill their cells; the page height follows from the layout "
                "and the panels' aspect ratio. When the panels do not fit on one page (panels_per_page), "
                "several pages of the same size are returned as one image batch."
            ),
            inputs=[
                io.Image.Input("images", lazy=True, tooltip="The story's panels, in reading order."),
                io.String.Input(
                    "captions",
                    multiline=True,
                    default="",
                    tooltip=(
                        "One caption per panel per line, in panel order; an empty line leaves that panel "
                        "without caption. Connect the Story Prompts node's captions output here, or type them."
                    ),
                ),
                io.Combo.Input(
                    "layout",
                    options=list(LAYOUTS),
                    default=CLASSIC,
                    tooltip=(
                        "grid: equal cells, `columns` per row. classic comic: rows of 1 to `columns` panels, "
                        "chosen by `seed`. four-panel strip: 2 x 2 panels per page."
                    ),
                ),
                io.Int.Input(
                    "columns",
                    default=3,
                    min=1,
                    max=16,
                    tooltip="grid: panels per row. classic comic: the most panels in one row. Ignored by the four-panel strip.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    tooltip="Chooses the classic comic's row pattern; the same seed always gives the same pages.",
                ),
                io.Combo.Input(
                    "reading_order",
                    options=list(READING_ORDERS),
                    default=LEFT_TO_RIGHT,
                    tooltip="right to left (manga) mirrors each page: the first panel is at the top right.",
                ),
                io.Int.Input("page_width", default=1024, min=64, max=16384, tooltip="Page width in pixels."),
                io.Int.Input(
                    "panels_per_page",
                    default=0,
                    min=0,
                    max=4096,
                    tooltip="Panels on each page; more panels go on further pages. 0 puts all on one page. "
                    "The four-panel strip always puts 4 on a page.",
                ),
                io.Int.Input("gutter", default=16, min=0, max=1024, tooltip="Space between panels, in pixels."),
                io.Int.Input("margin", default=24, min=0, max=4096, tooltip="Space around the page's edge, in pixels."),
                io.Int.Input(
                    "caption_font_size",
                    default=0,
                    min=0,
                    max=512,
                    tooltip="Caption text size in pixels; 0 scales it to the page and the narrowest panel.",
                ),
                io.String.Input(
                    "background_color",
                    default="#FFFFFF",
                    tooltip="Page colour as hex, like #FFFFFF. Caption text is black or white, whichever reads better on it.",
                ),
                StoryType.Input(
                    "story", optional=True,
                    tooltip="Optional: Story Prompts' story. Every drawn panel is saved (output folder, "
                    "consistent_story_panels/<name>/, named by panel number and what the panel depends on in the "
                    "story), captions come from the story, and a story drawn in part (Story Prompts' panels) is laid "
                    "out whole: the panels not drawn are the saved ones of an earlier run of the same story.",
                ),
                io.String.Input(
                    "name", optional=True, default=DEFAULT_NAME,
                    tooltip="With story: the folder of this story's saved panels. Use another name for another "
                    "checkpoint, seed or sampler setting, so panels of different settings are never mixed.",
                ),
            ],
            outputs=[io.Image.Output(display_name="pages", tooltip="The comic pages, all the same size.")],
        )

    @classmethod
    def validate_inputs(cls, layout=None, columns=None, seed=0, reading_order=None, page_width=None,
                        panels_per_page=0, gutter=None, margin=None, caption_font_size=0, background_color=None,
                        captions=None):
        """Before anything is sampled: the page settings that are widgets (a linked input arrives as
        None: linked captions are checked in check_lazy_status, still before sampling). ComfyUI
        leaves the limits of the inputs named here to this check (``out_of_limits``)."""
        named = dict(layout=layout, columns=columns, seed=seed, reading_order=reading_order, page_width=page_width,
                     panels_per_page=panels_per_page, gutter=gutter, margin=margin,
                     caption_font_size=caption_font_size)
        try:
            if background_color is not None:
                parse_color(background_color)
            if caption_font_size is not None and caption_font_size < 0:
                raise ValueError(f"caption_font_size is {caption_font_size}: use 0 for automatic or a size in pixels.")
            if (error := out_of_limits(cls, named)) is not None:
                raise ValueError(error)
            options = layout_options(named)
            if options is not None:
                check_width_fits(options)
                if captions is not None and caption_font_size is not None:
                    check_captions_fit(options, captions, caption_font_size)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def check_lazy_status(cls, captions="", caption_font_size=0, images=None, **values):
        """``images`` is lazy, so ComfyUI runs this node once its captions are known (from Story
        Prompts, before sampling; the executor runs a node that feeds an output as soon as it can)
        and asks here which inputs it needs: captions that would make every page too tall are
        refused then, instead of after the panels are sampled."""
        if images is None:
            options = layout_options(values)
            if options is not None:
                check_captions_fit(options, captions, caption_font_size)
            return ["images"]
        return []

    @classmethod
    def execute(
        cls,
        images,
        captions: str,
        layout: str,
        columns: int,
        seed: int,
        reading_order: str,
        page_width: int,
        panels_per_page: int,
        gutter: int,
        margin: int,
        caption_font_size: int,
        background_color: str,
        story=None,
        name: str = DEFAULT_NAME,
    ) -> io.NodeOutput:
        options = LayoutOptions(layout, columns, seed, reading_order, page_width, panels_per_page, gutter, margin)
        if story is not None:
            images, captions = story_pages(story, images, captions, name)
        elif name != DEFAULT_NAME:
            raise ValueError(f"name '{name}' names the saved panels of a story: connect Story Prompts' story output "
                             f"to story, or set name back to '{DEFAULT_NAME}'.")
        return io.NodeOutput(compose_pages(images, captions, options, caption_font_size, background_color))


def layout_options(values: dict) -> LayoutOptions | None:
    """The page layout from the node's inputs (``values`` may hold others), or None while one of them
    is still unknown (a linked input, before it runs)."""
    picked = {field.name: values.get(field.name) for field in dataclasses.fields(LayoutOptions)}
    return None if any(value is None for value in picked.values()) else LayoutOptions(**picked)


def story_pages(story, images, captions: str, name: str):
    """The whole story's panels and captions: the drawn panels are saved, the others read back."""
    drawn = len(story.drawn_panels)
    if images.shape[0] != drawn:
        raise ValueError(f"images holds {images.shape[0]} pictures but Story Prompts draws {drawn} panels: connect "
                         "the decoded panels of the sampler that takes this story's prompts.")
    if captions.strip() and captions != "\n".join(story.captions):
        raise ValueError("With story connected the captions come from the story: disconnect captions (or clear "
                         "them), or disconnect story.")
    folder = panel_folder(name)
    save_panels(story, images, folder)
    return whole_story(story, images, folder), "\n".join(panel.caption for panel in story.panels)


NODES = [ComicPage]
