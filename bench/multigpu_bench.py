"""A story on one GPU against two under ComfyUI's own multi-GPU sampling (ComfyUI >= v0.33, issue #20).

A two-character story (2 identity panels each; then Bob, Alice, both, nobody in turn), story-mode
Consistent Self-Attention (rate 0.5, every step, the model's default blocks), sampled by ComfyUI's
own path (``comfy.sample.sample``, euler) twice: on one GPU, then through ComfyUI's "MultiGPU CFG
Split" node (``MultiGPU_WorkUnits``, max_gpus 2: a deep clone per device, its thread pool):
  - SDXL (random fp16 weights, CFG 5): ComfyUI puts cond and uncond on different devices;
  - Flux.1 dev (random bf16 weights, CFG 1): one cond, so the pack spreads the story's sub-calls
    over the device ComfyUI leaves idle (nodes/host/story_devices.py).
Each model's clones come from a ``cached_patcher_init`` factory (ComfyUI's hook for a loader),
which rebuilds the same random weights. Measured: wall time of the sampling (every device
synchronised), speedup, peak memory per GPU (``max_memory_allocated(device)``), sub-calls per
device, and the largest absolute and relative difference between the two runs' latents: bit for
bit is expected on the CPU; on GPUs the pass mark is max |a - b| <= TOLERANCE x max |a|.

``--tiny`` runs on the CPU with ``cpu`` and ``cpu:1`` as the two devices (only ComfyUI's device
list is replaced, as tests/integration/test_multigpu.py does), small layouts, panels_per_call 1,
and fails unless the two-device latents equal the one-device latents bit for bit.

    python bench/multigpu_bench.py --tiny --comfyui ~/comfy/ComfyUI-0.33           # CPU check, < 1 minute
    python3 bench/multigpu_bench.py --comfyui PATH --out $OUT --doc $OUT/performance.md   # 2 GPUs
    (docs/performance.md, "A story on two GPUs", gives the device machine's whole command)
    python bench/multigpu_bench.py --render bench/results/h200x2_multigpu.json --doc docs/performance.md
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_host  # noqa: E402
from csa_bench import find_comfyui  # noqa: E402
from report import markdown_table, write_block  # noqa: E402
from story_bench import panel_characters  # noqa: E402

BEGIN = "<!-- multigpu_bench: generated block, rewritten by bench/multigpu_bench.py --doc -->"
END = "<!-- multigpu_bench: end of generated block -->"
TOLERANCE = 1e-2  # GPU pass mark: max |one - two| <= TOLERANCE x max |one| (fp16 / bf16 work)
TARGET = 1.8  # issue #20: at least 1.8x on two GPUs
GIB = 2**30
# name -> (builder, CFG, scheduler, latent channels, text (tokens, width), pooled width, extra cond)
MODELS = {
    "sdxl": ("SDXL", bench_host.build_sdxl, 5.0, "normal", 4, (77, 2048), 1280, {}),
    "flux": ("Flux.1 dev", bench_host.build_flux, 1.0, "simple", 16, (512, 4096), 768, {"guidance": 3.5}),
}


class SubCallCount:
    """DIFFUSION_MODEL wrapper: the model calls (story sub-calls) and their rows, per device."""

    def __init__(self):
        self.counts, self.lock = {}, threading.Lock()

    def __deepcopy__(self, memo):
        return self  # every device's clone counts here

    def __call__(self, executor, *args, **kwargs):
        options = kwargs.get("transformer_options") or args[-1]
        device = str(options.get("multigpu_thread_device", args[0].device))
        with self.lock:
            calls, rows = self.counts.get(device, (0, 0))
            self.counts[device] = (calls + 1, rows + args[0].shape[0])
        return executor(*args, **kwargs)

    def take(self) -> dict:
        with self.lock:
            counts, self.counts = self.counts, {}
        return {device: {"calls": calls, "rows": rows} for device, (calls, rows) in sorted(counts.items())}


def two_devices(tiny: bool) -> list:
    """The two devices: ``cpu`` and ``cpu:1`` with --tiny (ComfyUI's device list replaced, as the
    multi-GPU tests do; everything after it is ComfyUI's), else the host's first two GPUs."""
    import importlib.util

    import torch

    import comfy.model_management as mm

    if importlib.util.find_spec("comfy.multigpu") is None:
        raise SystemExit("this ComfyUI has no comfy/multigpu.py (MultiGPU CFG Split): pass --comfyui with v0.33 or newer.")
    if tiny:
        pair = [torch.device("cpu"), torch.device("cpu", 1)]
        mm.get_all_torch_devices = lambda exclude_current=False: list(pair)
        return pair
    found = mm.get_all_torch_devices()
    if len(found) < 2 or found[0].type != "cuda":
        raise SystemExit(f"this benchmark needs two GPUs; ComfyUI sees {[str(d) for d in found]}. "
                         "Run it on nvidia-h200-x2, or pass --tiny for the CPU check.")
    return found[:2]


def splitter() -> tuple:
    """ComfyUI's MultiGPU CFG Split (max_gpus 2) as a function of the model, and what it is.

    The node's module needs comfy_api, which imports PyAV; where it does not import (the device
    image has no PyAV) the node's whole body, ``comfy.multigpu.create_multigpu_deepclones``, is
    called instead. Resolved before any run, so a long run never fails at its split."""
    import comfy.multigpu

    try:
        from comfy_extras.nodes_multigpu import MultiGPUCFGSplitNode
    except Exception as error:  # noqa: BLE001  (any failure of comfy_api's imports: the same body follows)
        how = ("comfy.multigpu.create_multigpu_deepclones(max_gpus=2, reuse_loaded=True), the node's body "
               f"(its module did not import: {error})")
        return lambda model: comfy.multigpu.create_multigpu_deepclones(model, 2, reuse_loaded=True), how

    def node(model):
        out = MultiGPUCFGSplitNode.execute(model=model, max_gpus=2)
        return out[0] if isinstance(out, tuple) else out.result[0]

    return node, "MultiGPU CFG Split node (MultiGPU_WorkUnits, max_gpus 2)"


class MultiGPUBench:
    def __init__(self, args):
        import torch

        self.args, self.torch = args, torch
        self.devices = two_devices(args.tiny)
        self.cuda = self.devices[0].type == "cuda"
        self.csa_patch = bench_host.load_host_module("csa_patch")
        self.dit_patch = bench_host.load_host_module("dit_patch")
        self.dit_families = bench_host.load_host_module("dit_families")
        self.engine = sys.modules[f"{bench_host.PACK_NAME}.attention"]
        self.counter = SubCallCount()
        self.split, self.split_how = splitter()

    def story_model(self, key: str):
        """The model at its layout with random weights, a factory for its device clones, and
        story-mode CSA over a ``--panels`` story installed on a clone."""
        _, builder, *_ = MODELS[key]
        base = builder(self.args.tiny, 0)
        base.cached_patcher_init = (builder, (self.args.tiny, 0))  # ComfyUI rebuilds it per device
        model = base.clone()
        model.add_wrapper_with_key("diffusion_model", "multigpu_bench.count", self.counter)
        config = self.engine.CSAConfig(rate_fine=0.5, rate_coarse=0.5, blocks="output", schedule="always")
        cast = self.engine.StoryCast.from_panels(("Bob", "Alice"), panel_characters(self.args.panels), 2)
        family = self.dit_families.dit_family(model)
        if family is None:
            patch = self.csa_patch.ConsistentAttentionPatch(config, cast, self.args.panels_per_call)
        else:
            patch = self.dit_patch.DiTAttentionPatch(family, config, cast, self.args.panels_per_call)
        patch.install(model)
        return model, sum(p.numel() for p in base.model.diffusion_model.parameters())

    def inputs(self, key: str) -> tuple:
        torch, panels, size = self.torch, self.args.panels, self.args.size
        _, _, cfg, _, channels, (tokens, width), pooled, extra = MODELS[key]
        tokens = min(tokens, 8) if self.args.tiny and key == "flux" else tokens
        gen = torch.Generator().manual_seed(panels)

        def cond():
            return [[torch.randn(panels, tokens, width, generator=gen),
                     {"pooled_output": torch.randn(panels, pooled, generator=gen), "width": size, "height": size,
                      **extra}]]

        positive = cond()
        return positive, positive if cfg == 1.0 else cond(), torch.zeros(panels, channels, size // 8, size // 8)

    def sample(self, model, key: str, inputs: tuple, steps: int):
        import comfy.sample

        _, _, cfg, scheduler, *_ = MODELS[key]
        positive, negative, latent = inputs
        noise = comfy.sample.prepare_noise(latent, 1234)
        with self.torch.inference_mode():
            return comfy.sample.sample(model, noise, steps, cfg, "euler", scheduler, positive, negative, latent,
                                       disable_pbar=True, seed=1234)

    def settle(self) -> None:
        for device in self.devices if self.cuda else ():
            self.torch.cuda.synchronize(device)

    def measure(self, model, key: str, inputs: tuple, steps: int) -> tuple[dict, object]:
        """One warm-up step (weights and device clones loaded), then ``steps`` steps timed."""
        torch = self.torch
        self.sample(model, key, inputs, 1)
        self.settle()
        self.counter.take()
        for device in self.devices if self.cuda else ():
            torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        latent = self.sample(model, key, inputs, steps)
        self.settle()
        wall = time.perf_counter() - began
        peaks = {str(d): torch.cuda.max_memory_allocated(d) if self.cuda else 0 for d in self.devices}
        return {"wall_s": wall, "s_per_step": wall / steps, "peak_bytes": peaks, "sub_calls": self.counter.take(),
                "finite": bool(torch.isfinite(latent).all())}, latent

    def run(self, key: str) -> dict:
        import comfy.model_management as mm

        steps = self.args.flux_steps if key == "flux" else self.args.steps
        mm.unload_all_models()  # no clone of an earlier model left in ComfyUI's list of loaded models
        model, params = self.story_model(key)
        inputs = self.inputs(key)
        one, alone = self.measure(model, key, inputs, steps)
        print(MODELS[key][0], "one device", json.dumps(one), flush=True)
        two, both = self.measure(self.split(model), key, inputs, steps)
        print(MODELS[key][0], "two devices", json.dumps(two), flush=True)
        mm.unload_all_models()
        return {"model": MODELS[key][0], "params": params, "cfg": MODELS[key][2], "steps": steps, "split": self.split_how,
                "one": one, "two": two, "speedup": one["wall_s"] / two["wall_s"], "difference": difference(alone, both)}


def difference(one, two) -> dict:
    """Largest |one - two|, absolute and relative to max |one|; bit-for-bit equality; the pass mark."""
    import torch

    one, two = one.float().cpu(), two.float().cpu()
    largest, scale = (one - two).abs().max().item(), one.abs().max().item()
    return {"equal": bool(torch.equal(one, two)), "max_abs": largest, "max_rel": largest / scale if scale else 0.0,
            "within_tolerance": largest <= TOLERANCE * scale}


HEADER = ["model", "devices", "s/step", "wall s", "speedup", "peak GiB (first / second)", "sub-calls (rows) per device",
          "max abs diff", "max rel diff", "bit for bit", f"within {TOLERANCE:g} x max"]


def rows(results: dict) -> list[list[str]]:
    body = []
    for run in results["models"].values():
        diff = run["difference"]
        for label, entry in (("one", run["one"]), ("two", run["two"])):
            peaks = " / ".join(f"{b / GIB:.2f}" for b in entry["peak_bytes"].values())
            calls = ", ".join(f"{d}: {c['calls']} ({c['rows']})" for d, c in entry["sub_calls"].items())
            two = label == "two"
            body.append([run["model"], label, f"{entry['s_per_step']:.3f}", f"{entry['wall_s']:.1f}",
                         f"{run['speedup']:.3f}x" if two else "1x", peaks, calls,
                         f"{diff['max_abs']:.3g}" if two else "", f"{diff['max_rel']:.3g}" if two else "",
                         str(diff["equal"]) if two else "", str(diff["within_tolerance"]) if two else ""])
    return body


def table_text(results: dict) -> str:
    body = rows(results)
    widths = [max(len(r[i]) for r in [HEADER] + body) for i in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in [HEADER] + body)


def generated_block(results: dict) -> str:
    env, s = results["environment"], results["settings"]
    runs = list(results["models"].values())
    lines = [BEGIN, "", f"Machine: {env['gpu']} ({', '.join(s['devices'])}), torch {env['torch']}, CUDA {env['cuda']}, "
             f"ComfyUI {env['comfyui']}, attention `{env['comfy_attention']}`. A {s['panels']}-panel two-character "
             f"story (2 identity panels each), {s['size']}x{s['size']}, euler, story-mode CSA rate 0.5 every step, "
             f"panels_per_call {s['panels_per_call']}; "
             + "; ".join(f"{r['model']}: {r['params'] / 1e9:.2f} B parameters, random weights, CFG {r['cfg']:g}, "
                         f"{r['steps']} steps" for r in runs)
             + ". Two devices through " + "; ".join(dict.fromkeys(r["split"] for r in runs)) + ". Wall time of the "
             "whole sampling after a one-step warm-up, every device synchronised; peak = max_memory_allocated per device.", ""]
    lines += markdown_table(HEADER, rows(results)) + [""]
    if env["tiny"]:
        lines += ["CPU check: its timings mean nothing (the two devices share the machine's cores)."]
    else:
        lines += ["Target (issue #20) >= 1.8x on two GPUs: " + "; ".join(
            f"{r['model']} {r['speedup']:.2f}x, {'met' if r['speedup'] >= TARGET else 'missed'}" for r in runs)]
    lines += ["", END]
    return "\n".join(lines)


def update_doc(path: Path, results: dict) -> None:
    write_block(path, generated_block(results), BEGIN, END)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU check: cpu + cpu:1, small layouts, 64 px, bit for bit")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI v0.33+ checkout (default: $COMFYUI_PATH, ~/comfy/ComfyUI)")
    parser.add_argument("--models", default="sdxl,flux", help="comma-separated: sdxl, flux")
    parser.add_argument("--panels", type=int, help="story length (default 100; tiny 12)")
    parser.add_argument("--panels-per-call", type=int, help="panels per sub-call (default 8; tiny 1)")
    parser.add_argument("--size", type=int, help="image size in pixels (default 1024; tiny 64)")
    parser.add_argument("--steps", type=int, help="SDXL steps (default 30; tiny 2)")
    parser.add_argument("--flux-steps", type=int, help="Flux steps (default 4: ~20 s a step at 100 panels; tiny 2)")
    parser.add_argument("--out", type=Path, default=Path("out/multigpu_bench"))
    parser.add_argument("--doc", type=Path, help="markdown file whose multigpu_bench block is (re)written")
    parser.add_argument("--render", type=Path, nargs="+", help="only render --doc from results.json files (merged)")
    args = parser.parse_args(argv)
    defaults = (12, 1, 64, 2, 2) if args.tiny else (100, 8, 1024, 30, 4)
    for name, value in zip(("panels", "panels_per_call", "size", "steps", "flux_steps"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"--models takes {', '.join(MODELS)}; got {', '.join(sorted(unknown))}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:  # several files: a run split over device calls (--models sdxl, then --models flux)
        results = json.loads(args.render[0].read_text())
        for path in args.render[1:]:
            results["models"].update(json.loads(path.read_text())["models"])
        update_doc(args.doc or Path("docs/performance.md"), results)
        print(table_text(results))
        return 0
    bench_host.import_comfy(find_comfyui(args.comfyui), cpu=args.tiny)
    args.out.mkdir(parents=True, exist_ok=True)
    bench = MultiGPUBench(args)
    results = {"environment": bench_host.environment(args.tiny), "models": {}, "settings": {
        "panels": args.panels, "panels_per_call": args.panels_per_call, "size": args.size,
        "devices": [str(d) for d in bench.devices], "tolerance": TOLERANCE}}
    print(json.dumps(results["environment"]), flush=True)
    started = time.perf_counter()
    for key in args.models.split(","):
        results["models"][key] = bench.run(key)
        results["wall_s"] = time.perf_counter() - started
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(table_text(results))
    if args.doc:
        update_doc(args.doc, results)
    if args.tiny:
        print("(CPU timings mean nothing: the one-device run is on the main thread, whose torch ops ran 3-10x slower "
              "than the same work on a worker thread on this shared machine; the two devices share its cores.)")
        for run in results["models"].values():
            equal = run["difference"]["equal"]
            print(f"{run['model']}: two devices (cpu, cpu:1) equal one device bit for bit with panels_per_call "
                  f"{args.panels_per_call}: {equal}")
            if not equal:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
