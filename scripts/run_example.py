"""Run an example comic workflow headless, in-process, and print the path of the saved page.

    python scripts/run_example.py                  # "workflows/Consistent Story - Comic page (SD1.5).json"
    python scripts/run_example.py --workflow "workflows/Consistent Story - Four-panel strip (SDXL).json" --full

The workflow file is converted to an API prompt with the live node definitions of the ComfyUI
that scripts/comfy_host.py finds (this pack loaded as a custom node) and executed by ComfyUI's
own executor. Pages go to that ComfyUI's output folder unless --output is given.

Checkpoint: the workflow's own if it is in ComfyUI's checkpoint folders, else the first one there
of the workflow's family (SD1.5 or SDXL, as ComfyUI detects it), else a small RANDOM-WEIGHT
checkpoint built once into ~/.cache/consistent-story/checkpoints. A random-weight model draws
noise, not a comic: the run then only shows that the whole graph works.

On a CPU, or with random weights, the panels are made small and few steps are taken unless
--full is given; the script says so.

--story FILE replaces the workflow's story with the text of FILE (Story Prompts' syntax); the
latent batch follows the new panel count (Story Latent, or the workflow's panel_count link).

--panels "10" (or "3, 9-12") draws only those panels (and the identity panels they read) and
writes the pages again with the other panels of the last run of the same story in the output
folder. For that every run gives each panel its own noise (Story Latent, as the shipped workflows
have it; in other workflows it replaces the Empty Latent Image that takes panel_count) and Comic
Page saves the panels it lays out, under a name made of the workflow, checkpoint, size, steps and
seed. A story or graph that ComfyUI or the pack refuses ends the run with the node's message and
exit code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parent.parent
for path in (REPO_ROOT / "tests", REPO_ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

DEFAULT_WORKFLOW = REPO_ROOT / "workflows" / "Consistent Story - Comic page (SD1.5).json"
# Where random-weight stand-ins are built once; $CONSISTENT_STORY_CACHE moves it (tests share theirs).
RANDOM_CHECKPOINT_DIR = Path(os.environ.get("CONSISTENT_STORY_CACHE", "~/.cache/consistent-story")).expanduser() / "checkpoints"


class Family(NamedTuple):
    label: str
    model_classes: set[str]  # comfy.supported_models classes of the family
    random_kind: str  # the random-weight stand-in built when no checkpoint of the family is found


FAMILIES = {
    "sd15": Family("SD1.5", {"SD15"}, "sd15_small"),
    "sdxl": Family("SDXL", {"SDXL", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B"}, "vega_small"),
}
QUICK_SIZE, QUICK_STEPS = 128, 4
STORY_PROMPTS = "ConsistentStoryPrompts"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW, help="UI-format workflow JSON (default: %(default)s)")
    parser.add_argument("--output", type=Path, help="output folder (default: ComfyUI's output folder)")
    parser.add_argument(
        "--checkpoint",
        help="checkpoint file name in ComfyUI's checkpoint folders (default: the workflow's if present, "
        "else the first of its family, else random weights)",
    )
    parser.add_argument("--story", type=Path, help="a text file with your story (Story Prompts' syntax) instead of the workflow's")
    parser.add_argument(
        "--family", choices=sorted(FAMILIES),
        help="model family of the workflow (default: its checkpoint's, when installed, else from the latent size it samples at)",
    )  # fmt: skip
    parser.add_argument("--panels", default="", help="draw only these panels, e.g. '10' or '3, 9-12' (numbered as the "
                        "editor's badge numbers them); the other panels come from the last run of the same story")
    parser.add_argument("--full", action="store_true", help="keep the workflow's size and steps even on a CPU")
    parser.add_argument("--size", type=int, default=QUICK_SIZE, help="panel size of a quick run (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=QUICK_STEPS, help="sampling steps of a quick run (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="show ComfyUI's log")
    return parser.parse_args(argv)


def say(message: str) -> None:
    print(f"[run_example] {message}", flush=True)


def warn(message: str) -> None:
    bar = "!" * 78
    print(f"{bar}\n{message}\n{bar}", flush=True)


# ----------------------------------------------------------------------------------------------
# ComfyUI
# ----------------------------------------------------------------------------------------------
def start_comfyui(session_dir: Path, output: Path | None, verbose: bool):
    """ComfyUI in-process with the pack; CPU when there is no CUDA; outputs to the user's folder."""
    import torch

    from harness.comfy_env import import_comfyui

    cpu = not torch.cuda.is_available()
    # Quiet while ComfyUI imports (optional extra nodes it cannot import log tracebacks).
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, format="%(message)s")
    env = import_comfyui(session_dir, cpu=cpu)
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
        for handler in logging.getLogger().handlers:
            handler.addFilter(_not_from_executor)
    import folder_paths

    _load_extra_model_paths(env.comfy_dir)
    output = output.resolve() if output else env.comfy_dir / "output"
    output.mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(output))
    return env, cpu


