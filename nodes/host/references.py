"""Characters from the user's images: their reference rows in each model call (host glue).

A ``CharacterReference`` is what the Character nodes attach to a story: the VAE latents of the
character's images, and its description and the story's negative encoded as conditionings. In
every model call of a story, before any panel runs, ``run_reference_rows`` evaluates one extra
row per reference image: the clean latent noised to the call's sigma with fixed, seeded noise
(ComfyUI's own ``model_sampling.noise_scaling``), prompted with the description (cond chunks) or
the negative (uncond chunks), its model inputs built by ComfyUI's own conditioning code. Those
rows leave their sampled tokens in the call's identity bank and their outputs are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...attention import ConsistentAttentionError, mix_seed

NOISE_SEED = 0x5EED_C4A2  # mixed with the CSA seed: the references' noise


@dataclass(frozen=True)
class CharacterReference:
    name: str  # the story's character it stands for
    latents: torch.Tensor  # [n, C, h, w] in the VAE's latent space (before the model's process_latent_in)
    positive: list  # CONDITIONING: the character's description, in the story's style
    negative: list  # CONDITIONING: the story's negative prompt
    latent_format: str | None = None  # the model family's latent format it was made with, e.g. "SD15"

    @property
    def count(self) -> int:
        return self.latents.shape[0]


def check_references(references, base_model, latent_hw: tuple[int, int]) -> None:
    """The references must be latents of this model's family and the story's size."""
    model_format = type(base_model.latent_format).__name__
    for ref in references:
        if ref.latent_format is not None and ref.latent_format != model_format:
            raise ConsistentAttentionError(
                f"[{ref.name}] was made for {ref.latent_format} models but this model is {model_format}: make the "
                "character again with this model's VAE (Character from Image), or use a model of its family."
            )
        if ref.latents.shape[1] != base_model.latent_format.latent_channels:
            raise ConsistentAttentionError(
                f"[{ref.name}]'s reference latents have {ref.latents.shape[1]} channels but this model's latents have "
                f"{base_model.latent_format.latent_channels}: make the character with this model's VAE."
            )
        if tuple(ref.latents.shape[-2:]) != tuple(latent_hw):
            size = lambda hw: f"{hw[1] * 8}x{hw[0] * 8} px"  # noqa: E731
            raise ConsistentAttentionError(
                f"[{ref.name}]'s reference images are {size(ref.latents.shape[-2:])} but this model call is for "
                f"{size(latent_hw)} panels: set width and height on Character from Image to the panels' size (the "
                "Story Latent's). Area conditionings (Conditioning Set Area) crop the panels and cannot be "
                "combined with characters from images."
            )


def reference_noise(references, seed: int, device) -> torch.Tensor:
    """The fixed noise of every reference row, drawn on the CPU so any device gets the same."""
    latents = torch.cat([ref.latents for ref in references])
    generator = torch.Generator().manual_seed(mix_seed(seed, NOISE_SEED))
    return torch.randn(latents.shape, generator=generator).to(device)


def reference_inputs(base_model, references, x: torch.Tensor, sigma: torch.Tensor, chunk_kinds, seed: int):
    """Model inputs of the reference rows for chunks of kinds ``chunk_kinds`` (0 cond, 1 uncond):
    ``(x, timestep, c_concat, c_crossattn, extra)`` with rows chunk-major, as ComfyUI batches chunks."""
    import comfy.sampler_helpers
    import comfy.samplers

    latents = torch.cat([ref.latents for ref in references]).to(x.device, torch.float32)
    noise = reference_noise(references, seed, x.device)
    rows = latents.shape[0]
    noised = base_model.model_sampling.noise_scaling(sigma.reshape(1).expand(rows), noise,
                                                     base_model.process_latent_in(latents))
    per_row = []
    for kind in chunk_kinds:
        for ref in references:
            conditioning = ref.negative if kind == 1 else ref.positive
            conds = comfy.sampler_helpers.convert_cond(conditioning)[:1]
            conds = comfy.samplers.encode_model_conds(base_model.extra_conds, conds, noised[:1], x.device,
                                                      "negative" if kind == 1 else "positive")
            row = {name: cond.process_cond(batch_size=1, area=None) for name, cond in conds[0]["model_conds"].items()}
            per_row.extend([row] * ref.count)
    extra = {name: value.to(x.device) if isinstance(value, torch.Tensor) else value
             for name, value in comfy.samplers.cond_cat(per_row).items()}
    timestep = sigma.reshape(1).expand(rows * len(chunk_kinds)).to(x.dtype)
    return noised.repeat(len(chunk_kinds), *([1] * (noised.ndim - 1))).to(x.dtype), timestep, extra.pop("c_concat", None), \
        extra.pop("c_crossattn", None), extra
