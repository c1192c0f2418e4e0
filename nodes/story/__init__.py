"""Pure story and page logic: story text, panel selection, the story summary, comic layout.

No ComfyUI import (Pillow, numpy and torch at most), so the unit tests run it without ComfyUI;
below it only ``attention/`` (the cast rule). Kept empty: modules are imported by their own names.
"""
