"""Consistent Story: StoryDiffusion's Consistent Self-Attention for ComfyUI.

ComfyUI loads this file as a custom node package and calls ``comfy_entrypoint`` (v3 schema).
``comfy_api`` is imported only inside the entrypoint, so the torch-only engine in
``attention/`` and its tests import without ComfyUI. No ``NODE_CLASS_MAPPINGS`` here: its
presence would make ComfyUI skip the v3 entrypoint.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import ConsistentStoryExtension
    from .nodes.host.summary_route import add_summary_route

    add_summary_route()  # the editor's "story at a glance" (web/story_glance.js)
    return ConsistentStoryExtension()
