"""The Consistent Self-Attention node: MODEL -> MODEL."""
from __future__ import annotations

import logging
from dataclasses import replace

from comfy_api.v0_0_2 import io

from ..attention import KERNELS, MAX_IDENTITY_PANELS, PERCENT_OF, ConsistentAttentionError, CSAConfig, parse_block_list
from .host.csa_patch import ConsistentAttentionPatch
from .host.dit_families import FAMILIES, dit_family
from .host.dit_patch import KEY_POSITIONS, DiTAttentionPatch
from .schema import CATEGORY, DEFAULT_IDENTITY_PANELS, StoryType


BLOCK_OPTIONS = ("output", "all", "custom", "single-stream", "double-stream")


class ConsistentSelfAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentStorySelfAttention",
            display_name="Consistent Self-Attention",
            category=CATEGORY,
            description=(
                "StoryDiffusion's Consistent Self-Attention: the panels of one batch share identity. In each "
                "self-attention layer a panel also attends to tokens sampled from the other panels of the batch "
                "(cond only with cond, uncond only with uncond), so characters, faces and clothes stay the same. "
                "Training-free; SD1.5 and SDXL families (UNets) and these DiTs, recognised by ComfyUI's model config: "
                f"{', '.join(family.name for family in FAMILIES)} (on a DiT only each panel's own image tokens are "
                "shared, never text or reference-image tokens). Give the sampler one latent per panel. With Story "
                "Prompts' story connected, panels share by character instead: each character's first single-character "
                "panels are its identity panels, every other panel reads only the identity panels of the characters "
                "it names, [NC] panels read nothing, and long stories run a few panels per model call."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch. It is cloned; the input model is never changed."),
                io.Float.Input(
                    "rate_fine", default=0.5, min=0.0, max=1.0, step=0.05,
                    tooltip="Share of each other panel's tokens attended to in fine layers (at least a quarter of the "
                    "latent's tokens; SDXL's 64x64 grid at 1024 px, the official 'sa64'). 0 turns these layers off. "
                    "On a DiT: the share of image tokens in every chosen block.",
                ),
                io.Float.Input(
                    "rate_coarse", default=0.5, min=0.0, max=1.0, step=0.05,
                    tooltip="Share of each other panel's tokens attended to in coarser layers (SDXL's 32x32 grid at "
                    "1024 px, the official 'sa32'). 0 turns these layers off. Ignored on a DiT (one resolution).",
                ),
                io.Int.Input(
                    "window", default=0, min=0, max=64,
                    tooltip="Without a story: each panel samples from at most this many neighbouring panels (0 = all "
                    "others), so memory and time stay linear in the panel count; 4 is a good value past 8 panels. "
                    "With a story the characters decide who reads whom: keep 0.",
                ),
                io.Combo.Input(
                    "blocks", options=list(BLOCK_OPTIONS), default="output",
                    tooltip="Where CSA runs. UNet: 'output' = the decoder blocks (as the official app); 'all' = every "
                    "self-attention layer. DiT: 'output' = the family's default: the single-stream blocks on Flux.1, "
                    "Flux.2, Chroma and Chroma Radiance (as CharaConsist), the second half of the blocks on Qwen-Image, "
                    "SD3 / SD3.5 (all of them double-stream) and Z-Image; 'single-stream', 'double-stream', or 'all'. 'custom' = the blocks "
                    "listed in custom_blocks.",
                ),
                io.String.Input(
                    "custom_blocks", default="output 0-5", multiline=False,
                    tooltip="Used when blocks is 'custom': comma-separated entries such as 'output 0-5, middle 0, "
                    "input 7' (a UNet, ComfyUI's block numbering) or 'single 0-37, double 10-18' (a DiT; Qwen-Image's "
                    "blocks are 'double 0-59').",
                ),
                io.Combo.Input(
                    "schedule", options=["official", "always"], default="official",
                    tooltip="'official': plain attention for the first 10% of steps, then CSA on each layer with "
                    "probability 0.7, and 0.9 from 40% of the steps on (as the official app; with percent_of 'sigma' "
                    "these are sigma percents). 'always': every step in the start-end range, every chosen layer.",
                ),
                io.Float.Input(
                    "start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                    tooltip="Where CSA starts; what it is a percent of, percent_of says. 'steps' (default): this "
                    "fraction of each sampler run's steps (0 = its first step); a sampler that starts later "
                    "(KSamplerAdvanced from step 20, denoise below 1) counts its own steps. 'sigma': a sigma percent "
                    "as ControlNet's start_percent (0 = the highest noise): CSA runs while the step's sigma is at "
                    "most this percent's sigma.",
                ),
                io.Float.Input(
                    "end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                    tooltip="Where CSA ends. 'steps': CSA stops before this fraction of each sampler run's steps (1 = "
                    "through the last step). 'sigma': a sigma percent as ControlNet's end_percent: CSA runs while the "
                    "step's sigma is at least this percent's sigma (1 = through the last step).",
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                    tooltip="Seeds which tokens are shared and the schedule's draws. Same seed and inputs, same images.",
                ),
                StoryType.Input(
                    "story", optional=True,
                    tooltip="Story Prompts' story output (the same node that feeds the sampler). Connected: panels "
                    "share by character (identity panels, [NC] reads nothing) and any number of panels runs in one "
                    "sampler. Not connected: every panel of the batch shares with the others.",
                ),
                io.Int.Input(
                    "identity_panels", optional=True, default=DEFAULT_IDENTITY_PANELS, min=1, max=MAX_IDENTITY_PANELS,
                    tooltip="With a story: the most of each character's first single-character panels that make its "
                    "identity (the official app's id_length; 2 by default). A character shown alone in fewer panels "
                    "uses all of them (logged when the node runs); one never shown alone is an error. Identity panels "
                    "share only with each other; every other panel of that character reads them.",
                ),
                io.Int.Input(
                    "panels_per_call", optional=True, default=0, min=0, max=4096,
                    tooltip="With a story: the most panels one model call holds. 0 = as many as fit in free memory "
                    "(ComfyUI's own estimate). When the story does not fit in one call, the positive and negative "
                    "halves run in separate calls, identity panels first, then the other panels this many at a "
                    "time, so memory stays flat however long the story is; the images are the same.",
                ),
                io.Combo.Input(
                    "key_positions", options=list(KEY_POSITIONS), default="shifted", optional=True,
                    tooltip="DiT only; ignored on a UNet. The shared keys carry their panel's RoPE positions: "
                    "'shifted' moves them one image width to the right (an exact re-rotation with the family's own "
                    "RoPE axes and theta), so they never sit on the reader's own positions; 'as is' keeps them. SD3 / "
                    "SD3.5 adds its positions to the tokens instead of rotating keys: no exact shift exists, use 'as is'.",
                ),
                io.Combo.Input(
                    "attention_kernel", options=list(KERNELS), default="fastest", optional=True,
                    tooltip="The attention kernel of the calls CSA extends (their keys are longer). 'fastest': where "
                    "ComfyUI runs PyTorch's SDPA on a CUDA GPU, CSA times ComfyUI's own call against SDPA with "
                    "cuDNN's kernel first, once per shape, and runs the faster (never slower than ComfyUI's; on "
                    "Hopper cuDNN is about twice as fast there). 'host': always ComfyUI's own choice. Calls CSA does "
                    "not extend always keep ComfyUI's kernel. On a CPU, or another attention backend, both are the same.",
                ),
                io.Combo.Input(
                    "percent_of", options=list(PERCENT_OF), default="steps", optional=True,
                    tooltip="What start_percent, end_percent and the official schedule's 10% warm-up and 40% switch "
                    "count. 'steps' (default, as before): fractions of each sampler run's steps, so a second sampler "
                    "pass (refiner, hires fix, KSamplerAdvanced from a later step) starts the warm-up over. 'sigma': "
                    "sigma percents, as ControlNet and conditioning timestep ranges in ComfyUI (the model's "
                    "percent_to_sigma): each step's noise level decides, so passes over one schedule behave as one pass.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The patched clone of the model.")],
        )

    @classmethod
    def validate_inputs(cls, blocks=None, custom_blocks=None):
        """Before anything loads, so that the editor shows the message on this node: the block
        list (inputs named here skip ComfyUI's own list check, hence blocks is checked too; a
        linked input arrives as None and is checked when the node runs)."""
        try:
            if blocks is not None and blocks not in BLOCK_OPTIONS:
                raise ConsistentAttentionError(f"blocks must be one of {BLOCK_OPTIONS}, got {blocks!r}.")
            if blocks == "custom" and custom_blocks is not None:
                parse_block_list(custom_blocks)
        except ConsistentAttentionError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, model, rate_fine, rate_coarse, window, blocks, custom_blocks, schedule,
                start_percent, end_percent, seed, story=None, identity_panels=DEFAULT_IDENTITY_PANELS,
                panels_per_call=0, key_positions="shifted", attention_kernel="fastest",
                percent_of="steps") -> io.NodeOutput:
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
            percent_of=percent_of,
        )
        cast = story_cast(story, window, identity_panels, panels_per_call)
        family = dit_family(model)
        if family is not None:  # one resolution: rate_fine is the rate (rate_coarse is ignored, as the tooltip says)
            config = replace(config, rate_coarse=config.rate_fine)
        elif blocks.endswith("-stream"):
            raise ConsistentAttentionError(
                f"blocks '{blocks}' names DiT blocks but this model is a UNet: pick 'output', 'all' or 'custom'."
            )
        if not config.enabled:
            return io.NodeOutput(model)
        if config.blocks == "custom":
            check_custom_blocks(config.custom_blocks, attention_blocks(model, family))
        patched = model.clone()
        references = story.references if story is not None else ()
        if family is not None:
            DiTAttentionPatch(family, config, cast, panels_per_call, references, key_positions,
                              attention_kernel).install(patched)
        else:
            ConsistentAttentionPatch(config, cast, panels_per_call, references, attention_kernel).install(patched)
        return io.NodeOutput(patched)


