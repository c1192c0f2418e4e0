"""GPU benchmark of Consistent Self-Attention on Flux (ComfyUI's Flux class, Flux.1-dev layout, random bf16).

4 panels at 1024x1024 (4096 image tokens each), T5-sized random prompts (512 tokens), guidance
3.5, no CFG (as Flux.1-dev is run), euler. For each block preset (single-stream, the default;
double-stream; all) and vanilla: ms per step (CUDA events around each model call), peak memory,
a one-step check that CSA reached exactly the preset's blocks, and finite outputs.

    python bench/flux_bench.py --tiny                                  # CPU check
    python bench/flux_bench.py --comfyui .device/ComfyUI --out $OUT    # the GPU run
    python bench/flux_bench.py --render bench/results/h200_flux.json --doc docs/performance.md
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
from report import markdown_table, write_block  # noqa: E402

PRESETS = ("vanilla", "single-stream", "double-stream", "all")
BEGIN = "<!-- flux_bench: generated block, rewritten by bench/flux_bench.py --doc -->"
END = "<!-- flux_bench: end of generated block -->"
ROWS_KEY = "consistent_story.rows"


class BlockCounter:
    """Attention override after CSA: how many joint-attention calls were extended, per call."""

    def __init__(self):
        self.extended = 0
        self.calls = 0

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        self.calls += 1
        self.extended += int(k.shape[2] > q.shape[2])
        return func(q, k, v, heads, *args, **kwargs)


class FluxBench:
    def __init__(self, args):
        import torch

        import comfy.model_management as mm

        self.args, self.torch = args, torch
        self.cuda = mm.get_torch_device().type == "cuda"
        self.dit_patch = bench_host.load_csa_patch_module("dit_patch")
        self.families = bench_host.load_csa_patch_module("dit_families")
        self.engine = sys.modules[f"{bench_host.PACK_NAME}.attention"]
        self.base = bench_host.build_flux(args.tiny)
        unet = self.base.model.diffusion_model
        self.blocks = {"double-stream": len(unet.double_blocks), "single-stream": len(unet.single_blocks)}
        self.blocks["all"] = sum(self.blocks.values())
        gen = torch.Generator().manual_seed(0)
        self.positive = [[torch.randn(args.panels, args.text, 4096, generator=gen),
                          {"pooled_output": torch.randn(args.panels, 768, generator=gen), "guidance": 3.5}]]
        self.negative = [[torch.zeros(1, args.text, 4096), {"pooled_output": torch.zeros(1, 768), "guidance": 3.5}]]

    def model(self, preset: str, probe=None):
        model = self.base.clone()
        if preset != "vanilla":
            config = self.engine.CSAConfig(rate_fine=0.5, rate_coarse=0.5, blocks=preset, schedule="always")
            family = self.families.dit_family(model)
            self.dit_patch.DiTAttentionPatch(family, config, key_positions="shifted").install(model)
        if probe is not None:
            model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = probe
        return model

    def sample(self, model, steps: int):
        import comfy.sample

        torch, side = self.torch, self.args.size // 8
        latent = torch.zeros(self.args.panels, 16, side, side)
        noise = comfy.sample.prepare_noise(latent, 7)
        with torch.inference_mode():
            return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", self.positive, self.negative,
                                       latent, disable_pbar=True, seed=7)

    def run(self, preset: str) -> dict:
        torch = self.torch
        counter = BlockCounter()
        self.sample(self.model(preset, counter), 1)
        timer = StepTimer(self.cuda)
        model = self.model(preset)
        model.set_model_unet_function_wrapper(timer)
        self.sample(model, 1)  # warm-up
        timer.take_ms()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() if self.cuda else 0
        latent = self.sample(model, self.args.steps)
        ms = timer.take_ms()
        return {"preset": preset, "ms_per_step": statistics.median(ms), "ms": ms, "resident_bytes": resident,
                "peak_bytes": torch.cuda.max_memory_allocated() if self.cuda else 0,
                "finite": bool(torch.isfinite(latent).all()), "extended_calls": counter.extended,
                "attention_calls": counter.calls, "expected_extended": self.blocks.get(preset, 0)}


def rows(results: dict) -> list[list[str]]:
    vanilla = results["runs"].get("vanilla", {})
    body = []
    for preset, run in results["runs"].items():
        if "error" in run:
            body.append([preset, run["error"], "", "", "", "", ""])
            continue
        time_ratio = run["ms_per_step"] / vanilla["ms_per_step"] if vanilla else float("nan")
        peak_ratio = run["peak_bytes"] / vanilla["peak_bytes"] if vanilla.get("peak_bytes") else float("nan")
        body.append([preset, f"{run['ms_per_step']:.1f}", f"{time_ratio:.3f}x", f"{run['peak_bytes'] / 2**30:.2f}",
                     f"{peak_ratio:.3f}x", f"{run['extended_calls']}/{run['expected_extended']}", str(run["finite"])])
    return body


HEADER = ["blocks", "ms/step", "x vanilla", "peak GiB", "peak x vanilla", "blocks extended / expected", "finite"]


def generated_block(results: dict) -> str:
    env, s = results["environment"], results["settings"]
    lines = [BEGIN, "", f"Machine: {env['gpu']}, torch {env['torch']}, ComfyUI {env['comfyui']}, attention "
             f"`{env['comfy_attention']}`. Flux.1-dev layout (19 double + 38 single blocks), random bf16 weights, "
             f"{s['panels']} panels at {s['size']}x{s['size']}, {s['text']} text tokens, guidance 3.5, no CFG, euler, "
             f"{s['steps']} timed steps, rate 0.5, CSA every step, shifted key positions.", ""]
    lines += markdown_table(HEADER, rows(results)) + ["", END]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="1 + 1 blocks, 64 px, on the CPU")
    parser.add_argument("--comfyui", type=Path)
    parser.add_argument("--panels", type=int, default=4)
    parser.add_argument("--size", type=int)
    parser.add_argument("--text", type=int, default=512, help="text tokens (T5: 512 for Flux.1-dev)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--out", type=Path, default=Path("out/flux_bench"))
    parser.add_argument("--doc", type=Path)
    parser.add_argument("--render", type=Path)
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
    else:
        args.size = args.size or (64 if args.tiny else 1024)
        args.steps = args.steps or (2 if args.tiny else 8)
        if args.tiny:
            args.text = min(args.text, 8)
        bench_host.import_comfy(find_comfyui(args.comfyui), cpu=args.tiny)
        args.out.mkdir(parents=True, exist_ok=True)
        bench = FluxBench(args)
        results = {"environment": bench_host.environment(args.tiny), "runs": {},
                   "settings": {"panels": args.panels, "size": args.size, "text": args.text, "steps": args.steps}}
        started = time.perf_counter()
        for preset in PRESETS:
            try:
                results["runs"][preset] = bench.run(preset)
            except bench.torch.OutOfMemoryError as error:
                results["runs"][preset] = {"error": f"out of memory: {str(error).splitlines()[0]}"}
            print(preset, {k: v for k, v in results["runs"][preset].items() if k != "ms"}, flush=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
        results["wall_s"] = time.perf_counter() - started
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n".join("  ".join(r) for r in [HEADER] + rows(results)))
    if args.doc:
        write_block(args.doc, generated_block(results), BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
