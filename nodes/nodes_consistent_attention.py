"""The Consistent Self-Attention node: MODEL -> MODEL."""
from __future__ import annotations

from comfy_api.latest import io

from ..attention import CSAConfig, parse_block_list
from .csa_patch import ConsistentAttentionPatch


class ConsistentSelfAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentStorySelfAttention",
            display_name="Consistent Self-Attention",
            category="consistent_story",
            description=(
                "StoryDiffusion's Consistent Self-Attention: the panels of one batch share identity. In each "
                "self-attention layer a panel also attends to tokens sampled from the other panels of the batch "
                "(cond only with cond, uncond only with uncond), so characters, faces and clothes stay the same. "
                "Training-free; SD1.5 and SDXL families. Give the sampler one latent per panel."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch. It is cloned; the input model is never changed."),
                io.Float.Input(
                    "rate_fine", default=0.5, min=0.0, max=1.0, step=0.05,
                    tooltip="Share of each other panel's tokens attended to in fine layers (at least a quarter of the "
                    "latent's tokens; SDXL's 64x64 grid at 1024 px, the official 'sa64'). 0 turns these layers off.",
                ),
                io.Float.Input(
                    "rate_coarse", default=0.5, min=0.0, max=1.0, step=0.05,
                    tooltip="Share of each other panel's tokens attended to in coarser layers (SDXL's 32x32 grid at "
                    "1024 px, the official 'sa32'). 0 turns these layers off.",
                ),
                io.Int.Input(
                    "window", default=0, min=0, max=64,
                    tooltip="Each panel samples from at most this many neighbouring panels (0 = all others). Keeps "
                    "memory and time linear in the panel count for long stories; 4 is a good value past 8 panels.",
                ),
                io.Combo.Input(
                    "blocks", options=["output", "all", "custom"], default="output",
                    tooltip="Where CSA runs: 'output' = the UNet's decoder blocks (as the official app); 'all' = every "
                    "self-attention layer; 'custom' = the blocks listed in custom_blocks.",
                ),
                io.String.Input(
                    "custom_blocks", default="output 0-5", multiline=False,
                    tooltip="Used when blocks is 'custom': comma-separated entries such as 'output 0-5, middle 0, "
                    "input 7' (ComfyUI's block numbering).",
                ),
                io.Combo.Input(
                    "schedule", options=["official", "always"], default="official",
                    tooltip="'official': plain attention for the first 10% of steps, then CSA on each layer with "
                    "probability 0.7, and 0.9 from 40% of the steps on (as the official app). 'always': every step in "
                    "the start-end range, every chosen layer.",
                ),
                io.Float.Input(
                    "start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                    tooltip="CSA runs from this fraction of the sampling steps on (0 = first step).",
                ),
                io.Float.Input(
                    "end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                    tooltip="CSA stops before this fraction of the sampling steps (1 = through the last step).",
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                    tooltip="Seeds which tokens are shared and the schedule's draws. Same seed and inputs, same images.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The patched clone of the model.")],
        )

    @classmethod
    def execute(cls, model, rate_fine, rate_coarse, window, blocks, custom_blocks, schedule,
                start_percent, end_percent, seed) -> io.NodeOutput:
        config = CSAConfig(
            rate_fine=rate_fine,
            rate_coarse=rate_coarse,
            window=window,
            blocks=blocks,
            custom_blocks=parse_block_list(custom_blocks) if blocks == "custom" else frozenset(),
            schedule=schedule,
            start=start_percent,
            end=end_percent,
            seed=seed,
        )
        if not config.enabled:
            return io.NodeOutput(model)
        patched = model.clone()
        ConsistentAttentionPatch(config).install(patched)
        return io.NodeOutput(patched)


NODES = [ConsistentSelfAttention]
