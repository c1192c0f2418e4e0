"""How a self-attention call lays out its tokens, and which of them other panels may read.

A UNet's attn1 calls attention on ``[rows, tokens, C]``: every token is an image token. A DiT
calls joint attention on ``[rows, heads, tokens, D]`` (or ``[rows, tokens, C]``) over text and
image tokens, and some families append tokens that are not the panel's picture (Kontext's
reference latents). Only the panel's own image tokens are shared (another panel's text or
reference tokens never are). Where they sit is taken from each call: the text length is the
call's token count less the image and trailing tokens, so a reference row whose prompt is
encoded apart from the panels' finds its image tokens all the same. Keys already rotated by
RoPE may be moved to other positions first (``key_shift``). ``TokenLayout`` gathers the sampled
tokens of the rows that are read and appends them to the readers' own tokens, and extends an
attention mask to match, for either layout, so ``StoryCall`` serves both.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .config import ConsistentAttentionError


@dataclass(frozen=True)
class TokenLayout:
    """token_dim: 1 for ``[rows, tokens, C]``, 2 for ``[rows, heads, tokens, D]``, None: from the
      tensors' rank (a family whose host version decides, as Qwen-Image's).
    image: the panel's own image tokens in each call, after its text; None = every token is one.
    trailing: tokens after the image that are not the panel's picture (reference latents).
    key_shift: applied to the shared keys once taken (a RoPE re-rotation), or None."""

    token_dim: int | None = 1
    image: int | None = None
    trailing: int = 0
    key_shift: Callable[[torch.Tensor], torch.Tensor] | None = None

    def for_rank(self, rank: int) -> "TokenLayout":
        """This layout with its token dimension fixed for tensors of ``rank`` dimensions."""
        if self.token_dim is not None:
            return self
        return replace(self, token_dim=1 if rank == 3 else 2)

    def shared_tokens(self, tokens: int) -> tuple[int, int]:
        """``(first, count)`` of the shareable tokens of a call with ``tokens`` tokens: the text
        before them is what the call holds beyond the image and trailing tokens."""
        if self.image is None:
            return 0, tokens
        text = tokens - self.image - self.trailing
        if text < 0:
            raise ConsistentAttentionError(
                f"Consistent Self-Attention expected {self.image} image tokens per panel"
                f"{f' and {self.trailing} reference tokens' if self.trailing else ''}, but an attention call holds "
                f"only {tokens} tokens. The model lays out its tokens in a way this version does not know: please "
                "report the model, and remove Consistent Self-Attention for it meanwhile."
            )
        return text, self.image

    def take(self, t: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Tokens ``positions[i]`` (``[W, count]``, absolute) of rows ``rows[i]``, token-major:
        ``[W, count, C]`` or ``[W, count, heads, D]``. One ``index_select`` over the tokens: a DiT's
        ``[rows, heads, tokens, D]`` is a view of a token-major projection, so seen token-major it
        needs no copy, and gathering whole tokens is many times cheaper than indexing per head."""
        tokens = t.shape[self.token_dim]
        flat = (rows * tokens)[:, None] + positions
        if self.token_dim == 1:
            token_major = t.reshape(-1, t.shape[-1])
        else:
            token_major = t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[-1])
        taken = token_major.index_select(0, flat.reshape(-1))
        return taken.view(*positions.shape, *taken.shape[1:])

    def extend(self, own: torch.Tensor, stored: torch.Tensor, bank_rows: torch.Tensor) -> torch.Tensor:
        """``own`` tokens followed by the banked tokens (token-major, ``[slots, count, ...]``) of each
        row's sources (``bank_rows`` ``[G, n]``): one gather, one concatenation."""
        rows, sources = bank_rows.shape
        extra = stored.index_select(0, bank_rows.reshape(-1))
        extra = extra.view(rows, sources * stored.shape[1], *stored.shape[2:])
        if self.token_dim == 2:
            extra = extra.transpose(1, 2)  # [G, heads, n * count, D], a view
        return torch.cat([own, extra], dim=self.token_dim)


