"""Per model call: which self-attention layers extend their keys, and with which gather.

One ``CallPlanner`` serves one UNet evaluation (one step). It draws one token sample per
resolution (as the official app draws one mask per step and resolution) and reuses that plan
for every layer of the resolution: building a plan per layer measured 3.4 ms of a 151 ms SDXL
step on an H100 (docs/performance.md). Hosts (ComfyUI patch, diffusers processor) only
translate their own layer naming into ``plan(...)`` arguments, so both decide identically.
"""
from __future__ import annotations

import torch

from .config import ConsistentAttentionError, CSAConfig
from .layers import downsample_factor
from .schedule import Step, layer_active, mix_seed
from .tokens import GatherPlan, plan_gather

BLOCK_KIND_IDS = {"input": 0, "middle": 1, "output": 2, "double": 4, "single": 5}


def layer_seed(block: tuple[str, int], block_index: int) -> int:
    """A layer's identity for the schedule's draws, in ComfyUI's block naming."""
    return mix_seed(BLOCK_KIND_IDS.get(block[0], 3), block[1], block_index)


class CallPlanner:
    def __init__(self, config: CSAConfig, step: Step):
        self.config = config
        self.step = step
        self._plans: dict[tuple, GatherPlan | None] = {}

    def rate(self, block: tuple[str, int], block_index: int, tokens: int, latent_hw: tuple[int, int] | None) -> float:
        """The sampling rate of this layer in this call; 0 where it runs plain attention
        (block not chosen, rate 0 for its resolution, or the schedule skips it at this step).
        ``latent_hw`` None: a model of one resolution (a DiT), whose layers take the fine rate."""
        if not self.config.patches_block(block[0], block[1]):
            return 0.0
        downsample = 1 if latent_hw is None else downsample_factor(latent_hw[0], latent_hw[1], tokens)
        rate = self.config.rate_for(downsample)
        if rate <= 0 or not layer_active(self.config, self.step, layer_seed(block, block_index)):
            return 0.0
        return rate

    def seed_for(self, tokens: int) -> int:
        """The token-sampling seed of one resolution in this call."""
        return mix_seed(self.config.seed, self.step.index, tokens)

    def plan(
        self,
        block: tuple[str, int],
        block_index: int,
        rows: int,
        chunks: int,
        tokens: int,
        latent_hw: tuple[int, int],
        device: torch.device,
    ) -> GatherPlan | None:
        """The gather for this layer, or None where it runs plain attention."""
        if not self.config.patches_block(block[0], block[1]):
            return None
        panels = panels_per_chunk(rows, chunks)
        rate = self.rate(block, block_index, tokens, latent_hw) if panels >= 2 else 0.0
        if rate <= 0:
            return None
        key = (chunks, panels, tokens, rate, device)
        if key not in self._plans:
            self._plans[key] = plan_gather(
                chunks, panels, tokens, rate, self.config.window, seed=self.seed_for(tokens), device=device,
            )
        return self._plans[key]


def panels_per_chunk(rows: int, chunks: int) -> int:
    """Panels in each conditioning chunk of a batch of ``rows`` rows."""
    if rows % chunks:
        raise ConsistentAttentionError(
            f"Consistent Self-Attention got {rows} rows for {chunks} conditioning chunks; something split "
            "the panel batch (context windows over the batch?). Remove that node or CSA."
        )
    return rows // chunks
