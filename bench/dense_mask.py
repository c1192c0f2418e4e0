"""The official StoryDiffusion formulation, written for comparison: one dense boolean mask.

Per CFG half, the panels' tokens are concatenated into one sequence of ``panels * tokens``;
once per model call and layer resolution, one Bernoulli(rate) draw picks which tokens are
shared; every query then sees its own panel's tokens plus the shared tokens of the other panels,
through a ``[panels * tokens]^2`` boolean mask handed to ComfyUI's masked attention (SDPA).
Installed as attn1 replace patches on the output blocks, so q/k/v are ComfyUI's own projections.
"""
from __future__ import annotations

import torch

MASKS_KEY = "consistent_story.bench.dense_masks"
WRAPPER_KEY = "consistent_story.bench.dense"


class DenseMaskCSA:
    def __init__(self, config, downsample_factor):
        self.config = config  # CSAConfig: rate_fine / rate_coarse as in ours
        self.downsample_factor = downsample_factor
        self.layer_calls = 0  # how many attn1 layers it served (verification only)

    def __deepcopy__(self, memo):
        return self

    def install(self, model, output_blocks: int = 9) -> None:
        import comfy.patcher_extension as ext

        for index in range(output_blocks):
            model.set_model_attn1_replace(self.attend, "output", index)
        model.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, WRAPPER_KEY, self.fresh_masks)

    def fresh_masks(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        """A new draw per model call (the official app draws its masks once per step)."""
        options = dict(transformer_options)
        options[MASKS_KEY] = {}
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    def mask(self, panels: int, tokens: int, rate: float, device) -> torch.Tensor:
        panel_of = torch.arange(panels * tokens, device=device) // tokens
        shared = torch.rand(panels * tokens, device=device) < rate
        return (panel_of[:, None] == panel_of[None, :]) | shared[None, :]

    def attend(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention_masked

        rows, tokens, width = q.shape
        chunks = len(extra_options.get("cond_or_uncond") or [0])
        panels = rows // chunks
        height, latent_width = extra_options["original_shape"][-2:]
        rate = self.config.rate_for(self.downsample_factor(height, latent_width, tokens))
        masks = extra_options.setdefault(MASKS_KEY, {})
        key = (panels, tokens)
        if key not in masks:
            masks[key] = self.mask(panels, tokens, rate, q.device)
        self.layer_calls += 1
        q, k, v = (t.reshape(chunks, panels * tokens, width) for t in (q, k, v))
        out = optimized_attention_masked(q, k, v, extra_options["n_heads"], masks[key],
                                         attn_precision=extra_options.get("attn_precision"))
        return out.reshape(rows, tokens, width)
