"""GPU benchmark of Consistent Self-Attention on every supported DiT family (ComfyUI's own classes).

Each family at its released layout (the configs ComfyUI's ``model_detection`` writes for the
released checkpoints), random bf16 weights, 4 panels at 1024x1024, random prompts of the family's
text width, one row per panel (no CFG), euler. For vanilla, the family's default blocks and all
joint blocks: ms per model call (CUDA events, median), peak memory, and how many layers CSA
extended per call (its own count, ``CallState.extended``) against the blocks it chose.

    python bench/dit_bench.py --tiny                                   # CPU check, tiny layouts
    python bench/dit_bench.py --comfyui PATH --out $OUT                # the GPU run
    python bench/dit_bench.py --render bench/results/h200_dit.json --doc docs/performance.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # harness.model_files needs comfy_host
import bench_host  # noqa: E402
from csa_bench import StepTimer, find_comfyui  # noqa: E402
import reference_csa  # noqa: E402
from report import markdown_table, write_block  # noqa: E402



def markers(host: str) -> tuple[str, str]:
    """The generated block's first and last lines in the doc: one block per ComfyUI version."""
    return (f"<!-- dit_bench ComfyUI {host}: generated block, rewritten by bench/dit_bench.py --doc -->",
            f"<!-- dit_bench ComfyUI {host}: end of generated block -->")

