"""Random-weight diffusion-model and VAE files of the image DiTs whose workflows ship with the
pack (Flux.2 klein, Qwen-Image, Z-Image), as UNETLoader and VAELoader read them.

Each file is the smallest one ComfyUI's own detection (``model_detection.detect_unet_config``,
``sd.VAE``) maps to the family's real config class and layout; the builder checks that before
writing. What detection fixes stays real, what it reads from the weights is cut down:

- Flux.2 klein: widths are read from the weights (``img_in``, ``txt_in``), so one 128-wide head,
  one double and one single block, and klein 4B's text width (Qwen3-4B, three layers: 7680).
- Qwen-Image: 24 heads of 128 and the 3584-wide text input are fixed; one block (0.38 billion
  parameters, 0.8 GB in bf16).
- Z-Image: only dim 3840 is Z-Image (any other is Lumina 2 or nothing); one main layer, the two
  refiners of each kind the class always builds (0.9 billion parameters, 1.8 GB in bf16).
- VAEs at their real layouts: Flux.2's (AutoencoderKL, 32 latent channels with the batch norm
  that makes 128 at 1/16) and Qwen-Image's, Wan 2.1's (ComfyUI 0.3.64 fixes its width at 96).
  Z-Image uses the Flux.1 VAE (model_files.build_flux_vae).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from harness.checkpoints import _KL_VAE_CONFIG, FIXED_PART_DTYPE, _random_state_dict
from harness.comfy_env import import_comfyui

FLUX2_KLEIN = {
    "image_model": "flux2", "axes_dim": [32, 32, 32, 32], "num_heads": 1, "mlp_ratio": 3.0, "theta": 2000,
    "out_channels": 128, "global_modulation": True, "mlp_silu_act": True, "qkv_bias": False, "ops_bias": False,
    "default_ref_method": "index", "ref_index_scale": 10.0, "txt_ids_dims": [3], "in_channels": 128,
    "hidden_size": 128, "context_in_dim": 3 * 2560, "vec_in_dim": None, "depth": 1, "depth_single_blocks": 1,
    "patch_size": 1, "guidance_embed": False, "yak_mlp": False, "txt_norm": False,
}
QWEN_IMAGE = {"image_model": "qwen_image", "in_channels": 64, "num_layers": 1}
Z_IMAGE = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 2560, "n_layers": 1,
    "qk_norm": True, "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
    "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
    "pad_tokens_multiple": 32,
}
# workflow kind -> (config class, unet_config, detected fields that must come back as built)
DIT_FILES = {
    "flux2_klein": ("Flux2", FLUX2_KLEIN, ("hidden_size", "context_in_dim", "depth", "depth_single_blocks",
                                           "guidance_embed")),
    "qwen_image": ("QwenImage", QWEN_IMAGE, ("num_layers",)),
    "z_image": ("ZImage", Z_IMAGE, ("dim", "cap_feat_dim", "n_layers", "pad_tokens_multiple")),
}


def build_dit(kind: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """A random-weight diffusion model of ``kind`` (see DIT_FILES) in bf16, checked to be detected
    as that family's config with the fields it was built with."""
    import_comfyui()
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils

    config_name, unet_config, fields = DIT_FILES[kind]
    model_config = getattr(comfy.supported_models, config_name)(dict(unet_config))
    model_config.set_inference_dtype(torch.bfloat16, None)
    diffusion_model = model_config.get_model({}, device="meta").diffusion_model
    state_dict = _random_state_dict(diffusion_model, seed, torch.bfloat16)
    detected = comfy.model_detection.detect_unet_config(state_dict, "")
    found = comfy.model_detection.model_config_from_unet_config(detected, state_dict)
    wrong = {name: detected.get(name) for name in fields if detected.get(name) != unet_config.get(name)}
    if type(found).__name__ != config_name or wrong:
        raise RuntimeError(f"ComfyUI would not load this as {config_name} as built: {type(found).__name__}, {wrong}")
    return _save(state_dict, path)


def build_flux2_vae(path: str | os.PathLike, seed: int = 0) -> Path:
    """Flux.2's VAE: ComfyUI's AutoencoderKL with 32 latent channels and the latent batch norm
    (``bn.*``) by which VAELoader knows it, at the real widths."""
    import_comfyui()
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=dict(_KL_VAE_CONFIG, z_channels=32), embed_dim=32)
    state_dict = _random_state_dict(vae, seed, FIXED_PART_DTYPE)
    # The latent batch norm's statistics, over the 2x2-patchified latent (128 channels).
    state_dict.update({"bn.running_mean": torch.zeros(128), "bn.running_var": torch.ones(128),
                       "bn.num_batches_tracked": torch.tensor(0)})
    return _save(state_dict, path)


def build_wan21_vae(path: str | os.PathLike, seed: int = 0) -> Path:
    """Qwen-Image's VAE, Wan 2.1's (ComfyUI's ``ldm.wan.vae.WanVAE``)."""
    import_comfyui()
    from comfy.ldm.wan.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                     temperal_downsample=[False, True, True], dropout=0.0)
    state_dict = _random_state_dict(vae, seed, FIXED_PART_DTYPE)
    for name in state_dict:
        if name.endswith(".gamma"):  # RMS norms' scales
            state_dict[name] = torch.ones_like(state_dict[name])
    return _save(state_dict, path)


def _save(state_dict: dict, path: str | os.PathLike) -> Path:
    import comfy.utils

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.utils.save_torch_file(state_dict, str(path))
    return path
