"""The model files of the DiT workflows' tests (Flux.1, Flux.2 klein, Qwen-Image, Z-Image): random
diffusion models and VAEs that UNETLoader and VAELoader load and detect as the family's, and a
test node standing in for the workflow's text-encoder loader (the real encoders are too large
for the CI machine: harness/text_encoders.py).

Which host can run which workflow: a workflow for a family that only newer ComfyUI has is not
collected on an older host (``host_lacks`` names the missing config class); the source of the
host found is read, so no host at all still fails (the ``comfy`` fixture).
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import NamedTuple

from harness.dit_files import DIT_FILES

TEXT_ENCODER_STAND_IN = "ConsistentStoryTestTextEncoder"  # registered by test fixtures


class DiTFiles(NamedTuple):
    build_model: Callable  # (path) -> path: the diffusion model file
    build_vae: Callable  # (path) -> path: the VAE file
    text_loader: str  # the workflow's text-encoder loader node, replaced by the stand-in
    text_type: str | None  # the loader's ``type`` the family needs (CLIPLoader); None: not checked


def _builders() -> dict[str, DiTFiles]:
    from harness.dit_files import build_dit, build_flux2_vae, build_wan21_vae
    from harness.model_files import build_flux, build_flux_vae

    return {
        "flux": DiTFiles(build_flux, build_flux_vae, "DualCLIPLoader", None),
        "flux2_klein": DiTFiles(functools.partial(build_dit, "flux2_klein"), build_flux2_vae, "CLIPLoader", "flux2"),
        "qwen_image": DiTFiles(functools.partial(build_dit, "qwen_image"), build_wan21_vae, "CLIPLoader", "qwen_image"),
        "z_image": DiTFiles(functools.partial(build_dit, "z_image"), build_flux_vae, "CLIPLoader", "lumina2"),
    }


# The test kinds (harness.workflow.TEST_CHECKPOINT values) that are DiT families: their config
# class in comfy/supported_models.py.
DIT_CONFIGS = {"flux": "Flux", **{kind: config for kind, (config, _, _) in DIT_FILES.items()}}


def host_lacks(kind: str) -> str | None:
    """Why the ComfyUI found cannot run a workflow of test kind ``kind``, or None if it can (or if
    no ComfyUI is found: the test then fails, naming where to put one)."""
    import comfy_host

    config = DIT_CONFIGS.get(kind)
    comfy_dir = comfy_host.find_comfyui()
    if config is None or comfy_dir is None:
        return None
    source = (comfy_dir / "comfy" / "supported_models.py").read_text(encoding="utf-8")
    if re.search(rf"^class {config}\(", source, re.MULTILINE):
        return None
    return f"the ComfyUI at {comfy_dir} has no {config} model (comfy/supported_models.py): a newer ComfyUI runs it"


class TextEncoderStandIn:
    """A node standing in for a DiT workflow's text-encoder loader: the family's own tokenizer and
    encoder classes around a stand-in of T5-XXL or of the LLM (harness/text_encoders.py)."""

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": ("STRING", {})}}

    def load(self, family):
        from harness.text_encoders import flux_text_encoder, llm_text_encoder

        return (flux_text_encoder() if family == "flux" else llm_text_encoder(family),)


def provide_dit_files(prompt: dict, kind: str, comfy, definitions: dict) -> None:
    """Random model files of ``kind`` in the session's model folders, set on the prompt's
    UNETLoader and VAELoader; its text-encoder loader replaced by the stand-in, after checking
    the workflow asks it for the family's type and this host's loader offers that type."""
    import folder_paths

    from harness.workflow import nodes_of_type, set_widgets

    files = _builders()[kind]
    for folder_name, builder, class_type, widget in (
        ("diffusion_models", files.build_model, "UNETLoader", "unet_name"),
        ("vae", files.build_vae, "VAELoader", "vae_name"),
    ):
        folder = comfy.session_dir / folder_name
        path = folder / f"random_{folder_name}_{kind}.safetensors"
        if not path.exists():
            builder(path)
        folder_paths.add_model_folder_path(folder_name, str(folder), is_default=True)
        set_widgets(prompt, class_type, **{widget: path.name})
    loaders = nodes_of_type(prompt, files.text_loader)
    assert loaders, f"the {kind} workflow has no {files.text_loader}"
    for node in loaders.values():
        if files.text_type is not None:
            offered = definitions[files.text_loader]["input"]["required"]["type"][0]
            assert node["inputs"]["type"] == files.text_type in offered, (node["inputs"]["type"], offered)
        node["class_type"], node["inputs"] = TEXT_ENCODER_STAND_IN, {"family": kind}


def by_workflow_on_this_host(paths):
    """``harness.workflow.by_workflow`` for tests that run a workflow's models: only the workflows
    whose family this host has (``host_lacks``), as tests/integration/test_dit_families.py takes
    only the host's families. Nothing is skipped: a workflow is either run or not collected."""
    import pytest

    from harness.workflow import TEST_CHECKPOINT, workflow_id

    runnable = [path for path in paths if host_lacks(TEST_CHECKPOINT.get(workflow_id(path), "")) is None]
    return pytest.mark.parametrize("path", [pytest.param(path, id=workflow_id(path)) for path in runnable])