def extend_mask(mask: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """An attention mask (or bias) ``[rows | 1, (heads,) queries, keys]`` for keys extended by shared
    tokens: each shared key gets the reader's own mask column at the same image position
    (``columns`` ``[rows, extra]``), so a query treats another panel's token at position p as it
    treats its own token at p (Redux's text bias, for one, leaves image columns alone)."""
    rows = columns.shape[0]
    if mask.shape[0] == 1 and rows > 1:
        mask = mask.expand(rows, *mask.shape[1:])
    index = columns.view(rows, *([1] * (mask.ndim - 2)), -1).expand(*mask.shape[:-1], columns.shape[1])
    return torch.cat([mask, mask.gather(-1, index)], dim=-1)


def rope_shift(axes_dim: tuple[int, ...], theta: float, axis: int, delta: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that moves RoPE-rotated keys ``[..., D]`` by ``delta`` positions along ``axis``.

    RoPE rotates each pair of head dimensions by ``position * omega``; rotations add, so a key
    rotated at position ``p`` is rotated at ``p + delta`` by one more rotation of ``delta * omega``.
    Dimensions follow Flux's ``EmbedND`` layout: the pairs of axis 0, then axis 1, ... each axis
    ``axes_dim[i]`` dimensions wide, frequencies ``theta ** -(2j / axes_dim[i])``; the last
    dimension may hold several heads of ``sum(axes_dim)`` each (``[rows, tokens, heads * D]``).
    """
    first = sum(axes_dim[:axis]) // 2
    width = axes_dim[axis]
    head = sum(axes_dim)
    angle = delta * theta ** -(torch.arange(0, width, 2, dtype=torch.float64) / width)
    cos_sin = torch.stack([angle.cos(), angle.sin()]).float()
    on_device: dict = {}  # device -> cos_sin there: copied once, not once per layer (a blocking copy stalls the GPU queue)

    def rotation(device) -> torch.Tensor:
        if device not in on_device:
            on_device[device] = cos_sin.to(device, non_blocking=True)
        return on_device[device]

    def shift(keys: torch.Tensor) -> torch.Tensor:
        c, s = rotation(keys.device)  # [width / 2] each
        pairs = keys.unflatten(-1, (-1, head // 2, 2))
        x0, x1 = pairs[..., first:first + width // 2, :].float().unbind(-1)
        rotated = torch.stack([c * x0 - s * x1, s * x0 + c * x1], dim=-1).to(keys.dtype)
        return torch.cat([pairs[..., :first, :], rotated, pairs[..., first + width // 2:, :]], dim=-2).flatten(-3)

    return shift


@dataclass(frozen=True)
class RoPE:
    """A DiT's rotary position embedding in Flux's ``EmbedND`` layout: ``axes_dim`` head
    dimensions per position axis, frequencies from ``theta``; ``width_axis`` is the axis of an
    image token's column."""

    axes_dim: tuple[int, ...]
    theta: float
    width_axis: int


def patch_grid(height: int, width: int, patch: int) -> tuple[int, int]:
    """Token rows and columns of a ``height`` x ``width`` latent cut into ``patch`` x ``patch``
    patches, padded up to whole patches (ComfyUI's ``pad_to_patch_size``)."""
    return -(-height // patch), -(-width // patch)


def dit_layout(latent_hw: tuple[int, int], patch: int, references=(), rope: RoPE | None = None,
               token_dim: int | None = 2, padding: int = 1) -> TokenLayout:
    """The tokens of a DiT call ``[text, image, references]`` on a latent of ``latent_hw``:
    the image grid from the model's patch size, padding tokens up to a multiple of ``padding``
    and the reference latents' tokens (``references``: their ``(height, width)``) after it, never
    shared; with ``rope``, shared keys move one image width along its width axis."""
    rows, columns = patch_grid(*latent_hw, patch)
    trailing = -(rows * columns) % padding
    trailing += sum(r * c for r, c in (patch_grid(h, w, patch) for h, w in references))
    shift = None if rope is None else rope_shift(rope.axes_dim, rope.theta, rope.width_axis, columns)
    return TokenLayout(token_dim=token_dim, image=rows * columns, trailing=trailing, key_shift=shift)
