"""A story under ComfyUI's own multi-GPU sampling ("MultiGPU CFG Split", ComfyUI >= v0.33) equals
the one-device run, and with CFG 1 its sub-calls spread over the devices the step leaves idle.

The graph is the real one: a checkpoint loaded by CheckpointLoaderSimple (and a tiny Flux.1 for
the DiT path), Consistent Self-Attention, ComfyUI's MultiGPU CFG Split node (its per-device deep clones, its thread pool, its
scheduler), and ComfyUI's KSampler. This CPU-only machine has one torch device; the second is
``cpu:1``, a distinct device to ComfyUI's bookkeeping whose tensors live on the CPU. Only the
host's device list is replaced (``get_all_torch_devices``, read by the node to pick the extra
devices); everything after it is ComfyUI's own code. A DIFFUSION_MODEL wrapper records which
device's model clone ran each sub-call and its panels. ``panels_per_call`` 1 makes each sub-call
the same rows on one device or two, so the comparison is bit for bit.
"""
from __future__ import annotations

import importlib
import threading

import pytest
import torch

from test_story_attention import SIZE, STORY, patch, story_inputs

pytestmark = pytest.mark.integration

STATE_KEY = "consistent_story.csa"
IDENTITY_PANELS = (0, 1, 2, 5)  # BOB_AND_ALICE: each character's first two solo panels
SECOND = torch.device("cpu", 1)


class SubCallRecord:
    """DIFFUSION_MODEL wrapper: (device model, panels, cond_or_uncond) of every diffusion-model call."""

    def __init__(self):
        self.calls, self.lock = [], threading.Lock()

    def __deepcopy__(self, memo):
        return self  # model clones (per device too) share one record

    def __call__(self, executor, *args, **kwargs):
        options = kwargs.get("transformer_options") or args[-1]
        state = options.get(STATE_KEY)
        with self.lock:
            self.calls.append((executor.class_obj, state.panels if state else None, tuple(options["cond_or_uncond"])))
        return executor(*args, **kwargs)


def two_devices(comfy, model, monkeypatch):
    """``model`` through ComfyUI's MultiGPU CFG Split node, on this CPU and ``cpu:1``."""
    from comfy import model_management

    monkeypatch.setattr(model_management, "get_all_torch_devices",
                        lambda exclude_current=False: [torch.device("cpu"), SECOND])
    model_management.unload_all_models()  # no stale entry of the last graph in ComfyUI's list of loaded models
    split = comfy.NODE_CLASS_MAPPINGS["MultiGPU_WorkUnits"].execute(model=model, max_gpus=2)
    return split[0] if isinstance(split, tuple) else split.result[0]