def _not_from_executor(record: logging.LogRecord) -> bool:
    """ComfyUI's executor logs a failing node's traceback; the run reports the node's message
    itself (the traceback with --verbose)."""
    return Path(record.pathname).name != "execution.py"


def _load_extra_model_paths(comfy_dir: Path) -> None:
    """The model folders the user configured for ComfyUI (main.py reads the same file)."""
    config = comfy_dir / "extra_model_paths.yaml"
    if config.is_file():
        from utils.extra_config import load_extra_path_config

        load_extra_path_config(str(config))


# ----------------------------------------------------------------------------------------------
# Checkpoint
# ----------------------------------------------------------------------------------------------
def model_class(path: Path) -> str | None:
    """The comfy.supported_models class ComfyUI would load a .safetensors file as, from its header only."""
    import comfy.model_detection
    import comfy.utils
    import torch

    if path.suffix not in (".safetensors", ".sft"):
        return None
    try:
        header = json.loads(comfy.utils.safetensors_header(str(path)) or "{}")
    except (OSError, ValueError, struct.error):
        return None
    # Tensors on the meta device carry shapes and no data: detection reads only shapes.
    state_dict = {
        key: torch.empty(entry["shape"], device="meta")
        for key, entry in header.items()
        if key != "__metadata__"
    }
    try:
        config = comfy.model_detection.model_config_from_unet(state_dict, "model.diffusion_model.")
    except Exception:  # not a UNet checkpoint ComfyUI knows
        return None
    return type(config).__name__ if config is not None else None


def choose_checkpoint(wanted: str, family: str, requested: str | None) -> tuple[str, bool]:
    """(ckpt_name, random weights?) following the order in the module docstring."""
    import folder_paths

    available = folder_paths.get_filename_list("checkpoints")
    if requested:
        if requested not in available:
            raise SystemExit(f"--checkpoint {requested} is not in ComfyUI's checkpoint folders: {available or 'none'}.")
        return requested, False
    if wanted in available:
        return wanted, False
    for name in available:
        if model_class(Path(folder_paths.get_full_path("checkpoints", name))) in FAMILIES[family].model_classes:
            say(f"{wanted} is not installed; using {name}, the first {FAMILIES[family].label} checkpoint found.")
            return name, False
    return random_checkpoint(FAMILIES[family].random_kind), True


def random_checkpoint(kind: str) -> str:
    import folder_paths

    from harness.checkpoints import build_checkpoint

    path = RANDOM_CHECKPOINT_DIR / f"random_{kind}.safetensors"
    if not path.exists():
        say(f"building a random-weight '{kind}' checkpoint into {path.parent} (once)...")
        build_checkpoint(kind, path)
    folder_paths.add_model_folder_path("checkpoints", str(path.parent))
    return path.name


# SDXL-family models are trained at about one megapixel, SD1.5 at a quarter of that.
SDXL_LEAST_PIXELS = 768 * 768


def family_of(prompt: dict, wanted: str) -> str:
    """The family a workflow is made for, from its graph: the class ComfyUI detects in the
    workflow's own checkpoint when it is installed, else the latent size it samples at."""
    import folder_paths
    from harness.workflow import latent_nodes

    if wanted in folder_paths.get_filename_list("checkpoints"):
        detected = model_class(Path(folder_paths.get_full_path("checkpoints", wanted)))
        for name, family in FAMILIES.items():
            if detected in family.model_classes:
                return name
        raise RunError(
            f"The workflow's checkpoint {wanted} is a {detected or 'model ComfyUI does not detect'}; the main job "
            f"runs {' and '.join(f.label for f in FAMILIES.values())} checkpoints. Open the workflow in ComfyUI instead."
        )
    latents = [node["inputs"] for node in latent_nodes(prompt).values()]
    sizes = [(i["width"], i["height"]) for i in latents if not isinstance(i["width"], list) and not isinstance(i["height"], list)]
    if not sizes:
        raise RunError("The workflow has no Story Latent or Empty Latent Image with a typed size: pass --family sd15 "
                       "or --family sdxl.")
    return "sdxl" if max(w * h for w, h in sizes) >= SDXL_LEAST_PIXELS else "sd15"


