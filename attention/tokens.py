"""Which tokens each panel attends to, and the gather that builds its extended keys/values.

A chunk of rows holds ``panels`` images (one CFG half, or one conditioning entry). Every panel
keeps all its own tokens and adds ``count`` tokens sampled from each of its ``neighbours``
other panels. All rows thus get the same key length, so the attention backend needs no mask
and keeps its fused kernels, and one ``index_select`` per tensor builds every row at once: no
dense (panels x tokens)^2 mask, no Python loop over panels.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class GatherPlan:
    """Row-gather indices over ``rows`` rows of ``tokens`` tokens, flattened (rows * tokens)."""

    index: torch.Tensor  # [rows * (tokens + extra)] long, on the tensors' device
    rows: int
    tokens: int
    extra: int

    def extend(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows, tokens, C]`` -> ``[rows, tokens + extra, C]``: own tokens first, then sampled ones."""
        if x.shape[0] != self.rows or x.shape[1] != self.tokens:
            raise ValueError(f"plan is for [{self.rows}, {self.tokens}, C], got {list(x.shape)}")
        flat = x.reshape(self.rows * self.tokens, x.shape[-1])
        return flat.index_select(0, self.index).view(self.rows, self.tokens + self.extra, x.shape[-1])


def plan_gather(
    chunks: int,
    panels: int,
    tokens: int,
    rate: float,
    window: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> GatherPlan | None:
    """The gather for ``chunks`` chunks of ``panels`` rows each (row ``r`` is panel ``r % panels``
    of chunk ``r // panels``). Rows mix only within their chunk. Every chunk uses the same sampled
    positions, drawn from ``seed`` on ``device``. None when there is nothing to add."""
    count = sampled_count(tokens, rate)
    neighbours = neighbour_table(panels, window, device)
    if count == 0 or neighbours.shape[1] == 0:
        return None
    panel_start = torch.arange(panels, device=device).mul_(tokens)  # [P]
    if count == tokens:
        positions = torch.arange(tokens, device=device).expand(panels, tokens)
    else:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        scores = torch.rand(panels, tokens, generator=generator, device=device)
        positions = scores.topk(count, dim=1, sorted=False).indices.sort(dim=1).values  # [P, count]
    sampled = positions + panel_start[:, None]  # [P, count], chunk-local flat token ids
    own = panel_start[:, None] + torch.arange(tokens, device=device)  # [P, L]
    extra = sampled[neighbours].reshape(panels, -1)  # [P, m * count]
    per_chunk = torch.cat([own, extra], dim=1)  # [P, L + E]
    chunk_start = torch.arange(chunks, device=device).mul_(panels * tokens)
    index = (per_chunk[None] + chunk_start[:, None, None]).reshape(-1)
    return GatherPlan(index=index, rows=chunks * panels, tokens=tokens, extra=extra.shape[1])


def append_reference(x: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    """Append reference tokens ``[R, C]`` (e.g. a stored identity bank) to every row of ``x``."""
    if reference is None or reference.shape[0] == 0:
        return x
    reference = reference.to(device=x.device, dtype=x.dtype)
    return torch.cat([x, reference.expand(x.shape[0], *reference.shape)], dim=1)