def run(comfy, model, positive, negative, panels, cfg):
    latent = {"samples": torch.zeros(panels, 4, SIZE // 8, SIZE // 8)}
    with torch.inference_mode():
        return comfy.nodes.common_ksampler(model, 7, 2, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


@pytest.fixture
def story_model(comfy, loaded):
    model, clip = loaded("sd15_small")
    positive, negative, panels, story = story_inputs(comfy, clip, STORY)
    record = SubCallRecord()
    recorded = model.clone()
    recorded.add_wrapper_with_key("diffusion_model", "test.devices", record)
    patched = patch(comfy, recorded, story, rate_fine=0.5, rate_coarse=0.5, panels_per_call=1, schedule="always")
    return patched, (positive, negative, panels), record, recorded


def one_and_two_devices(comfy, story_model, monkeypatch, cfg: float):
    """The story sampled on one device, then on two; the record holds the two-device run's calls."""
    patched, inputs, record, _ = story_model
    alone = run(comfy, patched, *inputs, cfg=cfg)
    record.calls.clear()
    both = run(comfy, two_devices(comfy, patched, monkeypatch), *inputs, cfg=cfg)
    assert torch.equal(both, alone), "the story on two devices must equal it on one, bit for bit"
    return both


def assert_spread(record, panels: int, steps: int) -> None:
    """Both devices' model clones ran sub-calls: each the identity panels (its own bank), every other
    panel once per step on one of them, and each device some of the other panels."""
    by_model: dict = {}
    for model, drawn, _ in record.calls:
        by_model.setdefault(id(model), []).extend(drawn)
    assert len(by_model) == 2, "CFG 1 leaves the second device idle: the story's sub-calls must use it"
    for drawn in by_model.values():
        for panel in IDENTITY_PANELS:
            assert drawn.count(panel) == steps
    for panel in (panel for panel in range(panels) if panel not in IDENTITY_PANELS):
        assert sum(drawn.count(panel) for drawn in by_model.values()) == steps
    assert all(set(drawn) - set(IDENTITY_PANELS) for drawn in by_model.values()), \
        "each device must draw some of the other panels"


def test_cfg_1_spreads_the_story_over_the_idle_device_and_equals_one_device(comfy, story_model, monkeypatch):
    _, inputs, record, vanilla_model = story_model
    spread = one_and_two_devices(comfy, story_model, monkeypatch, cfg=1.0)
    assert_spread(record, panels=inputs[2], steps=2)
    vanilla = run(comfy, two_devices(comfy, vanilla_model, monkeypatch), *inputs, cfg=1.0)
    assert not torch.equal(spread, vanilla), "CSA must change the story on two devices"


def test_a_flux_story_spreads_over_the_idle_device_and_equals_one_device(comfy, monkeypatch):
    """The DiT path (Flux.1, CFG 1, its single-stream blocks): the same spread, equal bit for bit.
    The tiny Flux is built in memory; its ``cached_patcher_init`` (ComfyUI's hook for a custom
    loader) rebuilds it for the second device, as UNETLoader's reloads a file."""
    from harness.model_files import tiny_dit
    from harness.pack import load_pack
    from test_dit_families import CSA, conditioning, latent

    load_pack()
    from consistent_story.nodes.story.story_prompts import parse_story

    model = tiny_dit("Flux")
    model.cached_patcher_init = (tiny_dit, ("Flux",))
    story = parse_story(STORY, "No style")
    panels = len(story.panels)
    record = SubCallRecord()
    recorded = model.clone()
    recorded.add_wrapper_with_key("diffusion_model", "test.devices", record)
    patched = comfy.NODE_CLASS_MAPPINGS["ConsistentStorySelfAttention"].execute(
        model=recorded, story=story, panels_per_call=1, **{**CSA, "rate_fine": 0.5}).result[0]
    positive = conditioning("Flux", panels, seed=2)

    def flux_run(model):
        with torch.inference_mode():
            return comfy.nodes.common_ksampler(model, 5, 2, 1.0, "euler", "simple", positive, positive,
                                               {"samples": latent("Flux", panels)})[0]["samples"]

    alone = flux_run(patched)
    record.calls.clear()
    spread = flux_run(two_devices(comfy, patched, monkeypatch))
    assert torch.equal(spread, alone), "the Flux story on two devices must equal it on one, bit for bit"
    assert_spread(record, panels, steps=2)
    assert not torch.equal(spread, flux_run(model)), "CSA must change the Flux story"


def test_cfg_split_runs_cond_and_uncond_apart_and_equals_one_device(comfy, story_model, monkeypatch):
    record = story_model[2]
    one_and_two_devices(comfy, story_model, monkeypatch, cfg=5.0)
    chunks_by_model: dict = {}
    for model, panels, cond_or_uncond in record.calls:
        assert len(cond_or_uncond) == 1, "a sub-call never mixes cond with uncond"
        chunks_by_model.setdefault(id(model), set()).add(cond_or_uncond[0])
    assert sorted(map(sorted, chunks_by_model.values())) == [[0], [1]], \
        "ComfyUI's CFG split puts cond on one device and uncond on the other; CSA keeps them there"


def test_shares_follow_the_relative_speeds_comfyui_keeps(comfy):
    """The share of sub-calls each device takes comes from ComfyUI's own balance of the speeds its
    MultiGPU Options node records (a device three times as fast takes three times the work)."""
    nodes_package = comfy.NODE_CLASS_MAPPINGS["ConsistentStorySelfAttention"].__module__.rpartition(".")[0]
    story_devices = importlib.import_module(nodes_package + ".host.story_devices")  # the pack ComfyUI loaded
    SpareDevices, StoryDevices = story_devices.SpareDevices, story_devices.StoryDevices
    first = torch.device("cpu")
    speeds = {first: {"relative_speed": 1.0}, SECOND: {"relative_speed": 3.0}}
    devices = StoryDevices(SpareDevices({}, None, speeds, {first: (SECOND,)}), first, (SECOND,))
    assert devices.shares(8) == [2, 6]
    assert devices.shares(1) == [0, 1]
