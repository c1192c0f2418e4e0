"""Errors the editor can show on the node: options that are widgets are checked by ComfyUI's
validation (the nodes' validate_inputs) before anything is loaded or sampled, so the frontend
marks the node and shows the message there; an error at run time names its type as a name, not
as the path ComfyUI imported the pack from."""
from __future__ import annotations

import pytest

from harness.pack import load_pack
from harness.runner import GraphError

pytestmark = pytest.mark.integration


def graph(ckpt_name: str, story: str = "[Ann] a woman\n[Ann] reads", **attention):
    from comfy_execution.graph_utils import GraphBuilder

    g = GraphBuilder(prefix="")
    checkpoint = g.node("CheckpointLoaderSimple", ckpt_name=ckpt_name)
    prompts = g.node("ConsistentStoryPrompts", clip=checkpoint.out(1), story=story, style="No style", negative="")
    patched = g.node("ConsistentStorySelfAttention", model=checkpoint.out(0), story=prompts.out(4), **{
        "rate_fine": 0.5, "rate_coarse": 0.5, "window": 0, "blocks": "output", "custom_blocks": "",
        "schedule": "official", "start_percent": 0.0, "end_percent": 1.0, "seed": 0, **attention})
    latent = g.node("EmptyLatentImage", width=32, height=32, batch_size=prompts.out(2))
    sampled = g.node("KSampler", model=patched.out(0), positive=prompts.out(0), negative=prompts.out(1),
                     latent_image=latent.out(0), seed=0, steps=1, cfg=1.0, sampler_name="euler",
                     scheduler="normal", denoise=1.0)
    g.node("PreviewImage", images=g.node("VAEDecode", samples=sampled.out(0), vae=checkpoint.out(2)).out(0))
    return g.finalize(), prompts.id, patched.id


@pytest.mark.parametrize("change,node,message", [
    ({"blocks": "custom", "custom_blocks": "outptu 0-2"}, "attention", "custom_blocks: cannot read 'outptu 0-2'"),
    ({"blocks": "custom", "custom_blocks": " "}, "attention", "custom_blocks is empty"),
    ({"story": "[Ann] a woman\n[Bob] a man\n[Ann] reads"}, "story", "[Bob]"),
])
def test_bad_widget_values_are_refused_on_their_node_before_anything_loads(comfy, checkpoints, graph_runner, change,
                                                                            node, message):  # fmt: skip
    prompt, prompts_id, attention_id = graph(checkpoints["sd15_small"], **change)
    with pytest.raises(GraphError) as raised:
        graph_runner(prompt)
    error = raised.value
    assert error.stage == "validation", str(error)
    node_id = {"story": prompts_id, "attention": attention_id}[node]
    lines = [line for line in str(error).splitlines() if line.strip().startswith(f"node {node_id} (")]
    assert lines and message in lines[0], str(error)


def test_the_pack_errors_read_as_names_where_comfyui_shows_their_type(comfy):
    """ComfyUI puts the error's type ahead of its message (module + name); the pack's module is the
    path of its folder."""
    import execution

    load_pack()
    from consistent_story.attention import ConsistentAttentionError
    from consistent_story.nodes.story.story_prompts import StoryError

    names = [execution.full_type_name(error) for error in (ConsistentAttentionError, StoryError)]
    assert names == ["consistent_story.ConsistentAttentionError", "consistent_story.StoryError"]