STATE_KEY = "consistent_story.csa"
FLUX_DEV = dict(bench_host.FLUX_DEV)
# name -> (ComfyUI config class, released layout, latent (channels, downscale, frames), text (tokens, width), pooled)
FAMILIES = {
    "Flux.1 dev": ("Flux", FLUX_DEV, (16, 8, None), (512, 4096), 768),
    "Chroma": ("Chroma", {**{k: v for k, v in FLUX_DEV.items() if k not in ("vec_in_dim", "guidance_embed")},
                          "image_model": "chroma", "in_channels": 64, "out_channels": 64, "in_dim": 64,
                          "out_dim": 3072, "hidden_dim": 5120, "n_layers": 5}, (16, 8, None), (512, 4096), 768),
    # Flux.2 klein 4B: 5 double + 20 single blocks, 3072 wide, Qwen3-4B text (3 x 2560).
    "Flux.2 klein 4B": ("Flux2", {"image_model": "flux2", "axes_dim": [32, 32, 32, 32], "num_heads": 24, "mlp_ratio": 3.0,
                                  "theta": 2000, "out_channels": 128, "global_modulation": True, "mlp_silu_act": True,
                                  "qkv_bias": False, "ops_bias": False, "default_ref_method": "index",
                                  "ref_index_scale": 10.0, "txt_ids_dims": [3], "in_channels": 128, "hidden_size": 3072,
                                  "context_in_dim": 7680, "vec_in_dim": None, "depth": 5, "depth_single_blocks": 20,
                                  "patch_size": 1, "guidance_embed": False, "yak_mlp": False, "txt_norm": False},
                        (128, 16, None), (512, 7680), 768),
    "Qwen-Image": ("QwenImage", {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 60,
                                 "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584},
                   (16, 8, 1), (128, 3584), None),
    "Z-Image": ("ZImage", {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840,
                           "cap_feat_dim": 2560, "n_layers": 30, "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30,
                           "qk_norm": True, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
                           "ffn_dim_multiplier": 8 / 3, "z_image_modulation": True, "time_scale": 1000.0,
                           "pad_tokens_multiple": 32}, (16, 8, None), (128, 2560), None),
    # SD3.5 Large: 38 joint blocks, 38 heads of 64, RMS q/k norms; 77 CLIP + 77 T5 tokens.
    "SD3.5 Large": ("SD3", {"in_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2, "out_channels": 16,
                            "depth": 38, "input_size": None, "adm_in_channels": 2048, "num_patches": 36864,
                            "pos_embed_max_size": 192, "qk_norm": "rms", "x_block_self_attn_layers": [],
                            "context_embedder_config": {"target": "torch.nn.Linear",
                                                        "params": {"in_features": 4096, "out_features": 2432}}},
                    (16, 8, None), (154, 4096), 2048),
}
TINY = {"Flux.1 dev": dict(depth=1, depth_single_blocks=1), "Chroma": dict(depth=1, depth_single_blocks=1),
        "Flux.2 klein 4B": dict(depth=1, depth_single_blocks=1), "Qwen-Image": dict(num_layers=2),
        "Z-Image": dict(n_layers=2, n_refiner_layers=1),
        "SD3.5 Large": dict(depth=2, num_patches=256, pos_embed_max_size=16,
                            context_embedder_config={"target": "torch.nn.Linear",
                                                     "params": {"in_features": 4096, "out_features": 128}})}
# (blocks, attention kernel of the extended calls, key positions); 'output' = the family's default
# blocks; 'reference' = the yardstick (bench/reference_csa.py) in the same blocks, host's kernel or cuDNN first
RUNS = (("vanilla", "host", None), ("reference", "host", "as is"), ("reference", "cudnn", "as is"),
        ("output", "host", "shifted"), ("output", "fastest", "shifted"), ("output", "fastest", "as is"),
        ("all", "fastest", "shifted"))


class ExtendedCounter:
    """Attention override after CSA: the layers each model call extended, as CSA counted them."""

    def __init__(self):
        self.states = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        state = (kwargs.get("transformer_options") or {}).get(STATE_KEY)
        if state is not None and (not self.states or self.states[-1] is not state):
            self.states.append(state)
        return func(q, k, v, heads, *args, **kwargs)


class DiTBench:
    def __init__(self, args):
        import torch

        import comfy.model_management as mm

        self.args, self.torch = args, torch
        self.device = mm.get_torch_device()
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.dit_patch = bench_host.load_host_module("dit_patch")
        self.families = bench_host.load_host_module("dit_families")
        self.engine = sys.modules[f"{bench_host.PACK_NAME}.attention"]
        self.kernels = sys.modules[f"{bench_host.PACK_NAME}.attention.kernels"]
        self.reference = None
        self.name = None

    def build(self, name: str):
        import comfy.model_patcher
        import comfy.supported_models
        from harness.model_files import host_unet_config

        config_name, layout, _, _, _ = FAMILIES[name]
        layout = dict(layout, **TINY[name]) if self.args.tiny else layout
        config = getattr(comfy.supported_models, config_name)(host_unet_config(config_name, layout))
        config.set_inference_dtype(self.dtype, None)
        model = config.get_model({}, device=self.device)
        bench_host.init_random_(model.diffusion_model, 0)
        model.eval()
        return comfy.model_patcher.ModelPatcher(model, load_device=self.device, offload_device=self.device)

    def inputs(self, name: str):
        torch = self.torch
        _, _, (channels, downscale, frames), (tokens, width), pooled = FAMILIES[name]
        tokens = min(tokens, 8) if self.args.tiny else tokens
        gen = torch.Generator().manual_seed(0)
        extra = {"guidance": 3.5, "pooled_output": torch.randn(self.args.panels, pooled or 32, generator=gen)}
        positive = [[torch.randn(self.args.panels, tokens, width, generator=gen), extra]]
        side = self.args.size // downscale
        latent = torch.zeros(self.args.panels, channels, *((frames,) if frames else ()), side, side)
        return positive, latent

    def model(self, base, blocks: str, kernel: str = "host", positions: str | None = None, probe=None):
        model = base.clone()
        if blocks == "reference":
            chosen = self.model(base, "output", "host", "as is").get_wrappers("apply_model", "consistent_story.csa")[0].__self__.chosen
            family = self.families.dit_family(model)
            diffusion_model = model.get_model_object("diffusion_model")
            side = self.args.size // FAMILIES[self.name][2][1]
            image = self.engine.patch_grid(side, side, diffusion_model.patch_size)
            kernel_fn = None if kernel == "host" else lambda q, k, v, heads, mask, skip, skip_out: self.kernels.sdpa(
                q, k, v, heads, mask, skip, skip_out, None, self.kernels.cudnn_first())
            self.reference = reference_csa.ReferenceExtension(chosen, image[0] * image[1], 0.5, kernel_fn, family.named_by_host)
            self.reference.install(model, family, diffusion_model)
        elif blocks != "vanilla":
            config = self.engine.CSAConfig(rate_fine=0.5, rate_coarse=0.5, blocks=blocks, schedule="always")
            family = self.families.dit_family(model)
            if family.rope_embedder is None:
                positions = "as is"  # SD3: no RoPE to shift by
            patch = self.dit_patch.DiTAttentionPatch(family, config, key_positions=positions, attention_kernel=kernel)
            patch.install(model)
        if probe is not None:
            model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = probe
        return model

    def sample(self, model, positive, latent, steps: int):
        import comfy.sample

        noise = comfy.sample.prepare_noise(latent, 7)
        with self.torch.inference_mode():
            return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, positive, latent,
                                       disable_pbar=True, seed=7)

    def run(self, name: str, base, blocks: str, kernel: str, positions: str | None) -> dict:
        torch = self.torch
        self.name = name
        positive, latent = self.inputs(name)
        counter = ExtendedCounter()
        if blocks not in ("vanilla", "reference"):
            self.sample(self.model(base, blocks, "host", positions, counter), positive, latent, 1)
        model = self.model(base, blocks, kernel, positions)
        patch = None
        if blocks not in ("vanilla", "reference"):
            patch = model.get_wrappers("apply_model", "consistent_story.csa")[0].__self__
        timer = StepTimer(self.cuda)
        model.set_model_unet_function_wrapper(timer)
        self.sample(model, positive, latent, 1)  # warm-up
        timer.take_ms()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        out = self.sample(model, positive, latent, self.args.steps)
        ms = timer.take_ms()
        if blocks == "reference":
            extended, chosen = self.reference.extended // (self.args.steps + 1), len(self.reference.chosen)
        else:
            extended = max((state.extended for state in counter.states), default=0)
            chosen = 0 if patch is None else len(patch.chosen)
            positions = None if patch is None else patch.key_positions  # SD3 runs 'as is' whatever was asked
        return {"blocks": blocks, "kernel": kernel, "positions": positions, "ms_per_step": statistics.median(ms), "ms": ms,
                "peak_bytes": torch.cuda.max_memory_allocated() if self.cuda else 0,
                "finite": bool(torch.isfinite(out).all()),
                "extended": extended, "chosen": chosen,
                "kernels": sorted(set(patch.kernels.chosen.values())) if patch is not None else []}


