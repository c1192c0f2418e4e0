"""Consistent Self-Attention installed on a ComfyUI ModelPatcher.

Small pieces cooperate, all namespaced and all stackable with other packs:
- an OUTER_SAMPLE wrapper: refuses, before the first step, a prompt batch that does not match the
  latent batch and character references of another size than the latent;
- an APPLY_MODEL wrapper: once per model call, finds the sampling step from the sigmas and puts
  a fresh per-call ``CallState`` (with the engine's ``CallPlanner`` and ``StoryCall``) into (a
  copy of) ``transformer_options``;
- an attn1 patch (``set_model_attn1_patch``): each self-attention layer names itself in the state;
- an ``optimized_attention_override`` (chained to any override already present): the attention
  call right after attn1 asks the engine's ``StoryCall`` for that layer, which extends the
  *projected* keys and values with the tokens its rows read, so no extra projection work is done
  and ComfyUI's own attention backend still runs, unmasked.
One engine serves both modes: without a story every panel reads its neighbours (``BatchCast``);
with one (``StoryCast``) the characters decide, and the APPLY_MODEL wrapper runs the call panel
subset by panel subset (``story_calls.py``); a PREPARE_SAMPLING wrapper sizes ComfyUI's model load
for one such subset, not the whole story.
Nothing persists between calls; the patch object holds only frozen options, and clones share it.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ...attention import (
    OFFICIAL_SWITCH, OFFICIAL_WARMUP, BatchCast, CallPlanner, ConsistentAttentionError, CSAConfig, KernelChoice,
    SigmaMarks, Step, StoryCall, StoryCast, locate_step, panels_per_chunk,
)
from ..story.wiring import BATCH_WIRING
from .references import check_references
from .story_calls import run_story_call
from .story_devices import CALC_COND_BATCH, offer_spare_devices

STATE_KEY = "consistent_story.csa"
WRAPPER_KEY = "consistent_story.csa"
ROWS_KEY = "consistent_story.rows"  # story mode: (chunk, panel) of each row of an attention call
APPLY_MODEL = "apply_model"  # comfy.patcher_extension.WrappersMP.APPLY_MODEL
OUTER_SAMPLE = "outer_sample"  # comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
PREPARE_SAMPLING = "prepare_sampling"  # comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING
OVERRIDE_KEY = "optimized_attention_override"


class CallState:
    """One model call (or story sub-call): its planner, and what waits for the next attention call.

    ``pending`` is ``(layer, latent_hw)`` for the layer whose attention comes next: ``layer`` is
    ((block, index), transformer index), ``latent_hw`` None on a DiT (one resolution). ``story``
    is the call's ``StoryCall``, ``panels`` the sub-call's panels, ``layout`` its tokens (a DiT's;
    None on a UNet). ``extended`` counts the layers whose keys this call extended: the tests and
    benches read it, and it makes a no-op visible.
    """

    __slots__ = ("planner", "pending", "chained_override", "story", "panels", "layout", "extended", "reached",
                 "replaced")

    def __init__(self, planner: CallPlanner, chained_override, story=None, panels=(), layout=None, replaced=()):
        self.planner = planner
        self.pending = None
        self.chained_override = chained_override
        self.story = story
        self.panels = panels
        self.layout = layout
        self.extended = 0
        self.reached = set()  # the blocks that named themselves in this call
        self.replaced = frozenset(replaced)  # attn1 layers another node replaced in this call (PAG, SAG)

    def expect(self, layer, detail) -> None:
        """The next attention call is ``layer``'s; the previous layer's must have come through CSA."""
        if self.pending is not None:
            raise_unreached(self.pending)
        self.pending = (layer, detail)
        self.reached.add(layer[0])


def raise_unreached(pending) -> None:
    layer = pending[0]
    raise ConsistentAttentionError(
        f"Consistent Self-Attention planned layer {layer}, but its attention never reached CSA (something "
        "between ComfyUI's attention call and CSA's attention override dropped it). Remove the node that replaces "
        "this model's attention, or this Consistent Self-Attention node."
    )


def current_step(transformer_options: dict, config: CSAConfig | None = None, model_sampling=None) -> Step:
    """The step of this sampling call (one host sync per model call, measured at 0.4 ms on SDXL).

    With sigma percents (``config.percent_of == "sigma"``) the step also carries its sigma (the
    schedule's, so extra evaluations of one step agree) and the config's percents converted by
    ``model_sampling.percent_to_sigma``, as ComfyUI's ControlNet converts its start and end."""
    sigmas = transformer_options.get("sigmas")
    schedule = transformer_options.get("sample_sigmas")
    if sigmas is None or schedule is None:
        return Step(0, 1)
    schedule = schedule.tolist()
    step = locate_step(float(sigmas.reshape(-1)[0]), schedule)
    if config is None or config.percent_of != "sigma":
        return step
    return replace(step, sigma=float(schedule[step.index]), marks=sigma_marks(config, model_sampling))


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
        raise ConsistentAttentionError(
            f"Story Prompts draws part of the story (panels {', '.join(str(p + 1) for p in drawn)}), but the "
            "sampler's noise is not those panels' noise in the whole story, so they would not be the whole run's "
            "panels. Connect Story Latent directly to the sampler's latent_image (Empty Latent Image, or Latent "
            "Batch Seed Behavior 'random', gives the first panels' noise instead)."
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

    def __deepcopy__(self, memo):
        return self  # immutable: every clone of the model shares this patch

    def install(self, model) -> None:
        """Install on a ModelPatcher clone (never on the incoming model)."""
        if model.get_wrappers(APPLY_MODEL, WRAPPER_KEY):
            raise ConsistentAttentionError(
                "this model already has Consistent Self-Attention; use one Consistent Self-Attention node per model."
            )
        self.mark_layers(model)
        model.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, self.wrap_apply_model)
        model.add_wrapper_with_key(OUTER_SAMPLE, WRAPPER_KEY, self.check_batch)
        if self.cast is not None:
            model.add_wrapper_with_key(PREPARE_SAMPLING, WRAPPER_KEY, self.size_model_load)
            model.add_wrapper_with_key(CALC_COND_BATCH, WRAPPER_KEY, offer_spare_devices)

    def mark_layers(self, model) -> None:
        """Have each self-attention layer name itself before its attention call: an attn1 patch."""
        model.set_model_attn1_patch(self)

    def check_batch(self, executor, noise, *args, **kwargs):
        """OUTER_SAMPLE wrapper: before the first step, the panel batch, a part's noise and the references' size."""
        story_panels = None if self.cast is None else len(self.cast.batch)
        if self.cast is not None and self.cast.drawn is not None:
            check_story_noise(self.cast.drawn, noise, args, kwargs)
        if self.references:
            check_references(self.references, executor.class_obj.model_patcher.model, tuple(noise.shape[-2:]))
        return check_panel_batch(executor, noise, *args, story_panels=story_panels, **kwargs)

    def size_model_load(self, executor, model, noise_shape, conds, model_options=None, **kwargs):
        """PREPARE_SAMPLING wrapper: ComfyUI sizes its model load from the whole batch; a story runs
        at most its largest panel subset at once, so ask for that (the weights then stay loaded
        instead of being pushed off the GPU by a long story). Without panels_per_call: the least
        that must run at once, the largest character's identity panels; the rest fits at run time."""
        panels = min(noise_shape[0], self.cast.largest_call(self.panels_per_call or 1))
        return executor(model, [panels] + list(noise_shape[1:]), conds, model_options=model_options, **kwargs)

    def wrap_apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        options = dict(transformer_options)  # the caller's dict stays untouched
        planner = CallPlanner(self.config, current_step(options, self.config, executor.class_obj.model_sampling))
        if self.cast is not None:
            return run_story_call(self, planner, executor, x, t, c_concat, c_crossattn, control, options, **kwargs)
        chunks = len(options.get("cond_or_uncond") or [0])
        panels = panels_per_chunk(x.shape[0], chunks)
        story = self.story_call(planner, chunks, 0, panels, keep_bank=False)
        self.prepare(options, planner, story, tuple(range(panels)), self.call_layout(x, kwargs))
        return self.run(executor, x, t, c_concat, c_crossattn, control, options=options, **kwargs)

    def story_call(self, planner: CallPlanner, chunks: int, first_chunk: int, panels: int,
                   keep_bank: bool = True) -> StoryCall:
        """Who reads whom in one model call (or one chunk of it) of ``panels`` panels per chunk: the
        story's cast, or without one every panel its neighbours. ``keep_bank`` False when a single
        sub-call writes and reads every layer's shared tokens (each layer's are then dropped right
        after it)."""
        cast = self.cast if self.cast is not None else BatchCast.of(panels, self.config.window)
        return StoryCall(planner, cast, chunks, first_chunk, keep_bank=keep_bank)

    def call_layout(self, x, kwargs: dict):
        """The token layout of a model call with latents ``x`` and model inputs ``kwargs``: None
        on a UNet (every attn1 token is an image token); a DiT says where its image tokens are."""
        return None

    def prepare(self, options: dict, planner: CallPlanner, story=None, panels: tuple[int, ...] = (), layout=None) -> dict:
        """Put a fresh ``CallState`` and this patch's attention override (chained to the one found
        there) into ``options``, a copy of transformer_options owned by this call."""
        replaced = (options.get("patches_replace") or {}).get("attn1") or {}
        options[STATE_KEY] = CallState(planner, options.get(OVERRIDE_KEY), story, panels, layout, replaced)
        options[OVERRIDE_KEY] = self.attention
        return options

    def run(self, executor, *args, options: dict, **kwargs):
        """Run one (sub-)call prepared in ``options``; a layer left pending never reached CSA."""
        out = executor(*args, options, **kwargs)
        state = options[STATE_KEY]
        if state.pending is not None:
            raise_unreached(state.pending)
        self.check_reached(state)
        return out

    def check_reached(self, state: CallState) -> None:
        """After a call: every block CSA chose named itself (a DiT's blocks are known in advance)."""

    def __call__(self, n, context, value, extra_options):
        """attn1 patch: name this layer, whose attention call comes next."""
        state = extra_options.get(STATE_KEY)
        if state is None:
            return n, context, value
        block = extra_options.get("block")
        if block is None or attn1_replaced(state, extra_options, block):
            return n, context, value  # another node's attention replaces this layer's (PAG, SAG): not CSA's to extend
        state.expect((block, extra_options.get("block_index", 0)), tuple(extra_options["original_shape"][-2:]))
        return n, context, value

    def attention(self, func, q, k, v, heads, *args, **kwargs):
        """optimized_attention_override: extend k/v with the planned tokens, then attend as usual.
        A planned layer whose call CSA cannot extend is an error naming the layer and the shapes."""
        options = kwargs.get("transformer_options") or {}
        state = options.get(STATE_KEY)
        if state is None:
            return func(q, k, v, heads, *args, **kwargs)
        pending, state.pending = state.pending, None
        if args:  # ComfyUI's attention functions take (q, k, v, heads, mask=None, ...): name the mask
            kwargs = {**kwargs, "mask": args[0]}
            args = args[1:]
        if q.ndim == 3 and v.ndim == 4:  # SD3: v per head, q and k [rows, tokens, heads * D]; the backends take either
            v = v.flatten(2)
        mask = kwargs.get("mask")

        def attend(q, k, v, rows=None, mask=mask):
            """The attention ComfyUI would run (through any chained override); ``rows`` names the
            rows of a story attention call for the overrides after this one."""
            call_kwargs = {**kwargs, "mask": mask} if "mask" in kwargs or mask is not None else kwargs
            if rows is not None:
                call_kwargs = {**call_kwargs, "transformer_options": {**options, ROWS_KEY: rows}}
            if state.chained_override is not None:
                return state.chained_override(func, q, k, v, heads, *args, **call_kwargs)
            if k.shape[-2 if k.ndim == 4 else 1] > q.shape[-2 if q.ndim == 4 else 1]:  # a call CSA extended
                return self.kernels.attend(func, lambda: func(q, k, v, heads, *args, **call_kwargs), q, k, v, heads,
                                           call_kwargs)
            return func(q, k, v, heads, *args, **call_kwargs)

        if pending is None:
            return attend(q, k, v)
        layer, latent_hw = pending
        if not state.planner.config.patches_block(*layer[0]):
            return attend(q, k, v)  # a block CSA never runs in: whatever its shapes, not CSA's
        rows = state.story.chunks * len(state.panels)
        if q.shape[:-1] != k.shape[:-1] or q.shape[0] != rows or (mask is not None and mask.shape[0] not in (1, rows)):
            raise_unextendable(layer, q, k, mask, f"{rows} rows of self-attention")
        out = state.story.attention(layer, state.panels, q, k, v, latent_hw, attend, state.layout, mask)
        if out is None:  # not a CSA layer at this step (schedule, rate)
            return attend(q, k, v)
        state.extended += int(state.story.reads(state.panels, q.device))
        return out


def attn1_replaced(state: CallState, extra_options: dict, block) -> bool:
    """Whether another node replaced this attn1 (ComfyUI looks up (block, id, block_index), then block)."""
    replaced = state.replaced
    return bool(replaced) and ((*block, extra_options.get("block_index", 0)) in replaced or block in replaced)


def raise_unextendable(layer, q, k, mask, expected: str) -> None:
    masked = "" if mask is None else f", mask {list(mask.shape)}"
    raise ConsistentAttentionError(
        f"Consistent Self-Attention cannot extend layer {layer}: its attention call has queries {list(q.shape)} and "
        f"keys {list(k.shape)}{masked}, where CSA expected {expected}. Something changed this model's attention "
        "(another node, or a model layout this version does not know): remove that node or Consistent Self-Attention."
    )
