"""UI-format workflows (what the frontend saves and users share) to API prompts, as the frontend does.

The backend only runs API prompts; the frontend's ``graphToPrompt`` converts. ``ui_to_api`` does
the same from a workflow's JSON and node definitions in ``/object_info`` form, so the shipped
workflow files themselves are what the tests and the main job run:

- ``widgets_values`` holds one value per widget, in the definition's input order (required,
  then optional); inputs that are sockets only (MODEL, forceInput, ...) have none. A widget
  converted to an input keeps its slot: the link wins. A list value is wrapped as
  ``{"__value__": [...]}`` so that it does not read as a link.
- The frontend stores extra values of its own: a ``control_after_generate`` mode after a seed
  (``"fixed"``, ``"randomize"``, ...), a filter text after a combo with that control, upload
  widgets after a file combo. They are skipped.
- Frontend-only nodes (notes, reroutes, primitives) are not in the prompt: links are followed
  through reroutes, a primitive's value is already the target widget's value.
- A muted node (mode 2) is left out and so are the links from it; a bypassed node (mode 4) is
  left out and each of its outputs is fed by its input of the same type, as the frontend does.

``node_definitions`` builds that ``/object_info`` form in-process, as server.py's ``node_info``;
``set_widgets`` and ``shrink`` edit a converted prompt (another checkpoint, a quick CPU run).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, NamedTuple

MUTED, BYPASSED = 2, 4
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}  # the frontend's legacy rule: these INTs get a control widget
UPLOAD_WIDGETS = {"image_upload": 1, "animated_image_upload": 1, "video_upload": 1, "audio_upload": 2}
REROUTE = "Reroute"
PRIMITIVE = "PrimitiveNode"
FRONTEND_ONLY = {"Note", "MarkdownNote", REROUTE, PRIMITIVE}
COMIC_PAGE = "ConsistentStoryComicPage"
CHARACTER_FROM_IMAGE = "ConsistentStoryCharacterFromImage"
STORY_LATENT = "ConsistentStoryLatent"
# The nodes that make a sampler's empty latent from a typed width and height: the pack's Story
# Latent (the shipped workflows) and the host's, which a user's own workflow may have instead.
LATENT_NODES = (STORY_LATENT, "EmptyLatentImage", "EmptySD3LatentImage", "EmptyFlux2LatentImage")
COMIC_PAGE_LENGTHS = {"page_width": 64, "gutter": 1, "margin": 1, "caption_font_size": 8}  # pixels, and their least
WORKFLOW_DIR = Path(__file__).resolve().parents[2] / "workflows"
# The shipped workflows are named by their titles: ComfyUI's template browser shows a custom
# node's template under its file name (no other metadata), with the .jpg of the same name. Each
# name starts with the pack's name, as frontend 1.58's template search reads only the file name:
# "consistent" finds them all.
TITLE_PREFIX = "Consistent Story - "
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
# The CPU test checkpoint standing in for each workflow's model family, by workflow_id.
TEST_CHECKPOINT = {"comic_page_sd1_5": "sd15_small", "four_panel_strip_sdxl": "vega_small",
                   "long_story_of_24_panels_sd1_5": "sd15_small", "two_characters_sdxl": "vega_small",
                   "character_from_your_image_sd1_5": "sd15_small", "character_lora_sdxl": "vega_small",
                   "photomaker_face_sdxl": "vega_small", "comic_page_flux": "flux",
                   # DiT families: random model files of their own (harness/workflow_models.py)
                   "comic_page_flux_2_klein": "flux2_klein", "comic_page_qwen_image": "qwen_image",
                   "comic_page_z_image": "z_image"}


def workflow_id(path: Path | str) -> str:
    """A shipped workflow's short id, for test ids, ``-k`` filters and file names, without the
    pack's name: "Consistent Story - Comic page (SD1.5).json" -> "comic_page_sd1_5"."""
    title = Path(path).name.removesuffix(".json").removeprefix(TITLE_PREFIX)  # not .stem: "(SD1.5)" holds a dot
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")


def by_workflow(paths: Iterable[Path]):
    """``pytest.mark.parametrize`` over workflow files, each test id its ``workflow_id``."""
    import pytest

    paths = list(paths)
    return pytest.mark.parametrize("path", paths, ids=[workflow_id(path) for path in paths])


class WorkflowError(ValueError):
    """The workflow cannot be converted; the message names the node and what to change."""


