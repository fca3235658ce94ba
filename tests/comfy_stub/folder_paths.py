"""Stand-in for ComfyUI's ``folder_paths`` (ComfyUI 0.8.0): model folders by name, file lists and full paths.

Tests register folders with ``add_model_folder_path(name, path)`` (or ``reset()`` to forget them); nothing is read
from a ComfyUI install.
"""

from __future__ import annotations

import os

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}


def reset() -> None:
    """Forget every folder (tests call it between cases)."""
    folder_names_and_paths.clear()
    for name in ("checkpoints", "controlnet", "loras", "vae", "clip"):
        folder_names_and_paths[name] = ([], set(supported_pt_extensions))


reset()


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    paths, exts = folder_names_and_paths.setdefault(folder_name, ([], set(supported_pt_extensions)))
    if full_folder_path in paths:
        paths.remove(full_folder_path)
    if is_default:
        paths.insert(0, full_folder_path)
    else:
        paths.append(full_folder_path)


def get_folder_paths(folder_name: str) -> list[str]:
    return folder_names_and_paths[folder_name][0][:]


def get_filename_list(folder_name: str) -> list[str]:
    """Files under the folder's paths (recursively, ``/``-separated relative names) with a known extension."""
    paths, exts = folder_names_and_paths.get(folder_name, ([], set()))
    out: set[str] = set()
    for base in paths:
        for root, _dirs, files in os.walk(base):
            for f in files:
                if os.path.splitext(f)[1].lower() in exts:
                    out.add(os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/"))
    return sorted(out)


def get_full_path(folder_name: str, filename: str) -> str | None:
    for base in folder_names_and_paths.get(folder_name, ([], set()))[0]:
        full = os.path.join(base, os.path.normpath(filename))
        if os.path.isfile(full):
            return full
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    full = get_full_path(folder_name, filename)
    if full is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return full
