"""Random-weight single-file checkpoints of real architectures, built with ComfyUI's own classes.

``build_checkpoint(kind, path, seed)`` writes a ``.safetensors`` file that ComfyUI's
CheckpointLoaderSimple detects as the intended model (checked when building): the UNet is
ComfyUI's ``UNetModel`` with a layout that ``comfy.model_detection`` maps to the intended
``comfy.supported_models`` class; the text encoders are ComfyUI's CLIP-L (and CLIP-G for the
SDXL family) at their fixed sizes; the VAE is a TAESD (default, tiny) or the SD KL VAE. Keys
are produced by ComfyUI's own saving path (``BaseModel.state_dict_for_saving``).

Every tensor is drawn from its own generator seeded by (seed, tensor name), so a file depends
only on (kind, seed, taesd) and the ComfyUI version: same inputs, same bytes. Modules are
built on the meta device, so no memory is spent before the values are drawn.

Also used by the GPU benchmarks under bench/: nothing here needs pytest except the fixture.
"""
from __future__ import annotations

import gc
import hashlib
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.comfy_env import import_comfyui

# The layout keys are those of comfy.model_detection.detect_unet_config: building from them and
# detecting the saved file must give them back (checked in build_checkpoint). UNetModel pops
# transformer_depth_output from the end: its last entry is output block 0 (the deepest).
_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,  # fixed by detection for both families; depth and channel_mult are free
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
_SD15_FAMILY = {**_COMMON, "context_dim": 768, "use_linear_in_transformer": False, "adm_in_channels": None}
_SDXL_FAMILY = {
    **_COMMON,
    "context_dim": 2048,
    "use_linear_in_transformer": True,
    "adm_in_channels": 2816,
    "num_classes": "sequential",
}


@dataclass(frozen=True)
class CheckpointKind:
    model_config: str  # class name in comfy.supported_models that detection must pick
    unet: dict
    unet_dtype: torch.dtype
    built_in_cpu_tests: bool


KINDS: dict[str, CheckpointKind] = {
    # 3 levels of 320 channels, one res block each, no attention on the deepest level (as SD1.5):
    # attn1 in input 1,3, middle 0 and output 2-5 (64 and 16 tokens at 64 px, 4 in the middle).
    "sd15_small": CheckpointKind(
        "SD15",
        {
            **_SD15_FAMILY,
            "num_res_blocks": [1, 1, 1],
            "channel_mult": [1, 1, 1],
            "transformer_depth": [1, 1, 0],
            "transformer_depth_output": [1, 1, 1, 1, 0, 0],
            "transformer_depth_middle": 1,
        },
        torch.float32,
        True,
    ),
    # The real SD1.5 UNet (860M parameters): attn1 in input 1,2,4,5,7,8, middle 0, output 3-11.
    "sd15": CheckpointKind(
        "SD15",
        {
            **_SD15_FAMILY,
            "num_res_blocks": [2, 2, 2, 2],
            "channel_mult": [1, 2, 4, 4],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            "transformer_depth_middle": 1,
        },
        torch.float16,
        True,
    ),
    # The real Segmind Vega layout (transformer depths are what detection keys on) but with 320
    # channels on every level: attn1 in input 4,5 (x1), 7,8 (x2) and output 0-2 (x2), 3-5 (x1).
    "vega_small": CheckpointKind(
        "Segmind_Vega",
        {
            **_SDXL_FAMILY,
            "num_res_blocks": [2, 2, 2],
            "channel_mult": [1, 1, 1],
            "transformer_depth": [0, 0, 1, 1, 2, 2],
            "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
            "transformer_depth_middle": -1,  # as the real Vega: a middle block without attention
        },
        torch.float32,
        True,
    ),
    # The full SDXL base UNet (2.6B parameters) for GPU benchmarks; about 7 GB on disk.
    "sdxl": CheckpointKind(
        "SDXL",
        {
            **_SDXL_FAMILY,
            "num_res_blocks": [2, 2, 2],
            "channel_mult": [1, 2, 4],
            "transformer_depth": [0, 0, 2, 2, 10, 10],
            "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
            "transformer_depth_middle": 10,
        },
        torch.float16,
        False,
    ),
}
CPU_KINDS = tuple(name for name, kind in KINDS.items() if kind.built_in_cpu_tests)

# Text encoders and VAEs have fixed sizes: half precision keeps the files small.
FIXED_PART_DTYPE = torch.float16
# ComfyUI's default SD1.x/SDXL KL VAE layout (comfy/sd.py).
_KL_VAE_CONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
# Scalars with a meaning, kept at the value the real model has.
_CONSTANTS = {"logit_scale": 4.6055, "vae_scale": 1.0, "vae_shift": 0.0}


