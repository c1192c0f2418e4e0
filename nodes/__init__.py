"""ComfyUI nodes of the pack (v3 schema), one ``nodes_<family>.py`` module per family, in three rooms
whose imports run downward only:

- here: the node classes (``nodes_*.py``, what they share in ``schema.py``, and ``extension.py``,
  which gathers them for ``comfy_entrypoint``); they read inputs, clone, patch;
- ``host/``: ComfyUI glue, everything that touches ComfyUI's objects (model patches, sampler
  wrappers, conditioning, files in ComfyUI's folders); it never imports a node module;
- ``story/``: pure story and page logic (story text, panel selection, the summary, comic layout),
  no ComfyUI import, testable without it.

Below them all, ``attention/`` is the torch-only engine. Kept empty so ``story/`` imports without
ComfyUI.
"""