def load_workflow(path: Path | str) -> dict:
    workflow = json.loads(Path(path).read_text(encoding="utf-8"))
    if "nodes" not in workflow or "links" not in workflow:
        raise WorkflowError(f"{path} is not a UI-format workflow (no 'nodes' and 'links'); API prompts need no conversion.")
    return workflow


# ----------------------------------------------------------------------------------------------
# Node definitions
# ----------------------------------------------------------------------------------------------
def node_definitions(node_class_mappings: dict, class_types: Iterable[str] | None = None) -> dict:
    """``/object_info`` for ``class_types`` (default: all), from ComfyUI's ``NODE_CLASS_MAPPINGS``.

    Only the fields the conversion reads; v3 nodes describe themselves as server.py asks them to.
    """
    import nodes  # ComfyUI's nodes.py
    from comfy_api.internal import _ComfyNodeInternal

    info = {}
    for name in node_class_mappings if class_types is None else class_types:
        cls = node_class_mappings.get(name)
        if cls is None:
            continue
        if issubclass(cls, _ComfyNodeInternal):
            info[name] = cls.GET_NODE_INFO_V1()
            continue
        inputs = cls.INPUT_TYPES()
        info[name] = {
            "input": inputs,
            "input_order": {group: list(entries) for group, entries in inputs.items()},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "name": name,
            "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        }
    return info


def workflow_node_types(workflow: dict) -> set[str]:
    """The node types a workflow uses, frontend-only ones excluded."""
    return {node["type"] for node in workflow["nodes"] if node["type"] not in FRONTEND_ONLY}


class Widget(NamedTuple):
    name: str
    kind: str  # INT, FLOAT, STRING, BOOLEAN or COMBO
    options: dict
    stored: int  # values the frontend stores for it: its own and those of its helper widgets


def widget_inputs(definition: dict) -> list[Widget]:
    """The widgets of a node definition, in the order the frontend stores their values."""
    widgets = []
    for group in ("required", "optional"):
        entries = definition["input"].get(group) or {}
        for name in definition.get("input_order", {}).get(group, list(entries)):
            spec = entries[name]
            kind, options = spec[0], (spec[1] if len(spec) > 1 and spec[1] else {})
            if isinstance(kind, (list, tuple)):  # v1 combos list their options as the type
                kind, options = "COMBO", {**options, "options": list(kind)}
            if kind in WIDGET_TYPES and not options.get("forceInput"):
                widgets.append(Widget(name, kind, options, 1 + _frontend_extras(name, kind, options)))
    return widgets


def _frontend_extras(name: str, kind: str, options: dict) -> int:
    """Values the frontend stores after this widget's own value (widgets of its own)."""
    control = options.get("control_after_generate")
    if control is None:
        control = kind == "INT" and name in SEED_NAMES
    extras = (2 if kind == "COMBO" else 1) if control else 0  # a combo's control adds a filter box
    return extras + sum(count for key, count in UPLOAD_WIDGETS.items() if options.get(key))


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------
def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt ``{node_id: {"class_type", "inputs", "_meta"}}`` of a UI-format workflow."""
    graph = _Graph(workflow)
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("This workflow contains subgraphs: unpack them (right-click > Unpack Subgraph) and save again.")
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        definition = object_info.get(node["type"])
        if definition is None:
            raise WorkflowError(
                f"Node #{node['id']} has type '{node['type']}', which this ComfyUI does not have: install the custom "
                "node pack that provides it, or remove the node."
            )
        inputs = _widget_values(node, definition)
        for entry in node.get("inputs") or []:
            name = (entry.get("widget") or {}).get("name", entry["name"])
            source = graph.source(entry.get("link"))
            if source is not None:
                inputs[name] = [str(source[0]), source[1]]
        title = node.get("title") or definition.get("display_name") or node["type"]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": title}}
    return prompt


def _widget_values(node: dict, definition: dict) -> dict[str, Any]:
    stored = node.get("widgets_values")
    widgets = widget_inputs(definition)
    if isinstance(stored, dict):  # some nodes save their widgets by name
        return {w.name: stored[w.name] for w in widgets if w.name in stored}
    stored, values, at = list(stored or []), {}, 0
    for widget in widgets:
        if at < len(stored):
            values[widget.name] = stored[at]
        elif "default" in widget.options:  # a widget added to the node after the workflow was saved
            values[widget.name] = widget.options["default"]
        else:
            raise WorkflowError(
                f"Node #{node['id']} ({node['type']}) stores {len(stored)} widget values, too few for its inputs "
                f"{[w.name for w in widgets]}: open the workflow in ComfyUI, check the node and save it again."
            )
        at += widget.stored
    # A list value would read as a link: the frontend wraps it and ComfyUI's validation unwraps it.
    return {name: {"__value__": value} if isinstance(value, list) else value for name, value in values.items()}


class _Graph:
    """Link lookups of one workflow: which real node output feeds a link."""

    def __init__(self, workflow: dict):
        self.nodes = {node["id"]: node for node in workflow["nodes"]}
        self.links = {}
        for link in workflow["links"]:
            if isinstance(link, dict):  # schema version 1 stores links as objects
                link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link["type"]]
            self.links[link[0]] = link
        for node in workflow["nodes"]:
            for entry in node.get("inputs") or []:
                if entry.get("link") is not None and entry["link"] not in self.links:
                    raise WorkflowError(f"Node #{node['id']} input '{entry['name']}' uses link {entry['link']}, which the workflow does not have.")

    def source(self, link_id, seen: frozenset = frozenset()) -> tuple[int, int] | None:
        """``(node id, output slot)`` feeding ``link_id``, or None if nothing real does."""
        if link_id is None:
            return None
        if link_id in seen:
            raise WorkflowError(f"Link {link_id} loops through reroutes or bypassed nodes.")
        _, origin_id, slot, _, _, kind = self.links[link_id]
        origin = self.nodes.get(origin_id)
        if origin is None:
            raise WorkflowError(f"Link {link_id} starts at node #{origin_id}, which the workflow does not have.")
        mode, seen = origin.get("mode", 0), seen | {link_id}
        if origin["type"] == PRIMITIVE or mode == MUTED:
            return None
        if origin["type"] == REROUTE:
            return self.source(origin["inputs"][0].get("link"), seen)
        if mode == BYPASSED:
            return self.source(self._bypass_input(origin, slot, kind), seen)
        return origin_id, slot

    @staticmethod
    def _bypass_input(node: dict, slot: int, kind: str):
        """The link a bypassed node passes on for output ``slot``: same slot's input, else the first of the type."""
        linked = [(i, entry) for i, entry in enumerate(node.get("inputs") or []) if entry.get("link") is not None]
        matching = [(i, entry) for i, entry in linked if entry["type"] == kind or "*" in (entry["type"], kind)]
        for i, entry in matching:
            if i == slot:
                return entry["link"]
        return matching[0][1]["link"] if matching else None


# ----------------------------------------------------------------------------------------------
# Editing API prompts
# ----------------------------------------------------------------------------------------------
def nodes_of_type(prompt: dict, class_type: str) -> dict[str, dict]:
    return {node_id: node for node_id, node in prompt.items() if node["class_type"] == class_type}


def latent_nodes(prompt: dict) -> dict[str, dict]:
    """The nodes that make an empty latent of a typed size (``LATENT_NODES``), in prompt order."""
    return {node_id: node for node_id, node in prompt.items() if node["class_type"] in LATENT_NODES}


def set_widgets(prompt: dict, class_type: str, **values) -> None:
    """Set widget inputs on every node of ``class_type``; refuses to overwrite a link or miss."""
    found = nodes_of_type(prompt, class_type)
    if not found:
        raise WorkflowError(f"The prompt has no {class_type} node.")
    for node in found.values():
        for name, value in values.items():
            if isinstance(node["inputs"].get(name), list):
                raise WorkflowError(f"{class_type} input '{name}' is linked; not replacing the link with {value!r}.")
            node["inputs"][name] = value


def shrink(prompt: dict, size: int, steps: int) -> None:
    """Smaller panels (width and height at most ``size``, ratio kept; character references alike),
    fewer sampling steps, and comic pages scaled like the panels, so they are not drawn blown up."""
    scales = []
    for node in [*latent_nodes(prompt).values(), *nodes_of_type(prompt, CHARACTER_FROM_IMAGE).values()]:
        width, height = node["inputs"]["width"], node["inputs"]["height"]
        scales.append(min(1.0, size / max(width, height)))
        node["inputs"].update(width=_multiple_of_8(width * scales[-1]), height=_multiple_of_8(height * scales[-1]))
    set_widgets(prompt, "KSampler", steps=steps)
    scale = min(scales, default=1.0)
    for node in nodes_of_type(prompt, COMIC_PAGE).values():
        for name, least in COMIC_PAGE_LENGTHS.items():
            if not isinstance(node["inputs"][name], list) and node["inputs"][name]:
                node["inputs"][name] = max(least, round(node["inputs"][name] * scale))


def _multiple_of_8(pixels: float) -> int:
    return max(16, int(round(pixels / 8)) * 8)
