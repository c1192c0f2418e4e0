"""The DiT families Consistent Self-Attention knows, each recognised by its ComfyUI model config.

A family is chosen by the exact class of ``model.model.model_config`` (``comfy.supported_models``),
never by attribute names: Flux.2 and Chroma Radiance have Flux.1's attributes but not its
patches or positions, and would be silently wrong. Each ``DiTFamily`` says which blocks run a
joint attention and how ComfyUI names them in ``patches_replace["dit"]``, where CSA runs by
default, and how a model call lays out its tokens (``call_layout``: text from the call, the
panel's image grid from the model's own patch size, reference latents after it, the RoPE for
shifted keys). A family that is not listed is an error that names it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ...attention import ConsistentAttentionError, CSAConfig, RoPE, TokenLayout, dit_layout


@dataclass(frozen=True)
class JointBlocks:
    """Blocks with a joint attention: ComfyUI's ``patches_replace["dit"]`` name, the block kind
    in CSA's naming (``custom_blocks``, presets), and the diffusion model's attribute holding them."""

    replace_name: str
    kind: str
    attribute: str
    skipped: str | None = None  # the model's list of block indices it skips (Chroma's skip_mmdit, skip_dit)


FLUX_BLOCKS = (JointBlocks("double_block", "double", "double_blocks", "skip_mmdit"),
               JointBlocks("single_block", "single", "single_blocks", "skip_dit"))


QWEN_BLOCKS = (JointBlocks("double_block", "double", "transformer_blocks"),)
MMDIT_BLOCKS = (JointBlocks("double_block", "double", "joint_blocks"),)
# NextDiT (Z-Image) has no block replacement; its forward names each main layer in
# transformer_options["block_index"] (ComfyUI 0.8 and newer), which CSA reads instead.
NEXTDIT_LAYERS = (JointBlocks("", "double", "layers"),)
LATE_HALF = "late half"  # a default: the second half of the joint blocks (no preset names it)


@dataclass(frozen=True)
class DiTFamily:
    name: str
    configs: tuple[str, ...]  # the classes of comfy.supported_models it covers, exactly
    blocks: tuple[JointBlocks, ...]
    default_blocks: str  # what the preset 'output' stands for on this family: a preset, or LATE_HALF
    references: str | None = None  # the model input holding reference latents (Kontext), never shared
    token_dim: int | None = 2  # of q/k/v at the attention call; None: the host version decides (rank)
    named_by_host: bool = False  # blocks named by the host's transformer_options["block_index"], not marked
    rope_embedder: str | None = "pe_embedder"  # the diffusion model's EmbedND; None: positions added to the input
    pads_image: bool = False  # the image tokens are padded to a multiple of the model's pad_tokens_multiple

    def resolve_blocks(self, config: CSAConfig, diffusion_model) -> CSAConfig:
        """``config`` with the UNet default ('output') turned into this family's default."""
        if config.blocks != "output":
            return config
        if self.default_blocks != LATE_HALF:
            return replace(config, blocks=self.default_blocks)
        blocks = [(b.kind, index) for b, index in self.joint_blocks(diffusion_model)]
        return replace(config, blocks="custom", custom_blocks=frozenset(blocks[len(blocks) // 2:]))

    def joint_blocks(self, diffusion_model) -> list[tuple[JointBlocks, int]]:
        return [(blocks, index) for blocks in self.blocks for index in range(len(getattr(diffusion_model, blocks.attribute)))]

    def running_blocks(self, diffusion_model) -> set[tuple[str, int]]:
        """``(kind, index)`` of the joint blocks the model runs (not those it is told to skip)."""
        return {(blocks.kind, index) for blocks, index in self.joint_blocks(diffusion_model)
                if index not in (getattr(diffusion_model, blocks.skipped, None) or () if blocks.skipped else ())}

    def geometry(self, diffusion_model) -> tuple[int, RoPE | None]:
        """The model's patch size and RoPE. Every listed family embeds positions with Flux's
        ``EmbedND`` (index, row, column[, ...]), ``axes_dim`` dimensions each: the column is axis 2
        (Qwen-Image centres rows and columns; a shift by whole columns is exact all the same)."""
        if self.rope_embedder is None:
            return diffusion_model.patch_size, None
        embedder = getattr(diffusion_model, self.rope_embedder)
        return diffusion_model.patch_size, RoPE(tuple(embedder.axes_dim), float(embedder.theta), 2)

    def padding(self, diffusion_model) -> int:
        """The multiple the image tokens are padded to (1: none)."""
        return (getattr(diffusion_model, "pad_tokens_multiple", None) or 1) if self.pads_image else 1

    def call_layout(self, patch_size: int, rope: RoPE | None, x, kwargs: dict, padding: int = 1) -> TokenLayout:
        """The tokens of a model call on latents ``x`` with model inputs ``kwargs``; ``rope`` None
        keeps shared keys where they are; ``padding``: the image tokens are padded to its multiple."""
        if self.named_by_host and kwargs.get("ref_latents"):
            raise ConsistentAttentionError(
                f"{self.name} with reference images puts them before the panel's image; Consistent Self-Attention "
                "does not support that layout yet. Remove the reference images or this node."
            )
        references = [tuple(ref.shape[-2:]) for ref in (kwargs.get(self.references) or ())] if self.references else ()
        return dit_layout(tuple(x.shape[-2:]), patch_size, references, rope, self.token_dim, padding)


FAMILIES = (
    DiTFamily("Flux.1", ("Flux", "FluxSchnell", "FluxInpaint"), FLUX_BLOCKS, "single-stream", references="ref_latents"),
    DiTFamily("Flux.2", ("Flux2",), FLUX_BLOCKS, "single-stream", references="ref_latents"),
    DiTFamily("Chroma", ("Chroma",), FLUX_BLOCKS, "single-stream"),
    DiTFamily("Chroma Radiance", ("ChromaRadiance",), FLUX_BLOCKS, "single-stream"),
    # Qwen-Image and Qwen-Image-Edit: one config; its blocks are all double-stream. Its q/k/v are
    # [rows, tokens, heads * D] on ComfyUI 0.3.64 and [rows, heads, tokens, D] on newer hosts.
    DiTFamily("Qwen-Image", ("QwenImage",), QWEN_BLOCKS, LATE_HALF, references="ref_latents", token_dim=None),
    # SD3 / SD3.5: [context, image] in every joint block; learned absolute positions, no RoPE, so
    # shared keys cannot be moved ('as is' only); q and k are [rows, tokens, heads * D], v per head.
    DiTFamily("SD3 / SD3.5", ("SD3",), MMDIT_BLOCKS, LATE_HALF, token_dim=1, rope_embedder=None),
    # Z-Image (ComfyUI 0.8+): [caption + pads, image + pads] per main layer, blocks named by the host.
    DiTFamily("Z-Image", ("ZImage",), NEXTDIT_LAYERS, LATE_HALF, named_by_host=True, rope_embedder="rope_embedder",
              pads_image=True),
)

# Families people run that are known and not supported yet, and why (the error says so).
NOT_YET = {
    "Lumina2": "Lumina 2 (its blocks cannot be marked: ComfyUI has no block replacement for them)",
    "ZImagePixelSpace": "Z-Image pixel space",
    "HiDream": "HiDream (image tokens first, and its blocks cannot be marked)",
}


def dit_family(model) -> DiTFamily | None:
    """The family of ``model`` (a ModelPatcher) from its config class; None for a UNet model
    (it has ``input_blocks``); any other model is an error naming it."""
    config_class = type(model.model.model_config)
    config = config_class.__name__
    for family in FAMILIES:
        if config in family.configs and config_class.__module__ == "comfy.supported_models":
            return family
    diffusion_model = model.get_model_object("diffusion_model")
    if all(hasattr(diffusion_model, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        return None
    named = NOT_YET.get(config, config)
    supported = ", ".join(family.name for family in FAMILIES)
    raise ConsistentAttentionError(
        f"Consistent Self-Attention supports SD1.5- and SDXL-family UNets and these DiT families: {supported}; this "
        f"model is {named} (ComfyUI config {config}, {type(diffusion_model).__name__}), which it does not support "
        "yet. Remove the node for this model."
    )
