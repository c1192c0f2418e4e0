"""The Consistent Self-Attention engine: plain torch, no host imports.

Hosts (the ComfyUI patch in ``nodes/host/``, the diffusers processor in ``diffusers_host/``, which
this package never imports) decide *where* CSA runs; this
package decides *what* each row attends to: every panel of a batch the others (``tokens``), or,
in a story, each panel the identity panels of its characters (``cast``, ``story_attention``),
a few panels at a time if need be (``rows``).
"""
from .cast import MAX_IDENTITY_PANELS, BatchCast, StoryCast
from .config import OFFICIAL_SWITCH, OFFICIAL_WARMUP, PERCENT_OF, ConsistentAttentionError, CSAConfig, parse_block_list
from .kernels import KERNELS, KernelChoice
from .layers import downsample_factor
from .planner import CallPlanner, layer_seed, panels_per_chunk
from .rows import index_tensor, move_to, take_rows
from .schedule import SigmaMarks, Step, layer_active, locate_step, mix_seed, step_in_range
from .story_attention import StoryCall
from .token_layout import RoPE, TokenLayout, dit_layout, extend_mask, patch_grid, rope_shift
from .tokens import neighbour_table, sampled_count

__all__ = [
    "BatchCast",
    "CallPlanner",
    "CSAConfig",
    "ConsistentAttentionError",
    "KERNELS",
    "KernelChoice",
    "MAX_IDENTITY_PANELS",
    "OFFICIAL_SWITCH",
    "OFFICIAL_WARMUP",
    "PERCENT_OF",
    "SigmaMarks",
    "Step",
    "StoryCall",
    "StoryCast",
    "RoPE",
    "TokenLayout",
    "index_tensor",
    "dit_layout",
    "downsample_factor",
    "extend_mask",
    "layer_active",
    "layer_seed",
    "locate_step",
    "mix_seed",
    "move_to",
    "neighbour_table",
    "panels_per_chunk",
    "parse_block_list",
    "patch_grid",
    "rope_shift",
    "sampled_count",
    "step_in_range",
    "take_rows",
]
