"""Consistent Self-Attention installed on a ComfyUI ModelPatcher.

Small pieces cooperate, all namespaced and all stackable with other packs:
- an OUTER_SAMPLE wrapper: refuses, before the first step, a prompt batch that does not match the
  latent batch, a part of a story without its panels' noise, and character references of another
  size than the latent;
- an APPLY_MODEL wrapper: once per model call, finds the sampling step from the sigmas and runs
  the call through CSA (``csa_call.CallRunner``: a fresh per-call state in a copy of
  ``transformer_options``, an attn1 patch naming each self-attention layer, an attention override
  extending its keys and values);
One engine serves both modes: without a story every panel reads its neighbours (``BatchCast``);
with one (``StoryCast``) the characters decide, and the call runs as sub-calls of a few panels
(``story_calls.py``, their one owner); a PREPARE_SAMPLING wrapper sizes ComfyUI's model load for
one such sub-call, not the whole story; under ComfyUI's multi-GPU sampling a CALC_COND_BATCH
wrapper offers the devices a step leaves idle to the story's sub-calls (``story_devices.py``).
Nothing persists between calls; the patch object holds only frozen options, and clones share it.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ...attention import (
    OFFICIAL_SWITCH, OFFICIAL_WARMUP, CallPlanner, ConsistentAttentionError, CSAConfig, KernelChoice, SigmaMarks, Step,
    StoryCast, locate_step, panels_per_chunk,
)
from ..story.wiring import BATCH_WIRING
from .csa_call import CallRunner
from .references import check_references
from .story_calls import StorySubCalls
from .story_devices import CALC_COND_BATCH, offer_spare_devices

WRAPPER_KEY = "consistent_story.csa"
APPLY_MODEL = "apply_model"  # comfy.patcher_extension.WrappersMP.APPLY_MODEL
OUTER_SAMPLE = "outer_sample"  # comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
PREPARE_SAMPLING = "prepare_sampling"  # comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING
SAMPLER_SAMPLE = "sampler_sample"  # comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE
MARKS_KEY = "consistent_story.sigma_marks"  # a sampler run's SigmaMarks, in its transformer_options


def current_step(transformer_options: dict, config: CSAConfig | None = None) -> Step:
    """The step of this sampling call (one host sync per model call, measured at 0.4 ms on SDXL).

    With sigma percents (``config.percent_of == "sigma"``) the step also carries its sigma (the
    schedule's, so extra evaluations of one step agree) and the config's percents converted by
    ``model_sampling.percent_to_sigma``, as ComfyUI's ControlNet converts its start and end, once
    per sampler run (``mark_sigmas``: on a UNet each conversion reads a GPU buffer back)."""
    sigmas = transformer_options.get("sigmas")
    schedule = transformer_options.get("sample_sigmas")
    if sigmas is None or schedule is None:
        return Step(0, 1)
    schedule = schedule.tolist()
    step = locate_step(float(sigmas.reshape(-1)[0]), schedule)
    if config is None or config.percent_of != "sigma":
        return step
    return replace(step, sigma=float(schedule[step.index]), marks=transformer_options.get(MARKS_KEY))


def sigma_marks(config: CSAConfig, model_sampling) -> SigmaMarks:
    """The config's sigma percents as sigmas of this model (a shift node's model_sampling included)."""
    def to_sigma(percent: float) -> float:
        return float(model_sampling.percent_to_sigma(percent))

    warmup, switch = (to_sigma(OFFICIAL_WARMUP), to_sigma(OFFICIAL_SWITCH)) if config.schedule == "official" else (0, 0)
    return SigmaMarks(to_sigma(config.start), to_sigma(config.end), warmup, switch)


def check_panel_batch(executor, noise, *args, story_panels: int | None = None, **kwargs):
    """OUTER_SAMPLE wrapper: one prompt per panel must meet one latent per panel.

    ComfyUI silently tiles or cuts a conditioning batch that differs from the latent batch, which
    would pair panels with the wrong prompts; say how to fix the wiring instead.
    """
    latents = noise.shape[0]
    if story_panels is not None and story_panels != latents:
        raise ConsistentAttentionError(
            f"The story has {story_panels} panels but the latent batch has {latents} images. {BATCH_WIRING}"
        )
    for name, conds in (getattr(executor.class_obj, "conds", None) or {}).items():
        for cond in conds:
            prompts = cond["cross_attn"].shape[0] if "cross_attn" in cond else 1
            if prompts not in (1, latents):
                raise ConsistentAttentionError(
                    f"The {name} conditioning holds {prompts} prompts (one per panel) but the latent batch has "
                    f"{latents} images. {BATCH_WIRING}"
                )
    return executor(noise, *args, **kwargs)


NOISE_FIX = "Connect Story Latent directly to the sampler's latent_image"


def check_story_noise(drawn: tuple[int, ...], noise, args: tuple, kwargs: dict) -> None:
    """A story drawn in part must start from each drawn panel's noise in the whole story (what Story
    Latent's batch_index gives), or its panels silently differ from the whole run's. Checked where the
    sampler's seed is known (outer_sample(noise, latent_image, ..., seed)) and noise is added."""
    seed = args[6] if len(args) > 6 else kwargs.get("seed")
    latent = args[0] if args else kwargs.get("latent_image")
    if seed is None or not isinstance(noise, torch.Tensor) or noise.is_nested or not isinstance(latent, torch.Tensor):
        return
    if noise.shape[0] != len(drawn) or not noise.any():  # a batch error is named next; no noise added: nothing to check
        return
    import comfy.sample

    expected = comfy.sample.prepare_noise(latent, seed, list(drawn))
    if expected.shape == noise.shape and not torch.equal(expected.to(noise.device, noise.dtype), noise):
        panels = f"panel{'s' if len(drawn) > 1 else ''} {', '.join(str(p + 1) for p in drawn)}"
        raise ConsistentAttentionError(  # the fix first: frontends show the message under other text, cut short
            f"{NOISE_FIX}: Story Prompts draws part of the story ({panels}), and the sampler's noise is not those "
            "panels' noise in the whole story, so they would not be the whole run's panels (Empty Latent Image, or "
            "Latent Batch Seed Behavior 'random', gives the first panels' noise instead)."
        )