def attention_blocks(model, family) -> set[tuple[str, int]]:
    """The blocks of this model that hold a self-attention CSA can extend, in ComfyUI's naming."""
    diffusion_model = model.get_model_object("diffusion_model")
    if family is not None:
        return {(blocks.kind, index) for blocks, index in family.joint_blocks(diffusion_model)}
    found = set()
    for kind, blocks in (("input", diffusion_model.input_blocks), ("middle", [diffusion_model.middle_block]),
                         ("output", diffusion_model.output_blocks)):
        for index, block in enumerate(blocks):
            if any(type(module).__name__ == "BasicTransformerBlock" for module in block.modules()):
                found.add((kind, index))
    return found


def check_custom_blocks(chosen: frozenset, available: set[tuple[str, int]]) -> None:
    """A custom block list that reaches no self-attention layer would do nothing: name what there is."""
    if chosen & available:
        return
    by_kind: dict[str, list[int]] = {}
    for kind, index in sorted(available):
        by_kind.setdefault(kind, []).append(index)
    listed = ", ".join(f"{kind} {', '.join(map(str, indices))}" for kind, indices in by_kind.items())
    raise ConsistentAttentionError(
        f"custom_blocks names no block of this model that has self-attention, so it would change nothing. "
        f"This model's blocks with self-attention: {listed}."
    )


