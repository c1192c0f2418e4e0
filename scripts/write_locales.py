"""Write the pack's English locale file for ComfyUI's frontend from the nodes' own schemas.

    python scripts/write_locales.py           # (re)writes locales/en/nodeDefs.json
    python scripts/write_locales.py --check   # exit 1 if the file differs from the schemas

ComfyUI serves ``<pack>/locales/<lang>/{main,nodeDefs}.json`` at ``/i18n`` and the frontend
looks node titles, descriptions, input names/tooltips and output names/tooltips up there
(``nodeDefs.<node id>...``), falling back to the schema. The English file is generated so it can
never drift from the code (a test runs ``--check``); translators copy it to ``locales/<lang>/``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
for path in (REPO_ROOT / "tests", REPO_ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

NODE_DEFS_FILE = REPO_ROOT / "locales" / "en" / "nodeDefs.json"
NODE_ID_PREFIX = "ConsistentStory"


def node_entry(info: dict) -> dict:
    """One node's locale entry, in the frontend's nodeDefs layout, from its v1 node info."""
    inputs = {}
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            entry = {"name": options.get("display_name", name)}
            if options.get("tooltip"):
                entry["tooltip"] = options["tooltip"]
            inputs[name] = entry
    outputs = {}
    tooltips = info.get("output_tooltips") or []
    for index, name in enumerate(info["output_name"]):
        entry = {"name": name}
        if index < len(tooltips) and tooltips[index]:
            entry["tooltip"] = tooltips[index]
        outputs[str(index)] = entry
    return {
        "display_name": info["display_name"],
        "description": info["description"],
        "inputs": inputs,
        "outputs": outputs,
    }


def node_defs(node_class_mappings: dict) -> dict:
    return {
        node_id: node_entry(node_class.GET_NODE_INFO_V1())
        for node_id, node_class in sorted(node_class_mappings.items())
        if node_id.startswith(NODE_ID_PREFIX)
    }


def rendered(defs: dict) -> str:
    return json.dumps(defs, indent=2, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    from harness.comfy_env import import_comfyui

    text = rendered(node_defs(import_comfyui().NODE_CLASS_MAPPINGS))
    if args.check:
        current = NODE_DEFS_FILE.read_text(encoding="utf-8") if NODE_DEFS_FILE.is_file() else ""
        if current != text:
            print(f"{NODE_DEFS_FILE} is out of date: run python scripts/write_locales.py", file=sys.stderr)
            return 1
        return 0
    NODE_DEFS_FILE.parent.mkdir(parents=True, exist_ok=True)
    NODE_DEFS_FILE.write_text(text, encoding="utf-8")
    print(NODE_DEFS_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
