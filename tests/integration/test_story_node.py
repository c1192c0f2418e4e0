"""The Story Prompts node on real ComfyUI text encoders (random weights) and real samplers.

Row i of the node's positive must be exactly what core CLIPTextEncode gives for panel i alone
(repeated whole to the common token length), and must steer row i of the latent batch only.
"""
from __future__ import annotations

import pytest
import torch

from harness.runner import ksampler_graph

pytestmark = pytest.mark.integration

NODE = "ConsistentStoryPrompts"
POOLED_WIDTH = {"sd15_small": 768, "vega_small": 1280}
LONG = ", ".join(["tall pine trees"] * 30)  # about 120 tokens: two 77-token chunks
# Two panels of different token lengths (77 and 154): as few encodes as the checks need.
STORY = f"""
[Bob] a man with short black hair, red coat
[Alice] a woman in a green dress

[Bob] and [Alice] read a newspaper at home # Big news.
[NC] a dark forest, {LONG}
"""


def run_node(comfy, clip, story, style="No style", negative="blurry", custom_style=""):
    with torch.inference_mode():
        return comfy.NODE_CLASS_MAPPINGS[NODE].execute(
            clip=clip, story=story, style=style, negative=negative, custom_style=custom_style
        ).result


def core_encode(comfy, clip, text):
    with torch.inference_mode():
        return comfy.nodes.CLIPTextEncode().encode(clip, text)[0]


