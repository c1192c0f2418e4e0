"""The fastest exact attention kernel for the calls CSA extends.

ComfyUI runs every attention call through its configured backend; with PyTorch SDPA it also sets
the order of SDPA's kernels (ComfyUI 0.3.68 and newer on Linux: FlashAttention-2 first). The calls
CSA extends carry longer keys than the host's, and on Hopper cuDNN's kernel ran them about twice as
fast as FlashAttention-2 at equal accuracy (shared/PERFORMANCE.md; other GPUs may differ). So for
those calls only, ``KernelChoice`` times the host's own call against SDPA with cuDNN first, once per
shape class and device, and from then on runs the faster one: never slower than the host. Every
call CSA does not extend keeps the host's kernel, so a disabled CSA stays bit-identical.
"""
from __future__ import annotations

from typing import Callable

import torch

from .config import ConsistentAttentionError

KERNELS = ("fastest", "host")  # the node's choice: measure and take the faster, or always the host's
HOST = "host"
CUDNN_FIRST = "sdpa, cuDNN first"
TIMED_RUNS = 2


def sdpa(q, k, v, heads: int, mask=None, skip_reshape: bool = False, skip_output_reshape: bool = False,
         scale=None, backends=None) -> torch.Tensor:
    """What ComfyUI's ``attention_pytorch`` computes, with SDPA's kernels tried in ``backends``' order."""
    from torch.nn.attention import sdpa_kernel

    if skip_reshape:
        rows, dim = q.shape[0], q.shape[-1]
    else:
        rows, dim = q.shape[0], q.shape[-1] // heads
        q, k, v = (t.reshape(rows, -1, heads, dim).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask
        mask = mask.unsqueeze(1) if mask.ndim == 3 else mask
    extra = {} if scale is None else {"scale": scale}
    with sdpa_kernel(backends, set_priority=True):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, **extra)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(rows, -1, heads * dim)


def cudnn_first() -> list:
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class KernelChoice:
    """Per device and shape class, which kernel runs CSA's extended calls; shared by every clone
    of a patched model (its decisions hold for the process, whichever clone measured them)."""

    def __init__(self, mode: str = "fastest"):
        if mode not in KERNELS:
            raise ConsistentAttentionError(f"attention_kernel must be one of {KERNELS}, got {mode!r}.")
        self.mode = mode
        self.chosen: dict[tuple, str] = {}

    def __deepcopy__(self, memo):
        return self

    def applies(self, func, q: torch.Tensor) -> bool:
        """Only ComfyUI's PyTorch SDPA backend on a CUDA device has a faster order to offer."""
        return self.mode == "fastest" and q.is_cuda and getattr(func, "__name__", "") == "attention_pytorch"

    def attend(self, func, host: Callable[[], torch.Tensor], q, k, v, heads, kwargs: dict) -> torch.Tensor:
        """The extended call ``host()`` (ComfyUI's own), or the same attention with cuDNN first
        where that measured faster for this shape class."""
        if not self.applies(func, q):
            return host()
        mask = kwargs.get("mask")
        key = (q.device, q.dtype, tuple(q.shape), tuple(k.shape), None if mask is None else tuple(mask.shape),
               bool(kwargs.get("skip_reshape")))
        candidates = {HOST: host, CUDNN_FIRST: lambda: sdpa(
            q, k, v, heads, mask, kwargs.get("skip_reshape", False), kwargs.get("skip_output_reshape", False),
            kwargs.get("scale"), cudnn_first())}
        if key not in self.chosen:
            self.chosen[key] = min(candidates, key=lambda name: time_call(candidates[name]))
        return candidates[self.chosen[key]]()


def time_call(call: Callable[[], torch.Tensor]) -> float:
    """Milliseconds of ``call`` on the current CUDA stream (best of a few, after one warm-up)."""
    call()
    best = float("inf")
    for _ in range(TIMED_RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best
