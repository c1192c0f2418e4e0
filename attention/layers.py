"""Which resolution class a self-attention layer belongs to.

Layers are classified by their token count relative to the latent, never by block ids, so
every SD1.5- or SDXL-family layout (SSD-1B, Vega, KOALA, custom depths) is served alike.
"""
from __future__ import annotations

import math


def downsample_factor(latent_height: int, latent_width: int, tokens: int) -> int:
    """The power of two by which a layer's token grid is coarser than the latent grid."""
    if tokens <= 0:
        raise ValueError(f"a layer with {tokens} tokens cannot be classified")
    ratio = latent_height * latent_width / tokens
    return 2 ** max(0, round(math.log2(ratio) / 2))
