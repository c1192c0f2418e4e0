"""Consistent Self-Attention on Flux.1 at its real width, loaded as users load it (UNETLoader).

Cond/uncond separation, the float64 reference, RoPE shifts and the story rules are proven for every
family, Flux.1 included, in test_dit_families.py on tiny models; this module keeps what needs the
real width and the loader: ComfyUI's detection of the file, the block presets and custom lists.

The model is the smallest Flux.1-dev that ComfyUI 0.3.64 detects (one double-stream and one
single-stream block at the real width), loaded with UNETLoader. Its T5/CLIP text encoders are far
too large for the CI machine, so the conditioning is random, of the real shape ([panels, tokens,
4096] T5 states, [panels, 768] CLIP pooled, guidance). A probe chained after CSA's attention
override records each joint-attention call: its block, the rows it holds (CSA names them) and
its keys, so the tests can check which tokens every row attended to.
"""
from __future__ import annotations

import pytest
import torch

from test_consistent_attention import SharedAcrossClones

pytestmark = pytest.mark.integration

PANELS, TEXT, SIZE = 4, 8, 64  # 64 px: an 8x8 latent, 4x4 = 16 image tokens per panel
IMAGE = (SIZE // 16) ** 2
ROWS_KEY = "consistent_story.rows"
CSA = dict(rate_fine=0.5, rate_coarse=0.5, window=0, blocks="output", custom_blocks="", schedule="always",
           start_percent=0.0, end_percent=1.0, seed=0)


class JointProbe(SharedAcrossClones):
    """optimized_attention_override after CSA: (block, rows, q tokens, keys) of every attention call."""

    def __init__(self):
        self.calls = []
        self.block = None

    def mark(self, args, extra):
        self.block = extra.get("block")
        return extra["original_block"](args)

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        self.calls.append((options.get(ROWS_KEY), q.shape[2], k.clone(), options.get("consistent_story.csa")))
        return func(q, k, v, heads, *args, **kwargs)


@pytest.fixture(scope="module")
def flux(comfy):
    import folder_paths

    from harness.model_files import build_flux

    folder = comfy.session_dir / "diffusion_models"
    path = folder / "random_flux_tiny.safetensors"
    if not path.exists():
        build_flux(path)
    folder_paths.add_model_folder_path("diffusion_models", str(folder), is_default=True)
    model = comfy.nodes.UNETLoader().load_unet(path.name, "default")[0]
    assert type(model.model).__name__ == "Flux" and len(model.model.diffusion_model.single_blocks) == 1
    return model


def conditioning(panels: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(panels, TEXT, 4096, generator=g),
             {"pooled_output": torch.randn(panels, 768, generator=g), "guidance": 3.5}]]


def sample(comfy, model, cfg=1.0, steps=2, panels=PANELS, positive=None):
    latent = {"samples": torch.zeros(panels, 16, SIZE // 8, SIZE // 8)}
    positive = positive or conditioning(panels, 1)
    with torch.inference_mode():
        return comfy.nodes.common_ksampler(model, 1, steps, cfg, "euler", "simple", positive, conditioning(1, 2),
                                           latent)[0]["samples"]


def patch(comfy, model, **options):
    return comfy.NODE_CLASS_MAPPINGS["ConsistentStorySelfAttention"].execute(model=model, **{**CSA, **options}).result[0]


def with_probe(model, probe):
    model = model.clone()
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = probe
    return model


def test_disabled_is_bit_identical_and_enabled_changes_the_images(comfy, flux):
    vanilla = sample(comfy, flux)
    assert patch(comfy, flux, rate_fine=0.0) is flux, "rate 0 installs nothing"
    assert torch.equal(sample(comfy, patch(comfy, flux, start_percent=0.9)), vanilla), "installed but idle"
    assert not torch.allclose(sample(comfy, patch(comfy, flux)), vanilla, atol=1e-3)


@pytest.mark.parametrize("blocks,custom,expected", [
    ("output", "", {"single"}), ("single-stream", "", {"single"}), ("double-stream", "", {"double"}),
    ("all", "", {"single", "double"}), ("custom", "double 0", {"double"}),
])
def test_csa_runs_on_exactly_the_chosen_blocks_and_shares_image_tokens_only(comfy, flux, blocks, custom, expected):
    probe = JointProbe()
    sample(comfy, with_probe(patch(comfy, flux, blocks=blocks, custom_blocks=custom, rate_fine=1.0,
                                   key_positions="as is"), probe), steps=1)
    calls = probe.calls  # one per block: the double block's, then the single block's
    assert len(calls) == 2
    kinds = {"double": calls[0], "single": calls[1]}
    for kind, (rows, tokens, keys, _) in kinds.items():
        assert tokens == TEXT + IMAGE
        if kind not in expected:
            assert rows is None and keys.shape[2] == tokens, f"{kind} block untouched"
            continue
        assert [chunk for chunk, _ in rows] == [0] * PANELS, "cfg 1: one chunk"
        assert keys.shape[2] == tokens + (PANELS - 1) * IMAGE, "own tokens + every other panel's image tokens"
        for row, (_, panel) in enumerate(rows):
            extra = keys[row, :, tokens:].reshape(keys.shape[1], PANELS - 1, IMAGE, -1)
            others = [p for p in range(PANELS) if p != panel]
            for j, other in enumerate(others):
                source = rows.index((0, other))
                assert torch.equal(extra[:, j], keys[source, :, TEXT:tokens]), "the other panel's image keys"
            text_keys = keys[:, :, :TEXT].reshape(-1, keys.shape[-1])
            assert not (extra.reshape(-1, 1, keys.shape[-1]) == text_keys[None]).all(-1).any(), "never text"


def test_unsupported_models_are_named(comfy, loaded):
    """A model family without support is an error that names it (here: a UNet asked for DiT blocks)."""
    model, _ = loaded("sd15_small")
    with pytest.raises(ValueError, match="names DiT blocks but this model is a UNet"):
        patch(comfy, model, blocks="single-stream")


def test_a_family_without_support_is_named(comfy):
    """A Lumina 2 NextDiT (ComfyUI's own class, built on the meta device: never run)."""
    from comfy.model_patcher import ModelPatcher
    from comfy.supported_models import Lumina2

    config = Lumina2({"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 192, "cap_feat_dim": 32,
                      "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "qk_norm": True,
                      "axes_dims": [32, 32, 32], "axes_lens": [300, 512, 512]})
    lumina = ModelPatcher(config.get_model({}, device="meta"), load_device="cpu", offload_device="cpu")
    with pytest.raises(ValueError, match=r"these DiT families: Flux.1, .*; this model is Lumina 2 .*\(ComfyUI config Lumina2"):
        patch(comfy, lumina)