def build_checkpoint(kind: str, path: str | os.PathLike, seed: int = 0, taesd: bool = True) -> Path:
    """Write a random-weight checkpoint of ``kind`` (see KINDS) to ``path``; return the path.

    Needs ComfyUI importable: calls ``import_comfyui()`` (a no-op once it has run).
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown checkpoint kind {kind!r}; choose one of {sorted(KINDS)}.")
    import_comfyui()
    spec = KINDS[kind]
    model_config = _model_config(spec)
    model = _random_model(model_config, seed)
    clip_sd = _random_state_dict(_meta_text_encoder(model_config), seed, FIXED_PART_DTYPE)
    vae_sd = _random_state_dict(_meta_vae(taesd), seed, FIXED_PART_DTYPE)
    state_dict = state_dict_for_saving(model, clip_sd, vae_sd)
    _check_detection(state_dict, spec)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # not a model extension: never listed by ComfyUI
    metadata = {"consistent_story.random_weights": f"kind={kind} seed={seed} taesd={taesd}"}
    import comfy.utils

    comfy.utils.save_torch_file({k: t.contiguous() for k, t in state_dict.items()}, str(partial), metadata)
    os.replace(partial, path)
    return path


def state_dict_for_saving(model, clip_sd: dict, vae_sd: dict) -> dict:
    """``BaseModel.state_dict_for_saving`` across ComfyUI versions: since v0.12 it takes the UNet's
    state dict first instead of reading it from the model."""
    import inspect

    if "unet_state_dict" in inspect.signature(model.state_dict_for_saving).parameters:
        return model.state_dict_for_saving(model.diffusion_model.state_dict(), clip_sd, vae_sd)
    return model.state_dict_for_saving(clip_sd, vae_sd)


def _model_config(spec: CheckpointKind):
    import comfy.supported_models

    model_config = getattr(comfy.supported_models, spec.model_config)(spec.unet)
    model_config.set_inference_dtype(spec.unet_dtype, None)
    return model_config


def _random_model(model_config, seed: int):
    """ComfyUI's BaseModel for the config, UNet weights random (built on meta, then assigned)."""
    model = model_config.get_model({}, device="meta")
    unet = model.diffusion_model
    unet.load_state_dict(_random_state_dict(unet, seed), assign=True)
    return model


def _meta_text_encoder(model_config) -> torch.nn.Module:
    target = model_config.clip_target()
    return target.clip(device="meta", dtype=FIXED_PART_DTYPE)


def _meta_vae(taesd: bool) -> torch.nn.Module:
    with torch.device("meta"):
        if taesd:
            import comfy.taesd.taesd

            return comfy.taesd.taesd.TAESD()
        from comfy.ldm.models.autoencoder import AutoencoderKL

        return AutoencoderKL(ddconfig=_KL_VAE_CONFIG, embed_dim=4)


def _random_state_dict(module: torch.nn.Module, seed: int, dtype: torch.dtype | None = None) -> dict:
    """Values for every tensor of ``module``'s state dict, chosen by the owning layer's type."""
    owners = dict(module.named_modules())
    values = {}
    for name, tensor in module.state_dict().items():
        owner = owners[name.rpartition(".")[0]]
        values[name] = _initial_value(name, owner, tensor.shape, dtype or tensor.dtype, seed)
    return values


def _initial_value(name: str, owner: torch.nn.Module, shape: torch.Size, dtype: torch.dtype, seed: int):
    """Norms are identities, biases zero, weights N(0, 1/fan_in) (activations stay near unit scale
    through the whole UNet, so sampling stays finite and attention is far from uniform)."""
    leaf = name.rpartition(".")[2]
    if leaf in _CONSTANTS:
        return torch.full(shape, _CONSTANTS[leaf], dtype=dtype)
    if isinstance(owner, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
        return torch.ones(shape, dtype=dtype) if leaf == "weight" else torch.zeros(shape, dtype=dtype)
    if leaf == "scale" or type(owner).__name__ == "RMSNorm":  # Flux's query/key norms ("weight" in newer ComfyUI)
        return torch.ones(shape, dtype=dtype)
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype)
    if isinstance(owner, torch.nn.Embedding) or leaf == "class_embedding":  # CLIP vision's class token
        std = 0.02
    elif len(shape) >= 2:
        std = math.prod(shape[1:]) ** -0.5
    else:
        raise ValueError(f"No initialisation rule for {name} {tuple(shape)} in {type(owner).__name__}.")
    generator = torch.Generator().manual_seed(_tensor_seed(seed, name))
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=generator)


