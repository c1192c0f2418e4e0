"""The Comic Page node as ComfyUI loaded it: its schema, its v3 execute, and a real graph."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration

NODE = "ConsistentStoryComicPage"
SETTINGS = dict(layout="classic comic", columns=3, seed=7, reading_order="left to right", page_width=256,
                panels_per_page=3, gutter=6, margin=8, caption_font_size=0, background_color="#F0E8D8")


@pytest.fixture(scope="module")
def comic_page(comfy):
    return comfy.NODE_CLASS_MAPPINGS[NODE]


def run(node, images, captions="", **changes):
    with torch.inference_mode():
        return node.execute(images=images, captions=captions, **{**SETTINGS, **changes}).result[0]


def random_panels(count=5):
    return torch.rand(count, 48, 64, 3, generator=torch.Generator().manual_seed(0))


def test_schema_is_documented(comfy, comic_page):
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[NODE] == "Comic Page"
    info = comic_page.GET_NODE_INFO_V1()
    assert info["category"] == "Consistent Story" and info["description"]
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert set(inputs) == {"images", "captions", *SETTINGS, "story", "name"}
    assert all(spec[1].get("tooltip") for spec in inputs.values())
    assert info["output"] == ["IMAGE"]


def test_execute_returns_equal_sized_pages(comic_page):
    pages = run(comic_page, random_panels(5), "The hero wakes\n\nA fox appears\n\nThe end")
    assert pages.shape[0] == 2 and pages.shape[2:] == (256, 3) and pages.dtype == torch.float32
    assert 0 <= pages.min() and pages.max() <= 1
    background = torch.tensor([0xF0, 0xE8, 0xD8]) / 255
    assert torch.allclose(pages[:, :8].reshape(-1, 3), background.expand(2 * 8 * 256, 3))


def test_seed_and_reading_order_change_the_pages_deterministically(comic_page):
    images = random_panels(5)
    same = run(comic_page, images), run(comic_page, images)
    assert torch.equal(*same)
    manga = run(comic_page, images, reading_order="right to left (manga)")
    assert manga.shape == same[0].shape and not torch.equal(manga, same[0])
    other_seeds = [run(comic_page, images, seed=seed, panels_per_page=0) for seed in range(1, 6)]
    assert any(not torch.equal(page, other_seeds[0]) for page in other_seeds[1:])


@pytest.mark.parametrize(
    "changes, captions, names",
    [
        (dict(background_color="papayawhip"), "", ["background_color"]),
        (dict(), "a\nb\nc\nd\ne\nf", ["captions", "6", "5"]),
        (dict(columns=16, layout="grid"), "", ["columns", "page_width"]),
        (dict(margin=120), "", ["margin", "page_width"]),
    ],
)
def test_bad_input_names_what_to_change(comic_page, changes, captions, names):
    with pytest.raises(ValueError) as error:
        run(comic_page, random_panels(5), captions, **changes)
    assert all(name in str(error.value) for name in names)


def comic_graph(**settings):
    from comfy_execution.graph_utils import GraphBuilder

    g = GraphBuilder(prefix="")
    images = g.node("EmptyImage", width=64, height=48, batch_size=6, color=0x3366CC)
    captions = g.node("PrimitiveStringMultiline", value="One\nTwo\n\nFour\n")
    page = g.node("ConsistentStoryComicPage", images=images.out(0), captions=captions.out(0),
                  **{**SETTINGS, "layout": "four-panel strip", **settings})
    g.node("PreviewImage", images=page.out(0))
    return g.finalize(), page.id


def test_graph_with_wired_captions_runs_in_comfyui(graph_runner):
    prompt, page_id = comic_graph()
    pages = graph_runner(prompt).output(page_id)
    assert pages.shape[0] == 2 and pages.shape[2:] == (256, 3)


@pytest.mark.parametrize("settings,message", [
    ({"background_color": "#12"}, "background_color '#12' is not a hex colour"),
    ({"page_width": 100, "margin": 40}, "The page does not fit"),
    ({"caption_font_size": -1}, "caption_font_size is -1"),
    # ComfyUI leaves the limits of the inputs validate_inputs names to the node: they still hold.
    ({"gutter": 2000}, "gutter is 2000, more than its maximum 1024"),
    ({"columns": 0}, "columns is 0, less than its minimum 1"),
])
def test_bad_page_settings_are_refused_before_anything_runs(graph_runner, settings, message):
    """ComfyUI's validation (the node's validate_inputs) names the input, before sampling would start."""
    from harness.runner import GraphError

    prompt, _ = comic_graph(**settings)
    with pytest.raises(GraphError, match=message) as raised:
        graph_runner(prompt)
    assert raised.value.stage == "validation"


def test_captions_too_large_for_the_page_name_the_font_size():
    from harness.pack import load_pack

    load_pack()
    from consistent_story.nodes.story.comic_layout import LayoutOptions, layout_pages

    with pytest.raises(ValueError, match="Lower caption_font_size"):
        layout_pages(LayoutOptions(page_width=512, columns=1), 40, 1.0, caption_band=2000)


def test_captions_too_tall_for_any_page_stop_the_graph_before_sampling(comfy, checkpoints, graph_runner):
    """Story Prompts' captions reach Comic Page before its (lazy) images: a font that makes every page too
    tall whatever the panels is refused then, and the sampler never runs; typed captions at validation."""
    from harness.runner import GraphError, ksampler_graph

    story_node = comfy.NODE_CLASS_MAPPINGS["ConsistentStoryPrompts"].GET_SCHEMA()
    story_text = next(i.default for i in story_node.inputs if i.id == "story")
    graph = ksampler_graph(checkpoints["sd15_small"], batch_size=1, steps=1, filename_prefix="comic_too_tall")
    story = graph.builder.node("ConsistentStoryPrompts", clip=graph.checkpoint.out(1), story=story_text,
                               style="No style", negative="blurry")
    graph.sampler.set_input("positive", story.out(0))
    graph.sampler.set_input("negative", story.out(1))
    graph.latent.set_input("batch_size", story.out(2))
    page = graph.builder.node(NODE, images=graph.decode.out(0), captions=story.out(3),
                              **{**SETTINGS, "caption_font_size": 512})
    graph.save.set_input("images", page.out(0))
    with pytest.raises(GraphError, match="whatever the panels: its captions take") as raised:
        graph_runner(graph.prompt())
    assert raised.value.stage == "execution" and raised.value.details["node_type"] == NODE
    assert story.id in raised.value.details["executed"] and graph.sampler.id not in raised.value.details["executed"]

    prompt, page_id = comic_graph(caption_font_size=512)
    prompt[page_id]["inputs"]["captions"] = "Where does this lead?\n" * 4  # typed: ComfyUI's validation sees it
    with pytest.raises(GraphError, match="whatever the panels") as raised:
        graph_runner(prompt)
    assert raised.value.stage == "validation"
