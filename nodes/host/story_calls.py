"""One model call over a story, run a few panels at a time (the APPLY_MODEL wrapper's story mode).

ComfyUI calls the model with every panel of the batch, once per conditioning chunk it batched
together (``[uncond; cond]`` with CFG). When all of it fits (``panels_per_call`` 0 and enough free
memory, or ``panels_per_call`` at least the call's rows) it runs as one call. Otherwise each chunk
runs on its own, as ComfyUI itself runs chunks under memory pressure, in the panel subsets of
``StoryCast.call_plan``: identity panels first, so their tokens are in the chunk's bank before any
other panel reads them, then the other panels, ``panels_per_call`` at a time. A chunk's bank is
dropped before the next chunk starts. Each model input with a row per batch row (latents,
timesteps, prompts, ControlNet residuals, extra conds) is cut to the sub-call's rows,
``cond_or_uncond`` and ``uuids`` to its chunk, and the outputs go back in ComfyUI's row order.

Under ComfyUI's multi-GPU sampling, devices the step leaves idle (``story_devices.py``) each take
a share of the other panels' sub-calls, after their own run of the identity sub-calls (identity
panels never depend on the other panels, so each device's bank is the same); the identity panels'
outputs are the call's own device's.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ...attention import ConsistentAttentionError, index_tensor, move_to, panels_per_chunk, take_rows
from ..story.wiring import BATCH_WIRING
from .references import check_references, reference_inputs
from .story_devices import StoryDevices


@dataclass(frozen=True)
class SubCall:
    """One sub-call of a chunk: its panels, its rows of the model call, its inputs and options."""

    panels: tuple[int, ...]
    index: torch.Tensor  # rows of the model call (CPU)
    args: tuple  # x, timestep, c_concat, c_crossattn, control
    kwargs: dict
    sigmas: torch.Tensor | None  # one per panel, when the call has them
    kept: bool  # its output is the call's (an identity sub-call repeated on another device is not)

    def to(self, device) -> "SubCall":
        return SubCall(self.panels, self.index, move_to(self.args, device), move_to(self.kwargs, device),
                       move_to(self.sigmas, device), self.kept)


class StorySubCalls:
    """The one owner of a story model call's sub-calls: their panels, inputs, order, banks and
    devices. ``runner`` runs each through CSA (``csa_call.CallRunner``); nothing calls back up."""

    def __init__(self, runner, cast, panels_per_call: int, references: tuple, seed: int):
        self.runner = runner
        self.cast = cast
        self.panels_per_call = panels_per_call
        self.references = references
        self.seed = seed

    def run(self, planner, executor, x, t, c_concat, c_crossattn, control, options: dict, **kwargs):
        """The model call of ``executor`` over the whole batch, its rows in ComfyUI's order."""
        cast, runner = self.cast, self.runner
        cond_or_uncond = options.get("cond_or_uncond") or [0]
        chunks, rows = len(cond_or_uncond), x.shape[0]
        panels = panels_per_chunk(rows, chunks)
        if panels != len(cast.batch):
            raise ConsistentAttentionError(
                f"The model was called with {panels} panels for a story of {len(cast.batch)}. {BATCH_WIRING}"
            )
        if self.references:
            check_references(self.references, executor.class_obj, tuple(x.shape[-2:]))
        devices = StoryDevices.of(options, x)
        per_call = self.panels_per_call or rows_that_fit(executor.class_obj, x)
        if devices is not None:  # at least one sub-call of other panels per device
            other_panels = len([panel for panel in cast.batch if cast.slot_of(panel) is None])
            per_call = min(per_call, max(1, -(-other_panels // len(devices.devices))))
        if per_call >= rows:  # every row in one call, in ComfyUI's order: nothing to cut
            story_call = runner.story_call(planner, chunks, 0, panels, keep_bank=bool(self.references))
            self.reference_rows(planner, story_call, executor, x, t, options, range(chunks))
            runner.prepare(options, planner, story_call, cast.batch, runner.layout(x, kwargs))
            return runner.run(executor, x, t, c_concat, c_crossattn, control, options=options, **kwargs)

        refuse_single_call_recorders(options, rows)
        call_args = (x, t, c_concat, c_crossattn, control)
        position = {panel: row for row, panel in enumerate(cast.batch)}

        def sub_call(chunk: int, subset: tuple[int, ...], kept: bool = True) -> SubCall:
            positions = [position[panel] for panel in subset]  # rows of the chunk (a part of a story: fewer)
            index = index_tensor([chunk * panels + row for row in positions], "cpu")
            names = ("x", "timestep", "c_concat", "c_crossattn", "control")
            args = tuple(take_rows(value, index, rows, name) for value, name in zip(call_args, names))
            sub_kwargs = {name: take_rows(value, index, rows, name) for name, value in kwargs.items()}
            sigmas = options.get("sigmas")  # one sigma per panel (ComfyUI's per-chunk timestep)
            if sigmas is not None:
                sigmas = take_rows(sigmas, index_tensor(positions, "cpu"), panels, "sigmas")
            return SubCall(subset, index, args, sub_kwargs, sigmas, kept)

        out = None

        def keep(index: torch.Tensor, result: torch.Tensor) -> None:
            nonlocal out
            if out is None:
                out = result.new_empty((rows,) + tuple(result.shape[1:]))
            out.index_copy_(0, index.to(out.device, non_blocking=True), result.to(out.device))

        for chunk in range(chunks):
            plan = cast.call_plan(per_call)
            if devices is None:
                self.run_chunk(planner, executor, options, chunk, (sub_call(chunk, subset) for subset in plan), keep)
                continue
            identity = [subset for subset in plan if any(cast.slot_of(panel) is not None for panel in subset)]
            others = [subset for subset in plan if subset not in identity]
            shares, start = [], 0
            for device, count in zip(devices.devices, devices.shares(len(others))):
                shares.append((device, others[start:start + count]))
                start += count
            for device, share in shares[1:]:  # inputs moved before this device's own work is queued
                if share:
                    calls = [sub_call(chunk, subset, kept=False).to(device) for subset in identity]
                    calls += [sub_call(chunk, subset).to(device) for subset in share]
                    devices.submit(device, self.run_chunk, planner, devices.executor_on(device, executor),
                                   devices.options_on(device, options), chunk, calls)
            self.run_chunk(planner, executor, options, chunk,
                           (sub_call(chunk, subset) for subset in identity + shares[0][1]), keep)
            for device, share in shares[1:]:
                if share:
                    for index, result in devices.result(device):
                        keep(index, result)
        return out

    def run_chunk(self, planner, executor, options: dict, chunk: int, calls: Iterable[SubCall], keep=None):
        """Run one chunk's sub-calls in order over one bank (on the device of ``executor`` and the
        calls' inputs), each taken from ``calls`` only when it runs (a sub-call's rows of the inputs,
        never all of them at once); each kept sub-call's ``(rows, output)`` goes to ``keep`` as soon
        as it is computed, or without ``keep`` (another device's work) into the list returned."""
        results = []
        keep = keep or (lambda index, result: results.append((index, result)))
        runner = self.runner
        cond_or_uncond = options.get("cond_or_uncond") or [0]
        uuids = options.get("uuids")
        story_call = runner.story_call(planner, 1, chunk, len(self.cast.batch))  # this chunk's identity bank
        calls = iter(calls)
        first = next(calls)
        self.reference_rows(planner, story_call, executor, first.args[0], first.args[1], options,
                            range(chunk, chunk + 1))
        for call in itertools.chain([first], calls):
            sub_options = runner.prepare(dict(options), planner, story_call, call.panels,
                                         runner.layout(call.args[0], call.kwargs))
            sub_options["cond_or_uncond"] = cond_or_uncond[chunk:chunk + 1]
            if uuids is not None and len(uuids) == len(cond_or_uncond):
                sub_options["uuids"] = uuids[chunk:chunk + 1]
            if call.sigmas is not None:
                sub_options["sigmas"] = call.sigmas
            result = runner.run(executor, *call.args, options=sub_options, **call.kwargs)
            if call.kept:
                keep(call.index, result)
        return results

    def reference_rows(self, planner, story_call, executor, x, t, options: dict, chunks: range) -> None:
        """Evaluate the reference rows of ``chunks`` so their tokens are in ``story_call``'s bank;
        the output is dropped (the story's images are its panels)."""
        if not self.references:
            return
        runner, reference_panels = self.runner, self.cast.reference_panels
        cond_or_uncond = options.get("cond_or_uncond") or [0]
        kinds = [cond_or_uncond[chunk] for chunk in chunks]
        x_ref, t_ref, c_concat, c_crossattn, extra = reference_inputs(
            executor.class_obj, self.references, x, t.reshape(-1)[:1], kinds, self.seed)
        sub_options = runner.prepare(dict(options), planner, story_call, reference_panels, runner.layout(x_ref, extra))
        sub_options["cond_or_uncond"] = kinds
        uuids = options.get("uuids")
        if uuids is not None and len(uuids) == len(cond_or_uncond):
            sub_options["uuids"] = [uuids[chunk] for chunk in chunks]
        if "sigmas" in options:
            sub_options["sigmas"] = t_ref[:len(reference_panels)]
        runner.run(executor, x_ref, t_ref, c_concat, c_crossattn, None, options=sub_options, **extra)


def refuse_single_call_recorders(options: dict, rows: int) -> None:
    """Self-Attention Guidance keeps the attention map of the last model call it saw and applies it to
    the whole batch (a limitation its own source marks TODO); split over several calls it would
    silently use the wrong panels' map."""
    replaced = (options.get("patches_replace") or {}).get("attn1") or {}
    if any("SelfAttentionGuidance" in getattr(fn, "__qualname__", "") for fn in replaced.values()):
        raise ConsistentAttentionError(
            f"Self-Attention Guidance needs the whole batch in one model call, but this story's {rows} rows (panels "
            f"times CFG halves) run in several. Set panels_per_call to {rows} (needs the memory for all of them at "
            "once) or use Perturbed-Attention Guidance, which works with any panels_per_call."
        )


def rows_that_fit(base_model, x: torch.Tensor) -> int:
    """How many rows one model call can hold now: ComfyUI's own rule for batching conditionings
    (``samplers._calc_cond_batch``: estimated need x 1.5 under free memory)."""
    import comfy.model_management

    free = comfy.model_management.get_free_memory(x.device)
    per_row = base_model.memory_required([1] + list(x.shape[1:]))
    if per_row <= 0:
        return x.shape[0]
    return max(1, int(free / (1.5 * per_row)))
