"""A story's sub-calls on the devices ComfyUI's multi-GPU sampling leaves idle (ComfyUI >= v0.33).

ComfyUI's "MultiGPU CFG Split" (``comfy/multigpu.py``) gives the model one deep clone per device
and sends each conditioning entry of a step (cond, uncond) to a device, on a pool of one thread per
device. With CFG above 1 that already uses two devices; with CFG 1 (Flux, distilled models) the
single cond runs on the first device and the others idle. A story's model call is many sub-calls
(``story_calls.py``), and identity panels never depend on the other panels, so any share of the
other panels can run on another device beside that device's own copy of the identity panels, and
comes out as in the whole call.

This module builds only on ComfyUI's own machinery: the device clones it made
(``model_options["multigpu_clones"]``), its thread pool (``multigpu_thread_pool``), its relative
device speeds (``multigpu_options``, balanced by its ``load_balance_devices``), and the host's own
wrapper chain on each clone. The pack only decides which panels go where:
- a CALC_COND_BATCH wrapper sees the step's conditioning entries and the devices, works out the
  devices ComfyUI's scheduler leaves idle (it fills devices in order, one entry each while there
  are fewer entries than devices) and offers them, in the call's ``transformer_options``, to the
  story call running on each busy device;
- ``StoryDevices`` then runs a share of that call's sub-calls on each offered device.
An offered device that turns out busy only waits for its own work (it is never offered work to
wait on), so the split can be uneven but never deadlocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEVICES_KEY = "consistent_story.devices"
CALC_COND_BATCH = "calc_cond_batch"  # comfy.patcher_extension.WrappersMP.CALC_COND_BATCH


@dataclass(frozen=True)
class SpareDevices:
    """The step's multi-GPU machinery and, for each busy device, the idle devices it may use.

    Kept in transformer_options by reference (not a dict: ComfyUI's option merges copy dicts)."""

    clones: dict  # device -> ModelPatcher (ComfyUI's per-device clones, the main model included)
    pool: object  # comfy.multigpu.MultiGPUThreadPool
    speeds: dict  # device -> {"relative_speed": float}
    spare: dict  # busy device -> tuple of idle devices


def offer_spare_devices(executor, model, conds, x_in, timestep, model_options):
    """CALC_COND_BATCH wrapper: offer the devices this step leaves idle to the story's calls."""
    clones = model_options.get("multigpu_clones")
    pool = model_options.get("multigpu_thread_pool")
    if clones and len(clones) > 1 and pool is not None:
        devices = list(clones)
        entries = sum(len(entries) for entries in conds if entries)
        busy = devices[:max(1, min(entries, len(devices)))]
        idle = devices[len(busy):]
        if idle:
            spare = {device: tuple(idle[i::len(busy)]) for i, device in enumerate(busy)}
            speeds = model_options.get("multigpu_options") or {device: {"relative_speed": 1.0} for device in devices}
            options = dict(model_options.get("transformer_options") or {})
            options[DEVICES_KEY] = SpareDevices(clones, pool, speeds, spare)
            model_options = {**model_options, "transformer_options": options}
    return executor(model, conds, x_in, timestep, model_options)


class StoryDevices:
    """The devices one story model call runs on: its own first, then the idle ones offered to it."""

    def __init__(self, machinery: SpareDevices, device: torch.device, helpers: tuple):
        self.machinery = machinery
        self.devices = (device,) + tuple(helpers)

    @classmethod
    def of(cls, options: dict, x: torch.Tensor) -> "StoryDevices | None":
        """The devices offered to this call, or None when it runs alone (no multi-GPU, or none idle)."""
        machinery = options.get(DEVICES_KEY)
        if machinery is None:
            return None
        device = options.get("multigpu_thread_device", x.device)
        helpers = machinery.spare.get(device, ())
        return cls(machinery, device, helpers) if helpers else None

    def shares(self, calls: int) -> list[int]:
        """How many of ``calls`` sub-calls each device runs, by ComfyUI's relative device speeds."""
        import comfy.multigpu

        options = {"multigpu_clones": {device: None for device in self.devices},
                   "multigpu_options": {device: self.machinery.speeds.get(device, {"relative_speed": 1.0})
                                        for device in self.devices}}
        work = comfy.multigpu.load_balance_devices(options, calls).work_per_device
        return [work[device] for device in self.devices]

    def executor_on(self, device, executor):
        """``executor`` (the APPLY_MODEL wrapper chain after CSA's) on ``device``'s clone of the model."""
        model = self.machinery.clones[device].model
        original = executor.original.__func__.__get__(model)
        return type(executor).new_class_executor(original, model, executor.wrappers, executor.idx)

    @staticmethod
    def options_on(device, options: dict) -> dict:
        """The call's transformer_options for ``device``, as ComfyUI prepares them for a device's call."""
        import comfy.patcher_extension
        import comfy.samplers

        moved = comfy.patcher_extension.copy_nested_dicts(options)
        comfy.samplers.cast_transformer_options(moved, device=device)
        for name in ("sigmas", "sample_sigmas"):
            if isinstance(moved.get(name), torch.Tensor):
                moved[name] = moved[name].to(device)
        moved["multigpu_thread_device"] = device
        return moved

    def submit(self, device, work, *args):
        """Run ``work(*args)`` on ``device``'s thread of ComfyUI's pool."""
        self.machinery.pool.submit(device, run_and_settle, device, work, *args)

    def result(self, device):
        """The result of the work submitted to ``device``; its error, raised here."""
        value, error = self.machinery.pool.get_result(device)
        if error is not None:
            raise error
        return value


def run_and_settle(device, work, *args):
    """Run ``work`` and wait for the device to finish it, so its outputs are complete when read."""
    value = work(*args)
    if isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.synchronize(device)
    return value

