"""A story drawn in part (Story Prompts' ``panels``) gives each drawn panel the image it has in the
whole story's run, and samples only the drawn rows: real graphs (Story Prompts, Story Latent,
Consistent Self-Attention, KSampler) on a random-weight SD1.5 checkpoint, on the CPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from harness.runner import GraphError

from test_story_attention import STORY, sample

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


def story_graph(ckpt_name: str, panels: str, panels_per_call: int, text: str = STORY, name: str = ""):
    """Story Prompts -> Story Latent -> CSA -> KSampler -> VAE Decode -> a preview, or with ``name`` Comic Page
    (story connected) -> a preview."""
    from comfy_execution.graph_utils import GraphBuilder

    g = GraphBuilder(prefix="")
    checkpoint = g.node("CheckpointLoaderSimple", ckpt_name=ckpt_name)
    story = g.node("ConsistentStoryPrompts", clip=checkpoint.out(1), story=text, style="No style", negative="blurry",
                   panels=panels)
    latent = g.node("ConsistentStoryLatent", story=story.out(4), width=64, height=64)
    csa = g.node("ConsistentStorySelfAttention", model=checkpoint.out(0), rate_fine=0.5, rate_coarse=0.5, window=0,
                 blocks="output", custom_blocks="", schedule="official", start_percent=0.0, end_percent=1.0, seed=4,
                 story=story.out(4), panels_per_call=panels_per_call)
    sampler = g.node("KSampler", model=csa.out(0), positive=story.out(0), negative=story.out(1),
                     latent_image=latent.out(0), seed=3, steps=STEPS, cfg=5.0, sampler_name="euler",
                     scheduler="normal", denoise=1.0)
    decode = g.node("VAEDecode", samples=sampler.out(0), vae=checkpoint.out(2))
    shown = decode
    if name:
        shown = g.node("ConsistentStoryComicPage", images=decode.out(0), captions=story.out(3), layout="grid",
                       columns=4, seed=0, reading_order="left to right", page_width=320, panels_per_page=0, gutter=4,
                       margin=4, caption_font_size=0, background_color="#FFFFFF", story=story.out(4), name=name)
    g.node("PreviewImage", images=shown.out(0))
    return g.finalize(), story.id, sampler.id, shown.id


@pytest.fixture(scope="module")
def story_runs(comfy, checkpoints, graph_runner):
    """run(panels, panels_per_call, text=, name=) -> {samples, rows (UNet rows per call), panel_count, page};
    one executor, so the checkpoint loads once, as on a server."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from harness.runner import graph_executor

    executor = graph_executor()

    def run(panels: str, panels_per_call: int, **page):
        prompt, story_id, sampler_id, shown_id = story_graph(checkpoints["sd15_small"], panels, panels_per_call, **page)
        with UNetRows(UNetModel) as counted:
            result = graph_runner(prompt, executor=executor)
        return {"samples": result.output(sampler_id)["samples"], "rows": counted.rows,
                "panel_count": result.output(story_id, 2), "page": result.output(shown_id)}

    return run


def check_drawn_rows(run: dict, drawn: tuple) -> torch.Tensor:
    assert run["panel_count"] == len(drawn) == run["samples"].shape[0], "panel_count and the latent: the drawn rows"
    assert sum(run["rows"]) == STEPS * 2 * len(drawn), "each drawn row, both CFG halves, once per step; no other"
    return run["samples"]


def test_drawn_panels_are_the_whole_runs_bit_for_bit_and_pages_take_the_saved_panels(comfy, story_runs, tmp_path):
    """panels_per_call 1: every model call of a part is a call of the whole run, so the drawn panels are
    the whole run's bit for bit, and Comic Page lays out the same pages from them and the saved panels.
    After panel 7's line changes, only panel 7 is drawn again; a later part finds it."""
    import folder_paths

    name = f"test {tmp_path.name}"
    runs = {panels: story_runs(panels, 1, name=name) for panels in DRAWN}
    whole = check_drawn_rows(runs[""], DRAWN[""])
    for panels, drawn in DRAWN.items():
        part = check_drawn_rows(runs[panels], drawn)
        assert torch.equal(part, whole[list(drawn)]), f"panels '{panels}': the whole run's panels {drawn}, bit for bit"
        assert torch.equal(runs[panels]["page"], runs[""]["page"]), f"panels '{panels}': the same pages"
    folder = Path(folder_paths.get_output_directory()) / "consistent_story_panels" / name
    assert len(list(folder.glob("panel_*.png"))) == 7
    edited = STORY.replace("[Bob] eats an apple", "[Bob] reads a letter")
    changed = story_runs("7", 1, name=name, text=edited)["page"]
    assert changed.shape == runs[""]["page"].shape and not torch.equal(changed, runs[""]["page"])
    assert len(list(folder.glob("panel_007_*.png"))) == 2, "the edited panel 7 is saved beside the old one"
    assert torch.equal(story_runs("4", 1, name=name, text=edited)["page"], changed), "found by the next part"
    with pytest.raises(GraphError, match=r"Panels 2, 4, 5, 6, 7 of this story have no saved image"):
        story_runs("1", 1, name=name + " new")
    (folder / next(folder.glob("panel_001_*.png")).name).write_bytes(b"not a panel")
    with pytest.raises(GraphError, match="is not a panel saved by Comic Page"):
        story_runs("7", 1, name=name)


def test_in_one_call_a_part_only_rounds_differently(story_runs, tmp_path):
    """panels_per_call 0: the part runs in one smaller call, which only rounds differently (as any smaller
    batch does)."""
    whole = check_drawn_rows(story_runs("", 0, name=tmp_path.name), DRAWN[""])
    part = check_drawn_rows(story_runs("7", 0, name=tmp_path.name), DRAWN["7"])
    assert (part - whole[list(DRAWN["7"])]).abs().max() <= 1e-5 * whole.abs().max()


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
    patched = csa.execute(model=model, **{**options, "identity_panels": 1}).result[0]
    positive, negative, panel_count = run("7", identity_panels=1)[:3]
    with pytest.raises(ValueError, match="the sampler's noise is not those panels' noise in the whole story"):
        sample(comfy, patched, positive, negative, panel_count, steps=1)  # an Empty Latent Image: panels 1-2's noise
    assert sample(comfy, patched, positive, negative, panel_count, steps=1, noise_ids=[0, 6]).shape[0] == 2


def test_story_latent_is_empty_latent_image_with_each_panels_noise_index(comfy, loaded):
    """Story Latent gives what Empty Latent Image gives (so the sampler adapts it to any model as it
    adapts that one: Flux.2's 16x latents, pixel models), one row per drawn panel, plus batch_index."""
    from test_story_attention import story_inputs

    _, clip = loaded("sd15_small")
    story = story_inputs(comfy, clip)[3].select("7", 2)
    ours = comfy.NODE_CLASS_MAPPINGS["ConsistentStoryLatent"].execute(story=story, width=72, height=40).result[0]
    core = comfy.NODE_CLASS_MAPPINGS["EmptyLatentImage"]().generate(72, 40, batch_size=3)[0]
    assert ours.pop("batch_index") == [0, 2, 6]
    assert ours.keys() == core.keys()
    assert all(torch.equal(ours[k], core[k]) if torch.is_tensor(core[k]) else ours[k] == core[k] for k in core)
