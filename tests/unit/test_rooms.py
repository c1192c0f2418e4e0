"""The pack's rooms and their arrows (docs/architecture.md), read from the code's own imports.

Imports run downward only: node classes (``nodes/*.py``) -> ComfyUI glue (``nodes/host/``) ->
pure story/page logic (``nodes/story/``) -> the engine (``attention/``); the diffusers host
(``attention/diffusers_host/``) imports the engine and nothing else of the pack. Node modules share
``nodes/schema.py``, never each other (``extension.py`` gathers them). Every import is read, also
those inside functions.
"""
import ast
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ROOMS = {  # room -> (its folder, the rooms it may import)
    "nodes": ("nodes", {"nodes", "host", "story", "engine"}),
    "host": ("nodes/host", {"host", "story", "engine"}),
    "story": ("nodes/story", {"story", "engine"}),
    "engine": ("attention", {"engine"}),
    "diffusers_host": ("attention/diffusers_host", {"diffusers_host", "engine"}),
}
COMFYUI = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server", "execution"}


def room_of(path: Path) -> str:
    folder = path.parent.relative_to(REPO_ROOT).as_posix()
    return next(room for room, (where, _) in ROOMS.items() if where == folder)


def modules():
    return sorted(p for where, _ in ROOMS.values() for p in (REPO_ROOT / where).glob("*.py"))


def imports(path: Path):
    """``(kind, target)`` per import: ("pack", a path in the repo without .py) or ("outside", top-level name)."""
    package = path.parent.relative_to(REPO_ROOT).parts
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (("outside", alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield "outside", node.module.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] + tuple((node.module or "").split(".") if node.module else ())
            if not base:  # from the pack's own __init__ (the entrypoint): none of the rooms does this
                yield "pack", ""
                continue
            for alias in node.names:  # ``from . import nodes_story`` names a module, ``from .x import y`` a name
                sub = REPO_ROOT.joinpath(*base, alias.name)
                yield "pack", "/".join(base + (alias.name,)) if sub.with_suffix(".py").is_file() else "/".join(base)


def target_room(target: str) -> str:
    path = REPO_ROOT / target
    file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return room_of(file)


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_imports_run_downward_only(path):
    room, (_, allowed) = room_of(path), ROOMS[room_of(path)]
    for kind, target in imports(path):
        if kind == "pack":
            assert target_room(target) in allowed, f"{room} may import only {sorted(allowed)}, not {target}"
            if room == "nodes" and target_room(target) == "nodes" and path.name != "extension.py":
                assert target == "nodes/schema", f"node modules share nodes/schema.py, never each other: {target}"
        elif room != "nodes" and room != "host":
            assert target not in COMFYUI, f"{room} imports no ComfyUI ({target})"
        if room in ("engine", "diffusers_host") and kind == "outside":
            assert target == "torch" or target in sys.stdlib_module_names or target == "__future__", (
                f"the engine and the diffusers host are torch only, not {target}")


def test_every_module_is_in_a_room_and_the_rooms_are_not_empty():
    found = {room_of(p) for p in modules()}
    assert found == set(ROOMS)
    stray = [p for p in (REPO_ROOT / "nodes").rglob("*.py") if p not in modules()]
    stray += [p for p in (REPO_ROOT / "attention").rglob("*.py") if p not in modules()]
    assert not stray, f"modules outside the rooms of docs/architecture.md: {stray}"
