"""One model call over a story, run a few panels at a time (the APPLY_MODEL wrapper's story mode).

ComfyUI calls the model with every panel of the batch (times its conditioning chunks). The call
is split into the panel subsets of ``StoryCast.call_plan``: identity panels first, so their
tokens are in the call's bank before any other panel reads them, then the other panels,
``panels_per_call`` at a time. Each subset keeps every chunk (cond and uncond rows of the same
panels), so ``cond_or_uncond`` stays true for every patch that reads it. Each model input with a
row per batch row (latents, timesteps, prompts, ControlNet residuals, extra conds) is cut to the
subset's rows, and the outputs are put back in ComfyUI's row order.
"""
from __future__ import annotations

import torch

from ..attention import ConsistentAttentionError, StoryCall, call_rows, panels_per_chunk, take_rows


def run_story_call(patch, planner, executor, x, t, c_concat, c_crossattn, control, options: dict, **kwargs):
    chunks = len(options.get("cond_or_uncond") or [0])
    panels = panels_per_chunk(x.shape[0], chunks)
    cast = patch.cast
    if panels != cast.panels:
        raise ConsistentAttentionError(
            f"The model was called with {panels} panels for a story of {cast.panels}. Wire Story Prompts' "
            "panel_count into the latent's batch_size and its story into Consistent Self-Attention, from the same "
            "Story Prompts node."
        )
    story = StoryCall(planner, cast, chunks)
    per_call = patch.panels_per_call or panels_that_fit(executor.class_obj, x, chunks, panels)
    plan = cast.call_plan(per_call)
    if len(plan) == 1:  # every panel in one call, in ComfyUI's order: nothing to cut
        patch.prepare(options, planner, story, plan[0])
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    refuse_single_call_recorders(options, cast.panels)
    rows = x.shape[0]
    out = None
    for subset in plan:
        index = torch.tensor(call_rows(subset, chunks, panels), device=x.device)

        def take(value, name):
            return take_rows(value, index, rows, name)

        sub_options = patch.prepare(dict(options), planner, story, subset)
        if "sigmas" in options:  # one sigma per panel (ComfyUI's per-chunk timestep)
            sub_options["sigmas"] = take_rows(options["sigmas"], torch.tensor(subset), panels, "sigmas")
        result = executor(
            take(x, "x"), take(t, "timestep"), take(c_concat, "c_concat"), take(c_crossattn, "c_crossattn"),
            take(control, "control"), sub_options, **{name: take(value, name) for name, value in kwargs.items()},
        )
        if out is None:
            out = result.new_empty((rows,) + tuple(result.shape[1:]))
        out.index_copy_(0, index.to(result.device), result)
    return out


def refuse_single_call_recorders(options: dict, panels: int) -> None:
    """Self-Attention Guidance keeps the attention map of the last model call it saw and applies it to
    the whole batch (a limitation its own source marks TODO); split over several calls it would
    silently use the wrong panels' map."""
    replaced = (options.get("patches_replace") or {}).get("attn1") or {}
    if any("SelfAttentionGuidance" in getattr(fn, "__qualname__", "") for fn in replaced.values()):
        raise ConsistentAttentionError(
            f"Self-Attention Guidance needs the whole batch in one model call, but this story of {panels} panels "
            f"runs in several. Set panels_per_call to {panels} (needs the memory for every panel at once) or use "
            "Perturbed-Attention Guidance, which works with any panels_per_call."
        )


def panels_that_fit(base_model, x: torch.Tensor, chunks: int, panels: int) -> int:
    """How many panels (all their chunks) one model call can hold now: ComfyUI's own rule for
    batching conditionings (``samplers._calc_cond_batch``: estimated need x 1.5 under free memory)."""
    import comfy.model_management

    free = comfy.model_management.get_free_memory(x.device)
    per_panel = base_model.memory_required([chunks] + list(x.shape[1:]))
    if per_panel <= 0:
        return panels
    return max(1, min(panels, int(free / (1.5 * per_panel))))
