"""Saved characters: ``.safetensors`` files under ComfyUI's ``models/consistent_story_characters``.

A file holds one character's reference latents (tensor ``latents``, ``[n, C, h, w]``, the VAE's
latent space) and, as safetensors metadata, its format version, name, description, the latent
format of the model family it was made for and its latent size. Files are read with safetensors
only (no pickle); names are sanitised and always resolved inside the folder; an existing file is
never overwritten (a numbered name is taken instead).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ...attention import ConsistentAttentionError

FOLDER = "consistent_story_characters"
EXTENSION = ".safetensors"
FORMAT = "consistent-story-character"
VERSION = 1
_UNSAFE = re.compile(r"[^\w\- ]+")


@dataclass(frozen=True)
class SavedCharacter:
    name: str
    description: str
    latents: torch.Tensor
    latent_format: str | None


def characters_folder() -> Path:
    """The folder, registered with ComfyUI's folder_paths on first use (idempotent)."""
    import folder_paths

    path = Path(folder_paths.models_dir) / FOLDER
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, str(path), is_default=True)
    folder_paths.folder_names_and_paths[FOLDER][1].add(EXTENSION)
    return Path(folder_paths.get_folder_paths(FOLDER)[0])


def saved_character_files() -> list[str]:
    import folder_paths

    characters_folder()
    return folder_paths.get_filename_list(FOLDER)


def safe_file_stem(text: str) -> str:
    """A file name from a character name: letters, digits, '_', '-' and spaces; no paths."""
    stem = " ".join(_UNSAFE.sub(" ", text).split()).strip(" .")
    if not stem:
        raise ConsistentAttentionError(
            f"file_name {text!r} has no usable characters: use letters, digits, spaces, '_' or '-'."
        )
    return stem[:100]


def save_character(character: SavedCharacter, file_name: str) -> Path:
    """Write ``character`` as ``<file_name>.safetensors`` (or ``<file_name> 2`` ... if taken); return the path."""
    import safetensors.torch

    folder = characters_folder()
    folder.mkdir(parents=True, exist_ok=True)
    stem = safe_file_stem(file_name)
    path, number = folder / f"{stem}{EXTENSION}", 1
    while path.exists():
        number += 1
        path = folder / f"{stem} {number}{EXTENSION}"
    metadata = {
        "format": FORMAT, "version": str(VERSION), "name": character.name, "description": character.description,
        "latent_format": character.latent_format or "", "latent_size": json.dumps(list(character.latents.shape[-2:])),
    }
    partial = path.with_name(path.name + ".partial")
    safetensors.torch.save_file({"latents": character.latents.float().contiguous().cpu()}, str(partial), metadata)
    os.replace(partial, path)
    return path


def load_character(file_name: str) -> SavedCharacter:
    """Read a saved character; a file that is not one, or was edited out of shape, is a clear error."""
    import folder_paths
    from safetensors import safe_open

    characters_folder()
    if ".." in Path(file_name).parts or Path(file_name).is_absolute():
        raise ConsistentAttentionError(
            f"character file {file_name!r} points outside models/{FOLDER}; pick a file from the list."
        )
    path = folder_paths.get_full_path(FOLDER, file_name)
    if path is None:
        raise ConsistentAttentionError(
            f"No saved character {file_name!r} in models/{FOLDER}. Pick one of: {', '.join(saved_character_files()) or 'none'}."
        )
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = set(handle.keys())
            latents = handle.get_tensor("latents") if "latents" in keys else None
    except Exception as error:  # not a safetensors file at all
        raise ConsistentAttentionError(f"{file_name} is not a saved character (cannot read it: {error}).") from None
    if metadata.get("format") != FORMAT:
        raise ConsistentAttentionError(f"{file_name} is not a Consistent Story character (no '{FORMAT}' metadata).")
    if metadata.get("version") != str(VERSION):
        raise ConsistentAttentionError(
            f"{file_name} is a character file of version {metadata.get('version')!r}; this pack reads version {VERSION}. "
            "Update the pack, or save the character again."
        )
    size = json.loads(metadata.get("latent_size", "null") or "null")
    if latents is None or latents.ndim != 4 or latents.shape[0] < 1 or list(latents.shape[-2:]) != size \
            or not metadata.get("name"):
        raise ConsistentAttentionError(
            f"{file_name} is damaged: it needs a 'latents' tensor [images, channels, height, width] matching its "
            f"latent_size metadata and a name; found {list(latents.shape) if latents is not None else 'no latents'}, "
            f"latent_size {size}. Save the character again."
        )
    return SavedCharacter(metadata["name"], metadata.get("description", ""), latents,
                          metadata.get("latent_format") or None)
