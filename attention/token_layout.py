"""How a self-attention call lays out its tokens, and which of them other panels may read.

A UNet's attn1 calls attention on ``[rows, tokens, C]``: every token is an image token. A DiT
(Flux) calls joint attention on ``[rows, heads, tokens, D]`` over text and image tokens: only the
image tokens are shared (another panel's text never is), and since its keys are already rotated
by RoPE, shared keys may be moved to other positions first (``key_shift``). ``TokenLayout``
gathers the sampled tokens of the rows that are read and appends them to the readers' own tokens
for either layout, so ``StoryCall`` serves both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class TokenLayout:
    """token_dim: 1 for ``[rows, tokens, C]``, 2 for ``[rows, heads, tokens, D]``.
    shared: ``(first, count)`` of the tokens that may be read by other rows; None = all of them.
    key_shift: applied to the shared keys once taken (a RoPE re-rotation), or None."""

    token_dim: int = 1
    shared: tuple[int, int] | None = None
    key_shift: Callable[[torch.Tensor], torch.Tensor] | None = None

    def shared_tokens(self, tokens: int) -> tuple[int, int]:
        """``(first, count)`` of the shareable tokens of a call with ``tokens`` tokens."""
        if self.shared is None:
            return 0, tokens
        first, count = self.shared
        if first < 0 or first + count > tokens:
            raise ValueError(f"shared tokens {first}..{first + count} outside a call of {tokens} tokens")
        return first, count

    def take(self, t: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Tokens ``positions[i]`` (``[W, count]``, absolute) of rows ``rows[i]``:
        ``[W, count, C]`` or ``[W, heads, count, D]``."""
        if self.token_dim == 1:
            tokens = t.shape[1]
            flat = (rows * tokens)[:, None] + positions
            taken = t.reshape(-1, t.shape[-1]).index_select(0, flat.reshape(-1))
            return taken.view(positions.shape[0], positions.shape[1], t.shape[-1])
        return t[rows[:, None], :, positions].transpose(1, 2).contiguous()  # [W, count, H, D] -> [W, H, count, D]

    def extend(self, own: torch.Tensor, stored: torch.Tensor, bank_rows: torch.Tensor) -> torch.Tensor:
        """``own`` tokens followed by the banked tokens of each row's sources (``bank_rows`` ``[G, n]``)."""
        rows, sources = bank_rows.shape
        extra = stored.index_select(0, bank_rows.reshape(-1))
        if self.token_dim == 1:
            extra = extra.view(rows, -1, own.shape[-1])
        else:
            heads, count, dim = extra.shape[1:]
            extra = extra.view(rows, sources, heads, count, dim).transpose(1, 2).reshape(rows, heads, -1, dim)
        return torch.cat([own, extra], dim=self.token_dim)


def rope_shift(axes_dim: tuple[int, ...], theta: float, axis: int, delta: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that moves RoPE-rotated keys ``[..., D]`` by ``delta`` positions along ``axis``.

    RoPE rotates each pair of head dimensions by ``position * omega``; rotations add, so a key
    rotated at position ``p`` is rotated at ``p + delta`` by one more rotation of ``delta * omega``.
    Dimensions follow Flux's ``EmbedND`` layout: the pairs of axis 0, then axis 1, ... each axis
    ``axes_dim[i]`` dimensions wide, frequencies ``theta ** -(2j / axes_dim[i])``.
    """
    first = sum(axes_dim[:axis]) // 2
    width = axes_dim[axis]
    omega = theta ** -(torch.arange(0, width, 2, dtype=torch.float64) / width)
    angle = delta * omega
    cos, sin = angle.cos(), angle.sin()

    def shift(keys: torch.Tensor) -> torch.Tensor:
        pairs = keys.unflatten(-1, (-1, 2))
        x0, x1 = pairs[..., first:first + width // 2, 0], pairs[..., first:first + width // 2, 1]
        c, s = cos.to(keys.device, torch.float32), sin.to(keys.device, torch.float32)
        out = pairs.clone()
        out[..., first:first + width // 2, 0] = (c * x0.float() - s * x1.float()).to(keys.dtype)
        out[..., first:first + width // 2, 1] = (s * x0.float() + c * x1.float()).to(keys.dtype)
        return out.flatten(-2)

    return shift
