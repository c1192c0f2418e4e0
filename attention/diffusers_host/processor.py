"""Consistent Self-Attention in diffusers: an attn1 processor for ``UNet2DConditionModel``.

The same engine and options as the ComfyUI patch (``nodes/host/csa_patch.py``). Every self-attention
layer gets a processor that knows its ComfyUI identity (block kind, block number, index in its
transformer), so for one ``CSAConfig``, seed and step both hosts choose the same layers, draw the
same schedule and sample the same tokens. Layers and steps without CSA run the layer's previous
processor untouched (``AttnProcessor2_0`` in a default UNet); cross-attention (attn2) is not touched.

    state = install_consistent_attention(pipe.unet, CSAConfig(schedule="always"), scheduler=pipe.scheduler)
    images = pipe(["a knight, in a forest", "a knight, in a castle"], guidance_scale=5.0).images
    state.remove()

diffusers itself is never imported here: the processor only calls the ``Attention`` module it is
given, so ``import consistent_story.attention`` keeps working without diffusers installed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..cast import BatchCast, StoryCast
from ..config import ConsistentAttentionError, CSAConfig
from ..planner import CallPlanner, panels_per_chunk
from ..schedule import Step
from ..story_attention import StoryCall


@dataclass(frozen=True)
class LayerId:
    """A self-attention layer named as ComfyUI names it: ``block`` = (kind, number), ``block_index``."""

    kind: str
    number: int
    block_index: int

    @property
    def block(self) -> tuple[str, int]:
        return (self.kind, self.number)


def comfy_self_attention_layers(unet) -> list[tuple[LayerId, torch.nn.Module]]:
    """Every attn1 of a ``UNet2DConditionModel`` with its ComfyUI identity.

    ComfyUI's ``openaimodel.UNetModel`` numbers input blocks from 1, one per resnet (with its
    transformer, if any) and one per downsampler; the middle block is 0; output blocks count from
    0, one per resnet, the upsampler sharing the last one. This walks the diffusers blocks in
    that order, so any depth or layer count per level maps as ``comfy.utils.unet_to_diffusers``
    maps the weights.
    """
    layers = []
    number = 1
    for block in unet.down_blocks:
        for resnet in range(len(block.resnets)):
            layers += _transformer_attn1(block, resnet, "input", number)
            number += 1
        number += 1 if getattr(block, "downsamplers", None) else 0
    middle = getattr(unet.mid_block, "attentions", None) or []
    if len(middle) > 1:
        raise ConsistentAttentionError(
            f"the UNet's middle block has {len(middle)} transformers; ComfyUI's layout (and so CSA's layer "
            "naming) has one. Use a UNet with mid_block num_layers=1."
        )
    if middle:
        layers += _transformer_attn1(unet.mid_block, 0, "middle", 0)
    number = 0
    for block in unet.up_blocks:
        for resnet in range(len(block.resnets)):
            layers += _transformer_attn1(block, resnet, "output", number)
            number += 1
    return layers


def _transformer_attn1(block, position: int, kind: str, number: int) -> list[tuple[LayerId, torch.nn.Module]]:
    attentions = getattr(block, "attentions", None)
    if not attentions:
        return []
    transformer_blocks = getattr(attentions[position], "transformer_blocks", ())
    return [(LayerId(kind, number, index), layer.attn1) for index, layer in enumerate(transformer_blocks)]


class ConsistentAttentionState:
    """What every processor of one UNet shares; change its fields between (or during) calls.

    config: the ``CSAConfig`` (replace it to change options; no reinstall needed).
    chunks: CFG halves per UNet batch: 2 with classifier-free guidance (rows ``[uncond; cond]``),
      1 without (``guidance_scale <= 1``). Row ``r`` is panel ``r % panels`` of chunk ``r // panels``.
    step: the sampling step, ``Step(index, total)``. Set by hand before each UNet call, or found
      from each call's timestep in ``scheduler.timesteps`` when a scheduler is given.
    latent_hw: the latent's (height, width), taken from each UNet call's ``sample``.
    cast: a ``StoryCast`` (who reads whom) for story mode: each prompt of the batch is a panel of
      the story, in order; None shares among every panel of the batch.
    """

    def __init__(self, config: CSAConfig, chunks: int = 2, scheduler=None, cast: StoryCast | None = None):
        if chunks < 1:
            raise ConsistentAttentionError(f"chunks must be 1 (no CFG) or more (2 with CFG), got {chunks}.")
        self.config = config
        self.chunks = chunks
        self.scheduler = scheduler
        self.cast = cast
        self.step = Step(0, 1)
        self.latent_hw: tuple[int, int] | None = None
        self.planner: CallPlanner | None = None  # one per UNet call, as in ComfyUI
        self.story_call: StoryCall | None = None  # who reads whom in this UNet call (one engine for both modes)
        self.layers: list[LayerId] = []
        self._undo: list = []

    def story_active(self, layer: LayerId, hidden_states: torch.Tensor) -> bool:
        """Whether this layer shares tokens in the current UNet call."""
        if self.story_call is None:
            raise ConsistentAttentionError(
                "Consistent Self-Attention runs inside a UNet call: call the UNet, not its layers."
            )
        rows = hidden_states.shape[0]
        if rows != self.chunks * self.story_call.cast.panels:
            raise ConsistentAttentionError(
                f"the story has {self.story_call.cast.panels} panels and chunks is {self.chunks}, so a UNet call needs "
                f"{self.chunks * self.story_call.cast.panels} rows; got {rows}. Give one prompt per panel."
            )
        return self.planner.rate(layer.block, layer.block_index, hidden_states.shape[1], self.latent_hw) > 0

    def observe_unet_call(self, unet, args, kwargs) -> None:
        """UNet forward pre-hook: the latent size, the step (when a scheduler is known), a fresh planner."""
        sample = args[0] if args else kwargs["sample"]
        self.latent_hw = tuple(sample.shape[-2:])
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is not None and timestep is not None and len(timesteps):
            self.step = nearest_step(timestep, timesteps)
        self.planner = CallPlanner(self.config, self.step)
        cast = self.cast or BatchCast.of(panels_per_chunk(sample.shape[0], self.chunks), self.config.window)
        self.story_call = StoryCall(self.planner, cast, self.chunks, keep_bank=False)  # one call holds every panel

    def remove(self) -> None:
        """Give every attn1 its previous processor back and stop observing the UNet."""
        while self._undo:
            self._undo.pop()()
        self.planner = None


def nearest_step(timestep, timesteps) -> Step:
    """The step whose timestep is nearest (extra evaluations at one timestep land on one step)."""
    value = float(torch.as_tensor(timestep).reshape(-1)[0])
    schedule = torch.as_tensor(timesteps).to(torch.float64)
    return Step(int((schedule - value).abs().argmin()), len(schedule))


class ConsistentSelfAttnProcessor:
    """One attn1's processor: CSA where the state says so, else the processor it replaced."""

    def __init__(self, state: ConsistentAttentionState, layer: LayerId, fallback):
        self.state = state
        self.layer = layer
        self.fallback = fallback

    # The same parameters as AttnProcessor2_0: diffusers filters cross_attention_kwargs by them.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        state = self.state
        # attn1 fed another context (only_cross_attention) is left alone, as in ComfyUI
        if encoder_hidden_states is not None or not state.story_active(self.layer, hidden_states):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        plain = hidden_states.ndim == 3 and attn.spatial_norm is None and attn.group_norm is None
        if attention_mask is not None or not plain:
            raise ConsistentAttentionError(
                f"Consistent Self-Attention on {self.layer}: this self-attention call has an attention mask or a "
                "non-token input, which CSA does not extend. Leave this block out of the config's blocks."
            )
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)

        def attend(q, k, v, rows, mask):
            return _attend(attn, q, k, v)

        layer = (self.layer.block, self.layer.block_index)
        panels = tuple(range(state.story_call.cast.panels))
        out = state.story_call.attention(layer, panels, query, key, value, state.latent_hw, attend)
        if out is None:
            out = _attend(attn, query, key, value)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _attend(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``AttnProcessor2_0``'s attention on projected ``[rows, tokens, C]`` tensors (keys may be longer)."""
    rows = query.shape[0]
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(rows, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(rows, -1, attn.heads * head_dim).to(query.dtype)


def install_consistent_attention(
    unet, config: CSAConfig, *, chunks: int = 2, scheduler=None, cast: StoryCast | None = None
) -> ConsistentAttentionState:
    """Give every attn1 of ``unet`` a CSA processor sharing one state; returns that state.

    chunks: 2 when the pipeline uses classifier-free guidance, 1 when it does not.
    cast: story mode (``StoryCast``): the pipeline's prompts are the story's panels, in order; each
      panel then reads only the identity panels of its characters, ``[NC]`` panels nothing. The
      whole story runs in each UNet call (diffusers pipelines do not split the batch).
    scheduler: the pipeline's scheduler; each UNet call's step is then found from its timestep.
      Without it, set ``state.step = Step(i, total)`` before each denoising step.
    ``state.remove()`` restores the previous processors.
    """
    layers = comfy_self_attention_layers(unet)
    if any(isinstance(attn.processor, ConsistentSelfAttnProcessor) for _, attn in layers):
        raise ConsistentAttentionError("this UNet already has Consistent Self-Attention; call state.remove() first.")
    state = ConsistentAttentionState(config, chunks, scheduler, cast)
    for layer, attn in layers:
        previous = attn.processor
        attn.set_processor(ConsistentSelfAttnProcessor(state, layer, previous))
        state.layers.append(layer)
        state._undo.append(lambda attn=attn, previous=previous: attn.set_processor(previous))
    hook = unet.register_forward_pre_hook(state.observe_unet_call, with_kwargs=True)
    state._undo.append(hook.remove)
    return state

