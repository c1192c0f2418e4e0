"""Which panels each panel reads in batch mode, and how many tokens it takes from each.

A chunk of rows holds ``panels`` images (one CFG half, or one conditioning entry). Every panel
keeps all its own tokens and adds ``count`` tokens sampled from each of its ``neighbours``
other panels, so all rows get the same key length: the attention backend needs no mask and
keeps its fused kernels (``StoryCall`` builds the rows, ``BatchCast`` holds these neighbours).
"""
from __future__ import annotations

import torch


def neighbour_table(panels: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[panels, m]`` indices of the other panels each panel samples from.

    ``m = min(window, panels - 1)`` (``window`` 0 means all others). Each panel takes the
    contiguous run of ``m + 1`` panels around it (shifted inwards at the ends), minus itself,
    so every panel has exactly ``m`` neighbours and the cost is linear in ``panels``. Built
    with device ops only: a host-to-device copy here would stall the GPU queue on every layer.
    """
    others = panels - 1 if window <= 0 else min(window, panels - 1)
    panel = torch.arange(panels, device=device)[:, None]
    start = (panel - others // 2).clamp(0, panels - (others + 1))
    candidate = start + torch.arange(others, device=device)[None]
    return candidate + (candidate >= panel).long()


def sampled_count(tokens: int, rate: float) -> int:
    """Tokens taken from each neighbour: ``rate`` of a panel's tokens, at least one if rate > 0."""
    if rate <= 0:
        return 0
    return min(tokens, max(1, round(rate * tokens)))
