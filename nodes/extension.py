"""The pack's ComfyExtension: every node module exports ``NODES``."""
from comfy_api.latest import ComfyExtension, io

from . import nodes_character, nodes_comic, nodes_consistent_attention, nodes_story

NODE_MODULES = (nodes_consistent_attention, nodes_story, nodes_character, nodes_comic)


class ConsistentStoryExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [node for module in NODE_MODULES for node in module.NODES]
