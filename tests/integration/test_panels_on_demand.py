"""A story drawn in part (Story Prompts' ``panels``) gives each drawn panel the image it has in the
whole story's run, and samples only the drawn rows: real graphs (Story Prompts, Story Latent,
Consistent Self-Attention, KSampler) on a random-weight SD1.5 checkpoint, on the CPU."""
from __future__ import annotations

import pytest
import torch

from test_story_attention import STORY

pytestmark = pytest.mark.integration

STEPS = 2
DRAWN = {"": tuple(range(7)), "7": (0, 2, 6), "4-5": (0, 1, 2, 3, 4, 5)}  # Bob ids 1, 3; Alice ids 2, 6


class UNetRows:
    """Counts the latent rows of every UNet call, whoever makes it (a global forward pre-hook)."""

    def __init__(self, unet_class):
        self.unet_class, self.rows = unet_class, []

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self.hook)
        return self

    def hook(self, module, args):
        if isinstance(module, self.unet_class):
            self.rows.append(args[0].shape[0])

    def __exit__(self, *exc):
        self.handle.remove()


def story_graph(ckpt_name: str, panels: str, panels_per_call: int):
    from comfy_execution.graph_utils import GraphBuilder

    g = GraphBuilder(prefix="")
    checkpoint = g.node("CheckpointLoaderSimple", ckpt_name=ckpt_name)
    story = g.node("ConsistentStoryPrompts", clip=checkpoint.out(1), story=STORY, style="No style", negative="blurry",
                   panels=panels)
    latent = g.node("ConsistentStoryLatent", story=story.out(4), width=64, height=64)
    csa = g.node("ConsistentStorySelfAttention", model=checkpoint.out(0), rate_fine=0.5, rate_coarse=0.5, window=0,
                 blocks="output", custom_blocks="", schedule="official", start_percent=0.0, end_percent=1.0, seed=4,
                 story=story.out(4), panels_per_call=panels_per_call)
    sampler = g.node("KSampler", model=csa.out(0), positive=story.out(0), negative=story.out(1),
                     latent_image=latent.out(0), seed=3, steps=STEPS, cfg=5.0, sampler_name="euler",
                     scheduler="normal", denoise=1.0)
    decode = g.node("VAEDecode", samples=sampler.out(0), vae=checkpoint.out(2))
    g.node("PreviewImage", images=decode.out(0))
    return g.finalize(), story.id, sampler.id


@pytest.fixture(scope="module")
def story_runs(comfy, checkpoints, graph_runner):
    """run(panels, panels_per_call) -> (sampled latents, UNet rows per call, panel_count); one executor,
    so the checkpoint loads once, as on a server."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from harness.runner import graph_executor

    executor = graph_executor()

    def run(panels: str, panels_per_call: int):
        prompt, story_id, sampler_id = story_graph(checkpoints["sd15_small"], panels, panels_per_call)
        with UNetRows(UNetModel) as counted:
            result = graph_runner(prompt, executor=executor)
        return result.output(sampler_id)["samples"], counted.rows, result.output(story_id, 2)

    return run


@pytest.mark.parametrize("panels_per_call", [1, 0])
def test_drawn_panels_equal_the_whole_run_and_only_they_are_sampled(story_runs, panels_per_call):
    """panels_per_call 1: every model call of a part is a call of the whole run, so the drawn panels
    are the whole run's bit for bit. 0: the part runs in one smaller call, which only rounds
    differently (as any smaller batch does)."""
    cases = DRAWN if panels_per_call == 1 else {panels: DRAWN[panels] for panels in ("", "7")}
    runs = {}
    for panels, drawn in cases.items():
        samples, rows, panel_count = story_runs(panels, panels_per_call)
        assert panel_count == len(drawn) == samples.shape[0], "panel_count and the latent: the drawn rows"
        assert sum(rows) == STEPS * 2 * len(drawn), "each drawn row, both CFG halves, once per step; no other"
        runs[panels] = samples
    whole = runs[""]
    scale = whole.abs().max()
    for panels, drawn in cases.items():
        part, same = runs[panels], whole[list(drawn)]
        if panels_per_call == 1:
            assert torch.equal(part, same), f"panels '{panels}': the whole run's panels {drawn}, bit for bit"
        else:
            assert (part - same).abs().max() <= 1e-5 * scale, f"panels '{panels}'"


def test_a_part_keeps_the_whole_storys_token_length_and_errors_name_the_input(comfy, loaded):
    model, clip = loaded("sd15_small")
    prompts, csa = comfy.NODE_CLASS_MAPPINGS["ConsistentStoryPrompts"], comfy.NODE_CLASS_MAPPINGS["ConsistentStorySelfAttention"]
    long_panel = "[Bob] eats an apple, " + " ".join(["green"] * 80)  # two 77-token chunks
    text = STORY.replace("[Bob] eats an apple", long_panel)

    def run(panels="", **options):
        with torch.inference_mode():
            return prompts.execute(clip=clip, story=text, style="No style", negative="blurry", panels=panels,
                                   **options).result

    whole, part = run(), run("4")
    assert whole[0][0][0].shape[1] == part[0][0][0].shape[1] == 154, "the undrawn long panel sets the length"
    assert torch.equal(part[0][0][0][0], whole[0][0][0][3]) and part[2] == 1 and part[3] == ""
    with pytest.raises(ValueError, match="panels: '9' is outside the story, whose panels are numbered 1 to 7"):
        run("9")
    story = run("7", identity_panels=1)[4]
    options = dict(rate_fine=0.5, rate_coarse=0.5, window=0, blocks="output", custom_blocks="", schedule="always",
                   start_percent=0.0, end_percent=1.0, seed=0, story=story)
    with pytest.raises(ValueError, match="Story Prompts' identity_panels is 1 but this node's is 2"):
        csa.execute(model=model, **options)
    csa.execute(model=model, **{**options, "identity_panels": 1})
