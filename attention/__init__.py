"""The Consistent Self-Attention engine: plain torch, no host imports.

Hosts (the ComfyUI patch in ``nodes/``, a diffusers processor) decide *where* CSA runs; this
package decides *what* each row attends to.
"""
from .config import ConsistentAttentionError, CSAConfig, parse_block_list
from .layers import downsample_factor
from .planner import CallPlanner, layer_seed
from .schedule import Step, layer_active, locate_step, mix_seed, step_in_range
from .tokens import GatherPlan, append_reference, neighbour_table, plan_gather, sampled_count

__all__ = [
    "CallPlanner",
    "layer_seed",
    "CSAConfig",
    "ConsistentAttentionError",
    "GatherPlan",
    "Step",
    "append_reference",
    "downsample_factor",
    "layer_active",
    "locate_step",
    "mix_seed",
    "neighbour_table",
    "parse_block_list",
    "plan_gather",
    "sampled_count",
    "step_in_range",
]
