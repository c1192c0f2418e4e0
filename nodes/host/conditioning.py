"""Panel prompts -> one CONDITIONING whose row i is panel i's prompt (Story Prompts' ComfyUI glue).

Each panel is encoded alone with ComfyUI's CLIP, exactly as CLIPTextEncode would (or with the
host's PhotoMakerEncode), padded where the tokenizer does not pad, repeated to one token length,
and the rows are stacked into one entry.
"""
from __future__ import annotations

import math

import torch

# Most times a row is repeated to reach the common token length (see repeat_tokens).
MAX_TOKEN_REPEATS = 12

PHOTOMAKER_TRIGGER = "photomaker"  # the word ComfyUI's PhotoMakerEncode replaces with the person's ID


def encode(clip, text: str, tokenizer_options: dict | None = None) -> dict:
    """CLIPTextEncode's encoding of one text: {"cond": [1, L, D], "pooled_output": [1, P], ...}."""
    tokens = clip.tokenize(text, tokenizer_options=tokenizer_options) if tokenizer_options else clip.tokenize(text)
    return clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)


def common_padding(clip, texts) -> dict:
    """Tokenizer options that pad every text to one length where the tokenizer does not do it.

    CLIP tokenizers cut and pad text into 77-token chunks, which ``repeat_tokens`` batches. A T5
    tokenizer (Flux, SD3) or an LLM's (Qwen-Image, Z-Image) returns one sequence as long as the
    text: different panels would not batch. Its texts are padded to the longest with its pad
    token, as Flux pipelines pad to a fixed length (``<key>_min_length``, ComfyUI's tokenizer
    option); LLM encoders mask the padding out (their attention mask)."""
    lengths: dict[str, set[int]] = {}
    for text in texts:
        for key, batches in clip.tokenize(text).items():
            if len(batches) == 1:  # one sequence: a chunking tokenizer's would all be one chunk long
                lengths.setdefault(key, set()).add(len(batches[0]))
    return {f"{key}_min_length": max(found) for key, found in lengths.items() if len(found) > 1}


def panel_encoder(clip, photomaker=None, photomaker_image=None, tokenizer_options=None):
    """``encode``, or, with a PhotoMaker model and a face image, ComfyUI's own PhotoMakerEncode for
    every prompt containing the word 'photomaker' (the person's ID fused into the word before it)."""
    if (photomaker is None) != (photomaker_image is None):
        missing = "photomaker_image" if photomaker_image is None else "photomaker"
        raise ValueError(f"{missing} is empty: PhotoMaker needs both the model (PhotoMaker Loader) and a face image.")
    if photomaker is None:
        return lambda text: encode(clip, text, tokenizer_options)
    import nodes as comfy_nodes  # ComfyUI's node registry (this pack's nodes/ is imported relatively)

    core = comfy_nodes.NODE_CLASS_MAPPINGS.get("PhotoMakerEncode")
    if core is None:
        raise ValueError("This ComfyUI has no PhotoMakerEncode node (comfy_extras/nodes_photomaker.py): update it.")

    def encode_panel(text: str) -> dict:
        if PHOTOMAKER_TRIGGER not in text.split(" "):
            return encode(clip, text)
        result = core.execute(photomaker=photomaker, image=photomaker_image, clip=clip, text=text)
        [[cond, extras]] = result.result[0] if hasattr(result, "result") else result[0]
        return {"cond": cond, **extras}

    return encode_panel


def undrawn_lengths(clip, story, padding: dict, encodings: list[dict]) -> list[int]:
    """The token lengths of the panels not drawn, without encoding each: panels that tokenize to the
    same chunk lengths encode to the same length, so one panel per such shape is encoded, unless a
    drawn panel already has it."""

    def shape(text):
        tokens = clip.tokenize(text, tokenizer_options=padding) if padding else clip.tokenize(text)
        return tuple(sorted((key, tuple(len(chunk) for chunk in chunks)) for key, chunks in tokens.items()))

    known = {shape(panel.prompt): e["cond"].shape[1] for panel, e in zip(story.drawn_panels, encodings)}
    for panel in story.panels:
        key = shape(panel.prompt)
        if key not in known:
            known[key] = encode(clip, panel.prompt, padding)["cond"].shape[1]
    return list(known.values())


def common_token_length(lengths: list[int]) -> int:
    common = math.lcm(*lengths)
    if common > MAX_TOKEN_REPEATS * min(lengths):
        raise ValueError(
            f"The prompts encode to {sorted(set(lengths))} tokens. Batching them unchanged means repeating each "
            f"to their least common multiple, {common} tokens, more than {MAX_TOKEN_REPEATS}x the shortest. "
            "Shorten the longest panel prompts or character descriptions (or the style) so they fit fewer "
            "77-token chunks."
        )
    return common


def repeat_tokens(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat the token sequence (dim 1) whole up to ``length``.

    Cross-attention over a sequence repeated k times equals attention over the sequence: every
    key/value pair appears k times, so each softmax weight is split evenly among identical copies.
    Zero padding would not be neutral (a zero key scores 0, not -inf, and takes weight). This is
    how ComfyUI itself pads conds of different lengths (comfy/conds.py, CONDCrossAttn.concat).
    """
    return tensor.repeat(1, length // tensor.shape[1], *([1] * (tensor.dim() - 2)))


def batch_encodings(encodings: list[dict], length: int) -> list:
    """One CONDITIONING entry [cond, extras] whose row i is ``encodings[i]``, tokens at ``length``.

    Extras keep CLIPTextEncode's keys: per-row tensors (pooled_output [B, P]) are stacked, an
    attention mask is repeated like its tokens, shared values (hooks of the one CLIP) kept once.
    """
    rows = [repeat_tokens(e["cond"], length) for e in encodings]
    keys = dict.fromkeys(key for e in encodings for key in e if key != "cond")  # every row's, in order
    extras = {key: _batch_extra(key, [_extra(e, key) for e in encodings], length) for key in keys}
    return [torch.cat(rows), extras]


def _extra(encoding: dict, key: str):
    """``encoding``'s value of ``key``. An attention mask it lacks is all ones: ComfyUI's Qwen-Image
    encoder drops a mask that hides nothing (its longest, unpadded panel), while the padded panels
    keep theirs, and one batch needs a mask for every row."""
    value = encoding.get(key)
    if value is None and key == "attention_mask":
        return torch.ones(1, encoding["cond"].shape[1], dtype=torch.long)
    return value


def _batch_extra(key: str, values: list, length: int):
    first = values[0]
    if all(value is None for value in values):
        return None
    if all(isinstance(value, torch.Tensor) and value.shape[0] == 1 for value in values):
        if key == "attention_mask":
            values = [repeat_tokens(value, length) for value in values]
        if all(value.shape == values[0].shape for value in values):
            return torch.cat(values)
    elif all(value is first or (not isinstance(value, torch.Tensor) and value == first) for value in values):
        return first
    raise ValueError(
        f"This text encoder returns '{key}' in a form that cannot be batched per panel. Story Prompts supports "
        "CLIP, T5 and the LLM text encoders of Flux.2 klein, Qwen-Image and Z-Image; for other models, encode "
        "each panel with CLIPTextEncode."
    )
