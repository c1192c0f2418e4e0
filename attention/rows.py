"""Taking some rows of a model call's inputs, so a long story can run a few panels at a time.

A model call's inputs are tensors with one row per batch row, possibly nested in lists, tuples
and dicts (ControlNet residuals, extra conditionings). ``take_rows`` selects rows from all of
them at once; a tensor with one row is shared by every row and passes unchanged; any other batch
size cannot be split and is refused with the input's name.
"""
from __future__ import annotations

import torch

from .config import ConsistentAttentionError


def index_tensor(values, device) -> torch.Tensor:
    """Long indices on ``device``. Copied without waiting for the device: a blocking host-to-device
    copy synchronises the stream, and at a few copies per sub-call, dozens of sub-calls per step,
    the GPU would idle while the host catches up."""
    return torch.tensor(list(values), dtype=torch.long).to(device, non_blocking=True)


def take_rows(value, index: torch.Tensor, rows: int, name: str):
    """``value`` with only the batch rows ``index`` (a CPU tensor) of every tensor of ``rows`` rows in it.

    The index stays on the CPU and is copied to each tensor's device without blocking; a model
    input may sit on the CPU while the model runs on a GPU (ComfyUI moves it inside the call)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] == 1:
            return value
        if value.shape[0] != rows:
            raise ConsistentAttentionError(
                f"Consistent Self-Attention runs this story a few panels at a time, but the model input '{name}' "
                f"has {value.shape[0]} rows for a batch of {rows}, so it cannot be split by panel. Set "
                "panels_per_call to 0 with enough memory for every panel at once, or remove the node that adds "
                f"'{name}'."
            )
        return value.index_select(0, index if value.device.type == "cpu" else index.to(value.device, non_blocking=True))
    if isinstance(value, (list, tuple)):
        return type(value)(take_rows(item, index, rows, f"{name}[{i}]") for i, item in enumerate(value))
    if isinstance(value, dict):
        return {key: take_rows(item, index, rows, f"{name}.{key}") for key, item in value.items()}
    raise ConsistentAttentionError(
        f"Consistent Self-Attention cannot split the model input '{name}' ({type(value).__name__}) by panel. "
        "Set panels_per_call to 0 with enough memory for every panel at once, or remove the node that adds it."
    )


def move_to(value, device):
    """``value`` with every tensor in it (nested in lists, tuples and dicts) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(move_to(item, device) for item in value)
    if isinstance(value, dict):
        return {key: move_to(item, device) for key, item in value.items()}
    return value
