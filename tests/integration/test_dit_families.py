"""Consistent Self-Attention on every Flux-type DiT family the host has, each as ComfyUI builds it.

Each family is a tiny random-weight model of ComfyUI's own config class (``supported_models``:
Flux, Chroma, ChromaRadiance, QwenImage, SD3 on both hosts; Flux2 and ZImage where the host has
them), run by a real sampler.
A probe chained after CSA's attention override records every joint attention call (its rows as
CSA names them, its keys and mask), so the tests check token by token what each row read: the
other panels' image tokens only (never text or reference tokens), exactly rate x panels read x
the panel's image tokens more keys, from its own CFG half, in the family's default blocks.
"""
from __future__ import annotations

import re

import comfy_host
import pytest
import torch

from harness.pack import load_pack
from test_consistent_attention import SharedAcrossClones

load_pack()
from consistent_story.attention import patch_grid, rope_shift  # noqa: E402

pytestmark = pytest.mark.integration

PANELS, TEXT = 4, 6
ROWS_KEY, STATE_KEY = "consistent_story.rows", "consistent_story.csa"
CSA = dict(rate_fine=1.0, rate_coarse=0.5, window=0, blocks="output", custom_blocks="", schedule="always",
           start_percent=0.0, end_percent=1.0, seed=0, key_positions="as is")
# config class -> (latent channels, latent size giving 16 image tokens, context width, pooled width)
FAMILIES = {
    "Flux": (16, 8, 64, 32),
    "Chroma": (16, 8, 64, 32),  # pooled: ignored by the model, required by its conds
    "ChromaRadiance": (3, 64, 64, 32),
    "Flux2": (128, 4, 96, 32),
    "QwenImage": (16, 8, 32, None),  # latents [B, 16, 1, h, w] (Wan 2.1's VAE)
    "ZImage": (16, 8, 32, None),  # 16 image tokens padded to 32
    "SD3": (16, 8, 4096, 2048),  # CLIP-L + G pooled
}
VIDEO_LATENTS = {"QwenImage"}


def host_families() -> list[str]:
    """The families whose config class this host has (all of them when no host is found: the
    ``comfy`` fixture then fails each test, naming where to put ComfyUI)."""
    comfy_dir = comfy_host.find_comfyui()
    if comfy_dir is None:
        return list(FAMILIES)
    source = (comfy_dir / "comfy" / "supported_models.py").read_text()
    return [name for name in FAMILIES if re.search(rf"^class {name}\(", source, re.M)]


@pytest.fixture(scope="module", params=host_families())
def dit(request, comfy):
    from harness.model_files import tiny_dit

    model = tiny_dit(request.param)
    assert type(model.model.model_config).__name__ == request.param
    return request.param, model


class JointProbe(SharedAcrossClones):
    """optimized_attention_override after CSA: (rows, q tokens, keys, mask, state) of every call,
    keys as ``[rows, heads, tokens, D]`` whatever the call's layout."""

    def __init__(self):
        self.calls = []

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        mask = kwargs.get("mask")
        keys = k.unflatten(-1, (heads, -1)).transpose(1, 2) if k.ndim == 3 else k
        self.calls.append((options.get(ROWS_KEY), q.shape[-2 if q.ndim == 4 else 1], keys.clone(),
                           None if mask is None else mask.clone(), options.get(STATE_KEY)))
        return func(q, k, v, heads, *args, **kwargs)


def conditioning(name: str, panels: int, seed: int, text: int = TEXT, **extra):
    _, _, context, pooled = FAMILIES[name]
    g = torch.Generator().manual_seed(seed)
    options = {"guidance": 3.5, **extra}
    if pooled:
        options["pooled_output"] = torch.randn(panels, pooled, generator=g)
    return [[torch.randn(panels, text, context, generator=g), options]]


def latent(name: str, panels: int = PANELS):
    channels, size, _, _ = FAMILIES[name]
    frames = (1,) if name in VIDEO_LATENTS else ()
    return torch.zeros(panels, channels, *frames, size, size)


def image_tokens(model, name: str) -> int:
    rows, columns = patch_grid(*latent(name).shape[-2:], model.model.diffusion_model.patch_size)
    return rows * columns


def sample(comfy, name, model, cfg=1.0, steps=1, panels=PANELS, positive=None, seed=1):
    positive = positive or conditioning(name, panels, seed)
    with torch.inference_mode():
        return comfy.nodes.common_ksampler(model, 1, steps, cfg, "euler", "simple", positive,
                                           conditioning(name, panels, 2), {"samples": latent(name, panels)})[0]["samples"]


def patch(comfy, model, **options):
    return comfy.NODE_CLASS_MAPPINGS["ConsistentStorySelfAttention"].execute(model=model, **{**CSA, **options}).result[0]


def probed(model):
    probe = JointProbe()
    model = model.clone()
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = probe
    return model, probe


