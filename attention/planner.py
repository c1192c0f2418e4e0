"""Per model call: which self-attention layers share tokens, at what rate, seeded how.

One ``CallPlanner`` serves one model evaluation (one step). ``StoryCall`` draws one token sample
per resolution from ``seed_for`` (as the official app draws one mask per step and resolution) and
reuses it for every layer of the resolution. Hosts (ComfyUI patch, diffusers processor) only
translate their own layer naming into ``rate(...)`` arguments, so both decide identically.
"""
from __future__ import annotations

from .config import ConsistentAttentionError, CSAConfig
from .layers import downsample_factor
from .schedule import Step, layer_active, mix_seed

BLOCK_KIND_IDS = {"input": 0, "middle": 1, "output": 2, "double": 4, "single": 5}


def layer_seed(block: tuple[str, int], block_index: int) -> int:
    """A layer's identity for the schedule's draws, in ComfyUI's block naming."""
    return mix_seed(BLOCK_KIND_IDS.get(block[0], 3), block[1], block_index)


class CallPlanner:
    def __init__(self, config: CSAConfig, step: Step):
        self.config = config
        self.step = step

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
        return mix_seed(self.config.seed, self.step.key, tokens)


def panels_per_chunk(rows: int, chunks: int) -> int:
    """Panels in each conditioning chunk of a batch of ``rows`` rows."""
    if rows % chunks:
        raise ConsistentAttentionError(
            f"Consistent Self-Attention got {rows} rows for {chunks} conditioning chunks; something split "
            "the panel batch (context windows over the batch?). Remove that node or CSA."
        )
    return rows // chunks
