"""GPU benchmark of story-mode Consistent Self-Attention on ComfyUI's SDXL UNet (random fp16 weights).

Stories of two characters with two identity panels each (panels 0-3), then panels that show
Bob, Alice, both, or nobody ([NC]) in turn. Each story is sampled by ComfyUI's own sampling path
(euler, CFG 5, ``--steps`` steps) with ``ConsistentAttentionPatch(config, cast, panels_per_call)``
installed; vanilla runs sample batches of plain images. Measured per run:
  - ms per step (CUDA events around each model call: a ``model_function_wrapper``);
  - ms per UNet sub-call and its rows, identity calls apart from reading calls (a DIFFUSION_MODEL
    wrapper inside CSA's sub-calls), so a read row's step compares with a vanilla row's;
  - peak GPU memory (``max_memory_allocated`` over the run) and the identity bank's bytes;
  - checks: outputs finite, CSA reached every output-block self-attention layer of every sub-call.

    python bench/story_bench.py --tiny                                  # CPU check, a minute
    python bench/story_bench.py --comfyui .device/ComfyUI --out $OUT    # the GPU run
    python bench/story_bench.py --render bench/results/h200_story.json --doc docs/performance.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_host  # noqa: E402
from csa_bench import StepTimer, find_comfyui  # noqa: E402

CFG = 5.0
BOB, ALICE = 0, 1
REDRAW_IDENTITY = (0, 1, 2, 3)  # the identity panels of the stories below (Bob, Alice, Bob, Alice)


def panel_characters(panels: int) -> list[tuple[int, ...]]:
    """Identity panels Bob, Alice, Bob, Alice; then Bob, Alice, both, nobody, in turn."""
    cycle = [(BOB,), (ALICE,), (BOB, ALICE), ()]
    return [cycle[i % 2] if i < 4 else cycle[(i - 4) % 4] for i in range(panels)]


class CallTimer:
    """DIFFUSION_MODEL wrapper: times each UNet (sub-)call; notes its rows and whether it was an
    identity call; tracks the largest identity bank seen."""

    def __init__(self, cuda: bool, state_key: str):
        self.cuda, self.state_key = cuda, state_key
        self.marks, self.bank_bytes = [], 0

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        import torch

        options = kwargs.get("transformer_options") or args[-1]
        state = options.get(self.state_key)
        kind = "plain"
        if state is not None and state.story_call is not None:
            cast = state.story_call.cast
            if cast.reference_panels and set(state.panels) <= set(cast.reference_panels):
                kind = "reference"
            else:
                kind = "identity" if set(state.panels) <= set(cast.identity_panels) else "read"
        rows = args[0].shape[0]
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = executor(*args, **kwargs)
            end.record()
        else:
            start = time.perf_counter()
            out = executor(*args, **kwargs)
            end = time.perf_counter()
        self.marks.append((kind, rows, start, end))
        if state is not None and state.story_call is not None:
            self.bank_bytes = max(self.bank_bytes, state.story_call.bank_peak)
        return out

    def take(self) -> list[tuple[str, int, float]]:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            out = [(k, r, s.elapsed_time(e)) for k, r, s, e in self.marks]
        else:
            out = [(k, r, (e - s) * 1000.0) for k, r, s, e in self.marks]
        self.marks = []
        return out


class StoryBench:
    def __init__(self, args):
        import torch

        import comfy.model_management as mm

        self.args, self.torch = args, torch
        self.device = mm.get_torch_device()
        self.cuda = self.device.type == "cuda"
        self.csa_patch = bench_host.load_host_module()
        self.csa_call = bench_host.load_host_module("csa_call")
        self.engine = sys.modules[f"{bench_host.PACK_NAME}.attention"]
        self.base = bench_host.build_sdxl(args.tiny)
        self.output_layers = sum(1 for block in self.base.model.diffusion_model.output_blocks
                                 for m in block.modules() if type(m).__name__ == "BasicTransformerBlock")

    def references(self, images: int) -> tuple:
        """Bob drawn from ``images`` random reference latents, with a random description prompt."""
        torch, side = self.torch, self.args.size // 8
        gen = torch.Generator().manual_seed(7)
        conditioning = lambda: [[torch.randn(1, 77, 2048, generator=gen),  # noqa: E731
                                 {"pooled_output": torch.randn(1, 1280, generator=gen)}]]
        references = sys.modules[f"{bench_host.PACK_NAME}.nodes.host.references"]
        return (references.CharacterReference("Bob", torch.randn(images, 4, side, side, generator=gen),
                                              conditioning(), conditioning(), "SDXL"),)

    def model(self, panels: int | None, per_call: int, probe=None, reference_images: int = 0, drawn=None):
        model = self.base.clone()
        if panels is not None:
            config = self.engine.CSAConfig(rate_fine=0.5, rate_coarse=0.5, blocks="output", schedule="always")
            references = self.references(reference_images) if reference_images else ()
            cast = self.engine.StoryCast.from_panels(("Bob", "Alice"), panel_characters(panels), 2,
                                                     (reference_images, 0), drawn)
            self.csa_patch.ConsistentAttentionPatch(config, cast, per_call, references).install(model)
        self.step_timer = StepTimer(self.cuda)
        self.call_timer = CallTimer(self.cuda, self.csa_call.STATE_KEY)
        model.set_model_unet_function_wrapper(self.step_timer)
        model.add_wrapper_with_key("diffusion_model", "story_bench.timer", self.call_timer)
        if probe is not None:
            model.model_options["transformer_options"]["optimized_attention_override"] = probe
        return model

    def sample(self, model, panels: int, steps: int, drawn=None):
        import comfy.sample

        torch, size = self.torch, self.args.size
        latent = torch.zeros(panels, 4, size // 8, size // 8)
        noise = comfy.sample.prepare_noise(latent, 1234, None if drawn is None else list(drawn))  # as Story Latent
        gen = torch.Generator().manual_seed(panels)

        def cond():
            return [[torch.randn(panels, 77, 2048, generator=gen),
                     {"pooled_output": torch.randn(panels, 1280, generator=gen), "width": size, "height": size}]]

        positive, negative = cond(), cond()
        with torch.inference_mode():
            return comfy.sample.sample(model, noise, steps, CFG, "euler", "normal", positive, negative, latent,
                                       disable_pbar=True, seed=1234)

    def verify(self, panels: int, per_call: int) -> dict:
        """One step with a probe after CSA: each sub-call's story attention reached every output layer."""
        layers_per_call, probe = [], RowsProbe(self.csa_call.ROWS_KEY)
        self.sample(self.model(panels, per_call, probe), panels, 1)
        for kind, rows, _ in self.call_timer.take():
            layers_per_call.append((kind, rows))
        return {"sub_calls": len(layers_per_call), "story_layers": len(probe.layers),
                "expected_layers": self.output_layers, "rows_seen": probe.rows,
                "expected_rows": self.output_layers * 2 * panels}

    def run(self, panels: int | None, batch: int, per_call: int, reference_images: int = 0, drawn=None) -> dict:
        """One run; ``drawn``: the story drawn in part (those panels only, as Story Prompts' ``panels`` gives)."""
        torch, steps = self.torch, self.args.steps
        model = self.model(panels, per_call, reference_images=reference_images, drawn=drawn)
        self.sample(model, batch, 1, drawn)  # warm-up: kernels chosen, model loaded
        self.step_timer.take_ms(), self.call_timer.take()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() if self.cuda else 0
        began = time.perf_counter()
        latent = self.sample(model, batch, steps, drawn)
        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - began
        steps_ms, calls = self.step_timer.take_ms(), self.call_timer.take()
        by_kind = {}
        for kind, rows, ms in calls:
            entry = by_kind.setdefault(kind, {"calls": 0, "rows": 0, "ms": 0.0, "rows_per_call": []})
            entry["calls"] += 1
            entry["rows"] += rows
            entry["ms"] += ms
            if rows not in entry["rows_per_call"]:
                entry["rows_per_call"].append(rows)
        for entry in by_kind.values():
            entry["ms_per_row_step"] = entry["ms"] / entry["rows"]
        return {
            "panels": batch, "story": panels is not None, "panels_per_call": per_call, "steps": steps,
            "ms_per_step": statistics.median(steps_ms), "wall_s": wall, "sub_calls": by_kind,
            "resident_bytes": resident, "peak_bytes": torch.cuda.max_memory_allocated() if self.cuda else 0,
            "bank_bytes": self.call_timer.bank_bytes, "finite": bool(torch.isfinite(latent).all()),
            "reference_images": reference_images, "drawn": None if drawn is None else list(drawn),
        }


