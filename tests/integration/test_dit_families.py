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
from consistent_story.nodes.references import CharacterReference  # noqa: E402
from consistent_story.nodes.story_prompts import parse_story  # noqa: E402

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
    layout = csa.call_layout(latent(name), {})
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


STORY = ("[Bob] a man\n[Alice] a woman\n[Bob] walks\n[Alice] reads\n[Bob] runs\n[Alice] sings\n"
         "[Bob] and [Alice] talk\n[NC] a forest")


def identity_segments(probe, sources, image, trailing=0):
    """Check every probed row against ``sources`` (panel -> the panels whose image tokens it reads)."""
    own = {}
    for call in probe.calls:
        rows, tokens, keys, _, _ = call
        text = tokens - image - trailing
        for row, name in enumerate(rows or ()):
            own.setdefault(name, keys[row, :, text:text + image])
    checked = 0
    for rows, tokens, keys, _, _ in probe.calls:
        for row, (chunk, panel) in enumerate(rows or ()):
            extra = keys[row, :, tokens:]
            assert extra.shape[1] == image * len(sources[panel]), f"panel {panel}"
            segments = {src for src in sources[panel]
                        if any(torch.equal(seg, own[(chunk, src)]) for seg in extra.split(image, dim=1))}
            assert segments == sources[panel], f"panel {panel} reads {segments}, not {sources[panel]}"
            checked += 1
    return checked


@pytest.mark.parametrize("per_call", [0, 3])
def test_story_rules_identity_panels_read_each_other(comfy, dit, per_call):
    """Two solo panels per character: identity panels read each other, the others read their
    characters' identity panels, [NC] reads nothing, in one call or three panels per call."""
    name, model = dit
    image = image_tokens(model, name)
    story = parse_story(STORY, "No style")
    panels = len(story.panels)
    sources = {0: {2}, 2: {0}, 1: {3}, 3: {1}, 4: {0, 1, 2, 3}, 5: set()}
    patched, probe = probed(patch(comfy, model, story=story, panels_per_call=per_call))
    sample(comfy, name, patched, panels=panels, cfg=2.0)
    assert identity_segments(probe, sources, image, padding(model, name, image)) == 2 * panels


def test_reference_rows_find_their_image_tokens_whatever_their_prompt_length(comfy, dit):
    """A character from images runs as reference rows prompted apart from the panels: with a
    prompt longer or shorter than the panels', its panels read its image tokens, never text."""
    name, model = dit
    image = image_tokens(model, name)
    for text in (TEXT + 30, TEXT - 3):  # +30: past the 32 tokens Z-Image pads a caption to
        story = parse_story("[Bob] a man\n[Bob] walks\n[Bob] runs\n[NC] a forest", "No style")
        latents = torch.randn(latent(name, 1).shape, generator=torch.Generator().manual_seed(7))
        reference = CharacterReference("Bob", latents, conditioning(name, 1, 8, text=text),
                                       conditioning(name, 1, 9, text=text))
        story = story.with_reference(reference)
        patched, probe = probed(patch(comfy, model, story=story))
        sample(comfy, name, patched, panels=3, cfg=2.0)
        reference_calls = [call for call in probe.calls if call[0] and call[0][0][1] == 3]
        panel_calls = [call for call in probe.calls if call[0] and call[0][0][1] != 3]
        assert reference_calls and panel_calls
        assert {call[1] for call in reference_calls} == {call_tokens(model, name, text, image)}
        assert {call[1] for call in panel_calls} == {call_tokens(model, name, TEXT, image)}
        assert identity_segments(probe, {0: {3}, 1: {3}, 2: set(), 3: set()}, image, padding(model, name, image)) > 0


