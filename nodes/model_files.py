"""Path inputs of the nodes: a typed path cleaned of blanks and quotes (`clean_path_input`, every node), and a
loader's choice of model file: a combo over one of ComfyUI's model folders plus an optional `path`.

The loaders of the pack (ControlNet, SDM-LoRA) offer the files of a ComfyUI model folder (``folder_paths``) as a
combo, without the companion files that sit beside the models (``.table.safetensors``, ``.spade.safetensors``), and
take an explicit ``path`` instead when one is given. ComfyUI's ``folder_paths`` is imported where it is used: it only
exists inside ComfyUI (the tests put a stand-in on the path).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["clean_path_input", "model_file_options", "no_file_entry", "resolve_model_path"]


def clean_path_input(text: str | None) -> str:
    """A path typed into a node's text input, without surrounding blanks and the quotes a copied path often has."""
    return (text or "").strip().strip('"').strip()


def no_file_entry(folder: str) -> str:
    """The combo entry shown when ``models/<folder>`` holds no file (the `path` input is then required)."""
    return f"(no file in models/{folder}: set path)"


def model_file_options(folder: str, companion_suffix: str) -> list[str]:
    """The files ComfyUI lists for ``folder`` (``"controlnet"``, ``"loras"``), without companions ending in
    ``companion_suffix``; ``[no_file_entry(folder)]`` when there are none (a combo cannot be empty)."""
    import folder_paths

    files = [f for f in folder_paths.get_filename_list(folder) if not f.endswith(companion_suffix)]
    return files or [no_file_entry(folder)]


def resolve_model_path(
    folder: str,
    name: str,
    path: str,
    *,
    error: type[Exception],
    kind: str,
    name_input: str,
    folder_allowed: bool,
    wanted: str,
) -> Path:
    """The file (or diffusers folder) a loader node should read.

    Args:
        folder (`str`): ComfyUI's model folder kind of the combo (``"controlnet"``, ``"loras"``).
        name (`str`): the combo's value, a name relative to that folder (or `no_file_entry`).
        path (`str`): the node's ``path`` input; when not blank it wins (quotes and ``~`` are handled).
        error (`type[Exception]`): the node's error class, raised with a message naming the input at fault.
        kind (`str`): what the node loads, for messages (``"ControlNet"``).
        name_input (`str`): the combo input's name, for messages (``"controlnet_name"``).
        folder_allowed (`bool`): whether ``path`` may name a folder (a diffusers ControlNet folder) or must be a file.
        wanted (`str`): what ``path`` should name, for messages (``"a ControlNet file or diffusers folder"``).
    """
    text = clean_path_input(path)
    if text:
        resolved = Path(text).expanduser()
        if not (resolved.exists() if folder_allowed else resolved.is_file()):
            problem = "does not exist" if folder_allowed else "is not a file"
            raise error(f"`path` {text!r} {problem}; give {wanted}")
        return resolved
    if name == no_file_entry(folder) or not name:
        raise error(f"no {kind} chosen: put the file in models/{folder}, or set `path`")
    import folder_paths

    full = folder_paths.get_full_path(folder, name)
    if full is None:
        raise error(f"`{name_input}` {name!r} is not in ComfyUI's {folder} folders")
    return Path(full)
