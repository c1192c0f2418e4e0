"""Tag Story Part and Join Story Parts: a story drawn in parts on several ComfyUI servers by a
distributed engine (ComfyUI-Distributed), joined into the panels of the whole story for Comic Page.

The engine gives each server its own Story Prompts ``panels`` (its per-worker value) and collects
the servers' images on the master; these two nodes only make the collected batch readable
(see ``story_parts``). Nothing here schedules anything.
"""
from comfy_api.v0_0_2 import io

from .host.story_parts import join_parts, tag_part
from .schema import CATEGORY, StoryType


class TagStoryPart(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConsistentStoryTagPart",
            display_name="Tag Story Part",
            category=CATEGORY,
            description=(
                "For a story spread over several servers: puts, in front of this server's decoded panels, one "
                "image that lists which panels of the story they are, and gives the panels as the 8-bit pixels "
                "Comic Page saves, so the distributed engine's collector carries them unchanged. Connect its "
                "output to the collector; Join Story Parts reads the collected parts on the master."
            ),
            inputs=[
                StoryType.Input("story", tooltip="Story Prompts' story output (this server's panels)."),
                io.Image.Input("images", tooltip="The decoded panels of the sampler that takes this story's prompts."),
            ],
            outputs=[io.Image.Output(display_name="part", tooltip="Connect to the collector's images.")],
        )

    @classmethod
    def execute(cls, story, images) -> io.NodeOutput:
        return io.NodeOutput(tag_part(story, images))


class JoinStoryParts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConsistentStoryJoinParts",
            display_name="Join Story Parts",
            category=CATEGORY,
            description=(
                "On the master of a story spread over several servers: reads the parts the collector gathered "
                "(each from Tag Story Part, in any order) and gives their panels in story order with the story "
                "drawn in all of them, for Comic Page's images and story. A part of another story, or a panel two "
                "servers drew differently, is an error."
            ),
            inputs=[
                StoryType.Input("story", tooltip="Story Prompts' story output (the master's)."),
                io.Image.Input("images", tooltip="The collector's images: the parts of every server."),
            ],
            outputs=[
                io.Image.Output(display_name="panels", tooltip="Every collected panel once, in story order: "
                                "connect to Comic Page's images."),
                StoryType.Output(display_name="story", tooltip="The story drawn in the collected panels: connect to "
                                 "Comic Page's story (panels no server drew come from its saved panels)."),
            ],
        )

    @classmethod
    def execute(cls, story, images) -> io.NodeOutput:
        return io.NodeOutput(*join_parts(story, images))


NODES = [TagStoryPart, JoinStoryParts]