def padding(model, name: str, image: int) -> int:
    """Z-Image pads a panel's image tokens to a multiple of 32 with tokens that are not its picture."""
    multiple = getattr(model.model.diffusion_model, "pad_tokens_multiple", None) if name == "ZImage" else None
    return -image % multiple if multiple else 0


def call_tokens(model, name: str, text: int, image: int) -> int:
    """Tokens of a joint attention call with a prompt of ``text`` tokens, as the family builds it."""
    if name == "Flux2":
        return 512 + image  # Flux.2's conds pad every prompt to 512 tokens
    if name == "ZImage":
        return text + -text % 32 + image + padding(model, name, image)  # caption and image padded to 32
    return text + image


def joint_calls(probe):
    """The joint (text + image) attention calls: the longest ones (Z-Image's refiners are shorter)."""
    longest = max(call[1] for call in probe.calls)
    return [call for call in probe.calls if call[1] == longest]


def text_of(call, image: int, trailing: int = 0) -> int:
    return call[1] - image - trailing


def test_off_is_vanilla_bit_for_bit_and_on_changes_the_images(comfy, dit):
    name, model = dit
    vanilla = sample(comfy, name, model, steps=2)
    assert patch(comfy, model, rate_fine=0.0) is model, "rate 0 installs nothing"
    assert torch.equal(sample(comfy, name, patch(comfy, model, start_percent=0.9), steps=2), vanilla), "installed, idle"
    assert not torch.allclose(sample(comfy, name, patch(comfy, model, rate_fine=0.5), steps=2), vanilla, atol=1e-4)


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_default_blocks_read_the_other_panels_image_tokens_only(comfy, dit, rate):
    """The family's default blocks (the single-stream block of a Flux-type model; the second of
    Qwen-Image's two) gain rate x 3 panels x the panel's image tokens per row, and with rate 1 they
    are exactly the other panels' image keys, never their text."""
    name, model = dit
    image = image_tokens(model, name)
    patched, probe = probed(patch(comfy, model, rate_fine=rate))
    sample(comfy, name, patched)
    first, last = joint_calls(probe)  # one joint attention per block
    assert first[0] is None and first[2].shape[2] == first[1], "the first block is left alone"
    rows, tokens, keys, _, state = last
    assert state.layout.trailing == padding(model, name, image)
    text = text_of(last, image, state.layout.trailing)
    assert text >= TEXT and state.extended == 1, "CSA counted the one layer it extended"
    count = round(rate * image)
    assert keys.shape[2] == tokens + (PANELS - 1) * count, "rate x panels read x image tokens"
    for row, (_, panel) in enumerate(rows):
        extra = keys[row, :, tokens:].reshape(keys.shape[1], PANELS - 1, count, -1)
        for j, other in enumerate(p for p in range(PANELS) if p != panel):
            source = keys[rows.index((0, other)), :, text:text + image]
            matches = (extra[:, j, :, None] == source[:, None]).all(-1).any(-1)
            assert matches.all(), f"panel {panel} reads image tokens of panel {other}"
            if rate == 1.0:
                assert torch.equal(extra[:, j], source)
        assert not (extra.reshape(-1, 1, keys.shape[-1]) == keys[row, :, :text].reshape(1, -1, keys.shape[-1])).all(-1).any()


def test_cond_rows_never_read_uncond_rows(comfy, dit):
    name, model = dit
    image = image_tokens(model, name)
    patched, probe = probed(patch(comfy, model, blocks="all"))
    sample(comfy, name, patched, cfg=3.0)
    for call in joint_calls(probe):
        rows, tokens, keys, _, _ = call
        assert sorted({chunk for chunk, _ in rows}) == [0, 1]
        text = text_of(call, image, padding(model, name, image))
        for row, (chunk, panel) in enumerate(rows):
            extra = keys[row, :, tokens:].reshape(keys.shape[1], PANELS - 1, image, -1)
            for j, other in enumerate(p for p in range(PANELS) if p != panel):
                assert torch.equal(extra[:, j], keys[rows.index((chunk, other)), :, text:text + image])