class ConsistentAttentionPatch:
    """Frozen options of one CSA node: ``cast`` None = batch mode (every panel reads the others)."""

    def __init__(self, config: CSAConfig, cast: StoryCast | None = None, panels_per_call: int = 0, references=(),
                 attention_kernel: str = "fastest"):
        self.config = config
        self.cast = cast
        self.panels_per_call = panels_per_call
        self.references = tuple(references)  # CharacterReference per character with images, in cast order
        self.kernels = KernelChoice(attention_kernel)  # which kernel runs the calls CSA extends
        self.runner: CallRunner | None = None  # set by install

    def __deepcopy__(self, memo):
        return self  # immutable: every clone of the model shares this patch

    def install(self, model) -> None:
        """Install on a ModelPatcher clone (never on the incoming model)."""
        if model.get_wrappers(APPLY_MODEL, WRAPPER_KEY):
            raise ConsistentAttentionError(
                "this model already has Consistent Self-Attention; use one Consistent Self-Attention node per model."
            )
        self.runner = self.make_runner()
        self.mark_layers(model)
        model.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, self.wrap_apply_model)
        model.add_wrapper_with_key(OUTER_SAMPLE, WRAPPER_KEY, self.check_batch)
        if self.config.percent_of == "sigma":
            model.add_wrapper_with_key(SAMPLER_SAMPLE, WRAPPER_KEY, self.mark_sigmas)
        if self.cast is not None:
            model.add_wrapper_with_key(PREPARE_SAMPLING, WRAPPER_KEY, self.size_model_load)
            model.add_wrapper_with_key(CALC_COND_BATCH, WRAPPER_KEY, offer_spare_devices)

    def make_runner(self) -> CallRunner:
        return CallRunner(self.config, self.cast, self.kernels)

    def mark_layers(self, model) -> None:
        """Have each self-attention layer name itself before its attention call: an attn1 patch."""
        model.set_model_attn1_patch(self.runner)

    def check_batch(self, executor, noise, *args, **kwargs):
        """OUTER_SAMPLE wrapper: before the first step, the panel batch, a part's noise and the references' size."""
        story_panels = None if self.cast is None else len(self.cast.batch)
        if self.cast is not None and self.cast.drawn is not None:
            check_story_noise(self.cast.drawn, noise, args, kwargs)
        if self.references:
            check_references(self.references, executor.class_obj.model_patcher.model, tuple(noise.shape[-2:]))
        return check_panel_batch(executor, noise, *args, story_panels=story_panels, **kwargs)

    def mark_sigmas(self, executor, guider, sigmas, extra_args, *args, **kwargs):
        """SAMPLER_SAMPLE wrapper: the config's sigma percents as this model's sigmas, once for the
        run, in the run's own copy of transformer_options (where ComfyUI puts sample_sigmas)."""
        options = extra_args["model_options"].setdefault("transformer_options", {})
        options[MARKS_KEY] = sigma_marks(self.config, guider.model_patcher.model.model_sampling)
        return executor(guider, sigmas, extra_args, *args, **kwargs)

    def size_model_load(self, executor, model, noise_shape, conds, model_options=None, **kwargs):
        """PREPARE_SAMPLING wrapper: ComfyUI sizes its model load from the whole batch; a story runs
        at most its largest panel subset at once, so ask for that (the weights then stay loaded
        instead of being pushed off the GPU by a long story). Without panels_per_call: the least
        that must run at once, the largest character's identity panels; the rest fits at run time."""
        panels = min(noise_shape[0], self.cast.largest_call(self.panels_per_call or 1))
        return executor(model, [panels] + list(noise_shape[1:]), conds, model_options=model_options, **kwargs)

    def wrap_apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        options = dict(transformer_options)  # the caller's dict stays untouched
        planner = CallPlanner(self.config, current_step(options, self.config))
        runner = self.runner
        if self.cast is not None:
            sub_calls = StorySubCalls(runner, self.cast, self.panels_per_call, self.references, self.config.seed)
            return sub_calls.run(planner, executor, x, t, c_concat, c_crossattn, control, options, **kwargs)
        chunks = len(options.get("cond_or_uncond") or [0])
        panels = panels_per_chunk(x.shape[0], chunks)
        story_call = runner.story_call(planner, chunks, 0, panels, keep_bank=False)
        runner.prepare(options, planner, story_call, tuple(range(panels)), runner.layout(x, kwargs))
        return runner.run(executor, x, t, c_concat, c_crossattn, control, options=options, **kwargs)
