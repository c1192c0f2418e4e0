"""The Story Prompts node: story text -> one CONDITIONING whose row i is panel i's prompt.

ComfyUI maps row i of a conditioning tensor to row i of the latent batch
(``comfy.utils.repeat_to_batch_size``; a shorter batch silently tiles), but no core node builds
a batch of different prompts. Here each panel is encoded alone, exactly as CLIPTextEncode would,
and the rows are stacked into one entry (``host/conditioning.py``). Also Story Latent, the story's
empty latent.
"""
from __future__ import annotations

import comfy.utils
from comfy_api.v0_0_2 import io

from ..attention.cast import MAX_IDENTITY_PANELS
from .host.conditioning import (
    PHOTOMAKER_TRIGGER, batch_encodings, common_padding, common_token_length, encode, panel_encoder, undrawn_lengths,
)
from .schema import CATEGORY, DEFAULT_IDENTITY_PANELS, StoryType
from .story.story_prompts import DEFAULT_STYLE, EXAMPLE_STORY, STYLE_NAMES, parse_story
from .story.story_summary import story_summary


class StoryPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentStoryPrompts",
            display_name="Story Prompts",
            category=CATEGORY,
            description=(
                "Writes a whole story in one box: '[Name] description' lines define characters, every other line "
                "is a panel ('[Name]' is replaced by the description, '[NC]' = no character, text after '#' is the "
                "caption). Encodes every panel in the chosen style into ONE conditioning whose row i is panel i: "
                "give the sampler Story Latent (from this node's story), one latent per drawn panel, so each image "
                "gets its own prompt."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP text encoder of the checkpoint."),
                io.String.Input(
                    "story", multiline=True, default=EXAMPLE_STORY,
                    tooltip="One item per line; blank lines are ignored. '[Bob] a man in a red coat' (a name not "
                    "defined before, alone on its line) defines Bob. Every other line is a panel: '[Bob] reads the "
                    "paper # The news!' puts Bob's description in the prompt and 'The news!' in the caption. Any "
                    "number of characters per panel (the official app allows 2). '[NC] a forest at night' = panel "
                    "without character. Names: letters, digits, spaces, _ and -.",
                ),
                io.Combo.Input(
                    "style", options=list(STYLE_NAMES), default=DEFAULT_STYLE,
                    tooltip="Style template wrapped around every panel prompt, with its own negative prompt (the "
                    "styles of the official StoryDiffusion app). 'Custom' uses custom_style.",
                ),
                io.String.Input(
                    "custom_style", optional=True, default="watercolor storybook illustration of {prompt}, soft colors",
                    tooltip="Template for style 'Custom' (ignored otherwise); {prompt} is replaced by each panel's "
                    "prompt and must be present.",
                ),
                io.String.Input(
                    "negative", multiline=True, default="",
                    tooltip="Negative prompt for every panel, joined with the style's negative prompt.",
                ),
                io.Photomaker.Input(
                    "photomaker", optional=True,
                    tooltip="Optional, SDXL: a PhotoMaker model (core PhotoMaker Loader). Panels whose prompt contains "
                    "the word 'photomaker' are encoded with the face in photomaker_image, as core PhotoMaker Encode "
                    "does: write it after the class word in the character's description, e.g. '[Ann] a woman "
                    "photomaker with short hair'.",
                ),
                io.Image.Input(
                    "photomaker_image", optional=True,
                    tooltip="With photomaker: the face image of the character whose description has the word "
                    "'photomaker'.",
                ),
                io.String.Input(
                    "panels", optional=True, default="",
                    tooltip="Which panels to draw: empty = the whole story; '37' or '3, 9-12' = only those panels "
                    "(numbered from 1 as the badge counts them; definition lines are not panels) plus the identity "
                    "panels of the characters they name. Each drawn panel comes out as in the whole story's run: "
                    "give the sampler Story Latent's latent, which gives each panel its own noise.",
                ),
                io.Int.Input(
                    "identity_panels", optional=True, default=DEFAULT_IDENTITY_PANELS, min=1, max=MAX_IDENTITY_PANELS,
                    tooltip="With panels: how many identity panels per character are drawn beside the chosen "
                    "panels. Set it to Consistent Self-Attention's identity_panels (that node refuses another value).",
                ),
            ],
            outputs=[
                io.Conditioning.Output(
                    "positive", display_name="positive",
                    tooltip="One entry, one row per panel: connect to the sampler's positive.",
                ),
                io.Conditioning.Output(
                    "negative_out", display_name="negative",
                    tooltip="The negative prompt encoded once (batch 1; ComfyUI repeats it for every panel).",
                ),
                io.Int.Output(
                    "panel_count", display_name="panel_count",
                    tooltip="Number of panels drawn (all, or those panels selects plus their identity panels): wire "
                    "it to the latent's batch_size, or use Story Latent.",
                ),
                io.String.Output(
                    "captions", display_name="captions",
                    tooltip="One caption per drawn panel, newline-separated; an empty line where a panel has none.",
                ),
                StoryType.Output(
                    "parsed_story", display_name="story",
                    tooltip="The parsed story (characters and the characters of each panel) for other Consistent "
                    "Story nodes.",
                ),
                io.String.Output(
                    "summary", display_name="summary",
                    tooltip="The story at a glance, one line per panel: its role (identity panel of a character, "
                    "or which identity panels it reads, with identity_panels per character) and its final prompt "
                    "after the style and [Name] replacement. Connect a text preview node to see it.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, story=None, style=None, custom_style=""):
        """Before anything loads, so that the editor shows the message on this node: the story and
        its style (inputs named here skip ComfyUI's own list check: parse_story checks the style;
        a linked input arrives as None and is checked when the node runs)."""
        if any(value is None for value in (story, style, custom_style)):
            return True
        try:
            parse_story(story, style, custom_style)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, clip, story, style, negative, custom_style="", photomaker=None,
                photomaker_image=None, panels="", identity_panels=DEFAULT_IDENTITY_PANELS) -> io.NodeOutput:
        if clip is None:
            raise ValueError(
                "The clip input is empty: the checkpoint has no text encoder. Load one with a CLIP loader."
            )
        parsed = parse_story(story, style, custom_style, negative).select(panels, identity_panels)
        drawn = parsed.drawn_panels
        # Padded as the whole story is, so a panel drawn alone has the tokens it has in the whole run.
        padding = common_padding(clip, [panel.prompt for panel in parsed.panels] + [parsed.negative])
        encode_panel = panel_encoder(clip, photomaker, photomaker_image, padding)
        if photomaker is not None and not any(PHOTOMAKER_TRIGGER in p.prompt.split(" ") for p in drawn):
            raise ValueError(
                f"photomaker is connected but no panel prompt has the word '{PHOTOMAKER_TRIGGER}' (as a word of its own). "
                "Put it after the class word of the character's description, e.g. '[Ann] a woman photomaker with short hair'."
            )
        # The negative is one prompt: batch 1 is tiled to any batch by repeat_to_batch_size, so the
        # same output also fits a latent batch that differs from panel_count.
        negative_encoding = encode(clip, parsed.negative, padding)
        progress = comfy.utils.ProgressBar(len(drawn))
        encodings = []
        for panel in drawn:
            encodings.append(encode_panel(panel.prompt))
            progress.update(1)
        # Positive and negative share one token length so the sampler can run them in one batch; a part
        # of the story takes the whole story's length, so its rows are those of the whole run.
        lengths = [e["cond"].shape[1] for e in encodings + [negative_encoding]]
        if parsed.partial:
            lengths += undrawn_lengths(clip, parsed, padding, encodings)
        length = common_token_length(lengths)
        return io.NodeOutput(
            [batch_encodings(encodings, length)],
            [batch_encodings([negative_encoding], length)],
            len(drawn),
            "\n".join(parsed.captions),
            parsed,
            story_summary(parsed, identity_panels),
        )


class StoryLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentStoryLatent",
            display_name="Story Latent",
            category=CATEGORY,
            description=(
                "The empty latent of a story: one image per drawn panel (no batch size to set), each with the noise "
                "its panel has in the whole story (ComfyUI's batch_index), so a story drawn in part (Story Prompts' "
                "panels) gives each panel the image it has in the whole run. Use it in place of Empty Latent Image."
            ),
            inputs=[
                StoryType.Input("story", tooltip="Story Prompts' story output."),
                io.Int.Input("width", default=512, min=16, max=16384, step=8,
                             tooltip="Panel width in pixels (as on Empty Latent Image)."),
                io.Int.Input("height", default=512, min=16, max=16384, step=8,
                             tooltip="Panel height in pixels (as on Empty Latent Image)."),
            ],
            outputs=[io.Latent.Output(tooltip="Connect to the sampler's latent_image.")],
        )

    @classmethod
    def execute(cls, story, width, height) -> io.NodeOutput:
        drawn = story.drawn if story.drawn is not None else tuple(range(len(story.panels)))
        import nodes as comfy_nodes  # ComfyUI's node registry (this pack's nodes/ is imported relatively)

        # The host's own Empty Latent Image, so the sampler adapts it to the model as it adapts that
        # one (channels; on newer hosts the scale of Flux.2's or a pixel model's latent), plus
        # batch_index: prepare_noise draws one noise per index up to the largest, in story order.
        latent = comfy_nodes.EmptyLatentImage().generate(width, height, len(drawn))[0]
        return io.NodeOutput({**latent, "batch_index": list(drawn)})


NODES = [StoryPrompts, StoryLatent]
