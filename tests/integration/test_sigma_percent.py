"""percent_of 'sigma': start/end percents (and the official warm-up and switch) as ComfyUI's
sigma percents, on a real SD1.5-layout model and ComfyUI's own samplers.

Every model call is recorded with ComfyUI's keyed DIFFUSION_MODEL wrapper: the sigma of the step
CSA located and whether CSA extended any layer in it (``CallState.extended``). Each call must be on
exactly when the model's own ``percent_to_sigma`` (ControlNet's conversion) puts its sigma in the
range, and two KSamplerAdvanced passes over one schedule must give what one pass gives.
"""
from __future__ import annotations

import torch

from harness.step_record import STATE_KEY
from test_consistent_attention import SIZE, encode, patch


class SigmaRecord:
    """(the call's sigma, the step CSA located, layers CSA extended) for every model call."""

    def __init__(self):
        self.calls = []

    def __deepcopy__(self, memo):
        return self

    def install(self, model):
        model = model.clone()
        model.add_wrapper_with_key("diffusion_model", "test.sigmas", self.unet_call)
        return model

    def unet_call(self, executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        options = args[5] if len(args) > 5 else kwargs["transformer_options"]
        state = options[STATE_KEY]
        assert state.planner.step.sigma == float(options["sigmas"][0]), "euler: the call's sigma is its step's"
        self.calls.append((float(options["sigmas"][0]), state.planner.step.index, state.extended))
        return out


def passes(comfy, model, clip, steps, splits, scheduler="normal"):
    """KSamplerAdvanced over ``steps`` steps, in passes from split to split (leftover noise kept);
    cfg 1, so each step is one model call."""
    pos, neg = encode(comfy, clip, "a knight in red armour"), encode(comfy, clip, "blurry")
    latent = {"samples": torch.zeros(2, 4, SIZE // 8, SIZE // 8)}
    bounds = [0, *splits, steps]
    with torch.inference_mode():
        for first, last in zip(bounds, bounds[1:]):
            add_noise = "enable" if first == 0 else "disable"
            leftover = "enable" if last < steps else "disable"
            latent = comfy.nodes.KSamplerAdvanced().sample(model, add_noise, 1, steps, 1.0, "euler", scheduler, pos,
                                                           neg, latent, first, last, leftover)[0]
    return latent["samples"]


def test_sigma_percents_turn_csa_on_exactly_inside_the_sigma_range(comfy, loaded):
    model, clip = loaded("sd15_small")
    record = SigmaRecord()
    patched = patch(comfy, record.install(model), start_percent=0.3, end_percent=0.6, percent_of="sigma")
    passes(comfy, patched, clip, 6, [], scheduler="karras")
    to_sigma = model.get_model_object("model_sampling").percent_to_sigma
    high, low = to_sigma(0.3), to_sigma(0.6)
    on = [index for sigma, index, extended in record.calls if extended]
    assert [bool(extended) for _, _, extended in record.calls] == [low <= s <= high for s, _, _ in record.calls]
    assert on and len(on) < len(record.calls)
    steps_range = [i for i in range(6) if 0.3 <= i / 6 < 0.6]
    assert sorted(set(on)) != steps_range, "karras: the sigma range is not the step range"


def test_two_passes_with_sigma_percents_behave_as_one_pass(comfy, loaded):
    """Official schedule (warm-up 10%, switch 40%): with sigma percents the second pass of 2 of 4 steps
    continues the warm-up and the draws of one pass; with step fractions it starts them over."""
    model, clip = loaded("sd15_small")
    results = {}
    for percent_of in ("sigma", "steps"):
        patched = patch(comfy, model, schedule="official", percent_of=percent_of)
        results[percent_of] = [passes(comfy, patched, clip, 4, splits) for splits in ([], [2])]
    one, two = results["sigma"]
    # Between the passes the latent goes out of the latent format and back in: float32 rounding only.
    noise = (one - two).abs().max().item()
    assert noise <= 1e-6 * one.abs().max().item()
    one_steps, two_steps = results["steps"]
    assert (one_steps - two_steps).abs().max().item() > 100 * noise  # measured: 0.139 against 3.1e-5
