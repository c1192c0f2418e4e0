"""ComfyUI nodes of the pack (v3 schema), one ``nodes_<family>.py`` module per family.

Kept empty so the pure helpers beside the nodes (story parsing, page layout) import without
ComfyUI; ``extension.py`` gathers the nodes for ``comfy_entrypoint``.
"""
