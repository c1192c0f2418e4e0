"""Locate the ComfyUI installation this pack runs in (or is tested against).

Order: ``$COMFYUI_PATH``; the ComfyUI that encloses the pack
(``ComfyUI/custom_nodes/<pack>``); comfy-cli's default workspace ``~/comfy/ComfyUI``.
Standard library only: the setup script calls it before any environment exists.

    python scripts/comfy_host.py            # prints the directory, exit 1 if none
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKSPACE = Path("~/comfy/ComfyUI").expanduser()


def is_comfyui(path: Path) -> bool:
    """A ComfyUI checkout has main.py beside the comfy/ package and nodes.py."""
    return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "nodes.py").is_file()


def candidates() -> list[tuple[str, Path]]:
    found = []
    env = os.environ.get("COMFYUI_PATH")
    if env:
        found.append(("$COMFYUI_PATH", Path(env).expanduser()))
    if PACK_ROOT.parent.name == "custom_nodes":
        found.append(("enclosing ComfyUI", PACK_ROOT.parent.parent))
    found.append(("comfy-cli default workspace", DEFAULT_WORKSPACE))
    return found


def find_comfyui() -> Path | None:
    """The first candidate that is a ComfyUI checkout, else None.

    An explicit ``$COMFYUI_PATH`` that is not a checkout is an error, not a fall-through:
    silently testing against another ComfyUI than the one asked for would mislead.
    """
    for source, path in candidates():
        if is_comfyui(path):
            return path.resolve()
        if source == "$COMFYUI_PATH":
            raise SystemExit(f"COMFYUI_PATH={path} is not a ComfyUI checkout (no main.py / comfy/ there).")
    return None


def missing_message() -> str:
    tried = "\n".join(f"  - {source}: {path}" for source, path in candidates())
    return (
        "ComfyUI was not found. Looked in:\n" + tried + "\n"
        f"Put a ComfyUI checkout at {DEFAULT_WORKSPACE} (for example "
        f"`git clone https://github.com/comfyanonymous/ComfyUI {DEFAULT_WORKSPACE}`), "
        "or set COMFYUI_PATH to the folder that holds ComfyUI's main.py."
    )


if __name__ == "__main__":
    found = find_comfyui()
    if found is None:
        print(missing_message(), file=sys.stderr)
        sys.exit(1)
    print(found)
