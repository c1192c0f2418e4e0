"""Characters from the user's images: Character from Image, Save Character, Load Character."""
from __future__ import annotations

import os

import comfy.utils
from comfy_api.v0_0_2 import io

from ..attention import ConsistentAttentionError
from .host.character_files import SavedCharacter, load_character, save_character, saved_character_files
from .host.conditioning import encode
from .host.references import CharacterReference
from .schema import CATEGORY, StoryType

SIZE_TOOLTIP = ("The story's panel size in pixels (its Story Latent's width and height): each image is scaled to cover it and "
                "centre-cropped, so images of another size or shape work.")


def story_character(story, name: str) -> str:
    """``name`` as the story spells it; an unknown name is an error listing the story's characters."""
    name = " ".join(name.strip().strip("[]").split())
    try:
        return story.character(name).name
    except KeyError:
        known = ", ".join(f"[{c.name}]" for c in story.characters) or "none"
        raise ConsistentAttentionError(
            f"character: the story defines no [{name}]. Its characters: {known}. Write the name as in the story."
        ) from None


def reference(story, name: str, clip, latents, latent_format) -> CharacterReference:
    """The character's reference: latents, its description and the story's negative encoded."""
    positive = encode(clip, story.character_prompt(name))
    negative = encode(clip, story.negative)
    as_conditioning = lambda e: [[e["cond"], {k: v for k, v in e.items() if k != "cond"}]]  # noqa: E731
    return CharacterReference(name, latents.cpu(), as_conditioning(positive), as_conditioning(negative), latent_format)


def latent_format_of(model) -> str:
    return type(model.get_model_object("latent_format")).__name__


class CharacterFromImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentStoryCharacterFromImage",
            display_name="Character from Image",
            category=CATEGORY,
            description=(
                "Draws a story character from your own images (a design sheet, a photo, a mascot). Each image becomes "
                "a reference row that is noised to every step and read by all panels of that character, instead of "
                "its generated identity panels; the references themselves are never drawn. Connect the returned "
                "story to Consistent Self-Attention."
            ),
            inputs=[
                StoryType.Input("story", tooltip="Story Prompts' story output."),
                io.String.Input("character", default="", tooltip="The character's name as the story writes it, "
                                "e.g. Bob for [Bob]. Its description becomes the references' prompt."),
                io.Image.Input("images", tooltip="One or more images of the character (a batch = several references)."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE: it encodes the images."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP: it encodes the character's description."),
                io.Model.Input("model", tooltip="The model the story is drawn with; its family is recorded with the "
                               "character (saved characters refuse models of another family)."),
                io.Int.Input("width", default=1024, min=64, max=8192, step=8, tooltip=SIZE_TOOLTIP),
                io.Int.Input("height", default=1024, min=64, max=8192, step=8, tooltip=SIZE_TOOLTIP),
            ],
            outputs=[StoryType.Output("story_out", display_name="story",
                                      tooltip="The story, with this character drawn from the images.")],
        )

    @classmethod
    def execute(cls, story, character, images, vae, clip, model, width, height) -> io.NodeOutput:
        name = story_character(story, character)
        pixels = comfy.utils.common_upscale(images[..., :3].movedim(-1, 1), width, height, "bilinear", "center")
        latents = vae.encode(pixels.movedim(1, -1))
        return io.NodeOutput(story.with_reference(reference(story, name, clip, latents, latent_format_of(model))))


