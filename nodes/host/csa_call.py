"""Consistent Self-Attention inside one model call (or one story sub-call) on ComfyUI.

A ``CallRunner`` runs a call through CSA: ``prepare`` puts a fresh ``CallState`` and CSA's
attention override into the call's own copy of ``transformer_options``; during the call each
self-attention layer names itself (``mark``, installed as ComfyUI's attn1 patch), and the attention
call right after it (``attention``, the ``optimized_attention_override``, chained to any override
already there) asks the engine's ``StoryCall`` for that layer, which extends the *projected* keys
and values with the tokens its rows read, so no projection work is repeated and ComfyUI's own
attention backend still runs, unmasked. ``run`` then checks that every planned layer reached CSA.

The runner knows nothing of stories or sub-calls (``story_calls.py`` owns those) and keeps nothing
of a call on itself: clones of the model, on one device or several, share it.
"""
from __future__ import annotations

from ...attention import BatchCast, CallPlanner, ConsistentAttentionError, CSAConfig, KernelChoice, StoryCall, StoryCast

STATE_KEY = "consistent_story.csa"
ROWS_KEY = "consistent_story.rows"  # story mode: (chunk, panel) of each row of an attention call
OVERRIDE_KEY = "optimized_attention_override"


class CallState:
    """One model call (or story sub-call): its planner, and what waits for the next attention call.

    ``pending`` is ``(layer, latent_hw)`` for the layer whose attention comes next: ``layer`` is
    ((block, index), transformer index), ``latent_hw`` None on a DiT (one resolution).
    ``story_call`` is the call's ``StoryCall``, ``panels`` the sub-call's panels, ``layout`` its
    tokens (a DiT's; None on a UNet). ``extended`` counts the layers whose keys this call extended:
    the tests and benches read it, and it makes a no-op visible.
    """

    __slots__ = ("planner", "pending", "chained_override", "story_call", "panels", "layout", "extended", "reached",
                 "replaced")

    def __init__(self, planner: CallPlanner, chained_override, story_call: StoryCall, panels=(), layout=None,
                 replaced=()):
        self.planner = planner
        self.pending = None
        self.chained_override = chained_override
        self.story_call = story_call
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


class CallRunner:
    """Runs model calls through CSA for one CSA node: ``cast`` None = batch mode (every panel reads
    its neighbours); ``kernels`` chooses the kernel of the calls CSA extends."""

    def __init__(self, config: CSAConfig, cast: StoryCast | None, kernels: KernelChoice):
        self.config = config
        self.cast = cast
        self.kernels = kernels

    def __deepcopy__(self, memo):
        return self  # immutable: every clone of the model shares it

    def story_call(self, planner: CallPlanner, chunks: int, first_chunk: int, panels: int,
                   keep_bank: bool = True) -> StoryCall:
        """Who reads whom in one model call (or one chunk of it) of ``panels`` panels per chunk: the
        story's cast, or without one every panel its neighbours. ``keep_bank`` False when a single
        sub-call writes and reads every layer's shared tokens (each layer's are then dropped right
        after it)."""
        cast = self.cast if self.cast is not None else BatchCast.of(panels, self.config.window)
        return StoryCall(planner, cast, chunks, first_chunk, keep_bank=keep_bank)

    def layout(self, x, kwargs: dict):
        """The token layout of a model call with latents ``x`` and model inputs ``kwargs``: None
        on a UNet (every attn1 token is an image token); a DiT says where its image tokens are."""
        return None

    def prepare(self, options: dict, planner: CallPlanner, story_call: StoryCall, panels: tuple[int, ...] = (),
                layout=None) -> dict:
        """Put a fresh ``CallState`` and CSA's attention override (chained to the one found there)
        into ``options``, a copy of transformer_options owned by this call."""
        replaced = (options.get("patches_replace") or {}).get("attn1") or {}
        options[STATE_KEY] = CallState(planner, options.get(OVERRIDE_KEY), story_call, panels, layout, replaced)
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
        story_call = state.story_call
        rows = story_call.chunks * len(state.panels)
        if q.shape[:-1] != k.shape[:-1] or q.shape[0] != rows or (mask is not None and mask.shape[0] not in (1, rows)):
            raise_unextendable(layer, q, k, mask, f"{rows} rows of self-attention")
        out = story_call.attention(layer, state.panels, q, k, v, latent_hw, attend, state.layout, mask)
        if out is None:  # not a CSA layer at this step (schedule, rate)
            return attend(q, k, v)
        state.extended += int(story_call.reads(state.panels, q.device))
        return out


def raise_unreached(pending) -> None:
    layer = pending[0]
    raise ConsistentAttentionError(
        f"Consistent Self-Attention planned layer {layer}, but its attention never reached CSA (something "
        "between ComfyUI's attention call and CSA's attention override dropped it). Remove the node that replaces "
        "this model's attention, or this Consistent Self-Attention node."
    )


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

