"""Text encoders small enough for the CPU, built from ComfyUI's own tokenizers and encoder classes.

Flux: ComfyUI's FluxTokenizer and CLIP wrapper around a stand-in for T5-XXL and CLIP-L. T5-XXL has
4.7 billion parameters: too large to build and run on the CI machine. The stand-in returns states
of the real shapes (``[1, T5 tokens, 4096]``, pooled ``[1, 768]``) computed from the token ids, so
equal tokens give equal states and every token, padding included, changes them.

Flux.2 klein, Qwen-Image, Z-Image (``llm_text_encoder``): the LLM alone (Qwen3-4B, Qwen2.5-VL-7B)
is replaced, inside ComfyUI's own encoder classes, so their tokenizer (the ``qwen25_tokenizer``
files both hosts ship), template, padding, attention mask, layer choice (klein stacks three
layers, Z-Image takes the second to last) and template cut (Qwen-Image) are ComfyUI's.
Everything around them (``comfy.sd.CLIP``, token options, the sampler) is ComfyUI's.
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


# ----------------------------------------------------------------------------------------------
# LLM text encoders (Flux.2 klein: Qwen3-4B; Qwen-Image: Qwen2.5-VL-7B; Z-Image: Qwen3-4B)
# ----------------------------------------------------------------------------------------------
class TokenStates(torch.nn.Module):
    """Stands in for an LLM's token embedding: ``FluxTextStandIn.states`` of each token id."""

    def __init__(self, width: int, device=None):
        super().__init__()
        self.width = width
        self.weight = torch.nn.Parameter(torch.ones(1, device=device))  # where the text encoder runs

    def forward(self, input_ids, out_dtype=None):
        states = FluxTextStandIn.states(input_ids.flatten(), self.width).view(*input_ids.shape, self.width)
        return (states * self.weight).to(out_dtype or torch.float32)


class LLMStandIn(torch.nn.Module):
    """Stands in for the LLM inside ComfyUI's ``SDClipModel`` (``comfy.text_encoders.llama``): the
    same call and outputs ``(last, intermediate)``. Layer i's states are the token states plus i
    times the mean of the tokens the attention mask lets in, so every layer differs, every token
    counts and masked (padding) tokens do not reach the others."""

    def __init__(self, width: int, num_layers: int, device=None):
        super().__init__()
        self.num_layers = num_layers
        self.embed_tokens = TokenStates(width, device)

    def get_input_embeddings(self):
        return self.embed_tokens

    def layer(self, embeds, mask, index: int):
        keep = torch.ones(embeds.shape[:2]) if mask is None else mask.float()
        mean = (embeds * keep[..., None]).sum(1, keepdim=True) / keep.sum(1)[:, None, None].clamp(min=1)
        return torch.tanh(embeds + mean * (index + 1) / self.num_layers)

    def forward(self, x, attention_mask=None, embeds=None, intermediate_output=None, **kwargs):
        last = self.layer(embeds, attention_mask, self.num_layers - 1)
        if isinstance(intermediate_output, list):  # klein: three layers, stacked on dim 1
            return last, torch.stack([self.layer(embeds, attention_mask, i) for i in intermediate_output], dim=1)
        if isinstance(intermediate_output, int):  # Z-Image: the second-to-last layer
            return last, self.layer(embeds, attention_mask, intermediate_output % self.num_layers)
        return last, None


def _llm_stand_in(inner, width: int):
    """ComfyUI's ``inner`` (an ``SDClipModel`` of one LLM: its layer choice, special tokens,
    attention masks) with ``LLMStandIn`` in place of the LLM, which is built on the meta device only."""

    class StandIn(inner):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            super().__init__(device="meta", dtype=dtype, model_options=model_options or {})
            self.transformer = LLMStandIn(width, self.num_layers, device)
            self.freeze()

    return StandIn


def _outer_stand_in(outer, name: str, inner):
    """ComfyUI's text encoder class ``outer`` (its own ``encode_token_weights``: klein stacks three
    layers, Qwen-Image cuts its template off) around the stand-in ``inner``."""
    import comfy.sd1_clip

    class StandIn(outer):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            comfy.sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=dtype, name=name, clip_model=inner,
                                                 model_options=model_options or {})

    return StandIn


def llm_text_encoder(family: str):
    """A ``comfy.sd.CLIP`` with the family's own tokenizer and text encoder classes (what CLIPLoader
    builds for type flux2 / qwen_image / lumina2) around a stand-in of the LLM, at its real width."""
    import comfy.sd
    import comfy.supported_models_base

    if family == "flux2_klein":
        from comfy.text_encoders import flux

        tokenizer, outer = flux.KleinTokenizer, _outer_stand_in(
            flux.Flux2TEModel, "qwen3_4b", _llm_stand_in(flux.Qwen3_4BModel, 2560))
    elif family == "qwen_image":
        from comfy.text_encoders import qwen_image

        tokenizer, outer = qwen_image.QwenImageTokenizer, _outer_stand_in(
            qwen_image.QwenImageTEModel, "qwen25_7b", _llm_stand_in(qwen_image.Qwen25_7BVLIModel, 3584))
    elif family == "z_image":
        from comfy.text_encoders import z_image

        tokenizer, outer = z_image.ZImageTokenizer, _outer_stand_in(
            z_image.ZImageTEModel, "qwen3_4b", _llm_stand_in(z_image.Qwen3_4BModel, 2560))
    else:
        raise ValueError(f"no LLM text encoder stand-in for {family!r}")
    return comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(tokenizer, outer))
