"""Consistent Self-Attention with a story, on real ComfyUI models and samplers (random weights).

The story is encoded by the pack's Story Prompts node and sampled with ComfyUI's own KSampler
code. A probe chained after CSA's attention override records every self-attention call of the
story (CSA names the rows of each call, ``(chunk, panel)``, in ``transformer_options``), so the
tests can check, token by token, what each row attended to. Who should read whom is worked out
here from the story text, independently of the engine.
"""
from __future__ import annotations

import pytest
import torch
from harness.stories import BOB_AND_ALICE

from harness.step_record import StepRecord, sampler_run
from test_consistent_attention import SharedAcrossClones, output_transformer_layers

pytestmark = pytest.mark.integration

CSA = "ConsistentStorySelfAttention"
PROMPTS = "ConsistentStoryPrompts"
ROWS_KEY = "consistent_story.rows"
SIZE = 64
STORY = BOB_AND_ALICE
BOB_IDS, ALICE_IDS = (0, 2), (1, 5)  # each character's first two panels alone
NC_PANEL, BOTH_PANEL = 3, 4
# Who each panel reads, from the story above: identity panels their own character's other one,
# the others every identity panel of the characters they show, [NC] nobody.
EXPECTED_SOURCES = {0: {2}, 2: {0}, 1: {5}, 5: {1}, 3: set(), 4: {0, 2, 1, 5}, 6: {0, 2}}
CSA_OPTIONS = dict(rate_fine=1.0, rate_coarse=1.0, window=0, blocks="output", custom_blocks="", schedule="always",
                   start_percent=0.0, end_percent=1.0, seed=0)


class StoryProbe(SharedAcrossClones):
    """optimized_attention_override after CSA: keeps the story's self-attention calls."""

    def __init__(self):
        self.calls = []  # (block, block_index, rows, keys [rows, Lk, C], query tokens)

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        if ROWS_KEY in options:
            self.calls.append((tuple(options["block"]), options["block_index"], options[ROWS_KEY], k.clone(), q.shape[1]))
        return func(q, k, v, heads, *args, **kwargs)

    def rows_by_layer(self):
        """{(block, block_index): {(chunk, panel): keys}} for the first model call of each layer."""
        layers = {}
        for block, index, rows, keys, _ in self.calls:
            layer = layers.setdefault((block, index), {})
            for row, name in enumerate(rows):
                layer.setdefault(name, keys[row])
        return layers


def story_inputs(comfy, clip, text=STORY):
    with torch.inference_mode():
        positive, negative, panels, _, story, _ = comfy.NODE_CLASS_MAPPINGS[PROMPTS].execute(
            clip=clip, story=text, style="No style", negative="blurry").result
    return positive, negative, panels, story


def patch(comfy, model, story, **options):
    return comfy.NODE_CLASS_MAPPINGS[CSA].execute(model=model, story=story, **{**CSA_OPTIONS, **options}).result[0]


def with_probe(model, probe):
    model = model.clone()
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = probe
    return model


