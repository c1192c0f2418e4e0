"""The pack's ComfyExtension: every node module exports ``NODES``.

Nodes import the pinned API version ``comfy_api.v0_0_2`` (ComfyUI's v3 migration guide: a
numbered version stays compatible, ``latest`` may change without warning); it is the same
schema on v0.3.64 and v0.33.
"""
from comfy_api.v0_0_2 import ComfyExtension, io

from . import nodes_character, nodes_comic, nodes_consistent_attention, nodes_parts, nodes_story

NODE_MODULES = (nodes_consistent_attention, nodes_story, nodes_character, nodes_comic, nodes_parts)


class ConsistentStoryExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [node for module in NODE_MODULES for node in module.NODES]
