"""The yardstick the pack must beat: the simplest exact CSA on a DiT, written for the benchmark only.

In the blocks the pack chose, every row's keys and values are extended by the sampled image
tokens of every other row of the call: one token-major gather (``index_select``) of the sampled
tokens and one ``torch.cat`` per tensor, then the host's own attention (or SDPA with cuDNN first).
No bank, no story, no RoPE shift (the pack's 'as is'): what any port would write first. Batch mode
only (every row a panel; no CFG), the benchmark's setting.
"""
from __future__ import annotations

import torch

MARK = "csa_reference.block"


class BlockName:
    """``patches_replace["dit"]`` entry naming the block about to run in the call's options."""

    def __init__(self, layer: tuple[str, int]):
        self.layer = layer

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args: dict, extra: dict):
        args["transformer_options"][MARK] = self.layer
        try:
            return extra["original_block"](args)
        finally:
            args["transformer_options"][MARK] = None


class ReferenceExtension:
    """Attention override: in ``chosen`` blocks, each row also attends to ``rate`` of every other
    row's ``image`` tokens (the last ones of each call, after the text)."""

    def __init__(self, chosen: frozenset, image: int, rate: float, kernel=None, named_by_host: bool = False):
        self.chosen = chosen
        self.image = image
        self.count = max(1, round(rate * image))
        self.kernel = kernel  # None: the host's attention; else a function(q, k, v, heads, mask, skip_reshape, skip_output_reshape)
        self.named_by_host = named_by_host
        self.positions: dict = {}
        self.extended = 0

    def __deepcopy__(self, memo):
        return self

    def install(self, model, family, diffusion_model) -> None:
        if not self.named_by_host:
            for blocks, index in family.joint_blocks(diffusion_model):
                model.set_model_patch_replace(BlockName((blocks.kind, index)), "dit", blocks.replace_name, index)
        model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = self

    def layer(self, options: dict):
        if self.named_by_host:
            index = options.get("block_index")
            return None if index is None else ("double", index)
        return options.get(MARK)

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        if self.layer(options) not in self.chosen or q.shape[0] < 2:
            return func(q, k, v, heads, *args, **kwargs)
        token_dim = 1 if k.ndim == 3 or not kwargs.get("skip_reshape") else 2
        extra = (q.shape[0] - 1) * self.count
        k, v = (self.extend(t, token_dim) for t in (k, v))
        mask = kwargs.get("mask")
        if mask is not None:  # other rows' image tokens are never padding: attend to them, no bias
            fill = torch.ones if mask.dtype == torch.bool else torch.zeros
            kwargs["mask"] = torch.cat([mask, fill(*mask.shape[:-1], extra, dtype=mask.dtype, device=mask.device)], -1)
        self.extended += 1
        if self.kernel is not None:
            return self.kernel(q, k, v, heads, kwargs.get("mask"), kwargs.get("skip_reshape", False),
                               kwargs.get("skip_output_reshape", False))
        return func(q, k, v, heads, *args, **kwargs)

    def extend(self, t: torch.Tensor, token_dim: int) -> torch.Tensor:
        rows, tokens = t.shape[0], t.shape[token_dim]
        token_major = t if token_dim == 1 else t.transpose(1, 2)  # [rows, tokens, ...], a view
        key = (tokens, t.device)
        if key not in self.positions:
            generator = torch.Generator().manual_seed(tokens)
            sampled = torch.randperm(self.image, generator=generator)[: self.count].sort().values + tokens - self.image
            others = torch.stack([torch.cat([torch.arange(r), torch.arange(r + 1, rows)]) for r in range(rows)])
            # [rows, (rows - 1) * count]: flat token indices of every other row's sampled tokens
            flat = (others[:, :, None] * tokens + sampled[None, None]).reshape(rows, -1)
            self.positions[key] = flat.reshape(-1).to(t.device)
        flat = self.positions[key]
        taken = token_major.reshape(rows * tokens, *token_major.shape[2:]).index_select(0, flat)
        taken = taken.view(rows, -1, *token_major.shape[2:])
        if token_dim == 2:
            taken = taken.transpose(1, 2)
        return torch.cat([t, taken], dim=token_dim)
