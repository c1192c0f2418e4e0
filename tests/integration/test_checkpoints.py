"""The random-weight test checkpoints load in ComfyUI as the architectures they stand for."""
import hashlib

import pytest
import torch
from safetensors import safe_open

from harness.checkpoints import CPU_KINDS, build_checkpoint

pytestmark = pytest.mark.integration

# kind -> (comfy.supported_models class, text encoder class, cross-attention width, attn1 layers
# per UNet block). Layouts from DESIGN.md §2; Vega's from its ComfyUI config (no middle attention).
EXPECTED = {
    "sd15_small": ("SD15", "SD1ClipModel", 768, {
        ("input", 1): 1, ("input", 3): 1, ("middle", 0): 1,
        ("output", 2): 1, ("output", 3): 1, ("output", 4): 1, ("output", 5): 1,
    }),
    "sd15": ("SD15", "SD1ClipModel", 768, {
        **{("input", i): 1 for i in (1, 2, 4, 5, 7, 8)}, ("middle", 0): 1,
        **{("output", i): 1 for i in range(3, 12)},
    }),
    "vega_small": ("Segmind_Vega", "SDXLClipModel", 2048, {
        ("input", 4): 1, ("input", 5): 1, ("input", 7): 2, ("input", 8): 2,
        **{("output", i): 2 for i in (0, 1, 2)}, **{("output", i): 1 for i in (3, 4, 5)},
    }),
}


def test_every_cpu_kind_has_expectations():
    assert set(CPU_KINDS) == set(EXPECTED)


def attn1_layers_per_block(unet) -> dict:
    from comfy.ldm.modules.attention import SpatialTransformer

    blocks = [("input", i, b) for i, b in enumerate(unet.input_blocks)] + [("middle", 0, unet.middle_block)]
    blocks += [("output", i, b) for i, b in enumerate(unet.output_blocks)]
    counts = {}
    for kind, index, block in blocks:
        layers = sum(len(m.transformer_blocks) for m in block.modules() if isinstance(m, SpatialTransformer))
        if layers:
            counts[(kind, index)] = layers
    return counts


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_checkpoint_loads_as_intended_model(comfy, checkpoints, kind):
    from comfy import supported_models  # a plain `import comfy...` would shadow the fixture
    from comfy.taesd.taesd import TAESD

    config_class, clip_class, context_dim, attn1_layout = EXPECTED[kind]
    nodes = comfy.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model, clip, vae = nodes["CheckpointLoaderSimple"]().load_checkpoint(checkpoints[kind])
        cond = nodes["CLIPTextEncode"]().encode(clip, "a man in a red coat")[0]
        image = nodes["VAEDecode"]().decode(vae, {"samples": torch.randn(1, 4, 8, 8)})[0]

    assert type(model.model.model_config) is getattr(supported_models, config_class)
    assert attn1_layers_per_block(model.model.diffusion_model) == attn1_layout
    assert type(clip.cond_stage_model).__name__ == clip_class
    tokens, extras = cond[0]
    assert tokens.shape == (1, 77, context_dim) and torch.isfinite(tokens).all()
    if config_class != "SD15":
        assert extras["pooled_output"].shape == (1, 1280)
    assert isinstance(vae.first_stage_model, TAESD)
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


def test_sampling_stays_finite(comfy, checkpoints):
    nodes = comfy.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model, clip, vae = nodes["CheckpointLoaderSimple"]().load_checkpoint(checkpoints["sd15_small"])
        positive = nodes["CLIPTextEncode"]().encode(clip, "a man in a red coat")[0]
        negative = nodes["CLIPTextEncode"]().encode(clip, "")[0]
        latent = nodes["EmptyLatentImage"]().generate(64, 64, 2)[0]
        sampled = nodes["KSampler"]().sample(model, 0, 4, 5.0, "euler", "normal", positive, negative, latent)[0]
        image = nodes["VAEDecode"]().decode(vae, sampled)[0]
    assert torch.isfinite(sampled["samples"]).all() and sampled["samples"].shape == (2, 4, 8, 8)
    assert image.shape == (2, 64, 64, 3) and torch.isfinite(image).all()


SAMPLE_KEYS = (
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
    "first_stage_model.taesd_decoder.1.weight",
)


def test_kl_vae_option(comfy, checkpoints):
    from comfy.ldm.models.autoencoder import AutoencoderKL

    checkpoints["sd15_small"]
    path = build_checkpoint("sd15_small", checkpoints.folder / "random_sd15_small_kl_vae.safetensors", taesd=False)
    with torch.inference_mode():
        vae = comfy.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]().load_checkpoint(path.name)[2]
        image = comfy.NODE_CLASS_MAPPINGS["VAEDecode"]().decode(vae, {"samples": torch.randn(1, 4, 8, 8)})[0]
    assert isinstance(vae.first_stage_model, AutoencoderKL)
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
    with safe_open(str(path), "pt") as kl, safe_open(str(checkpoints.path("sd15_small")), "pt") as tiny:
        for key in SAMPLE_KEYS[:2]:  # each tensor has its own seed: the VAE choice leaves the rest alone
            assert torch.equal(kl.get_tensor(key), tiny.get_tensor(key)), key


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def test_builds_are_seeded(comfy, checkpoints, tmp_path):
    checkpoints["sd15_small"]  # built with seed 0
    session_build = checkpoints.path("sd15_small")
    same = build_checkpoint("sd15_small", tmp_path / "same.safetensors", seed=0)
    other = build_checkpoint("sd15_small", tmp_path / "other.safetensors", seed=1)
    assert sha256(same) == sha256(session_build)
    with safe_open(str(session_build), "pt") as a, safe_open(str(other), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in SAMPLE_KEYS:
            first, second = a.get_tensor(key), b.get_tensor(key)
            assert first.shape == second.shape and not torch.equal(first, second), key
