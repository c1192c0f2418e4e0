"""Import the pack's root package under the fixed name ``consistent_story``, without ComfyUI.

In ComfyUI the pack is loaded by ``nodes.load_custom_node`` under its folder path; tests of the
torch-only engine need a stable importable name instead, so relative imports inside the pack
resolve to ``consistent_story.<subpackage>``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACK_NAME = "consistent_story"
REPO_ROOT = Path(__file__).resolve().parents[2]


def load_pack() -> ModuleType:
    """The pack's root ``__init__.py`` as module ``consistent_story`` (imported once)."""
    module = sys.modules.get(PACK_NAME)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_NAME]
        raise
    return module