@pytest.mark.parametrize("name", [name for name in host_families() if name != "ZImage"])  # Z-Image: nothing to replace
def test_a_block_replaced_after_csa_is_an_error_not_a_no_op(comfy, name):
    """A node after CSA that replaces a block CSA runs in would silently switch CSA off there."""
    from harness.model_files import tiny_dit

    model = tiny_dit(name)
    patched = patch(comfy, model).clone()
    csa = csa_of(patched)
    (kind, index), = csa.chosen
    replace_name = next(b.replace_name for b in csa.family.blocks if b.kind == kind)
    patched.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", replace_name, index)
    with pytest.raises(ValueError, match=rf"blocks {kind} {index} never named themselves"):
        sample(comfy, name, patched)


@pytest.mark.parametrize("name", [name for name in host_families() if name in ("Flux", "Flux2", "QwenImage")])
def test_reference_latents_are_never_shared(comfy, name):
    """Kontext / Flux.2 / Qwen-Image-Edit reference latents follow the panel's image tokens in
    each call: no panel reads another's reference tokens, and they do not count as its image."""
    from harness.model_files import tiny_dit

    model = tiny_dit(name)
    image = image_tokens(model, name)
    reference = torch.randn(latent(name, 1).shape[:-2] + (FAMILIES[name][1] // 2,) * 2,
                            generator=torch.Generator().manual_seed(4))
    trailing = image // 4
    patched, probe = probed(patch(comfy, model))
    sample(comfy, name, patched, positive=conditioning(name, PANELS, 1, reference_latents=[reference]))
    rows, tokens, keys, _, state = probe.calls[-1]
    text = tokens - image - trailing
    assert state.layout.trailing == trailing and keys.shape[2] == tokens + (PANELS - 1) * image
    for row, (_, panel) in enumerate(rows):
        extra = keys[row, :, tokens:].reshape(keys.shape[1], PANELS - 1, image, -1)
        for j, other in enumerate(p for p in range(PANELS) if p != panel):
            assert torch.equal(extra[:, j], keys[rows.index((0, other)), :, text:text + image])


@pytest.mark.parametrize("name", [name for name in host_families() if name in ("Flux", "Chroma", "ChromaRadiance")])
def test_a_redux_attention_bias_is_extended_with_the_shared_keys(comfy, name):
    """Core StyleModelApply (a random Redux encoder, strength_type attn_bias) puts an attention
    bias on the conditioning: CSA extends it so each shared key gets the reader's own bias for
    that image position, and the bias still changes the images."""
    from comfy.ldm.flux.redux import ReduxImageEncoder
    from comfy.sd import StyleModel

    from harness.model_files import tiny_dit

    model = tiny_dit(name)
    image = image_tokens(model, name)
    torch.manual_seed(0)
    redux = ReduxImageEncoder(redux_dim=16, txt_in_features=FAMILIES[name][2])
    for parameter in redux.parameters():
        parameter.data = torch.randn_like(parameter) * 0.1
    vision = type("ClipVisionOutput", (), {"last_hidden_state": torch.randn(1, 3, 16)})()
    plain = conditioning(name, 1, 1)  # one prompt for every panel: core Redux appends one batch of image tokens
    styled = comfy.NODE_CLASS_MAPPINGS["StyleModelApply"]().apply_stylemodel(
        plain, StyleModel(redux), vision, 0.5, "attn_bias")[0]
    assert "attention_mask" in styled[0][1]
    patched, probe = probed(patch(comfy, model))
    masked = sample(comfy, name, patched, positive=styled)
    assert not torch.allclose(masked, sample(comfy, name, patch(comfy, model), positive=plain), atol=1e-4)
    rows, tokens, keys, mask, _ = probe.calls[-1]
    text = tokens - image
    assert mask is not None and mask.shape[-1] == keys.shape[2] == tokens + (PANELS - 1) * image
    for row in range(len(rows)):
        own = mask[row if mask.shape[0] > 1 else 0, ..., text:tokens]
        assert torch.equal(mask[row if mask.shape[0] > 1 else 0, ..., tokens:], own.repeat(*([1] * (own.ndim - 1)), PANELS - 1))