class SaveCharacter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentStorySaveCharacter",
            display_name="Save Character",
            category=CATEGORY,
            description=(
                "Saves a story character to models/consistent_story_characters as .safetensors (its reference "
                "latents, name, description, model family and size), for Load Character in other stories. A "
                "character from images saves those; a generated one saves its identity panels, taken from the "
                "story's decoded images. An existing file is never overwritten: a number is added to the name."
            ),
            inputs=[
                StoryType.Input("story", tooltip="The story the character is in (after Character from Image, if any)."),
                io.String.Input("character", default="", tooltip="The character's name as the story writes it."),
                io.String.Input("file_name", default="", tooltip="File name without extension; empty = the "
                                "character's name. Letters, digits, spaces, '_' and '-'."),
                io.Image.Input("images", optional=True, tooltip="For a generated character: the story's decoded "
                               "panels (VAE Decode after the sampler); its identity panels are saved."),
                io.Vae.Input("vae", optional=True, tooltip="For a generated character: the VAE that encodes its panels."),
                io.Model.Input("model", optional=True, tooltip="For a generated character: the model that drew it "
                               "(its family is recorded)."),
                io.Int.Input("identity_panels", optional=True, default=2, min=1, max=8, tooltip="For a generated "
                             "character: as on Consistent Self-Attention, how many of its first solo panels to save."),
            ],
            outputs=[io.String.Output("path", display_name="file", tooltip="The saved file's name.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, story, character, file_name, images=None, vae=None, model=None, identity_panels=2) -> io.NodeOutput:
        name = story_character(story, character)
        ref = next((r for r in story.references if r.name == name), None)
        if ref is not None:
            latents, latent_format = ref.latents, ref.latent_format
        else:
            if images is None or vae is None:
                raise ConsistentAttentionError(
                    f"[{name}] is generated, not drawn from images: connect the story's decoded panels to images "
                    "and the VAE to vae, so its identity panels can be saved."
                )
            panels = story.identity_panels(identity_panels)[name]
            drawn = {panel.index: row for row, panel in enumerate(story.drawn_panels)}  # a part: fewer rows
            if images.shape[0] != len(drawn):
                raise ConsistentAttentionError(
                    f"images holds {images.shape[0]} pictures but the story draws {len(drawn)} panels: connect "
                    "the decoded panels of this story's sampler."
                )
            if any(panel not in drawn for panel in panels):
                raise ConsistentAttentionError(
                    f"[{name}]'s identity panels {[p + 1 for p in panels]} are not all drawn (Story Prompts' panels): "
                    "draw a panel of this character, or the whole story, to save it."
                )
            latents = vae.encode(images[[drawn[panel] for panel in panels], ..., :3])
            latent_format = latent_format_of(model) if model is not None else None
        path = save_character(SavedCharacter(name, story.character(name).description, latents.cpu(), latent_format),
                              file_name or name)
        return io.NodeOutput(path.name, ui={"text": [f"saved [{name}] to {path.name}"]})


class LoadCharacter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentStoryLoadCharacter",
            display_name="Load Character",
            category=CATEGORY,
            description=(
                "Draws a story character from a saved character (Save Character): its saved reference latents are "
                "read by every panel of that character, as with Character from Image."
            ),
            inputs=[
                StoryType.Input("story", tooltip="Story Prompts' story output."),
                io.Combo.Input("character_file", options=saved_character_files(),
                               tooltip="A saved character from models/consistent_story_characters."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP: it encodes the character's description."),
                io.String.Input("character", default="", tooltip="The story's character it plays; empty = the "
                                "saved character's own name."),
            ],
            outputs=[StoryType.Output("story_out", display_name="story",
                                      tooltip="The story, with this character drawn from the saved references.")],
        )

    @classmethod
    def fingerprint_inputs(cls, story, character_file, clip, character=""):
        import folder_paths

        path = folder_paths.get_full_path("consistent_story_characters", character_file)
        return (character_file, os.path.getmtime(path) if path else None)

    @classmethod
    def execute(cls, story, character_file, clip, character="") -> io.NodeOutput:
        saved = load_character(character_file)
        name = story_character(story, character or saved.name)
        return io.NodeOutput(story.with_reference(reference(story, name, clip, saved.latents, saved.latent_format)))


NODES = [CharacterFromImage, SaveCharacter, LoadCharacter]
