"""Peak memory of sampling one story, measured in a fresh process (run by tests, prints JSON).

    python tests/harness/story_memory.py --checkpoints DIR --checkpoint NAME --panels 48 --panels-per-call 4

Loads the checkpoint and the pack in-process as the tests do, parses a story of ``--panels``
panels (two characters, some two-character and [NC] panels), patches the model with Consistent
Self-Attention and samples; a thread reads the resident set size every millisecond. The prompt
rows are one encoding repeated (encoding dozens of prompts on a CPU would take most of the time;
memory is about the rows, not their text). Prints ``{"before": bytes, "peak": bytes}``: resident memory just before sampling
and the most seen while sampling. A fresh process per measurement, started with
``MALLOC_MMAP_THRESHOLD_`` low, so freed tensors go back to the system and earlier runs cannot
hide or inflate what this one needs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
for path in (TESTS_DIR, TESTS_DIR.parent / "scripts"):
    sys.path.insert(0, str(path))

PAGE = os.sysconf("SC_PAGE_SIZE")
ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def story_text(panels: int) -> str:
    """Two characters; every fifth panel has both, every seventh none, the rest alternate."""
    lines = ["[Bob] a man in a red coat", "[Alice] a woman in a green dress"]
    for index in range(panels):
        if index % 5 == 4:
            lines.append(f"[Bob] and [Alice] talk, scene {index}")
        elif index % 7 == 6:
            lines.append(f"[NC] an empty street, scene {index}")
        else:
            lines.append(f"[{'Bob' if index % 2 == 0 else 'Alice'}] walks, scene {index}")
    return "\n".join(lines)


class PeakWatcher(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = resident_bytes()
        self.running = True

    def run(self):
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            threading.Event().wait(0.001)


def measure(checkpoints: Path, checkpoint: str, panels: int, per_call: int, size: int, steps: int) -> dict:
    import torch

    from harness.comfy_env import import_comfyui

    env = import_comfyui(tempfile.mkdtemp(prefix="consistent_story_memory_"))
    import folder_paths

    folder_paths.add_model_folder_path("checkpoints", str(checkpoints), is_default=True)
    from harness.pack import load_pack

    load_pack()
    from consistent_story.nodes.story.story_prompts import parse_story

    model, clip = env.nodes.CheckpointLoaderSimple().load_checkpoint(checkpoint)[:2]
    story = parse_story(story_text(panels), "No style")
    count = len(story.panels)
    with torch.inference_mode():
        [[cond, extras]] = env.nodes.CLIPTextEncode().encode(clip, "a man walks in a park")[0]
        positive = [[cond.repeat(count, 1, 1), {**extras, "pooled_output": extras["pooled_output"].repeat(count, 1)}]]
        negative = env.nodes.CLIPTextEncode().encode(clip, "blurry")[0]
        patched = env.NODE_CLASS_MAPPINGS["ConsistentStorySelfAttention"].execute(
            model=model, rate_fine=0.5, rate_coarse=0.5, window=0, blocks="output", custom_blocks="",
            schedule="always", start_percent=0.0, end_percent=1.0, seed=0, story=story,
            panels_per_call=per_call).result[0]
        latent = {"samples": torch.zeros(count, 4, size // 8, size // 8)}
        watcher = PeakWatcher()
        before = resident_bytes()
        watcher.start()
        env.nodes.common_ksampler(patched, 0, steps, 5.0, "euler", "normal", positive, negative, latent)
        watcher.running = False
        watcher.join()
    return {"before": before, "peak": max(watcher.peak, resident_bytes())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=Path, required=True, help="folder holding the checkpoint")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file name")
    parser.add_argument("--panels", type=int, required=True)
    parser.add_argument("--panels-per-call", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args(argv)
    result = measure(args.checkpoints, args.checkpoint, args.panels, args.panels_per_call, args.size, args.steps)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