def checkpoint_of(prompt: dict, workflow_path: Path) -> str:
    from harness.workflow import nodes_of_type

    loaders = nodes_of_type(prompt, "CheckpointLoaderSimple")
    if not loaders:
        raise RunError(
            f"{workflow_path.name} loads no checkpoint (Load Checkpoint): the main job runs checkpoint "
            "workflows (SD1.5 or SDXL family). Open this one in ComfyUI with your model files."
        )
    return next(iter(loaders.values()))["inputs"]["ckpt_name"]


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to change (printed without a traceback)."""


# ----------------------------------------------------------------------------------------------
# Main job
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except RunError as error:
        print(f"[run_example] {error}", file=sys.stderr, flush=True)
        return 2


def read_story(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RunError(f"--story {path}: cannot read it as UTF-8 text ({error}).") from None
    if not text.strip():
        raise RunError(f"--story {path} is empty: write one panel per line (Story Prompts' syntax).")
    return text


def run(args: argparse.Namespace) -> int:
    began = time.monotonic()
    story = read_story(args.story) if args.story else None
    with tempfile.TemporaryDirectory(prefix="consistent_story_run_") as session:
        env, cpu = start_comfyui(Path(session), args.output, args.verbose)
        say(f"ComfyUI {env.comfy_dir} loaded on {'CPU' if cpu else 'GPU'} in {time.monotonic() - began:.1f} s")

        from harness.runner import GraphError, run_prompt
        from harness.workflow import (
            latent_nodes, load_workflow, node_definitions, nodes_of_type, set_widgets, shrink, ui_to_api, workflow_node_types,
        )

        workflow = load_workflow(args.workflow)
        prompt = ui_to_api(workflow, node_definitions(env.NODE_CLASS_MAPPINGS, workflow_node_types(workflow)))
        if story is not None:
            set_widgets(prompt, STORY_PROMPTS, story=story)
            say(f"story from {args.story}")
        wanted = checkpoint_of(prompt, args.workflow)
        family = args.family or family_of(prompt, wanted)
        ckpt_name, random_weights = choose_checkpoint(wanted, family, args.checkpoint)
        set_widgets(prompt, "CheckpointLoaderSimple", ckpt_name=ckpt_name)
        say(f"workflow {args.workflow.name}, checkpoint {ckpt_name}")

        if random_weights:
            warn(
                f"No {FAMILIES[family].label} checkpoint found in ComfyUI's models/checkpoints: using a RANDOM-WEIGHT model.\n"
                "It draws NOISE, not a comic: this run only shows that the whole workflow executes.\n"
                f"Put a real {FAMILIES[family].label} checkpoint (e.g. {wanted}) into ComfyUI's "
                "models/checkpoints for real pictures."
            )
        if (cpu or random_weights) and not args.full:
            shrink(prompt, args.size, args.steps)
            latent = next(iter(latent_nodes(prompt).values()))["inputs"]
            warn(
                f"QUICK RUN: panels shrunk to {latent['width']}x{latent['height']} px and {args.steps} sampling steps "
                f"({'CPU' if cpu else 'random weights'}).\nPass --full to keep the workflow's own size and steps."
            )

        story_on_demand(prompt, args.panels, panels_name(args.workflow, ckpt_name, prompt), cpu)
        if args.panels:
            say(f"panels {args.panels}: the other panels come from {PANELS_FOLDER}/ in the output folder")
        started = time.monotonic()
        # As the frontend does: the saved page carries the workflow, so dropping it on ComfyUI opens it.
        try:
            result = run_prompt(prompt, {"extra_pnginfo": {"workflow": workflow}})
        except GraphError as error:
            raise RunError(graph_error_message(error, args.verbose)) from None
        say(f"workflow executed in {time.monotonic() - started:.1f} s (total {time.monotonic() - began:.1f} s)")
        save_id = next(iter(nodes_of_type(prompt, "SaveImage")))
        pages = result.image_paths(save_id)
        for page in pages:
            print(f"Comic page: {page}")
    return 0 if pages else 1


PANELS_FOLDER = "consistent_story_panels"


def story_on_demand(prompt: dict, panels: str, name: str, cpu: bool) -> None:
    """Draw ``panels`` of the story ("" = all) and keep every panel findable: Story Prompts draws the
    panels (for the identity panels Consistent Self-Attention reads), the sampler's latent is Story
    Latent (each panel's own noise, so a part of the story draws the whole run's panels: the shipped
    workflows have it; in a workflow of one's own an Empty Latent Image taking panel_count becomes
    one, and a Latent Batch Seed Behavior 'random' after it, which would drop that noise, is
    bypassed: it asks for the same per-panel noise), and Comic Page saves and reads the panels under
    ``name``. So that a panel's pixels do not depend on which others are drawn with it, panels are decoded one at a time
    and, on a CPU (where it costs nothing), Consistent Self-Attention runs one panel per model call
    (an identity group together): every call of a part is then a call of the whole run."""
    from harness.workflow import nodes_of_type

    story_nodes = list(nodes_of_type(prompt, STORY_PROMPTS))
    if len(story_nodes) != 1:
        if panels:
            raise RunError(f"--panels needs a workflow with one Story Prompts node; this one has {len(story_nodes)}.")
        return
    story_id = story_nodes[0]
    inputs = prompt[story_id]["inputs"]
    inputs["panels"] = panels
    for node in nodes_of_type(prompt, "ConsistentStorySelfAttention").values():
        if isinstance(node["inputs"].get("identity_panels"), int):
            inputs["identity_panels"] = node["inputs"]["identity_panels"]
    for node_id, node in nodes_of_type(prompt, "EmptyLatentImage").items():
        if node["inputs"].get("batch_size") == [story_id, 2]:
            prompt[node_id] = {"class_type": "ConsistentStoryLatent", "inputs": {
                "story": [story_id, 4], "width": node["inputs"]["width"], "height": node["inputs"]["height"]}}
    for node_id, node in nodes_of_type(prompt, "LatentBatchSeedBehavior").items():
        if node["inputs"].get("seed_behavior") == "random":
            for other in prompt.values():
                for key, value in other["inputs"].items():
                    if value == [node_id, 0]:
                        other["inputs"][key] = node["inputs"]["samples"]
    for node in nodes_of_type(prompt, "ConsistentStoryComicPage").values():
        node["inputs"].update(story=[story_id, 4], name=name)
    if cpu:
        for node in nodes_of_type(prompt, "ConsistentStorySelfAttention").values():
            node["inputs"]["panels_per_call"] = 1
    decode_one_at_a_time(prompt)


def decode_one_at_a_time(prompt: dict) -> None:
    """VAE Decode of each panel alone (core Rebatch Latents to batches of 1, Rebatch Images back to
    one batch): a batch decodes with other rounding than a single panel."""
    from harness.workflow import nodes_of_type

    for node_id, node in list(nodes_of_type(prompt, "VAEDecode").items()):
        split, joined = f"{node_id}_one_by_one", f"{node_id}_joined"
        for other in prompt.values():
            for key, value in other["inputs"].items():
                if value == [node_id, 0]:
                    other["inputs"][key] = [joined, 0]
        prompt[split] = {"class_type": "RebatchLatents", "inputs": {"latents": node["inputs"]["samples"], "batch_size": 1}}
        node["inputs"]["samples"] = [split, 0]
        prompt[joined] = {"class_type": "RebatchImages", "inputs": {"images": [node_id, 0], "batch_size": 4096}}


def panels_name(workflow: Path, ckpt_name: str, prompt: dict) -> str:
    """Comic Page's folder of saved panels: what the images depend on beside the story."""
    from harness.workflow import latent_nodes, nodes_of_type

    sampler = next(iter(nodes_of_type(prompt, "KSampler").values()), {"inputs": {}})["inputs"]
    latent = next(iter(latent_nodes(prompt).values()), {"inputs": {}})["inputs"]
    parts = [workflow.stem, Path(ckpt_name).stem, f"{latent.get('width')}x{latent.get('height')}",
             f"{sampler.get('steps')} steps", f"seed {sampler.get('seed')}"]
    return re.sub(r"[^\w \-]", "-", " ".join(str(part) for part in parts))


def graph_error_message(error, verbose: bool) -> str:
    """ComfyUI's refusal as one message: the node and what it said (the traceback with --verbose)."""
    data = error.details
    if error.stage != "execution" or "exception_message" not in data:
        return str(error)
    message = f"{data['node_type']} (node {data['node_id']}): {data['exception_message'].strip()}"
    if verbose:
        message += "\n" + "".join(data.get("traceback", []))
    return message


if __name__ == "__main__":
    sys.exit(main())