def rows(results: dict) -> list[list[str]]:
    body = []
    for name, family in results["families"].items():
        vanilla = family["runs"].get("vanilla/host", {})
        for key, run in family["runs"].items():
            blocks = key.split("/")[0]
            if "error" in run:
                body.append([name, key, run["error"], "", "", "", "", "", ""])
                continue
            time_ratio = run["ms_per_step"] / vanilla["ms_per_step"] if vanilla.get("ms_per_step") else float("nan")
            peak_ratio = run["peak_bytes"] / vanilla["peak_bytes"] if vanilla.get("peak_bytes") else float("nan")
            label = {"output": "default", "reference": "reference (default blocks)"}.get(blocks, blocks)
            if run.get("positions"):
                label += f", {run['positions']}"
            kernels = ", ".join(run.get("kernels") or []) or ("cuDNN first" if run.get("kernel") == "cudnn" else "host")
            body.append([name, label, run.get("kernel", "host") + f" ({kernels})", f"{family['params'] / 1e9:.1f}",
                         f"{run['ms_per_step']:.1f}", f"{time_ratio:.3f}x", f"{run['peak_bytes'] / 2**30:.2f}",
                         f"{peak_ratio:.3f}x", f"{run['extended']}/{run['chosen']}"])
    return body


HEADER = ["family", "blocks", "extended calls' kernel (chosen)", "params (B)", "ms/call", "x vanilla", "peak GiB", "peak x vanilla", "layers extended / chosen"]


def generated_block(results: dict) -> str:
    env, s = results["environment"], results["settings"]
    begin, end = markers(env["comfyui"])
    lines = [begin, "", f"Machine: {env['gpu']}, torch {env['torch']}, ComfyUI {env['comfyui']}, attention "
             f"`{env['comfy_attention']}`, SDPA order {env.get('sdpa_priority') or 'torch default'}. Each family's "
             f"released layout, random bf16 weights, {s['panels']} panels at {s['size']}x{s['size']}, no CFG, euler, "
             f"median of {s['steps']} timed model calls, rate 0.5, CSA on every call; key positions shifted or as is "
             "(SD3.5: as is, it has no RoPE). 'reference': the simplest exact CSA in the same blocks "
             "(bench/reference_csa.py: one token-major gather and one cat, no bank), the yardstick.", ""]
    lines += markdown_table(HEADER, rows(results)) + ["", end]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny layouts, 64 px, on the CPU")
    parser.add_argument("--comfyui", type=Path)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--panels", type=int, default=4)
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--out", type=Path, default=Path("out/dit_bench"))
    parser.add_argument("--doc", type=Path)
    parser.add_argument("--render", type=Path)
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
    else:
        args.size = args.size or (64 if args.tiny else 1024)
        args.steps = args.steps or (2 if args.tiny else 6)
        bench_host.import_comfy(find_comfyui(args.comfyui), cpu=args.tiny)
        args.out.mkdir(parents=True, exist_ok=True)
        bench = DiTBench(args)
        import comfy.supported_models

        results = {"environment": bench_host.environment(args.tiny), "families": {},
                   "settings": {"panels": args.panels, "size": args.size, "steps": args.steps}}
        started = time.perf_counter()
        for name in args.families.split(","):
            if not hasattr(comfy.supported_models, FAMILIES[name][0]):
                print(f"{name}: this ComfyUI has no {FAMILIES[name][0]}", flush=True)
                continue
            base = bench.build(name)
            family = results["families"][name] = {"params": sum(p.numel() for p in base.model.parameters()), "runs": {}}
            for blocks, kernel, positions in RUNS:
                key = f"{blocks}/{kernel}" + (f"/{positions}" if positions and blocks != "reference" else "")
                try:
                    family["runs"][key] = bench.run(name, base, blocks, kernel, positions)
                except bench.torch.OutOfMemoryError as error:
                    family["runs"][key] = {"error": f"out of memory: {str(error).splitlines()[0]}"}
                print(name, key, {k: v for k, v in family["runs"][key].items() if k != "ms"}, flush=True)
                (args.out / "results.json").write_text(json.dumps(results, indent=1))
            del base
            if bench.cuda:
                bench.torch.cuda.empty_cache()
        results["wall_s"] = time.perf_counter() - started
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n".join("  ".join(r) for r in [HEADER] + rows(results)))
    if args.doc:
        write_block(args.doc, generated_block(results), *markers(results["environment"]["comfyui"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