def test_shifted_keys_are_the_familys_rope_one_image_width_right(comfy, dit):
    """The patch's geometry is the model's, and its re-rotation equals ComfyUI's own RoPE (the
    model's pe_embedder, apply_rope) at positions one image width to the right. SD3 has no RoPE:
    'shifted' is refused there, naming 'as is'."""
    from comfy.ldm.flux.math import apply_rope

    name, model = dit
    diffusion_model = model.model.diffusion_model
    if name == "SD3":  # positions added to the input: no exact shift, and CSA says so
        with pytest.raises(ValueError, match="has no rotary position embedding .* set key_positions to 'as is'"):
            patch(comfy, model, key_positions="shifted")
        return
    embedder = getattr(diffusion_model, "rope_embedder", None) or diffusion_model.pe_embedder
    axes, theta = list(embedder.axes_dim), embedder.theta
    rows, columns = patch_grid(*latent(name).shape[-2:], diffusion_model.patch_size)
    patched = patch(comfy, model, key_positions="shifted")
    csa = csa_of(patched)
    layout = csa.runner.layout(latent(name), {})
    assert layout.image == rows * columns and csa.geometry[1].axes_dim == tuple(axes)
    assert csa.geometry[1].theta == theta
    ids = torch.zeros(1, rows * columns, len(axes))
    ids[0, :, 1] = torch.arange(rows * columns) // columns
    ids[0, :, 2] = torch.arange(rows * columns) % columns
    shifted = ids.clone()
    shifted[0, :, 2] += columns
    raw = torch.randn(2, 1, rows * columns, sum(axes), generator=torch.Generator().manual_seed(3))
    rotated, _ = apply_rope(raw, raw, embed(embedder, ids))
    direct, _ = apply_rope(raw, raw, embed(embedder, shifted))
    torch.testing.assert_close(layout.key_shift(rotated), direct, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layout.key_shift(rotated), rope_shift(tuple(axes), theta, 2, columns)(rotated))
    heads_last = rotated.transpose(1, 2).flatten(2)  # [rows, tokens, heads * D], Qwen-Image's layout on 0.3.64
    torch.testing.assert_close(layout.key_shift(heads_last), direct.transpose(1, 2).flatten(2), rtol=1e-4, atol=1e-4)
    assert (direct - rotated).abs().max() > 0.1, "the shift moves the keys"


def csa_of(patched):
    """The Consistent Self-Attention patch installed on ``patched``."""
    return patched.get_wrappers("apply_model", "consistent_story.csa")[0].__self__


def embed(embedder, ids):
    """The model's own position embedding of ``ids``, as ``[rows, 1, tokens, ...]`` for apply_rope."""
    pe = embedder(ids)
    return pe if pe.shape[1] == 1 else pe.movedim(2, 1)


def test_rate_one_equals_a_float64_reference(comfy, dit):
    """In the family's last block (a default block of each), every row attends to its own text and
    image tokens plus every other panel's image tokens."""
    name, model = dit
    image = image_tokens(model, name)

    def reference(func, q, k, v, heads, *args, **kwargs):
        if q.ndim == 3:  # [rows, tokens, heads * D] (SD3's v: [rows, tokens, heads, D])
            q, k, v = (t.reshape(*t.shape[:2], heads, -1).transpose(1, 2) for t in (q, k, v))
        text = q.shape[2] - image - padding(model, name, image)
        out = []
        for row in range(q.shape[0]):
            others = [r for r in range(q.shape[0]) if r != row]
            keys = torch.cat([k[row]] + [k[r, :, text:text + image] for r in others], dim=1).double()
            vals = torch.cat([v[row]] + [v[r, :, text:text + image] for r in others], dim=1).double()
            weights = (q[row].double() @ keys.transpose(1, 2) / q.shape[-1] ** 0.5).softmax(-1)
            out.append((weights @ vals).transpose(0, 1).reshape(q.shape[2], -1))
        return torch.stack(out).to(q.dtype)

    class FirstPrediction(SharedAcrossClones):
        def __init__(self):
            self.first = None

        def __call__(self, args):
            if self.first is None:
                self.first = args["denoised"].clone()
            return args["denoised"]

    class LastBlockOnly(SharedAcrossClones):
        """The reference in the model's last joint block, plain attention elsewhere. Blocks are its
        attention calls in order, or (Z-Image) the block_index the host names (refiners have none)."""

        def __init__(self, override, blocks, named_by_host):
            self.override, self.blocks, self.named_by_host, self.calls = override, blocks, named_by_host, 0

        def __call__(self, func, q, k, v, heads, *args, **kwargs):
            if self.named_by_host:
                last = (kwargs.get("transformer_options") or {}).get("block_index") == self.blocks - 1
            else:
                self.calls += 1
                last = self.calls % self.blocks == 0
            if last:
                return self.override(func, q, k, v, heads, *args, **kwargs)
            return func(q, k, v, heads, *args, **kwargs)

    def prediction(model, override=None):
        model = model.clone()
        recorder = FirstPrediction()
        model.set_model_sampler_post_cfg_function(recorder)
        if override is not None:
            family = csa_of(patch(comfy, model)).family
            blocks = len(family.joint_blocks(model.model.diffusion_model))
            model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = \
                LastBlockOnly(override, blocks, family.named_by_host)
        sample(comfy, name, model)
        return recorder.first

    ours = prediction(patch(comfy, model))
    expected = prediction(model, reference)
    vanilla = prediction(model)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert (ours - vanilla).abs().max() > 100 * (ours - expected).abs().max()