def _tensor_seed(seed: int, name: str) -> int:
    """Independent of the other tensors, so the UNet does not change when the VAE choice does."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _check_detection(state_dict: dict, spec: CheckpointKind) -> None:
    import comfy.model_detection

    prefix = "model.diffusion_model."
    detected = comfy.model_detection.detect_unet_config(state_dict, prefix)
    differing = {k: (v, detected.get(k)) for k, v in spec.unet.items() if detected.get(k) != v}
    config = comfy.model_detection.model_config_from_unet_config(detected, state_dict)
    if differing or type(config).__name__ != spec.model_config:
        raise RuntimeError(
            f"ComfyUI would not load this as {spec.model_config}: detected {type(config).__name__}, "
            f"layout differences (built, detected): {differing}"
        )


def build_in_subprocess(kind: str, path: Path, seed: int) -> None:
    """``build_checkpoint`` in a child process: building the full-size UNets takes gigabytes that a
    long test session would otherwise keep (glibc rarely returns them)."""
    import subprocess
    import sys

    script = Path(__file__).with_name("build_checkpoint.py")
    done = subprocess.run([sys.executable, str(script), kind, str(path), str(seed)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the {kind} checkpoint failed:\n{done.stderr[-4000:]}")


class SessionCheckpoints(Mapping):
    """kind -> checkpoint file name for CheckpointLoaderSimple; each kind is built on first use.

    Iterates over the CPU kinds only; any kind of KINDS (e.g. "sdxl") can still be asked for.
    """

    def __init__(self, folder: Path, seed: int = 0):
        self.folder = folder
        self.seed = seed

    def __getitem__(self, kind: str) -> str:
        path = self.path(kind)
        if not path.exists():
            build_in_subprocess(kind, path, self.seed)
        return path.name

    def path(self, kind: str) -> Path:
        if kind not in KINDS:
            raise KeyError(f"Unknown checkpoint kind {kind!r}; choose one of {sorted(KINDS)}.")
        return self.folder / f"random_{kind}.safetensors"

    def __iter__(self) -> Iterator[str]:
        return iter(CPU_KINDS)

    def __len__(self) -> int:
        return len(CPU_KINDS)


try:
    import pytest
except ImportError:  # benchmarks import this module without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def checkpoints(comfy) -> Iterator[SessionCheckpoints]:
        """Random-weight checkpoints in the session folder, registered as a ComfyUI checkpoints folder.

        Deleted at the end of the session: they are gigabytes, and any seed rebuilds them exactly.
        """
        import folder_paths

        folder = comfy.session_dir / "checkpoints"
        folder.mkdir(exist_ok=True)
        folder_paths.add_model_folder_path("checkpoints", str(folder), is_default=True)
        yield SessionCheckpoints(folder)
        shutil.rmtree(folder, ignore_errors=True)

    @pytest.fixture(scope="session")
    def loaded(comfy, checkpoints):
        """``loaded(kind) -> (model, clip)`` through CheckpointLoaderSimple, kept for later tests.

        At most ``LOADED_BUDGET`` slots are kept (the full-size SD1.5 UNet takes two), least
        recently used first out, so the suite's memory stays bounded on a small CI machine."""
        cache = LoadedModels(comfy, checkpoints)
        yield cache.load
        # Drop the models while ComfyUI is still importable: a ModelPatcher collected at
        # interpreter exit fails in its __del__ and prints a traceback for nothing.
        cache.clear()


LOADED_BUDGET = 2
LOADED_WEIGHT = {"sd15": 2}  # slots a kind takes; 1 by default


class LoadedModels:
    def __init__(self, comfy, checkpoints):
        self.comfy, self.checkpoints = comfy, checkpoints
        self.models: dict[str, tuple] = {}  # insertion order = least recently used first

    def load(self, kind: str):
        if kind in self.models:
            self.models[kind] = self.models.pop(kind)
            return self.models[kind]
        weight = LOADED_WEIGHT.get(kind, 1)
        while self.models and sum(LOADED_WEIGHT.get(k, 1) for k in self.models) + weight > LOADED_BUDGET:
            del self.models[next(iter(self.models))]
        release_memory()
        self.models[kind] = self.comfy.nodes.CheckpointLoaderSimple().load_checkpoint(self.checkpoints[kind])[:2]
        return self.models[kind]

    def clear(self) -> None:
        self.models.clear()
        release_memory()


def release_memory() -> None:
    """Let ComfyUI forget the models it loaded for sampling, collect garbage and hand freed heap
    pages back to the system (glibc keeps them otherwise, and a long test session's resident
    memory only grows)."""
    import ctypes
    import sys

    management = sys.modules.get("comfy.model_management")
    if management is not None:
        management.unload_all_models()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
