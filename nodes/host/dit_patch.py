"""Consistent Self-Attention on a DiT (the families of ``dit_families.py``).

A DiT has no attn1: each joint block runs one attention over text and image tokens, through
ComfyUI's ``optimized_attention`` with ``[rows, heads, tokens, dim]`` tensors (RoPE applied) and
the call's ``transformer_options``. So:
- a ``patches_replace["dit"]`` entry on every joint block (chained to one already there) names
  the block about to run in the call's state, then runs the block;
- the same APPLY_MODEL wrapper and attention override as the UNet patch then extend each row's
  keys and values with sampled IMAGE tokens of the panels it reads (never their text or
  reference tokens), where the family's ``call_layout`` says they are, already rotated by RoPE;
  "shifted" key positions move them one image width along the columns (AlignedGen reports that
  shared keys at the reader's own positions degrade results).
Batch and story mode are the UNet patch's (one engine); only the marking and the token layout differ.
"""
from __future__ import annotations

from ...attention import ConsistentAttentionError
from .csa_call import STATE_KEY, CallRunner
from .csa_patch import ConsistentAttentionPatch
from .dit_families import DiTFamily

KEY_POSITIONS = ("shifted", "as is")


class DiTAttentionPatch(ConsistentAttentionPatch):
    def __init__(self, family: DiTFamily, config, cast=None, panels_per_call: int = 0, references=(),
                 key_positions: str = "shifted", attention_kernel: str = "fastest"):
        if key_positions not in KEY_POSITIONS:
            raise ConsistentAttentionError(f"key_positions must be one of {KEY_POSITIONS}, got {key_positions!r}.")
        super().__init__(config, cast, panels_per_call, references, attention_kernel)
        self.family = family
        self.key_positions = key_positions
        self.geometry = None  # (patch size, RoPE, image padding) of the model, read by install
        self.chosen = frozenset()  # the model's blocks CSA runs in, (kind, index), set by install

    def install(self, model) -> None:
        diffusion_model = model.get_model_object("diffusion_model")
        double_blocks = getattr(diffusion_model, "double_blocks", ())
        if any(getattr(block, "flipped_img_txt", False) for block in double_blocks):
            raise ConsistentAttentionError(
                f"{type(diffusion_model).__name__} puts image tokens before text tokens in its double blocks; "
                "Consistent Self-Attention does not support that layout yet."
            )
        self.config = self.family.resolve_blocks(self.config, diffusion_model)  # 'output': the family's default
        self.geometry = self.family.geometry(diffusion_model) + (self.family.padding(diffusion_model),)
        if self.key_positions == "shifted" and self.geometry[1] is None:
            raise ConsistentAttentionError(
                f"{self.family.name} has no rotary position embedding (its positions are added to the image tokens "
                "before the first block), so the shared keys cannot be moved: set key_positions to 'as is'."
            )
        self.chosen = frozenset(layer for layer in self.family.running_blocks(diffusion_model)
                                if self.config.patches_block(*layer))
        if not self.chosen:
            kinds = sorted({blocks.kind for blocks in self.family.blocks})
            raise ConsistentAttentionError(
                f"blocks '{self.config.blocks}' chooses no block of this {self.family.name} model, so CSA would change "
                f"nothing. Its joint blocks are of kind {' and '.join(kinds)}: pick 'output' (the family's default), "
                "'all', or list them in custom_blocks."
            )
        super().install(model)

    def mark_layers(self, model) -> None:
        """Every joint block names itself before its attention."""
        diffusion_model = model.get_model_object("diffusion_model")
        replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        if self.family.named_by_host:
            return  # the host names each block in transformer_options (see attention)
        for blocks, index in self.family.joint_blocks(diffusion_model):
            marker = BlockMarker((blocks.kind, index), replaced.get((blocks.replace_name, index)))
            model.set_model_patch_replace(marker, "dit", blocks.replace_name, index)

    def make_runner(self) -> "DiTCallRunner":
        return DiTCallRunner(self.config, self.cast, self.kernels, self.family, self.geometry, self.key_positions,
                             self.chosen)


class DiTCallRunner(CallRunner):
    """Runs a DiT's calls through CSA: the family's token layout, its blocks all reached."""

    def __init__(self, config, cast, kernels, family: DiTFamily, geometry, key_positions: str, chosen: frozenset):
        super().__init__(config, cast, kernels)
        self.family = family
        self.geometry = geometry
        self.key_positions = key_positions
        self.chosen = chosen

    def check_reached(self, state) -> None:
        missing = self.chosen - state.reached
        if missing:
            names = ", ".join(f"{kind} {index}" for kind, index in sorted(missing))
            raise ConsistentAttentionError(
                f"Consistent Self-Attention marks each {self.family.name} block it runs in, but blocks {names} never "
                "named themselves in this model call: a node after Consistent Self-Attention replaced them "
                "(patches_replace). Put Consistent Self-Attention after that node, or leave those blocks out."
            )

    def layout(self, x, kwargs: dict):
        patch_size, rope, padding = self.geometry
        return self.family.call_layout(patch_size, rope if self.key_positions == "shifted" else None, x, kwargs, padding)

    def attention(self, func, q, k, v, heads, *args, **kwargs):
        """A family whose blocks the host names (``block_index``): the block comes from the call's
        options; calls without one (Z-Image's refiners) run plain."""
        if self.family.named_by_host:
            options = kwargs.get("transformer_options") or {}
            state, index = options.get(STATE_KEY), options.get("block_index")
            if state is not None and index is not None and state.pending is None:
                state.expect(((self.family.blocks[0].kind, index), 0), None)
        return super().attention(func, q, k, v, heads, *args, **kwargs)


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
            state.expect((self.layer, 0), None)  # one resolution: no latent size needed
        if self.chained is not None:
            return self.chained(args, extra)
        return extra["original_block"](args)
