"""Random-weight model files other than checkpoints, built with ComfyUI's own classes: a ControlNet,
a Flux.1-dev diffusion model and VAE, a LoRA, a PhotoMaker ID encoder. Each is what the matching
ComfyUI loader reads (ControlNetLoader, UNETLoader, VAELoader, LoraLoader, PhotoMakerLoader),
seeded like the checkpoints (see checkpoints.py), and checked where ComfyUI detects a layout.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from harness.checkpoints import FIXED_PART_DTYPE, KINDS, _KL_VAE_CONFIG, _model_config, _random_state_dict, _tensor_seed
from harness.comfy_env import import_comfyui


def build_controlnet(kind: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """A random-weight ControlNet (ComfyUI's ``cldm.ControlNet``, its original key layout) for the
    UNet of ``kind``; ControlNetLoader detects its layout from the keys as for a real one. Its zero
    convolutions are random too, so it changes what the UNet draws."""
    import_comfyui()
    import comfy.cldm.cldm
    import comfy.utils

    config = dict(_model_config(KINDS[kind]).unet_config)
    config.pop("out_channels")
    config.update(hint_channels=3, device="meta", dtype=torch.float32)
    state_dict = _random_state_dict(comfy.cldm.cldm.ControlNet(**config), seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.utils.save_torch_file(state_dict, str(path))
    return path


# ComfyUI 0.3.64 detects Flux's widths as fixed (3072 wide, 24 heads, T5's 4096-wide context); only
# the number of blocks is read from the weights. One double and one single block is the smallest
# Flux.1-dev (guidance embedding) it loads: 0.5 billion parameters, 1 GB in bf16.
FLUX_TINY = {
    "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
    "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1,
    "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
}


def build_flux(path: str | os.PathLike, seed: int = 0, depth: int = 1, single: int = 1) -> Path:
    """A random-weight Flux.1-dev-layout diffusion model file, as UNETLoader reads it (checked to be
    detected as ComfyUI's Flux with ``depth`` double and ``single`` single-stream blocks)."""
    import_comfyui()
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils

    import dataclasses

    from comfy.ldm.flux.model import FluxParams

    config = dict(FLUX_TINY, depth=depth, depth_single_blocks=single)
    if "txt_ids_dims" in {field.name for field in dataclasses.fields(FluxParams)}:
        config["txt_ids_dims"] = []  # newer ComfyUI (Flux.1: no text position ids), a required field there
    model_config = comfy.supported_models.Flux(config)
    model_config.set_inference_dtype(torch.bfloat16, None)
    diffusion_model = model_config.get_model({}, device="meta").diffusion_model
    state_dict = _random_state_dict(diffusion_model, seed, torch.bfloat16)
    detected = comfy.model_detection.detect_unet_config(state_dict, "")
    if type(comfy.model_detection.model_config_from_unet_config(detected, state_dict)).__name__ != "Flux" or \
            (detected["depth"], detected["depth_single_blocks"]) != (depth, single):
        raise RuntimeError(f"ComfyUI would not load this as Flux with {depth}+{single} blocks: {detected}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.utils.save_torch_file(state_dict, str(path))
    return path


def build_flux_vae(path: str | os.PathLike, seed: int = 0) -> Path:
    """A random-weight Flux VAE (ComfyUI's AutoencoderKL with 16 latent channels), as VAELoader reads it."""
    import_comfyui()
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=dict(_KL_VAE_CONFIG, z_channels=16), embed_dim=16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.utils.save_torch_file(_random_state_dict(vae, seed, FIXED_PART_DTYPE), str(path))
    return path


def build_lora(kind: str, path: str | os.PathLike, seed: int = 0, rank: int = 4) -> Path:
    """A random rank-``rank`` LoRA (kohya key names, as LoraLoader reads them) on every attention
    projection of the UNet of ``kind``; strong enough to change what the UNet draws."""
    import_comfyui()
    import comfy.utils

    model = _model_config(KINDS[kind]).get_model({}, device="meta")
    tensors = {}
    for name, weight in model.diffusion_model.state_dict().items():
        if not (name.endswith(".weight") and weight.ndim == 2 and (".attn1." in name or ".attn2." in name)):
            continue
        key = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
        out_features, in_features = weight.shape
        generator = torch.Generator().manual_seed(_tensor_seed(seed, key))
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * in_features ** -0.5
        tensors[f"{key}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * rank ** -0.5
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.utils.save_torch_file(tensors, str(path))
    return path


def build_photomaker(path: str | os.PathLike, seed: int = 0) -> Path:
    """A random-weight PhotoMaker ID encoder (ComfyUI's own ``PhotoMakerIDEncoder``: CLIP ViT-L/14
    vision tower, second projection, fuse module), as PhotoMakerLoader reads it; fp16, about 0.6 GB."""
    import sys

    env = import_comfyui()
    import comfy.utils

    loader = env.NODE_CLASS_MAPPINGS["PhotoMakerLoader"]
    encoder = sys.modules[loader.__module__].PhotoMakerIDEncoder()  # parameters allocated, never written
    state_dict = _random_state_dict(encoder, seed, FIXED_PART_DTYPE)
    del encoder
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.utils.save_torch_file(state_dict, str(path))
    return path


def photomaker_file(session_dir: Path) -> str:
    """The session's random PhotoMaker model, built on first use and registered with ComfyUI."""
    import folder_paths

    folder = Path(session_dir) / "photomaker"
    path = folder / "random_photomaker.safetensors"
    if not path.exists():
        build_photomaker(path)
    folder_paths.add_model_folder_path("photomaker", str(folder), is_default=True)
    return path.name


# The smallest DiT of each Flux-type family that ComfyUI's own classes build (one double and one
# single block, one head of 128 dimensions, so the real RoPE axes fit). Built from the family's
# config class directly: ComfyUI's detection fixes Flux.1's and Chroma's widths at their real
# sizes, and these tests need only the layout (patches, positions, blocks), not the width.
TINY_DITS = {
    "Flux": {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
             "context_in_dim": 64, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 1, "depth": 1,
             "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True},
    "Chroma": {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 64, "hidden_size": 128,
               "mlp_ratio": 4.0, "num_heads": 1, "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 56, 56],
               "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 128, "hidden_dim": 32,
               "n_layers": 1},
    "Flux2": {"image_model": "flux2", "axes_dim": [32, 32, 32, 32], "num_heads": 1, "mlp_ratio": 3.0, "theta": 2000,
              "out_channels": 128, "global_modulation": True, "mlp_silu_act": True, "qkv_bias": False,
              "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0, "txt_ids_dims": [3],
              "in_channels": 128, "hidden_size": 128, "context_in_dim": 96, "vec_in_dim": None, "depth": 1,
              "depth_single_blocks": 1, "patch_size": 1, "guidance_embed": True, "yak_mlp": False, "txt_norm": False},
}
TINY_DITS["QwenImage"] = {"image_model": "qwen_image", "in_channels": 64, "num_layers": 2, "attention_head_dim": 128,
                          "num_attention_heads": 1, "joint_attention_dim": 32}
TINY_DITS["ZImage"] = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 32,
                       "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "qk_norm": True,
                       "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
                       "ffn_dim_multiplier": 8 / 3, "z_image_modulation": True, "time_scale": 1000.0,
                       "pad_tokens_multiple": 32}
TINY_DITS["SD3"] = {"in_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2, "out_channels": 16, "depth": 2,
                    "input_size": None, "adm_in_channels": 2048, "num_patches": 256, "pos_embed_max_size": 16,
                    "context_embedder_config": {"target": "torch.nn.Linear",
                                                "params": {"in_features": 4096, "out_features": 128}},
                    "x_block_self_attn_layers": []}
TINY_DITS["ChromaRadiance"] = dict(
    TINY_DITS["Chroma"], image_model="chroma_radiance", in_channels=3, out_channels=3, patch_size=16,
    nerf_hidden_size=16, nerf_mlp_ratio=4, nerf_depth=1, nerf_max_freqs=8, nerf_tile_size=0,
    nerf_final_head_type="conv", nerf_embedder_dtype=None)
# Fields newer ComfyUI added to the Params dataclasses (required there, unknown to older hosts).
_PARAMS = {"Flux": "comfy.ldm.flux.model.FluxParams", "Flux2": "comfy.ldm.flux.model.FluxParams",
           "Chroma": "comfy.ldm.chroma.model.ChromaParams",
           "ChromaRadiance": "comfy.ldm.chroma_radiance.model.ChromaRadianceParams"}
_NEWER_PARAMS = {"txt_ids_dims": [], "vec_in_dim": None, "use_x0": False, "use_sequential_txt_ids": False}


def tiny_dit(config_name: str, seed: int = 0):
    """A random-weight ModelPatcher of ComfyUI's ``supported_models.<config_name>`` at the tiny
    layout above (float32), built and wrapped exactly as ComfyUI's loaders build and wrap models."""
    import_comfyui()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    model_config = getattr(comfy.supported_models, config_name)(host_unet_config(config_name, TINY_DITS[config_name]))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device="meta")
    state_dict = _random_state_dict(model.diffusion_model, seed, torch.float32)
    model = model_config.get_model({})
    model.diffusion_model.load_state_dict(state_dict, strict=True, assign=True)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=comfy.model_management.unet_offload_device())


def host_unet_config(config_name: str, unet_config: dict) -> dict:
    """``unet_config`` fitted to this host's Params dataclass: fields newer hosts require are
    added with their neutral values, fields this host does not know are dropped."""
    import dataclasses
    import importlib

    unet_config = dict(unet_config)
    if config_name in _PARAMS:  # a Params dataclass whose fields differ between hosts
        module, _, params_name = _PARAMS[config_name].rpartition(".")
        fields = {field.name for field in dataclasses.fields(getattr(importlib.import_module(module), params_name))}
        unet_config.update({name: value for name, value in _NEWER_PARAMS.items()
                            if name in fields and name not in unet_config})
        for name in [name for name in unet_config if name != "image_model" and name not in fields]:
            unet_config.pop(name)  # a field this host does not have
    return unet_config
