"""Consistent Self-Attention on a Flux-family DiT (ComfyUI's ``comfy.ldm.flux.model.Flux``).

Flux has no attn1: each double-stream and single-stream block runs one joint attention over
``[text, image]`` tokens, through ``flux.math.attention``, which applies RoPE and then calls
ComfyUI's ``optimized_attention`` with ``[rows, heads, tokens, dim]`` tensors and the call's
``transformer_options``. So:
- a ``patches_replace["dit"]`` entry on every block (chained to one already there) names the
  block about to run in the call's state, then runs the block;
- the same APPLY_MODEL wrapper and attention override as the UNet patch then extend each row's
  keys and values with sampled IMAGE tokens of the panels it reads (never their text tokens),
  already rotated by RoPE; "shifted" key positions move them one image width to the right
  (AlignedGen reports that shared keys at the reader's own positions degrade results).
Without a story every panel reads its neighbours (``BatchCast``); with one, the characters rule.
"""
from __future__ import annotations

from dataclasses import replace

from ..attention import (
    DIT_DEFAULT_PRESET, BatchCast, CallPlanner, ConsistentAttentionError, StoryCall, TokenLayout, rope_shift,
)
from .csa_patch import STATE_KEY, ConsistentAttentionPatch, current_step
from .story_calls import run_story_call

KEY_POSITIONS = ("shifted", "as is")
WIDTH_AXIS = 2  # Flux's position ids: (index, row, column)


def is_flux(diffusion_model) -> bool:
    return all(hasattr(diffusion_model, name) for name in ("double_blocks", "single_blocks", "pe_embedder", "params"))


class DiTAttentionPatch(ConsistentAttentionPatch):
    def __init__(self, config, cast=None, panels_per_call: int = 0, references=(), key_positions: str = "shifted"):
        if key_positions not in KEY_POSITIONS:
            raise ConsistentAttentionError(f"key_positions must be one of {KEY_POSITIONS}, got {key_positions!r}.")
        if config.blocks == "output":  # the UNet default means the DiT default here (see the node's tooltip)
            config = replace(config, blocks=DIT_DEFAULT_PRESET)
        super().__init__(config, cast, panels_per_call, references)
        self.key_positions = key_positions
        self.rope = None  # (axes_dim, theta) of the model, set by install

    def install(self, model) -> None:
        diffusion_model = model.get_model_object("diffusion_model")
        self.rope = (tuple(diffusion_model.params.axes_dim), diffusion_model.params.theta)
        if any(getattr(block, "flipped_img_txt", False) for block in diffusion_model.double_blocks):
            raise ConsistentAttentionError(
                f"{type(diffusion_model).__name__} puts image tokens before text tokens in its double blocks; "
                "Consistent Self-Attention does not support that layout yet."
            )
        super().install(model)

    def mark_layers(self, model) -> None:
        """Every double- and single-stream block names itself before its joint attention."""
        diffusion_model = model.get_model_object("diffusion_model")
        replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        blocks = [("double_block", len(diffusion_model.double_blocks)), ("single_block", len(diffusion_model.single_blocks))]
        for name, count in blocks:
            for index in range(count):
                marker = BlockMarker((name.split("_")[0], index), replaced.get((name, index)))
                model.set_model_patch_replace(marker, "dit", name, index)

    def wrap_apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        options = dict(transformer_options)
        planner = CallPlanner(self.config, current_step(options))
        if self.cast is not None:
            return run_story_call(self, planner, executor, x, t, c_concat, c_crossattn, control, options, **kwargs)
        chunks = len(options.get("cond_or_uncond") or [0])
        panels = x.shape[0] // chunks
        story = self.story_call(planner, chunks, 0, x, c_crossattn, keep_bank=False)
        self.prepare(options, planner, story, tuple(range(panels)))
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    def story_call(self, planner, chunks: int, first_chunk: int, x, c_crossattn, keep_bank: bool = True) -> StoryCall:
        height, width = x.shape[-2:]
        patch = 2  # Flux's 2x2 patches, padded up
        rows, columns = (height + patch // 2) // patch, (width + patch // 2) // patch
        text = c_crossattn.shape[1]
        shift = None
        if self.key_positions == "shifted":
            shift = rope_shift(*self.rope, WIDTH_AXIS, columns)
        layout = TokenLayout(token_dim=2, shared=(text, rows * columns), key_shift=shift)
        cast = self.cast if self.cast is not None else BatchCast.of(x.shape[0] // chunks, self.config.window)
        return StoryCall(planner, cast, chunks, first_chunk, layout, keep_bank)


class BlockMarker:
    """``patches_replace["dit"]`` entry: tells the call's state which block's attention comes next."""

    def __init__(self, layer: tuple[str, int], chained=None):
        self.layer = layer
        self.chained = chained

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args: dict, extra: dict):
        state = (args.get("transformer_options") or {}).get(STATE_KEY)
        if state is not None:
            state.pending = ((self.layer, 0), None)  # one resolution: no latent size needed
        if self.chained is not None:
            return self.chained(args, extra)
        return extra["original_block"](args)
