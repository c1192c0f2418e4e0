"""GPU benchmark of Consistent Self-Attention on ComfyUI's SDXL UNet (random fp16 weights).

For each panel count it samples with ComfyUI's own KSampler path (euler, CFG 5, so every UNet
call carries both CFG halves: ``panels * 2`` rows) and times every UNet call with CUDA events:
  vanilla  - the unpatched model;
  ours     - ``ConsistentAttentionPatch`` installed on a clone (schedule "always", rate 0.5/0.5,
             output blocks), its extended calls on the fastest kernel measured (attention_kernel 'fastest');
  ours_host - the same with ComfyUI's own kernel for every call (attention_kernel 'host');
  dense    - the official formulation, one dense boolean mask per CFG half (bench/dense_mask.py);
  probe_*  - ours with parts of its per-layer overhead removed, to see what they cost.
It also checks that CSA reached every output-block self-attention layer, that outputs are finite
and differ from vanilla, records peak memory, and profiles a few runs' kernels.

    python bench/csa_bench.py --tiny --only 2             # CPU check, about 30 s
    python bench/csa_bench.py --comfyui .device/ComfyUI --out $OUT --doc $OUT/performance.md
    python bench/csa_bench.py --render out/bench/results.json --doc docs/performance.md
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_host  # noqa: E402
import report  # noqa: E402

VARIANTS = ("vanilla", "ours", "ours_host", "dense", "probe_nosync")
# (variant, panels, window); vanilla and dense have no window.
FULL_RUNS = (
    ("vanilla", 2, 0), ("ours", 2, 0), ("dense", 2, 0),
    ("vanilla", 4, 0), ("ours", 4, 0), ("ours_host", 4, 0), ("dense", 4, 0), ("probe_nosync", 4, 0),
    ("vanilla", 8, 0), ("ours", 8, 4), ("ours_host", 8, 4), ("ours", 8, 0), ("dense", 8, 0), ("probe_nosync", 8, 4),
)
PROFILED = (("vanilla", 4, 0), ("ours", 4, 0), ("dense", 4, 0), ("vanilla", 8, 0), ("ours", 8, 4))
LAYER_COST_CASES = ((4, 0), (8, 4), (8, 0))
CFG = 5.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small SDXL-layout UNet, 64 px, 2 steps, on the CPU")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI checkout (default: $COMFYUI_PATH, ~/comfy/ComfyUI)")
    parser.add_argument("--size", type=int, help="image size in pixels (default 1024; tiny 64)")
    parser.add_argument("--steps", type=int, help="timed sampling steps per round (default 10; tiny 2)")
    parser.add_argument("--warmup", type=int, help="warm-up steps per run (default 3; tiny 1)")
    parser.add_argument("--rounds", type=int, help="timed rounds over all runs (default 2; tiny 1)")
    parser.add_argument("--only", help="comma list of panel counts to run, e.g. '4,8'")
    parser.add_argument("--no-profile", action="store_true", help="skip the kernel profiles")
    parser.add_argument("--out", type=Path, default=Path("out/bench"), help="folder for results.json and profiles.txt")
    parser.add_argument("--doc", type=Path, help="markdown file whose generated block is (re)written")
    parser.add_argument("--render", type=Path, help="only render --doc from an earlier results.json")
    args = parser.parse_args(argv)
    defaults = (64, 2, 1, 1) if args.tiny else (1024, 10, 3, 2)
    for name, value in zip(("size", "steps", "warmup", "rounds"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def find_comfyui(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit.resolve()
    sys.path.insert(0, str(bench_host.REPO_ROOT / "scripts"))
    import comfy_host

    found = comfy_host.find_comfyui()
    if found is None:
        raise SystemExit(comfy_host.missing_message())
    return found


class StepTimer:
    """``model_function_wrapper`` timing each UNet call (CUDA events; host clock on the CPU)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, apply_model, args):
        import torch

        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = apply_model(args["input"], args["timestep"], **args["c"])
            end.record()
            self.marks.append((start, end))
        else:
            began = time.perf_counter()
            out = apply_model(args["input"], args["timestep"], **args["c"])
            self.marks.append((began, time.perf_counter()))
        return out

    def take_ms(self) -> list[float]:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            times = [start.elapsed_time(end) for start, end in self.marks]
        else:
            times = [(end - start) * 1000.0 for start, end in self.marks]
        self.marks = []
        return times