def repeated(tensor, length):
    return tensor.repeat(1, length // tensor.shape[1], *([1] * (tensor.dim() - 2)))


@pytest.mark.parametrize("kind", POOLED_WIDTH)
def test_row_i_is_panel_i_alone_in_the_cond_and_in_the_sampler(kind, comfy, loaded):
    model, clip = loaded(kind)
    positive, negative, panel_count, captions, story, summary = run_node(comfy, clip, STORY)
    assert (panel_count, captions) == (2, "Big news.\n")
    never = "(never alone: no identity)"
    assert summary.splitlines() == ["2 panels · 2 characters", f"identity panels: Bob {never}; Alice {never}",
                                    f"1. reads Bob {never}; Alice {never}: {story.panels[0].prompt}",
                                    f"2. no character, reads nobody: {story.panels[1].prompt}"]
    [[cond, extras]] = positive
    assert cond.shape[:2] == (panel_count, 154)
    assert extras["pooled_output"].shape == (panel_count, POOLED_WIDTH[kind])

    # Each row is CLIPTextEncode of its panel alone, repeated whole to the common length.
    alone = [core_encode(comfy, clip, panel.prompt) for panel in story.panels]
    assert [c[0][0].shape[1] for c in alone] == [77, 154]
    for index, [[core_cond, core_extras]] in enumerate(alone):
        assert extras.keys() == core_extras.keys()
        assert torch.equal(cond[index : index + 1], repeated(core_cond, 154))
        assert torch.equal(extras["pooled_output"][index : index + 1], core_extras["pooled_output"])
    [[negative_cond, negative_extras]] = negative
    [[core_negative, core_negative_extras]] = core_encode(comfy, clip, story.negative)
    assert negative_cond.shape == (1, 154, cond.shape[2])
    assert torch.equal(negative_cond, repeated(core_negative, 154))
    assert torch.equal(negative_extras["pooled_output"], core_negative_extras["pooled_output"])

    # Sampling: the last row follows its own prompt (a batch-1 cond would tile panel 0 onto it).
    latent = {"samples": torch.zeros(panel_count, 4, 8, 8)}

    def sample(conditioning):
        with torch.inference_mode():
            return comfy.nodes.common_ksampler(model, 7, 2, 5.0, "euler", "normal", conditioning, negative, latent)[0]

    batch, reference = sample(positive)["samples"], sample(alone[1])["samples"]
    assert batch.shape == (panel_count, 4, 8, 8) and torch.isfinite(batch).all()
    torch.testing.assert_close(batch[1], reference[1])
    assert (batch[0] - reference[0]).abs().max() > 1e-3


def test_default_story_in_a_graph_with_batch_wired_to_panel_count(comfy, checkpoints, graph_runner):
    schema = comfy.NODE_CLASS_MAPPINGS[NODE].GET_SCHEMA()
    default_story = next(i.default for i in schema.inputs if i.id == "story")
    graph = ksampler_graph(checkpoints["sd15_small"], batch_size=1, steps=2, filename_prefix="story_prompts")
    story = graph.builder.node(NODE, clip=graph.checkpoint.out(1), story=default_story, style="Japanese Anime",
                               negative="blurry")
    graph.sampler.set_input("positive", story.out(0))
    graph.sampler.set_input("negative", story.out(1))
    graph.latent.set_input("batch_size", story.out(2))
    for unused in (graph.positive, graph.negative):
        graph.builder.remove_node(unused.id)

    result = graph_runner(graph.prompt())
    assert result.output(story.id, 2) == 4
    assert result.output(story.id, 3).split("\n") == [
        "Another Monday.", "Then he saw it.", "Where does this lead?", "The adventure begins."
    ]
    assert result.output(graph.sampler.id)["samples"].shape[0] == 4
    assert len(result.image_paths(graph.save.id)) == 4


def test_story_error_names_the_line(comfy, loaded):
    _, clip = loaded("sd15_small")
    with pytest.raises(ValueError, match=r"^Story line 3: no character is named \[Eve\]"):
        run_node(comfy, clip, "[Bob] a man\n[Bob] sits\n[Eve] and [Bob] talk")
    with pytest.raises(ValueError, match=r"custom style must contain \{prompt\}"):
        run_node(comfy, clip, STORY, style="Custom", custom_style="watercolor")


def test_token_lengths_without_small_common_multiple_are_refused(comfy, loaded):
    _, clip = loaded("sd15_small")
    # "pine" and "," are a token each and a chunk holds 75: 37k items fill k chunks of 77 tokens.
    story = "\n".join("[NC] " + ", ".join(["pine"] * 37 * chunks) for chunks in (3, 5))
    with pytest.raises(ValueError, match=r"least common multiple, 1155 tokens.*Shorten"):
        run_node(comfy, clip, story, negative="")


def test_photomaker_panels_are_core_photomaker_encodings(comfy, loaded):
    """With a PhotoMaker model (random weights, real loader) and a face, the panels with the word
    'photomaker' (every panel of the character whose description has it) are exactly core
    PhotoMakerEncode's conditioning; the others plain CLIP."""
    from harness.model_files import photomaker_file

    model, clip = loaded("vega_small")
    nodes = comfy.NODE_CLASS_MAPPINGS
    photomaker = nodes["PhotoMakerLoader"].execute(photomaker_model_name=photomaker_file(comfy.session_dir)).result[0]
    face = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    text = "[Ann] a woman photomaker with short hair\n[Ann] walks in the park\n[NC] a quiet forest"  # 2 panels
    with torch.inference_mode():
        positive, *_, story, _ = comfy.NODE_CLASS_MAPPINGS[NODE].execute(
            clip=clip, story=text, style="No style", negative="", photomaker=photomaker, photomaker_image=face).result
        core = nodes["PhotoMakerEncode"].execute(photomaker=photomaker, image=face, clip=clip,
                                                 text=story.panels[0].prompt).result[0]
    [[cond, extras]] = positive
    assert torch.equal(cond[0:1], core[0][0]) and torch.equal(extras["pooled_output"][0:1], core[0][1]["pooled_output"])
    assert torch.equal(cond[1:2], core_encode(comfy, clip, story.panels[1].prompt)[0][0]), "[NC]: plain CLIP"
    assert not torch.equal(cond[0:1], core_encode(comfy, clip, story.panels[0].prompt)[0][0]), "the face is fused in"
    with pytest.raises(ValueError, match="no panel prompt has the word 'photomaker'"):
        comfy.NODE_CLASS_MAPPINGS[NODE].execute(clip=clip, story="[NC] a forest", style="No style", negative="",
                                               photomaker=photomaker, photomaker_image=face)
    with pytest.raises(ValueError, match="photomaker_image is empty"):
        comfy.NODE_CLASS_MAPPINGS[NODE].execute(clip=clip, story=text, style="No style", negative="", photomaker=photomaker)


def test_t5_prompts_of_different_lengths_are_padded_to_one_batch(comfy):
    """Flux's text encoder (ComfyUI's FluxTokenizer and CLIP wrapper; a stand-in for T5-XXL itself):
    T5 returns one sequence as long as the text, so every panel is padded to the longest with T5's
    pad token, the way Flux pipelines pad, and each row is that panel's padded encoding."""
    from harness.text_encoders import flux_text_encoder

    clip = flux_text_encoder()
    long = ", ".join(["a very long winding mountain road with pine trees"] * 40)  # past T5's 256-token minimum
    text = f"[Bob] a man in a red coat\n[Bob] walks\n[NC] {long}"
    with torch.inference_mode():
        positive, negative, _, _, story, _ = run_node(comfy, clip, text)
    [[cond, extras]], [[negative_cond, _]] = positive, negative
    lengths = [len(clip.tokenize(p.prompt)["t5xxl"][0]) for p in story.panels]
    assert lengths[0] < lengths[1] and cond.shape == (2, lengths[1], 4096) and negative_cond.shape[1] == lengths[1]
    padded = clip.tokenize(story.panels[0].prompt, tokenizer_options={"t5xxl_min_length": lengths[1]})
    alone = clip.encode_from_tokens(padded, return_pooled=True, return_dict=True)
    assert torch.equal(cond[0:1], alone["cond"]) and torch.equal(extras["pooled_output"][0:1], alone["pooled_output"])


def test_llm_prompts_of_different_lengths_batch_with_their_attention_masks(comfy):
    """Qwen-Image's text encoder (ComfyUI's tokenizer and encoder classes; a stand-in for the
    Qwen2.5-VL LLM itself): panels are padded to the longest with Qwen's pad token. ComfyUI's
    encoder keeps the attention mask of a padded panel and drops the all-ones mask of the longest,
    so the batch carries one mask row per panel: ones for the longest, the padding masked out in
    the others. Each row is that panel's padded encoding alone."""
    from harness.text_encoders import llm_text_encoder

    clip = llm_text_encoder("qwen_image")
    text = "[Bob] a man in a red coat\n[Bob] walks\n[NC] a long winding mountain road with pine trees at dawn"
    with torch.inference_mode():
        positive, negative, _, _, story, _ = run_node(comfy, clip, text, negative="")
    [[cond, extras]], [[negative_cond, negative_extras]] = positive, negative
    lengths = [len(clip.tokenize(p.prompt)["qwen25_7b"][0]) for p in story.panels]
    longest = max(lengths)
    assert lengths[0] < longest == lengths[1]
    mask = extras["attention_mask"]
    assert mask.shape == (2, cond.shape[1]) and cond.shape[0] == 2 and negative_cond.shape[1] == cond.shape[1]
    assert mask[1].all() and not mask[0].all() and mask[0].sum() == cond.shape[1] - (longest - lengths[0])
    assert not negative_extras["attention_mask"].all(), "the negative is padded and masked the same way"
    padded = clip.tokenize(story.panels[0].prompt, tokenizer_options={"qwen25_7b_min_length": longest})
    alone = clip.encode_from_tokens(padded, return_pooled=True, return_dict=True)
    assert torch.equal(cond[0:1], alone["cond"]) and torch.equal(mask[0:1], alone["attention_mask"])