def story_cast(story, window: int, identity_panels: int, panels_per_call: int):
    """The story's cast, or None without a story; options that would do nothing are refused."""
    if story is None:
        unused = [f"{name} = {value}" for name, value, default in (
            ("identity_panels", identity_panels, DEFAULT_IDENTITY_PANELS), ("panels_per_call", panels_per_call, 0),
        ) if value != default]
        if unused:
            raise ConsistentAttentionError(
                f"{' and '.join(unused)} only apply with a story: connect Story Prompts' story output to this node, "
                f"or set {' and '.join(u.split(' =')[0] for u in unused)} back to the default."
            )
        return None
    if window:
        raise ConsistentAttentionError(
            f"window = {window} applies only without a story: with one, each panel reads the identity panels of "
            "its characters. Set window to 0, or disconnect the story to share across the whole batch."
        )
    drawn_for = getattr(story, "identity_count", None)
    if drawn_for is not None and drawn_for != identity_panels and (story.partial or drawn_for != DEFAULT_IDENTITY_PANELS):
        raise ConsistentAttentionError(
            f"Story Prompts' identity_panels is {drawn_for} but this node's is {identity_panels}: a story drawn in "
            "part (Story Prompts' panels) draws the identity panels this node reads. Set both to the same value."
        )
    cast = story.cast(identity_panels)
    fewer = [f"[{name}] {len(ids)} identity panel{'s' * (len(ids) > 1)} of {identity_panels}"
             for name, ids, references in zip(cast.names, cast.identity, cast.references)
             if not references and len(ids) < identity_panels]
    if fewer:
        logging.info("Consistent Self-Attention: %s (a character alone in fewer panels than identity_panels uses "
                     "those it has).", ", ".join(fewer))
    return cast


NODES = [ConsistentSelfAttention]
