"""ComfyUI glue: the pieces that touch ComfyUI's objects (ModelPatcher, sampler wrappers,
transformer_options, CLIP, folder_paths, widget schemas), for the node classes above.

Imports only ``nodes/story/`` and ``attention/``, never a node module. Kept empty: modules are
imported by their own names.
"""
