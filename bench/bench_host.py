"""ComfyUI for the benchmark: import it, build a random-weight SDXL UNet, load the pack's patch.

Only the modules sampling needs are imported (no node registry, no custom nodes), so the
device machine needs ComfyUI's tree plus two small wheels (torchsde, trampoline).
"""
from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "tests"))

from harness.pack import PACK_NAME, load_pack  # noqa: E402

# SDXL's UNet layout (ComfyUI's SDXL detection: 2/10 transformer depths, 2048-d context, 2816-d adm).
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_spatial_transformer": True, "use_linear_in_transformer": True, "legacy": False,
    "context_dim": 2048, "num_classes": "sequential", "adm_in_channels": 2816,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# Same block structure (attention on levels 1 and 2, output blocks 3-8), a fraction of the width.
TINY_UNET = dict(
    SDXL_UNET, model_channels=64, transformer_depth=[0, 0, 1, 1, 1, 1], transformer_depth_middle=1,
    transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1],
)


def import_comfy(comfy_dir: Path, cpu: bool):
    """Put ComfyUI first on sys.path and set its options before model_management reads them."""
    if not (comfy_dir / "comfy").is_dir():
        raise SystemExit(f"{comfy_dir} is not a ComfyUI checkout (no comfy/ folder); pass --comfyui PATH.")
    sys.path.insert(0, str(comfy_dir))
    from comfy.cli_args import LatentPreviewMethod, args

    args.cpu = cpu
    args.preview_method = LatentPreviewMethod.NoPreviews
    if not cpu and hasattr(args, "disable_dynamic_vram"):  # ComfyUI 0.2x+: estimate-based loading, weights kept
        args.disable_dynamic_vram = True
        args.highvram = True
    import comfy.model_management  # noqa: F401  (reads args now)
    import comfy.sample  # noqa: F401
    import comfy.samplers  # noqa: F401


def load_host_module(name: str = "csa_patch"):
    """``consistent_story.nodes.host.<name>`` (default ``csa_patch``), the pack imported as the tests import it."""
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.nodes.host.{name}")


def init_random_(module, seed: int) -> None:
    """ComfyUI's ops leave weights uninitialised: fill them in place, variance-preserving."""
    import torch

    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                fan_in = math.prod(param.shape[1:])
                param.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.02, generator=generator)
            else:  # norm scales
                param.fill_(1.0)


def build_sdxl(tiny: bool, seed: int = 0):
    """A ModelPatcher over ComfyUI's own SDXL model class with random fp16 (CPU: fp32) weights."""
    import torch

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    device = mm.get_torch_device()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    config = comfy.supported_models.SDXL(TINY_UNET if tiny else SDXL_UNET)
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=device)  # weights allocated straight on the GPU
    init_random_(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())


# Flux.1-dev's layout (ComfyUI's Flux detection: 3072 wide, 24 heads, 19 double + 38 single blocks).
FLUX_DEV = {
    "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
    "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
    "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
}


def build_flux(tiny: bool, seed: int = 0):
    """A ModelPatcher over ComfyUI's own Flux class, Flux.1-dev layout (tiny: 1 + 1 blocks, 256 wide,
    head width kept), random bf16 weights on the GPU (fp32 on the CPU)."""
    import torch

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    import dataclasses

    from comfy.ldm.flux.model import FluxParams

    device = mm.get_torch_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layout = dict(FLUX_DEV, depth=1, depth_single_blocks=1, hidden_size=256, num_heads=2) if tiny else dict(FLUX_DEV)
    if "txt_ids_dims" in {field.name for field in dataclasses.fields(FluxParams)}:
        layout["txt_ids_dims"] = []  # ComfyUI 0.8 and newer: a required field (Flux.1: no text positions)
    config = comfy.supported_models.Flux(layout)
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=device)
    init_random_(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())


def environment(tiny: bool) -> dict:
    """Machine, versions and the attention backend ComfyUI picked."""
    import platform

    import torch

    import comfy.ldm.modules.attention as attention
    import comfy.model_management as mm
    import comfy.ops

    device = mm.get_torch_device()
    info = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "comfy_attention": attention.optimized_attention.__name__,
        "sdpa_priority": [str(b).split(".")[-1] for b in getattr(comfy.ops, "SDPA_BACKEND_PRIORITY", [])],
        "tiny": tiny,
    }
    try:
        from comfyui_version import __version__

        info["comfyui"] = __version__
    except ImportError:
        info["comfyui"] = "unknown"
    return info


def render_results(args, report) -> int:
    """``--render FILE``: write a saved results file's table into the doc (``report``: the
    bench's report module, with ``update_doc`` and ``table_text``) without running anything."""
    import json

    results = json.loads(args.render.read_text())
    report.update_doc(args.doc or Path("docs/performance.md"), results)
    print(report.table_text(results))
    return 0
