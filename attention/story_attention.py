"""Consistent Self-Attention over a story: identity tokens written and read within one model call.

One ``StoryCall`` serves one model evaluation (one step; every row of every conditioning chunk
of that call). The call may run as several sub-calls over panel subsets (``StoryCast.call_plan``):
identity panels first, then the others. In each self-attention layer where CSA runs:

- *write*: the rows of identity panels present in this sub-call leave the keys and values of
  their sampled tokens in the call's bank (``[chunks * slots, count, C]`` per layer; the same
  sampled positions for every reader, as the official app shares one mask per step);
- *read*: every row attends to its own tokens plus the banked tokens of its sources
  (``StoryCast.sources``), from its own conditioning chunk only (cond never reads uncond).

Rows reading the same number of identity panels share one attention call, so every call has a
single key length: no mask, the backend's fused kernels stay. The bank lives as long as the
model call, so memory does not grow with the story's length or the number of steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .cast import StoryCast
from .planner import CallPlanner
from .rows import index_tensor
from .token_layout import TokenLayout, extend_mask
from .tokens import sampled_count

# attend(q, k, v, rows, mask) -> output rows; ``rows`` names each row as (chunk, panel); ``mask``
# is the call's attention mask extended to the keys (None without one).
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class ReadGroup:
    """Rows of a sub-call that read the same number of identity panels."""

    rows: torch.Tensor  # [G] row indices in the sub-call
    bank_rows: torch.Tensor | None  # [G, n] rows of the bank each reads; None when n == 0
    names: tuple  # (chunk, panel) of each row
    everyone: bool  # the group is the whole sub-call, in order
    span: tuple[int, int] | None  # (first row, row count) when the rows are consecutive: views, no copies

    def take(self, t: torch.Tensor) -> torch.Tensor:
        if self.everyone:
            return t
        if self.span is not None:
            return t.narrow(0, *self.span)
        return t.index_select(0, self.rows)


@dataclass(frozen=True)
class SubCallRows:
    """How the rows of one sub-call write to and read from the bank."""

    write_rows: torch.Tensor  # [W] rows of identity panels
    write_slots: torch.Tensor  # [W] bank rows they fill
    groups: tuple[ReadGroup, ...]
    fills_bank: bool = False  # the writes are every bank row, in order (batch mode, a one-call story)


class StoryCall:
    """``chunks`` conditioning chunks of one model call; ``first_chunk`` is the index of the first
    of them in the model call (only for naming rows: a host running chunks apart gives each its own
    StoryCall, and so its own bank)."""

    def __init__(self, planner: CallPlanner, cast: StoryCast, chunks: int, first_chunk: int = 0,
                 layout: TokenLayout = TokenLayout(), keep_bank: bool = True):
        self.planner = planner
        self.cast = cast
        self.chunks = chunks
        self.first_chunk = first_chunk
        self.layout = layout
        self.keep_bank = keep_bank  # False: one sub-call writes and reads everything, so a layer's bank dies with it
        self.bank_peak = 0
        self.slots = len(cast.identity_panels)
        self.bank: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._positions: dict[tuple, torch.Tensor] = {}
        self._rows: dict[tuple, SubCallRows] = {}

    def bank_bytes(self) -> int:
        """Bytes of identity tokens held now; ``bank_peak`` is the most held at once."""
        return sum(t.numel() * t.element_size() for pair in self.bank.values() for t in pair)

    def attention(
        self,
        layer: tuple,
        panels: tuple[int, ...],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        latent_hw: tuple[int, int],
        attend: Attend,
        layout: TokenLayout | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """CSA for one self-attention layer of the sub-call over ``panels``; None = plain attention.

        ``layer`` is (block, block_index); q/k/v are ``[chunks * len(panels), tokens, C]`` (or
        ``[rows, heads, tokens, D]``, see ``TokenLayout``), row ``r`` being panel
        ``panels[r % len(panels)]`` of chunk ``r // len(panels)``. ``layout``: this sub-call's
        token layout (else the call's); ``mask``: the call's attention mask, extended to the keys.
        """
        layout = (layout or self.layout).for_rank(q.ndim)
        first, shared = layout.shared_tokens(q.shape[layout.token_dim])
        rate = self.planner.rate(layer[0], layer[1], shared, latent_hw) if self.slots else 0.0
        if rate <= 0:
            return None
        count = sampled_count(shared, rate)
        rows = self._sub_call_rows(panels, k.device)
        if rows.write_rows.numel():
            self._write(layer, rows, k, v, count, layout, first, shared)
            self.bank_peak = max(self.bank_peak, self.bank_bytes())
        bank = self.bank.get(layer) if self.keep_bank else self.bank.pop(layer, None)
        out = None
        for index, group in enumerate(rows.groups):
            q_g, k_g, v_g = (group.take(t) for t in (q, k, v))
            mask_g = mask if mask is None or mask.shape[0] == 1 else group.take(mask)
            if group.bank_rows is not None:
                if bank is None:
                    raise RuntimeError(f"layer {layer}: identity tokens read before they were written")
                k_g, v_g = (layout.extend(t, stored, group.bank_rows) for t, stored in zip((k_g, v_g), bank))
                if mask_g is not None:
                    mask_g = extend_mask(mask_g, first + self._read_positions(group.bank_rows, shared, count))
            if not self.keep_bank and index == len(rows.groups) - 1:
                bank = None  # the last readers hold copies: the layer's shared tokens go before its attention runs
            result = attend(q_g, k_g, v_g, group.names, mask_g)
            if group.everyone:
                return result
            if out is None:
                out = result.new_empty((q.shape[0],) + tuple(result.shape[1:]))
            out.index_copy_(0, group.rows, result)
        return out

    def reads(self, panels: tuple[int, ...], device) -> bool:
        """Whether any row of the sub-call over ``panels`` reads shared tokens (its keys grow)."""
        return any(group.bank_rows is not None for group in self._sub_call_rows(panels, device).groups)

    def _write(self, layer, rows: SubCallRows, k, v, count: int, layout: TokenLayout, first: int, shared: int) -> None:
        """Leave the sampled shared tokens (``count`` of the ``shared`` from ``first`` on) of this
        sub-call's identity rows in the layer's bank."""
        positions = self._sampled_positions(shared, count, k.device) + first  # [slots, count]
        positions = positions.index_select(0, rows.write_slots % self.slots)  # [W, count]
        taken_k = layout.take(k, rows.write_rows, positions)
        if layout.key_shift is not None:
            taken_k = layout.key_shift(taken_k)
        taken_v = layout.take(v, rows.write_rows, positions)
        if layer not in self.bank and rows.fills_bank:  # what was taken is the bank: no copy
            self.bank[layer] = (taken_k, taken_v)
            return
        if layer not in self.bank:
            shape = (self.chunks * self.slots,) + tuple(taken_k.shape[1:])
            self.bank[layer] = (taken_k.new_empty(shape), taken_v.new_empty(shape))
        for stored, taken in zip(self.bank[layer], (taken_k, taken_v)):
            stored.index_copy_(0, rows.write_slots, taken)

    def _read_positions(self, bank_rows: torch.Tensor, tokens: int, count: int) -> torch.Tensor:
        """``[G, n * count]``: the positions (among the shared tokens) of the banked tokens each row reads."""
        slots = (bank_rows % self.slots).reshape(-1)
        positions = self._sampled_positions(tokens, count, bank_rows.device).index_select(0, slots)
        return positions.view(bank_rows.shape[0], -1)

    def _sampled_positions(self, tokens: int, count: int, device) -> torch.Tensor:
        """``[slots, count]`` positions among the ``tokens`` shared tokens of each identity panel, sorted."""
        key = (tokens, count, device)
        if key not in self._positions:
            if count == tokens:
                positions = torch.arange(tokens, device=device).expand(self.slots, tokens)
            else:
                generator = torch.Generator(device=device)
                generator.manual_seed(self.planner.seed_for(tokens))
                scores = torch.rand(self.slots, tokens, generator=generator, device=device)
                positions = scores.topk(count, dim=1, sorted=False).indices.sort(dim=1).values
            self._positions[key] = positions
        return self._positions[key]

    def _sub_call_rows(self, panels: tuple[int, ...], device) -> SubCallRows:
        key = (panels, device)
        if key not in self._rows:
            self._rows[key] = self._build_rows(panels, device)
        return self._rows[key]

    def _build_rows(self, panels: tuple[int, ...], device) -> SubCallRows:
        names = [(chunk, panel) for chunk in range(self.chunks) for panel in panels]
        writes = [(row, chunk * self.slots + slot) for row, (chunk, panel) in enumerate(names)
                  if (slot := self.cast.slot_of(panel)) is not None]
        by_count: dict[int, list[int]] = {}
        for row, (_, panel) in enumerate(names):
            by_count.setdefault(len(self.cast.sources(panel)), []).append(row)
        groups = []
        for n, members in sorted(by_count.items()):
            bank_rows = None
            if n:
                bank = [names[row][0] * self.slots + slot for row in members for slot in self.cast.sources(names[row][1])]
                bank_rows = index_tensor(bank, device).view(len(members), n)
            consecutive = members == list(range(members[0], members[0] + len(members)))
            groups.append(ReadGroup(
                rows=index_tensor(members, device),
                bank_rows=bank_rows,
                names=tuple((self.first_chunk + names[row][0], names[row][1]) for row in members),
                everyone=len(members) == len(names),
                span=(members[0], len(members)) if consecutive else None,
            ))
        slots = [w[1] for w in writes]
        return SubCallRows(index_tensor([w[0] for w in writes], device), index_tensor(slots, device), tuple(groups),
                           fills_bank=slots == list(range(self.chunks * self.slots)))

