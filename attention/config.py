"""Options of Consistent Self-Attention, shared by every host (ComfyUI, diffusers)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

UNET_BLOCK_KINDS = ("input", "middle", "output")
DIT_BLOCK_KINDS = ("double", "single")  # Flux's double-stream and single-stream blocks
BLOCK_KINDS = UNET_BLOCK_KINDS + DIT_BLOCK_KINDS
BLOCK_PRESETS = {
    "output": frozenset({"output"}),  # the official app: decoder (up) blocks only
    "all": frozenset(BLOCK_KINDS),
    "single-stream": frozenset({"single"}),  # CharaConsist (ICCV 2025): a DiT's single-stream blocks
    "double-stream": frozenset({"double"}),
}
SCHEDULES = ("official", "always")
PERCENT_OF = ("steps", "sigma")  # what start / end (and the official warm-up and switch) are percents of

# The official app's stochastic schedule (HVision-NKU/StoryDiffusion, gradio_app_sdxl_specific_id):
# plain attention before step 5 of 50, then CSA on each layer with probability 0.7 before
# step 20 of 50 and 0.9 after. Expressed here as fractions of the sampling steps.
OFFICIAL_WARMUP = 0.1
OFFICIAL_SWITCH = 0.4
OFFICIAL_PROBABILITIES = (0.7, 0.9)


class ConsistentAttentionError(ValueError):
    """Bad options or a batch the method cannot serve; the message says what to change."""

    # ComfyUI reports an error's type as module + name, ahead of its message; the module ComfyUI
    # imports the pack under is its folder's path, which reads as a file path.
    __module__ = "consistent_story"


def parse_block_list(text: str) -> frozenset[tuple[str, int]]:
    """Parse a custom block list such as ``"output 0-2, middle 0, input 7"`` (a UNet) or
    ``"single 0-37, double 18"`` (a DiT).

    Returns a set of ``(kind, index)`` pairs, ComfyUI's ``block`` naming.
    """
    blocks: set[tuple[str, int]] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(rf"({'|'.join(BLOCK_KINDS)})\s+(\d+)(?:\s*-\s*(\d+))?", item.lower())
        if match is None:
            raise ConsistentAttentionError(
                f"custom_blocks: cannot read {item!r}; write entries like 'output 0-2, middle 0, input 7' "
                "(SD1.5/SDXL) or 'single 0-37, double 18' (Flux)."
            )
        kind, first = match.group(1), int(match.group(2))
        last = int(match.group(3) or first)
        if last < first:
            raise ConsistentAttentionError(f"custom_blocks: range {item!r} runs backwards; write it as low-high.")
        blocks.update((kind, index) for index in range(first, last + 1))
    if not blocks:
        raise ConsistentAttentionError("custom_blocks is empty; list blocks like 'output 0-5', or pick a preset.")
    return frozenset(blocks)


@dataclass(frozen=True)
class CSAConfig:
    """What to patch and how much to share.

    rate_fine / rate_coarse: fraction of each other panel's tokens a panel attends to, in layers
      with at least a quarter of the latent's tokens (SDXL's 64x64 grid at 1024 px: the official
      ``sa64``) and in coarser layers (SDXL's 32x32: ``sa32``). 0 turns a class off; 1 shares all.
    window: each panel samples from at most this many neighbouring panels (0 = all others), so the
      cost grows linearly with the number of panels (the paper's tiles).
    blocks: "output" (official), "all", or "custom" with ``custom_blocks`` pairs.
    schedule: "official" (plain warm-up, then stochastic per layer) or "always".
    start / end: the fraction of the sampling steps in which CSA may run, or with percent_of
      "sigma" sigma percents (the host converts them to sigmas, ComfyUI with percent_to_sigma).
    percent_of: "steps" (fractions of each sampler run's steps) or "sigma"; the official
      schedule's warm-up and switch count the same way.
    seed: seeds token sampling and the schedule's draws; same seed, same images.
    """

    rate_fine: float = 0.5
    rate_coarse: float = 0.5
    window: int = 0
    blocks: str = "output"
    custom_blocks: frozenset = field(default_factory=frozenset)
    schedule: str = "official"
    start: float = 0.0
    end: float = 1.0
    seed: int = 0
    percent_of: str = "steps"

    def __post_init__(self):
        for name in ("rate_fine", "rate_coarse", "start", "end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConsistentAttentionError(f"{name} must lie between 0 and 1, got {value}.")
        if self.window < 0:
            raise ConsistentAttentionError(f"window must be 0 (all panels) or positive, got {self.window}.")
        if self.percent_of not in PERCENT_OF:
            raise ConsistentAttentionError(f"percent_of must be one of {PERCENT_OF}, got {self.percent_of!r}.")
        if self.schedule not in SCHEDULES:
            raise ConsistentAttentionError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if self.blocks == "custom":
            if not self.custom_blocks:
                raise ConsistentAttentionError("blocks is 'custom' but custom_blocks lists none.")
        elif self.blocks not in BLOCK_PRESETS:
            raise ConsistentAttentionError(f"blocks must be one of {(*BLOCK_PRESETS, 'custom')}, got {self.blocks!r}.")

    @property
    def enabled(self) -> bool:
        """False when no layer can ever change: then hosts install nothing at all."""
        return (self.rate_fine > 0 or self.rate_coarse > 0) and self.start < self.end

    def patches_block(self, kind: str, index: int) -> bool:
        if self.blocks == "custom":
            return (kind, index) in self.custom_blocks
        return kind in BLOCK_PRESETS[self.blocks]

    def rate_for(self, downsample: int) -> float:
        """Sampling rate of a layer ``downsample`` times coarser than the latent (1, 2, 4, 8 ...)."""
        return self.rate_fine if downsample <= 2 else self.rate_coarse
