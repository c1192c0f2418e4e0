"""Consistent Self-Attention on real ComfyUI models, real samplers, random weights.

Each test loads a checkpoint with CheckpointLoaderSimple, patches it with the pack's node as
ComfyUI loaded it, and samples with ComfyUI's own KSampler code. A probe installed as ComfyUI's
``optimized_attention_override`` (CSA chains to it) records every attention call, a post-CFG
function records the cond/uncond predictions of the first step, and keyed wrappers record the
step each model call located beside the steps the sampler itself announces.
"""
from __future__ import annotations

import pytest
import torch

from harness.step_record import StepRecord, sampler_run

PANELS = 4
SIZE = 64  # pixels; latent 8x8
NODE = "ConsistentStorySelfAttention"
CSA_DEFAULTS = dict(rate_fine=0.5, rate_coarse=0.5, window=0, blocks="output", custom_blocks="output 0-2",
                    schedule="always", start_percent=0.0, end_percent=1.0, seed=0)


class SharedAcrossClones:
    """ModelPatcher.clone() deep-copies model_options; recorders must stay one object."""

    def __deepcopy__(self, memo):
        return self


class AttentionProbe(SharedAcrossClones):
    """Records every attention call; an attn1 patch of its own marks the self-attention ones."""

    def __init__(self):
        self.calls = []  # (block, block_index, query tokens, key tokens, rows, is self-attention, latent h w)
        self._next_is_self = False

    def mark_self_attention(self, n, context, value, extra_options):
        self._next_is_self = True
        return n, context, value

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        block = tuple(options.get("block") or ())
        latent = tuple(options.get("original_shape", [0, 0])[-2:])
        self.calls.append((block, options.get("block_index"), q.shape[1], k.shape[1], q.shape[0], self._next_is_self, latent))
        self._next_is_self = False
        return func(q, k, v, heads, *args, **kwargs)

    def self_attention(self):
        return [call for call in self.calls if call[5]]

    def extended(self):
        """(block, block_index) of the self-attention calls whose keys outnumber their queries."""
        return {(c[0], c[1]) for c in self.self_attention() if c[3] > c[2]}


class FirstStepPredictions(SharedAcrossClones):
    def __init__(self):
        self.cond = self.uncond = None

    def __call__(self, args):
        if self.cond is None:
            self.cond, self.uncond = args["cond_denoised"].clone(), args["uncond_denoised"].clone()
        return args["denoised"]


ENCODED = {}  # (id(clip), text) -> (clip, CONDITIONING): CLIP-G on the CPU costs seconds a prompt


@pytest.fixture(scope="module", autouse=True)
def forget_encodings():
    yield
    ENCODED.clear()  # release the CLIP models before interpreter exit


def encode(comfy, clip, text):
    key = (id(clip), text)
    if key not in ENCODED:
        ENCODED[key] = (clip, comfy.nodes.CLIPTextEncode().encode(clip, text)[0])
    return ENCODED[key][1]


def patch(comfy, model, **options):
    return comfy.NODE_CLASS_MAPPINGS[NODE].execute(model=model, **{**CSA_DEFAULTS, **options}).result[0]


def with_recorders(model, probe=None, predictions=None):
    model = model.clone()
    if probe is not None:
        model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = probe
        model.set_model_attn1_patch(probe.mark_self_attention)
    if predictions is not None:
        model.set_model_sampler_post_cfg_function(predictions)
    return model