class RowsProbe:
    def __init__(self, rows_key: str):
        self.rows_key, self.layers, self.rows = rows_key, set(), 0

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        if self.rows_key in options:
            self.layers.add((tuple(options["block"]), options["block_index"]))
            self.rows += q.shape[0]
        return func(q, k, v, heads, *args, **kwargs)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small SDXL-layout UNet, 64 px, 2 steps, on the CPU")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI checkout (default: $COMFYUI_PATH, ~/comfy/ComfyUI)")
    parser.add_argument("--size", type=int, help="image size in pixels (default 1024; tiny 64)")
    parser.add_argument("--steps", type=int, help="sampling steps per run (default 30; tiny 2)")
    parser.add_argument("--panels-per-call", type=int, default=8, help="rows per UNet call of a split story")
    parser.add_argument("--stories", default="4,24,100", help="story lengths, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("out/story_bench"))
    parser.add_argument("--doc", type=Path, help="markdown file whose story block is (re)written")
    parser.add_argument("--render", type=Path, help="only render --doc from an earlier results.json")
    args = parser.parse_args(argv)
    for name, value in zip(("size", "steps"), (64, 2) if args.tiny else (1024, 30)):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> int:
    import story_report

    args = parse_args(argv)
    if args.render:
        return bench_host.render_results(args, story_report)
    bench_host.import_comfy(find_comfyui(args.comfyui), cpu=args.tiny)
    args.out.mkdir(parents=True, exist_ok=True)
    bench = StoryBench(args)
    per_call = args.panels_per_call
    results = {"environment": bench_host.environment(args.tiny), "settings": {
        "size": args.size, "steps": args.steps, "cfg": CFG, "sampler": "euler / normal", "rate": [0.5, 0.5],
        "schedule": "always", "blocks": "output", "identity_panels": 2, "characters": 2,
        "panels_per_call": per_call, "output_layers": bench.output_layers}, "runs": {}, "checks": {}}
    print(json.dumps(results["environment"]), flush=True)

    def save():
        (args.out / "results.json").write_text(json.dumps(results, indent=1))

    stories = [int(n) for n in args.stories.split(",")]
    for panels in stories:
        results["checks"][f"story-{panels}"] = bench.verify(panels, per_call)
        print("check", panels, results["checks"][f"story-{panels}"], flush=True)
    runs = [("vanilla-rows", None, per_call // 2, 0, None), ("vanilla-panels", None, per_call, 0, None)]
    runs += [(f"story-{panels}", panels, panels, 0, None) for panels in stories]
    runs += [(f"story-{stories[1]}-bob-from-2-images", stories[1], stories[1], 2, None)]
    both = max(i for i, chars in enumerate(panel_characters(stories[-1])) if chars == (BOB, ALICE))
    redraw = REDRAW_IDENTITY + (both,)  # the last panel of both characters: 1 panel + 4 identity panels
    runs += [(f"story-{stories[-1]}-redraw-1", stories[-1], len(redraw), 0, redraw)]
    for name, story, batch, images, drawn in runs:
        try:
            results["runs"][name] = bench.run(story, batch, per_call, images, drawn)
        except bench.torch.OutOfMemoryError as error:
            results["runs"][name] = {"error": f"out of memory: {str(error).splitlines()[0]}"}
        print(name, json.dumps(results["runs"][name]), flush=True)
        save()
    print(story_report.table_text(results))
    if args.doc:
        story_report.update_doc(args.doc, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