def sample(comfy, model, positive, negative, panels, steps=2, cfg=5.0, sampler="euler", noise_ids=None, seed=1):
    latent = {"samples": torch.zeros(panels, 4, SIZE // 8, SIZE // 8)}
    if noise_ids is not None:  # each panel's own noise, whatever else is in the batch
        latent["batch_index"] = list(noise_ids)
    with torch.inference_mode():
        return comfy.nodes.common_ksampler(model, seed, steps, cfg, sampler, "normal", positive, negative, latent)[0]["samples"]


@pytest.fixture(scope="module")
def story_setup(comfy, loaded):
    model, clip = loaded("sd15_small")
    positive, negative, panels, story = story_inputs(comfy, clip)
    assert panels == 7 and story.identity_panels(2) == {"Bob": BOB_IDS, "Alice": ALICE_IDS}
    return model, clip, positive, negative, panels, story


@pytest.mark.parametrize("panels_per_call", [0, 3])
def test_each_panel_reads_exactly_the_identity_panels_of_its_characters(comfy, story_setup, panels_per_call):
    model, _, positive, negative, panels, story = story_setup
    probe = StoryProbe()
    sample(comfy, with_probe(patch(comfy, model, story, panels_per_call=panels_per_call), probe), positive, negative,
           panels, steps=1)
    layers = probe.rows_by_layer()
    assert len(layers) == output_transformer_layers(model) > 0, "every output-block self-attention layer, no other"
    assert all(block[0] == "output" for block, _ in layers)
    for (block, index), rows in layers.items():
        assert set(rows) == {(chunk, panel) for chunk in (0, 1) for panel in range(panels)}, "both CFG halves"
        for (chunk, panel), keys in rows.items():
            tokens = next(q for b, i, _, _, q in probe.calls if (b, i) == (block, index))
            extra = keys[tokens:]
            sources = EXPECTED_SOURCES[panel]
            assert extra.shape[0] == tokens * len(sources), f"panel {panel} reads {len(sources)} identity panels"
            segments = list(extra.split(tokens)) if len(sources) else []
            found = set()
            for segment in segments:  # rate 1: each segment is one source's whole keys, from the same chunk
                matches = {src for src in sources if torch.equal(segment, rows[(chunk, src)][:tokens])}
                assert len(matches) == 1, f"panel {panel} (chunk {chunk}) read tokens of no expected panel"
                found |= matches
            assert found == sources
    read = {src for sources in EXPECTED_SOURCES.values() for src in sources}
    assert NC_PANEL not in read and read == set(BOB_IDS + ALICE_IDS), "only identity panels are ever read"


def test_sampled_tokens_come_only_from_the_panels_read(comfy, story_setup):
    model, _, positive, negative, panels, story = story_setup
    probe = StoryProbe()
    sample(comfy, with_probe(patch(comfy, model, story, rate_fine=0.5, rate_coarse=0.5, panels_per_call=2), probe),
           positive, negative, panels, steps=1)
    for (block, index), rows in probe.rows_by_layer().items():
        tokens = next(q for b, i, _, _, q in probe.calls if (b, i) == (block, index))
        count = round(0.5 * tokens)
        for (chunk, panel), keys in rows.items():
            extra = keys[tokens:]
            assert extra.shape[0] == count * len(EXPECTED_SOURCES[panel])
            pool = torch.cat([rows[(chunk, src)][:tokens] for src in EXPECTED_SOURCES[panel]] or [keys[:0]])
            assert (extra[:, None] == pool[None]).all(-1).any(1).all(), f"panel {panel}: a token from elsewhere"


def test_identities_do_not_depend_on_the_other_panels(comfy, loaded):
    """Bit for bit on the CPU: identity rows run in their own calls and read nobody else."""
    model, clip = loaded("sd15_small")
    lines = STORY.strip().splitlines()
    definitions, identity, others = lines[:2], [lines[2], lines[3], lines[4], lines[7]], [lines[5], lines[6], lines[8]]
    variants = {
        "story": (identity + others, [0, 1, 2, 3, 10, 11, 12]),
        "changed": (identity + ["[Bob] sings in the rain", others[1], "[NC] a mountain lake"], [0, 1, 2, 3, 20, 11, 21]),
        "longer": (identity + others + ["[Alice] rides a bike", "[Bob] and [Alice] dance"], [0, 1, 2, 3, 10, 11, 12, 30, 31]),
        "shorter": (identity + others[:1], [0, 1, 2, 3, 10]),
    }
    results = {}
    for name, (panel_lines, noise_ids) in variants.items():
        positive, negative, panels, story = story_inputs(comfy, clip, "\n".join(definitions + panel_lines))
        assert story.identity_panels(2) == {"Bob": (0, 2), "Alice": (1, 3)}
        patched = patch(comfy, model, story, rate_fine=0.5, rate_coarse=0.5, schedule="official", seed=4,
                        panels_per_call=3)
        results[name] = sample(comfy, patched, positive, negative, panels, steps=4, noise_ids=noise_ids)
    for name in ("changed", "longer", "shorter"):
        assert torch.equal(results[name][:4], results["story"][:4]), f"{name}: identity panels changed"
    assert not torch.equal(results["changed"][4], results["story"][4]), "a changed panel is drawn differently"


def test_a_story_in_several_calls_equals_the_story_in_one(comfy, story_setup):
    model, _, positive, negative, panels, story = story_setup
    runs = {per_call: sample(comfy, patch(comfy, model, story, rate_fine=0.5, rate_coarse=0.5, panels_per_call=per_call),
                             positive, negative, panels, steps=3)
            for per_call in (0, 1, 3)}
    vanilla = sample(comfy, model, positive, negative, panels, steps=3)
    batch_mode = sample(comfy, comfy.NODE_CLASS_MAPPINGS[CSA].execute(
        model=model, **{**CSA_OPTIONS, "rate_fine": 0.5, "rate_coarse": 0.5}).result[0], positive, negative, panels, steps=3)
    scale = runs[0].abs().max()
    for per_call in (1, 3):
        assert (runs[per_call] - runs[0]).abs().max() < 1e-5 * scale, f"{per_call} panels per call"
    assert (runs[0] - vanilla).abs().max() > 1e-3 * scale, "the story changes the images"
    assert (runs[0] - batch_mode).abs().max() > 1e-3 * scale, "and differently from sharing across the batch"


def test_panels_without_characters_run_plain_attention(comfy, loaded):
    """A story of [NC] panels only reads nothing anywhere: the unpatched model's images (bit for bit in
    one call; one panel per call only rounds differently, as any smaller batch does)."""
    model, clip = loaded("sd15_small")
    text = "[NC] a forest\n[NC] a lake at night\n[NC] a city street"
    positive, negative, panels, story = story_inputs(comfy, clip, text)
    vanilla = sample(comfy, model, positive, negative, panels)
    assert torch.equal(sample(comfy, patch(comfy, model, story), positive, negative, panels), vanilla)
    one_by_one = sample(comfy, patch(comfy, model, story, panels_per_call=1), positive, negative, panels)
    assert (one_by_one - vanilla).abs().max() < 1e-5 * vanilla.abs().max()


def test_wiring_and_option_errors_name_the_fix(comfy, story_setup, loaded):
    model, clip, positive, negative, panels, story = story_setup
    node = comfy.NODE_CLASS_MAPPINGS[CSA]
    with pytest.raises(ValueError, match="window = 4 applies only without a story"):
        node.execute(model=model, story=story, **{**CSA_OPTIONS, "window": 4})
    with pytest.raises(ValueError, match="panels_per_call = 2 only apply with a story"):
        node.execute(model=model, panels_per_call=2, **CSA_OPTIONS)
    with pytest.raises(ValueError, match="identity_panels = 3 only apply with a story"):
        node.execute(model=model, identity_panels=3, **CSA_OPTIONS)
    _, _, _, lonely = story_inputs(comfy, clip, "[Bob] a man\n[Kit] a cat\n[Bob] walks\n[Bob] pets [Kit]")
    with pytest.raises(ValueError, match=r"\[Kit\] never appears alone in a panel"):
        patch(comfy, model, lonely)
    with pytest.raises(ValueError, match="The story has 7 panels but the latent batch has 5 images"):
        sample(comfy, patch(comfy, model, story), positive, negative, 5, steps=1)


def test_identity_panels_beyond_a_characters_solo_panels_are_stated(comfy, story_setup, caplog):
    """identity_panels is the most per character (a stated rule, not an error: one character shown
    alone twice keeps the others' third identity panel): at 3, Alice, alone twice, takes 2 and the
    log says so; Bob, alone three times, takes 3 and is not named."""
    model, story = story_setup[0], story_setup[-1]
    with caplog.at_level("INFO"):
        patch(comfy, model, story, identity_panels=3)
    assert story.identity_panels(3) == {"Bob": (0, 2, 6), "Alice": ALICE_IDS}
    assert "[Alice] 2 identity panels of 3" in caplog.text and "[Bob]" not in caplog.text



@pytest.mark.parametrize("sampler", ["heun", "dpm_2"])
def test_samplers_with_extra_evaluations_and_cfg_one(comfy, story_setup, sampler):
    model, _, positive, negative, panels, story = story_setup
    record = StepRecord()
    patched = patch(comfy, record.install(model), story, schedule="official", panels_per_call=3)
    first = sample(comfy, patched, positive, negative, panels, steps=3, sampler=sampler)
    assert torch.isfinite(first).all()
    # every sub-call of a model call at that call's step: heun's / dpm_2's second evaluation at the next
    assert record.events == sampler_run(3, lambda i: [i], lambda i: [i + 1] if i < 2 else [])
    assert record.unet_calls > 5, "the story ran in several sub-calls per model call"
    assert not torch.equal(first, sample(comfy, model, positive, negative, panels, steps=3, sampler=sampler))
    probe = StoryProbe()
    sample(comfy, with_probe(patch(comfy, model, story, panels_per_call=3), probe), positive, negative, panels,
           steps=1, cfg=1.0)
    assert probe.calls and {chunk for _, _, rows, _, _ in probe.calls for chunk, _ in rows} == {0}, "cond rows only"


def test_guidance_nodes_that_rerun_the_model(comfy, story_setup):
    model, _, positive, negative, panels, story = story_setup
    nodes = comfy.NODE_CLASS_MAPPINGS

    def guided(node, per_call, base=model, **options):
        result = nodes[node].execute(model=patch(comfy, base, story, panels_per_call=per_call), **options)
        return result.result[0] if hasattr(result, "result") else result[0]

    for per_call in (0, 2):  # PAG's extra model call is split like any other, at the step of the call it guides
        record = StepRecord()
        pag = guided("PerturbedAttentionGuidance", per_call, record.install(model), scale=2.0)
        assert torch.isfinite(sample(comfy, pag, positive, negative, panels)).all()
        assert record.events == sampler_run(2, lambda i: [i, i])
    sag = sample(comfy, guided("SelfAttentionGuidance", 0, scale=0.5, blur_sigma=2.0), positive, negative, panels,
                 steps=1)
    assert torch.isfinite(sag).all()
    with pytest.raises(ValueError, match="Self-Attention Guidance needs the whole batch in one model call"):
        sample(comfy, guided("SelfAttentionGuidance", 2, scale=0.5, blur_sigma=2.0), positive, negative, panels, steps=1)


def test_controlnet_residuals_and_area_conds_are_cut_by_panel(comfy, story_setup):
    """A story split into calls with a ControlNet (random weights, real loader and apply nodes) and an
    area conditioning: the same images as in one call, and the ControlNet does change them."""
    import folder_paths
    from harness.model_files import build_controlnet

    model, clip, positive, negative, panels, story = story_setup
    folder = comfy.session_dir / "controlnet"
    build_controlnet("sd15_small", folder / "random_controlnet_sd15_small.safetensors")
    folder_paths.add_model_folder_path("controlnet", str(folder), is_default=True)
    nodes = comfy.nodes
    control_net = nodes.ControlNetLoader().load_controlnet("random_controlnet_sd15_small.safetensors")[0]
    hint = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    controlled = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control_net, hint, 1.0, 0.0, 1.0)
    area = nodes.ConditioningSetArea().append(positive, 32, 32, 0, 0, 1.0)[0]
    with_area = nodes.ConditioningCombine().combine(controlled[0], area)[0]

    def run(per_call, pos, neg):
        return sample(comfy, patch(comfy, model, story, rate_fine=0.5, rate_coarse=0.5, panels_per_call=per_call),
                      pos, neg, panels, steps=2)

    one_call, split = run(0, *controlled), run(2, *controlled)
    scale = one_call.abs().max()
    assert (split - one_call).abs().max() < 1e-5 * scale
    assert (one_call - run(0, positive, negative)).abs().max() > 1e-3 * scale, "the ControlNet takes part"
    assert (run(2, with_area, controlled[1]) - run(0, with_area, controlled[1])).abs().max() < 1e-5 * scale


def test_memory_stays_flat_as_the_story_grows(comfy, checkpoints):
    """Peak resident memory of sampling, each run in a fresh process (tests/harness/story_memory.py):
    48 panels at 4 per call against 12 panels, and 48 panels at once as the yardstick of what
    running the extra panels together would cost."""
    import json
    import os
    import subprocess
    import sys

    from harness import story_memory

    name = checkpoints["sd15_small"]
    runs = {"12 by 4": (12, 4), "48 by 4": (48, 4), "48 at once": (48, 0)}
    processes = {
        label: subprocess.Popen(
            [sys.executable, story_memory.__file__, "--checkpoints", str(checkpoints.folder), "--checkpoint", name,
             "--panels", str(panels), "--panels-per-call", str(per_call), "--size", str(SIZE)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **story_memory.ENVIRONMENT, "OMP_NUM_THREADS": "1"},
        )
        for label, (panels, per_call) in runs.items()
    }
    measured = {}
    for label, process in processes.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, f"{label}: {err[-3000:]}"
        measured[label] = json.loads(out.strip().splitlines()[-1])
    growth = {label: m["peak"] - m["before"] for label, m in measured.items()}
    print("\nsampling memory (MB):", {label: round(g / 2**20, 1) for label, g in growth.items()},
          "process peaks (MB):", {label: round(m["peak"] / 2**20) for label, m in measured.items()})
    assert measured["48 by 4"]["peak"] <= 1.3 * measured["12 by 4"]["peak"]
    # What 36 more panels add when run 4 at a time (their latents and prompt rows) is a small part of
    # what they add when run together (their activations): the measure does see activations.
    assert growth["48 at once"] > 3 * growth["12 by 4"]
    assert growth["48 by 4"] - growth["12 by 4"] < 0.2 * (growth["48 at once"] - growth["12 by 4"])
