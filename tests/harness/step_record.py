"""Which step each model call located, recorded with ComfyUI's own keyed wrappers.

Consistent Self-Attention keys a model call to a sampling step by its sigma (nodes/host/csa_patch.py
``current_step``) and keeps it in the call's ``CallState`` in transformer_options. The record puts
the step every call located beside the steps the sampler itself announces to its callback, so a
test can say, call by call, which step each sampler evaluation took.
"""
from __future__ import annotations

STATE_KEY = "consistent_story.csa"  # where CSA keeps a model call's CallState in transformer_options


class StepRecord:
    """The step each model call located, between the steps the sampler announces.

    Three of ComfyUI's keyed wrappers, installed on the model before Consistent Self-Attention (so
    the APPLY_MODEL one runs outside CSA's): SAMPLER_SAMPLE notes each sampler run's length and hands
    the sampler a callback that notes every step it announces (k-diffusion calls it once per step,
    right after that step's first model evaluation); APPLY_MODEL notes each model call, with the step
    that DIFFUSION_MODEL read, for every UNet (sub-)call of it, from CSA's ``CallState``."""

    def __init__(self):
        self.events, self._located = [], []
        self.unet_calls = 0  # every UNet call, a story's sub-calls each

    def __deepcopy__(self, memo):
        return self  # ModelPatcher.clone() deep-copies model_options: the record stays one object

    def install(self, model):
        model = model.clone()
        model.add_wrapper_with_key("sampler_sample", "test.steps", self.sampler_run)
        model.add_wrapper_with_key("apply_model", "test.steps", self.model_call)
        model.add_wrapper_with_key("diffusion_model", "test.steps", self.unet_call)
        return model

    def sampler_run(self, executor, guider, sigmas, extra_args, callback, *args, **kwargs):
        self.events.append(f"run of {len(sigmas) - 1}")

        def announce(step, *rest):
            self.events.append(f"step {step}")
            return callback(step, *rest)

        return executor(guider, sigmas, extra_args, announce, *args, **kwargs)

    def model_call(self, executor, *args, **kwargs):
        self._located = []
        out = executor(*args, **kwargs)
        located = set(self._located)
        self.events.append(f"call at {located.pop()}" if len(located) == 1 else f"call with sub-calls at {located}")
        return out

    def unet_call(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        state = transformer_options.get(STATE_KEY)
        step = None if state is None else state.planner.step
        self.unet_calls += 1
        self._located.append("no step: outside CSA" if step is None else f"{step.index} of {step.total}")
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def sampler_run(steps, before, after=lambda step: ()):
    """The events of one sampler run of ``steps`` steps: the steps the calls before and after the
    announcement of each step locate."""
    events = [f"run of {steps}"]
    for step in range(steps):
        events += [f"call at {s} of {steps}" for s in before(step)] + [f"step {step}"]
        events += [f"call at {s} of {steps}" for s in after(step)]
    return events