def sample(comfy, model, clip, positive="a knight in red armour", negative="blurry", panels=PANELS, steps=2,
           cfg=5.0, sampler="euler", seed=1):
    latent = {"samples": torch.zeros(panels, 4, SIZE // 8, SIZE // 8)}
    pos = encode(comfy, clip, positive) if isinstance(positive, str) else positive
    neg = encode(comfy, clip, negative) if isinstance(negative, str) else negative
    with torch.inference_mode():
        out = comfy.nodes.common_ksampler(model, seed, steps, cfg, sampler, "normal", pos, neg, latent)[0]
    return out["samples"]


def output_transformer_layers(model) -> int:
    from comfy.ldm.modules.attention import BasicTransformerBlock

    unet = model.model.diffusion_model
    return sum(isinstance(m, BasicTransformerBlock) for m in unet.output_blocks.modules())


@pytest.mark.parametrize("kind", ["sd15_small", "vega_small"])
def test_disabled_is_bit_identical_to_vanilla(comfy, loaded, kind):
    model, clip = loaded(kind)
    vanilla = sample(comfy, model, clip)
    assert patch(comfy, model, rate_fine=0.0, rate_coarse=0.0) is model, "rate 0 installs nothing"
    installed_but_idle = patch(comfy, model, start_percent=0.9)  # 2 steps: progress 0 and 0.5, both before 0.9
    assert installed_but_idle is not model
    assert torch.equal(sample(comfy, installed_but_idle, clip), vanilla)


@pytest.mark.parametrize("kind", ["sd15_small", "vega_small"])
def test_enabled_changes_images_and_runs_on_exactly_the_output_blocks(comfy, loaded, kind):
    model, clip = loaded(kind)
    vanilla_probe, csa_probe = AttentionProbe(), AttentionProbe()
    vanilla = sample(comfy, with_recorders(model, vanilla_probe), clip, steps=1)
    patched = sample(comfy, with_recorders(patch(comfy, model), csa_probe), clip, steps=1)
    assert not torch.allclose(patched, vanilla, atol=1e-3), "CSA must change the images"

    attn1 = vanilla_probe.self_attention()
    assert attn1 and all(c[2] == c[3] for c in attn1), "unpatched self-attention: keys == queries"
    assert [c[:3] for c in csa_probe.calls] == [c[:3] for c in vanilla_probe.calls]
    extended = csa_probe.extended()
    expected = {(c[0], c[1]) for c in attn1 if c[0][0] == "output"}
    assert extended == expected
    assert len(expected) == output_transformer_layers(model) > 0
    assert any(c[0][0] != "output" for c in attn1), "the model has other self-attention layers, left alone"
    for block, index, q_len, k_len, rows, _, _ in csa_probe.self_attention():
        if (block, index) in extended:  # 3 other panels x round(0.5 * tokens) each
            assert k_len == q_len + 3 * round(0.5 * q_len) and rows == 2 * PANELS


def test_real_sd15_layout_patches_output_blocks_3_to_11(comfy, loaded):
    model, clip = loaded("sd15")
    probe = AttentionProbe()
    sample(comfy, with_recorders(patch(comfy, model), probe), clip, steps=1, panels=2)
    assert {block for block, _ in probe.extended()} == {("output", i) for i in range(3, 12)}


@pytest.mark.parametrize("blocks", ["all", "custom"])
def test_block_choices_reach_exactly_the_chosen_layers(comfy, loaded, blocks):
    model, clip = loaded("sd15_small")
    vanilla_probe, csa_probe = AttentionProbe(), AttentionProbe()
    sample(comfy, with_recorders(model, vanilla_probe), clip, steps=1)
    layers = {(c[0], c[1]) for c in vanilla_probe.self_attention()}
    chosen = layers
    custom = ""
    if blocks == "custom":  # the model's first input block with attention, and its middle block
        first_input = min(block for block, _ in layers if block[0] == "input")
        chosen = {layer for layer in layers if layer[0] in (first_input, ("middle", 0))}
        custom = f"input {first_input[1]}, middle 0"
    sample(comfy, with_recorders(patch(comfy, model, blocks=blocks, custom_blocks=custom), csa_probe), clip, steps=1)
    assert len(chosen) >= 2 and csa_probe.extended() == chosen


def test_cond_rows_never_see_uncond_rows(comfy, loaded):
    """A 5-chunk positive cannot be batched with a 1-chunk negative (ComfyUI refuses an LCM over 4),
    so it runs alone; with a 5-chunk negative it shares the call. Its prediction must not care."""
    model, clip = loaded("sd15_small")
    patched = patch(comfy, model, rate_fine=1.0, rate_coarse=1.0)
    long_positive = encode(comfy, clip, ", ".join(["a knight in red armour on a horse"] * 40))
    long_negative = encode(comfy, clip, ", ".join(["a knight in blue armour on a horse"] * 40))
    assert long_positive[0][0].shape[1] == long_negative[0][0].shape[1] == 5 * 77

    runs = {}
    for name, negative in (("joint", long_negative), ("separate", "blurry")):
        probe, predictions = AttentionProbe(), FirstStepPredictions()
        sample(comfy, with_recorders(patched, probe, predictions), clip, positive=long_positive, negative=negative, steps=1)
        runs[name] = (probe, predictions)
    assert {c[4] for c in runs["joint"][0].calls} == {2 * PANELS}
    assert {c[4] for c in runs["separate"][0].calls} == {PANELS}
    vanilla = FirstStepPredictions()
    sample(comfy, with_recorders(model, None, vanilla), clip, positive=long_positive, negative=long_negative, steps=1)
    joint, separate = runs["joint"][1], runs["separate"][1]
    csa_effect = (joint.cond - vanilla.cond).abs().max()
    assert csa_effect > 1e-3, "CSA was active"
    # Same cond prediction whatever shares the call: only batch-size rounding (fp32, CPU or GPU
    # kernels) may differ, far below what mixing in other rows would change.
    assert (joint.cond - separate.cond).abs().max() < 1e-2 * csa_effect
    assert not torch.allclose(joint.uncond, separate.uncond, atol=1e-3)


def float64_all_panels_attention(q, k, v, extra_options):
    """Independent reference: each row attends to every token of every row in its chunk, in float64."""
    heads = extra_options["n_heads"]
    rows, tokens, width = q.shape
    chunks = len(extra_options["cond_or_uncond"])
    panels = rows // chunks
    split = lambda t: t.double().reshape(chunks, panels, tokens, heads, width // heads)  # noqa: E731
    q6, k6, v6 = split(q), split(k), split(v)
    keys = k6.reshape(chunks, panels * tokens, heads, -1)
    values = v6.reshape(chunks, panels * tokens, heads, -1)
    scores = torch.einsum("cpqhd,ckhd->cphqk", q6, keys) / (width // heads) ** 0.5
    out = torch.einsum("cphqk,ckhd->cpqhd", scores.softmax(dim=-1), values)
    return out.reshape(rows, tokens, width).to(q.dtype)


def test_rate_one_all_panels_matches_float64_reference(comfy, loaded):
    model, clip = loaded("sd15_small")
    ours = FirstStepPredictions()
    sample(comfy, with_recorders(patch(comfy, model, rate_fine=1.0, rate_coarse=1.0), None, ours), clip, steps=1)

    reference_model = model.clone()
    for index in range(12):
        reference_model.set_model_attn1_replace(float64_all_panels_attention, "output", index)
    reference, vanilla = FirstStepPredictions(), FirstStepPredictions()
    sample(comfy, with_recorders(reference_model, None, reference), clip, steps=1)
    sample(comfy, with_recorders(model, None, vanilla), clip, steps=1)

    torch.testing.assert_close(ours.cond, reference.cond, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.uncond, reference.uncond, rtol=1e-4, atol=1e-4)
    assert (ours.cond - vanilla.cond).abs().max() > 100 * (ours.cond - reference.cond).abs().max()


def test_seeded_reproducible_and_the_input_model_is_untouched(comfy, loaded):
    model, clip = loaded("sd15_small")
    before = sample(comfy, model, clip)
    options_before = repr(model.model_options)
    first = sample(comfy, patch(comfy, model, schedule="official", seed=5), clip, steps=10)
    again = sample(comfy, patch(comfy, model, schedule="official", seed=5), clip, steps=10)
    other_seed = sample(comfy, patch(comfy, model, schedule="official", seed=6), clip, steps=10)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)
    assert torch.equal(sample(comfy, model, clip), before)
    assert repr(model.model_options) == options_before


def test_one_panel_behaves_exactly_like_vanilla(comfy, loaded):
    model, clip = loaded("sd15_small")
    assert torch.equal(sample(comfy, patch(comfy, model), clip, panels=1), sample(comfy, model, clip, panels=1))


def test_survives_downstream_clones_and_refuses_a_second_patch(comfy, loaded):
    from comfy.model_patcher import ModelPatcher  # noqa: F401  (the host class the clone comes from)

    model, clip = loaded("sd15_small")
    patched = patch(comfy, model)
    downstream = patched.clone()  # what a LoRA loader or any later patch node does
    downstream.set_model_attn1_output_patch(lambda n, extra_options: n)
    assert torch.equal(sample(comfy, downstream, clip), sample(comfy, patched, clip))
    with pytest.raises(ValueError, match="already has Consistent Self-Attention"):
        patch(comfy, downstream)


@pytest.mark.parametrize("sampler", ["heun", "dpm_2"])
def test_samplers_with_extra_evaluations_locate_the_step_of_their_sigma(comfy, loaded, sampler):
    """heun evaluates step i at sigma i, then (but on the last step) at sigma i+1; dpm_2 at sigma i,
    then between sigma i and i+1, nearer i+1. Each call takes the step whose sigma is nearest: the
    second evaluation that of step i+1, so no extra call shifts a later step."""
    model, clip = loaded("sd15_small")
    record = StepRecord()
    result = sample(comfy, patch(comfy, record.install(model), schedule="official"), clip, sampler=sampler, steps=3)
    assert record.events == sampler_run(3, lambda i: [i], lambda i: [i + 1] if i < 2 else [])
    assert not torch.equal(result, sample(comfy, model, clip, sampler=sampler, steps=3))


def test_cfg_one_several_positives_and_area_conds(comfy, loaded):
    model, clip = loaded("sd15_small")
    patched = patch(comfy, model)
    nodes = comfy.nodes
    assert not torch.equal(sample(comfy, patched, clip, cfg=1.0), sample(comfy, model, clip, cfg=1.0))

    two = nodes.ConditioningCombine().combine(encode(comfy, clip, "a knight"), encode(comfy, clip, "a castle"))[0]
    probe = AttentionProbe()
    combined = sample(comfy, with_recorders(patched, probe), clip, positive=two, steps=1)
    assert {c[4] for c in probe.self_attention() if c[3] > c[2]} == {3 * PANELS}, "three chunks, one call"
    assert torch.isfinite(combined).all()

    area = nodes.ConditioningSetArea().append(encode(comfy, clip, "a dragon"), 32, 32, 0, 0, 1.0)[0]
    with_area = nodes.ConditioningCombine().combine(encode(comfy, clip, "a knight"), area)[0]
    probe = AttentionProbe()
    result = sample(comfy, with_recorders(patched, probe), clip, positive=with_area, steps=1)
    assert torch.isfinite(result).all()
    # The area chunk runs in its own call on the cropped latent (4x4), beside the copy of the
    # negative that ComfyUI gives the same area: 2 chunks, each still patched.
    area_calls = {c[4] for c in probe.self_attention() if c[3] > c[2] and c[6] == (4, 4)}
    assert area_calls == {2 * PANELS}


@pytest.mark.parametrize("guidance,options", [("PerturbedAttentionGuidance", {"scale": 2.0}),
                                              ("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0})])
def test_guidance_reruns_locate_the_step_of_the_call_they_guide(comfy, loaded, guidance, options):
    """PAG and SAG run the model a second time at the same sigma, inside the same sampler step."""
    model, clip = loaded("sd15_small")
    record = StepRecord()
    guided = comfy.NODE_CLASS_MAPPINGS[guidance].execute(model=patch(comfy, record.install(model)), **options)
    guided = guided.result[0] if hasattr(guided, "result") else guided[0]
    assert torch.isfinite(sample(comfy, guided, clip, steps=3)).all()
    assert record.events == sampler_run(3, lambda i: [i, i])


def test_a_second_sampler_on_the_same_model_counts_its_own_steps(comfy, loaded):
    """Refiner style (KSamplerAdvanced to step 2 of 4, then from step 2) and a second KSampler at
    denoise 0.5: each sampler run locates the steps of the schedule it was given, from 0, so
    start_percent, end_percent and the official schedule count each run's own steps."""
    model, clip = loaded("sd15_small")
    record = StepRecord()
    patched = patch(comfy, record.install(model))
    pos, neg = encode(comfy, clip, "a knight in red armour"), encode(comfy, clip, "blurry")
    latent = {"samples": torch.zeros(PANELS, 4, SIZE // 8, SIZE // 8)}
    advanced, plain = comfy.nodes.KSamplerAdvanced(), comfy.nodes.KSampler()
    with torch.inference_mode():
        half = advanced.sample(patched, "enable", 1, 4, 5.0, "euler", "normal", pos, neg, latent, 0, 2, "enable")[0]
        done = advanced.sample(patched, "disable", 1, 4, 5.0, "euler", "normal", pos, neg, half, 2, 10000, "disable")[0]
        plain.sample(patched, 1, 2, 5.0, "euler", "normal", pos, neg, done, denoise=0.5)
    assert record.events == 3 * sampler_run(2, lambda i: [i])


def test_prompt_batch_that_does_not_match_the_latent_batch_says_how_to_wire_it(comfy, loaded):
    model, clip = loaded("sd15_small")
    one, two = encode(comfy, clip, "a knight"), encode(comfy, clip, "a castle")
    two_prompts = [[torch.cat([one[0][0], two[0][0]]), {"pooled_output": torch.cat([one[0][1]["pooled_output"], two[0][1]["pooled_output"]])}]]
    patched = patch(comfy, model)
    assert torch.isfinite(sample(comfy, patched, clip, positive=two_prompts, panels=2, steps=1)).all()
    with pytest.raises(ValueError, match="panel_count into the latent's batch_size"):
        sample(comfy, patched, clip, positive=two_prompts, panels=3, steps=1)


def test_custom_blocks_that_reach_no_self_attention_are_refused(comfy, loaded):
    """sd15_small has self-attention in input 1, 3, middle 0 and output 2-5: output 0-1 and 40-45 have none."""
    model, _ = loaded("sd15_small")
    for blocks in ("output 0-1", "output 40-45, input 9"):
        with pytest.raises(ValueError, match=r"blocks with self-attention: input 1, 3, middle 0, output 2, 3, 4, 5"):
            patch(comfy, model, blocks="custom", custom_blocks=blocks)
    assert patch(comfy, model, blocks="custom", custom_blocks="output 0-2") is not model, "reaches output 2: fine"


def test_a_layer_whose_tokens_changed_after_planning_is_an_error_not_plain_attention(comfy, loaded):
    """A node after CSA that downsamples the keys and values (as ToDo does) leaves a planned layer
    with other shapes: CSA names the layer and the shapes instead of quietly running plain attention."""
    model, clip = loaded("sd15_small")
    merged = patch(comfy, model).clone()
    merged.set_model_attn1_patch(lambda n, context, value, extra: (n, context[:, ::2], value[:, ::2]))
    with pytest.raises(ValueError, match=r"cannot extend layer \(\('output', \d+\), 0\): its attention call has queries"):
        sample(comfy, merged, clip, steps=1)
