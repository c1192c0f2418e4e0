"""A Flux text encoder small enough for the CPU: ComfyUI's own FluxTokenizer and CLIP wrapper around
a stand-in for T5-XXL and CLIP-L.

T5-XXL has 4.7 billion parameters: too large to build and run on the CI machine. The stand-in
returns states of the real shapes (``[1, T5 tokens, 4096]``, pooled ``[1, 768]``) computed from the
token ids, so equal tokens give equal states and every token, padding included, changes them.
Everything around it (tokenizer, ``comfy.sd.CLIP``, token options, the sampler) is ComfyUI's.
"""
from __future__ import annotations

import torch


class FluxTextStandIn(torch.nn.Module):
    """What ``FluxClipModel`` returns, from token ids: T5 states and a CLIP-L pooled vector."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__()
        self.dtypes = {torch.float32}
        self.scale = torch.nn.Parameter(torch.ones(1, device=device))

    def reset_clip_options(self):
        pass

    def set_clip_options(self, options):
        pass

    @staticmethod
    def states(ids: torch.Tensor, width: int) -> torch.Tensor:
        frequencies = torch.arange(1, width + 1, dtype=torch.float32) / width
        return torch.sin(ids.float()[:, None] * frequencies[None] + 0.1)

    def encode_token_weights(self, token_weight_pairs):
        t5 = torch.tensor([token for token, *_ in token_weight_pairs["t5xxl"][0]])
        clip_l = torch.tensor([token for token, *_ in token_weight_pairs["l"][0]])
        return self.states(t5, 4096)[None] * self.scale, self.states(clip_l, 768).mean(0, keepdim=True) * self.scale

    def load_sd(self, sd):
        return self.load_state_dict(sd, strict=False)


def flux_text_encoder():
    """A ``comfy.sd.CLIP`` with ComfyUI's FluxTokenizer and the stand-in encoder."""
    import comfy.sd
    import comfy.supported_models_base
    from comfy.text_encoders.flux import FluxTokenizer

    return comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(FluxTokenizer, FluxTextStandIn))
