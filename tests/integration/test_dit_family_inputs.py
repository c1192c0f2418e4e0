"""What flows into a DiT family's attention calls, on every family the host has: stories (identity
panels reading each other, [NC]), characters from images prompted apart from the panels, Kontext /
Flux.2 / Qwen-Image-Edit reference latents, a Redux attention bias, and another node replacing a
block after CSA. The models, probe and helpers are test_dit_families.py's.
"""
from __future__ import annotations

import pytest
import torch

from test_dit_families import (  # noqa: F401  (dit: the per-family fixture)
    FAMILIES, PANELS, TEXT, call_tokens, conditioning, csa_of, dit, host_families, image_tokens, latent, padding,
    patch, probed, sample,
)

from harness.pack import load_pack

load_pack()
from consistent_story.nodes.host.references import CharacterReference  # noqa: E402
from consistent_story.nodes.story.story_prompts import parse_story  # noqa: E402

pytestmark = pytest.mark.integration


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
def test_story_rules_identity_panels_read_each_other(comfy, dit, per_call):  # noqa: F811
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


def test_reference_rows_find_their_image_tokens_whatever_their_prompt_length(comfy, dit):  # noqa: F811
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