class AttentionCounter:
    """``optimized_attention_override`` for one verification call: which (Lq, Lk) pairs ran."""

    def __init__(self):
        self.pairs = Counter()

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        if q.ndim == 3:
            self.pairs[(q.shape[1], k.shape[1])] += 1
        return func(q, k, v, heads, *args, **kwargs)


@contextlib.contextmanager
def probe(csa_patch, variant: str):
    """probe_nosync: ours without the per-call host sync that finds the step (restored afterwards)."""
    saved = csa_patch.current_step
    if variant == "probe_nosync":
        csa_patch.current_step = lambda *args: csa_patch.Step(0, 1)
    try:
        yield
    finally:
        csa_patch.current_step = saved


class Bench:
    def __init__(self, args):
        import torch

        import comfy.model_management as mm

        self.args = args
        self.torch = torch
        self.device = mm.get_torch_device()
        self.cuda = self.device.type == "cuda"
        self.csa_patch = bench_host.load_host_module()
        self.engine = sys.modules[f"{bench_host.PACK_NAME}.attention"]
        self.dense_mask = __import__("dense_mask")
        self.base = bench_host.build_sdxl(args.tiny)
        self.attn1_output_layers = sum(
            1 for block in self.base.model.diffusion_model.output_blocks
            for module in block.modules() if type(module).__name__ == "BasicTransformerBlock"
        )
        self.conds = {}
        self.vanilla_latents = {}

    def config(self, window: int):
        return self.engine.CSAConfig(rate_fine=0.5, rate_coarse=0.5, window=window, blocks="output", schedule="always")

    def model(self, variant: str, window: int, timer=None):
        model = self.base.clone()
        if variant in ("ours", "ours_host", "probe_nosync"):
            kernel = "host" if variant == "ours_host" else "fastest"
            self.csa_patch.ConsistentAttentionPatch(self.config(window), attention_kernel=kernel).install(model)
        elif variant == "dense":
            self.dense = self.dense_mask.DenseMaskCSA(self.config(window), self.engine.downsample_factor)
            self.dense.install(model, output_blocks=len(self.base.model.diffusion_model.output_blocks))
        if timer is not None:
            model.set_model_unet_function_wrapper(timer)
        return model

    def conditioning(self, panels: int):
        """One random prompt per panel: [panels, 77, 2048] tokens, [panels, 1280] pooled."""
        if panels not in self.conds:
            gen = self.torch.Generator().manual_seed(panels)
            size = self.args.size

            def cond():
                return [[self.torch.randn(panels, 77, 2048, generator=gen),
                         {"pooled_output": self.torch.randn(panels, 1280, generator=gen), "width": size, "height": size}]]

            self.conds[panels] = (cond(), cond())
        return self.conds[panels]

    def sample(self, model, panels: int, steps: int):
        import comfy.sample

        latent = self.torch.zeros(panels, 4, self.args.size // 8, self.args.size // 8)
        noise = comfy.sample.prepare_noise(latent, 1234)
        positive, negative = self.conditioning(panels)
        with self.torch.inference_mode():
            return comfy.sample.sample(model, noise, steps, CFG, "euler", "normal", positive, negative, latent,
                                       disable_pbar=True, seed=1234)

    def verify(self, variant: str, panels: int, window: int) -> dict:
        """One UNet call with an attention counter: did CSA extend every output-block attn1?"""
        counter = AttentionCounter()
        model = self.model(variant, window)
        model.model_options["transformer_options"]["optimized_attention_override"] = counter
        if variant == "dense":
            self.dense.layer_calls = 0
        with probe(self.csa_patch, variant):
            self.sample(model, panels, 1)
        if variant == "dense":
            extended = self.dense.layer_calls
        elif variant == "vanilla":
            extended = 0
        else:
            neighbours = panels - 1 if window <= 0 else min(window, panels - 1)
            extended = sum(n for (lq, lk), n in counter.pairs.items()
                           if lk == lq + neighbours * self.engine.sampled_count(lq, 0.5))
        return {"extended_layers": extended, "expected_layers": 0 if variant == "vanilla" else self.attn1_output_layers,
                "attention_shapes": {f"{lq}x{lk}": n for (lq, lk), n in sorted(counter.pairs.items())}}

    def timed(self, variant: str, panels: int, window: int, steps: int) -> dict:
        torch = self.torch
        timer = StepTimer(self.cuda)
        model = self.model(variant, window, timer)
        with probe(self.csa_patch, variant):
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if self.cuda else 0
            began = time.perf_counter()
            latent = self.sample(model, panels, steps)
            if self.cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - began
            peak = torch.cuda.max_memory_allocated() if self.cuda else 0
        return {"ms": timer.take_ms(), "wall_ms_per_step": wall * 1000.0 / steps, "base_bytes": base,
                "peak_bytes": peak, "latent": latent}

    def warm(self, variant: str, panels: int, window: int) -> None:
        timer = StepTimer(self.cuda)
        with probe(self.csa_patch, variant):
            self.sample(self.model(variant, window, timer), panels, self.args.warmup)
        timer.take_ms()

    def attn1_groups(self) -> dict:
        """{(tokens, width, heads): layers} of the output blocks' self-attention at this size."""
        unet = self.base.model.diffusion_model
        latent = self.args.size // 8
        groups = Counter()
        for block in unet.output_blocks:
            for module in block.modules():
                if type(module).__name__ == "BasicTransformerBlock":
                    width = module.attn1.to_q.in_features
                    level = (width // unet.model_channels).bit_length() - 1
                    groups[((latent >> level) ** 2, width, module.attn1.heads)] += 1
        return dict(groups)

    def layer_costs(self, panels: int, window: int) -> list[dict]:
        """Isolated cost of one output-block attn1 layer: attention at Lk = L and at L + extra, the
        engine's work around it (shared tokens written, gathered and appended: ``gather_kv``), and
        building a call's row plan (host clock, synchronised: ``plan_host``)."""
        import comfy.ldm.modules.attention as attention

        torch, engine = self.torch, self.engine
        rows, dtype = 2 * panels, (torch.float16 if self.cuda else torch.float32)
        config = engine.CSAConfig(rate_fine=0.5, rate_coarse=0.5, window=window, blocks="all", schedule="always")
        out = []
        for (tokens, width, heads), layers in self.attn1_groups().items():
            q, k, v = (torch.randn(rows, tokens, width, device=self.device, dtype=dtype) for _ in range(3))

            def call():
                return engine.StoryCall(engine.CallPlanner(config, engine.Step(0, 1)), engine.BatchCast.of(panels, window),
                                        2, keep_bank=False)

            def extend(story=None):
                seen = {}

                def attend(q_, k_, v_, names, mask):
                    seen["k"], seen["v"] = k_, v_
                    return q_

                (story or call()).attention((("output", 0), 0), tuple(range(panels)), q, k, v, None, attend)
                return seen["k"], seen["v"]

            story = call()
            k_ext, v_ext = extend(story)
            costs = {
                "attention_plain": self.device_ms(lambda: attention.optimized_attention(q, k, v, heads)),
                "attention_extended": self.device_ms(lambda: attention.optimized_attention(q, k_ext, v_ext, heads)),
                "gather_kv": self.device_ms(lambda: extend(story)),
                "plan_host": self.host_ms(lambda: call()._sub_call_rows(tuple(range(panels)), self.device)),
            }
            out.append({"tokens": tokens, "width": width, "heads": heads, "layers": layers,
                        "extended_tokens": k_ext.shape[1], "ms_per_layer": costs})
        return out

    def device_ms(self, fn, repeat: int = 20) -> float:
        torch = self.torch
        for _ in range(3):
            fn()
        if not self.cuda:
            return self.host_ms(fn, repeat)
        times = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            times.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in times)

    def host_ms(self, fn, repeat: int = 20) -> float:
        times = []
        for _ in range(repeat):
            if self.cuda:
                self.torch.cuda.synchronize()
            began = time.perf_counter()
            fn()
            if self.cuda:
                self.torch.cuda.synchronize()
            times.append((time.perf_counter() - began) * 1000.0)
        return statistics.median(times)

    def profile(self, variant: str, panels: int, window: int) -> dict:
        import kernel_profile
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        model = self.model(variant, window)
        steps = 2
        with probe(self.csa_patch, variant), profile(activities=activities) as prof:
            self.sample(model, panels, steps)
            if self.cuda:
                self.torch.cuda.synchronize()
        return kernel_profile.summarise(prof, steps)


def run_name(variant: str, panels: int, window: int) -> str:
    return f"{variant}-p{panels}-w{window}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        return bench_host.render_results(args, report)
    bench_host.import_comfy(find_comfyui(args.comfyui), cpu=args.tiny)
    import torch

    if args.tiny:
        torch.set_num_threads(1)  # a shared 2-core box: OpenMP barriers under load cost seconds per step
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [run for run in FULL_RUNS if not args.only or str(run[1]) in args.only.split(",")]
    started = time.perf_counter()
    bench = Bench(args)
    results = {"environment": bench_host.environment(args.tiny), "settings": {
        "size": args.size, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "cfg": CFG,
        "sampler": "euler / normal", "rate": [0.5, 0.5], "schedule": "always", "blocks": "output",
        "attn1_output_layers": bench.attn1_output_layers}, "runs": {}, "profiles": {}, "layer_costs": {}}
    print(json.dumps(results["environment"]), flush=True)

    def save():
        (args.out / "results.json").write_text(json.dumps(results, indent=1))

    for variant, panels, window in runs:
        name = run_name(variant, panels, window)
        entry = results["runs"][name] = {"variant": variant, "panels": panels, "window": window, "rows": 2 * panels}
        try:
            bench.warm(variant, panels, window)
            entry.update(bench.verify(variant, panels, window))
        except torch.OutOfMemoryError as error:
            entry["error"] = f"out of memory: {str(error).splitlines()[0]}"
        print(name, {k: v for k, v in entry.items() if k != "attention_shapes"}, flush=True)
        save()
    for round_index in range(args.rounds):
        for variant, panels, window in runs:
            entry = results["runs"][run_name(variant, panels, window)]
            if "error" in entry:
                continue
            try:
                measured = bench.timed(variant, panels, window, args.steps)
            except torch.OutOfMemoryError as error:
                entry["error"] = f"out of memory: {str(error).splitlines()[0]}"
                continue
            latent = measured.pop("latent")
            if variant == "vanilla":
                bench.vanilla_latents[panels] = latent
            reference = bench.vanilla_latents.get(panels)
            entry["finite"] = bool(torch.isfinite(latent).all())
            if reference is not None and variant != "vanilla":
                entry["max_abs_diff_vs_vanilla"] = float((latent - reference).abs().max())
            entry.setdefault("ms_rounds", []).append(measured.pop("ms"))
            entry.setdefault("wall_ms_per_step_rounds", []).append(measured.pop("wall_ms_per_step"))
            entry["base_bytes"] = measured["base_bytes"]
            entry["peak_bytes"] = max(entry.get("peak_bytes", 0), measured["peak_bytes"])
            all_ms = [ms for round_ms in entry["ms_rounds"] for ms in round_ms]
            entry["ms_median"] = statistics.median(all_ms)
            entry["ms_round_medians"] = [statistics.median(r) for r in entry["ms_rounds"]]
            print(f"round {round_index} {run_name(variant, panels, window)}: {entry['ms_median']:.2f} ms/step "
                  f"(rounds {['%.2f' % m for m in entry['ms_round_medians']]}), peak {entry['peak_bytes'] / 2**30:.2f} GiB",
                  flush=True)
            save()
    with torch.inference_mode():
        for panels, window in LAYER_COST_CASES:
            if not args.only or str(panels) in args.only.split(","):
                results["layer_costs"][f"p{panels}-w{window}"] = bench.layer_costs(panels, window)
                save()
    if not args.no_profile:
        import kernel_profile

        texts = []
        for variant, panels, window in PROFILED:
            name = run_name(variant, panels, window)
            if name not in results["runs"] or "error" in results["runs"][name]:
                continue
            summary = bench.profile(variant, panels, window)
            results["profiles"][name] = summary
            texts.append(kernel_profile.format_table(f"== {name} ==", summary))
            save()
        (args.out / "profiles.txt").write_text("\n".join(texts))
    results["wall_s"] = time.perf_counter() - started
    save()
    print(report.table_text(results))
    if args.doc:
        report.update_doc(args.doc, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
