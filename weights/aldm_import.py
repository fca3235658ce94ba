"""ALDM-native files: the class-embedding table file, and import of the official ALDM release (boschresearch/ALDM).

**Table files** (`save_class_embedding_table`, `load_class_embedding_table`): one safetensors tensor
``class_embeddings`` of shape `(N + 1, D)` (null row last) with kind ``class_embedding_table`` and the label set in
the metadata. An ALDM-native ControlNet file names its table (``l2i.table_file``, by default `table_path_for` it:
``<name>.table.safetensors``) and records its `table_fingerprint`.

**Official import.** The released checkpoints (``cityscapes_step9.ckpt``, ``ade20k_step9.ckpt``, ...; about 5.75 GB each) are
Lightning ``.ckpt`` files of the whole ControlLDM: ``model.diffusion_model.*`` (the SD 1.5 UNet),
``first_stage_model.*`` (VAE), ``cond_stage_model.*`` (CLIP) and ``control_model.*`` (the ControlNet, ~1.5 GB in
fp32, with ALDM's five-conv ``input_hint_block.{0,2,4,6,8}``). Only ``control_model.*`` is needed:

1. ``torch.load(path, weights_only=True, mmap=True)`` maps the file without reading it (`load_torch_file`); a
   pickle that needs anything but tensors and plain containers is refused;
2. the ``control_model.*`` tensors are cloned out of the mapping (`extract_controlnet_state_dict`), so only their
   pages are ever read and the peak RAM is about the ControlNet's size, not the file's;
3. the ldm keys are renamed to our `ALDMControlNetModel` (`convert_controlnet_state_dict`) with the config read
   from the shapes (SD 1.5 conventions for what shapes do not fix: 32 GroupNorm groups, 8 heads).

The class embeddings the checkpoint was trained with are not in it: ALDM ships them as separate ``.pth`` files
(a float `(N, D)` tensor for the classes and a `(1, D)` null embedding for ignore pixels), made by an undocumented
recipe. The user supplies them (we do not redistribute them); they are read with ``weights_only=True`` and
stacked into our `(N + 1, D)` table, null row last, written beside the ControlNet (`table_path_for`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.files import save_safetensors_atomic
from ..core.labels import LabelSet, load_label_set
from ..core.logging import get_logger
from .controlnet import (
    LDM_PREFIX,
    detect_controlnet_format,
    extract_controlnet_state_dict,
    infer_controlnet_config,
    save_controlnet_file,
)
from .metadata import MetadataError, WeightsMetadata, has_l2i_metadata
from .safe_load import (
    WeightsError,
    WeightsFileError,
    load_safetensors,
    load_torch_file,
    read_safetensors_header,
    sniff_file_format,
)

__all__ = [
    "ALDM_BASE_MODEL",
    "ALDMImport",
    "ClassEmbeddingTable",
    "import_aldm_checkpoint",
    "load_class_embedding_table",
    "load_companion_table",
    "load_official_class_embeddings",
    "read_control_model",
    "save_class_embedding_table",
    "table_fingerprint",
    "table_path_for",
]

logger = get_logger(__name__)

#: The base model the official ALDM checkpoints were trained on.
ALDM_BASE_MODEL = "runwayml/stable-diffusion-v1-5"

_TABLE_KEY = "class_embeddings"


@dataclass(frozen=True)
class ClassEmbeddingTable:
    """An ALDM class-embedding table read from disk.

    Args:
        table (`torch.Tensor`): `(N + 1, D)` float, one row per class, the null row (ignore pixels) last.
        metadata (`WeightsMetadata`): kind ``class_embedding_table``, with the label set.
    """

    table: torch.Tensor
    metadata: WeightsMetadata


def table_path_for(controlnet_path: str | os.PathLike) -> Path:
    """Where the class-embedding table of an ALDM-native ControlNet file is written: ``<name>.table.safetensors``."""
    path = Path(controlnet_path)
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    return path.with_name(f"{stem}.table.safetensors")


def table_fingerprint(table: torch.Tensor) -> str:
    """16 hex digits of the sha256 of a table's fp32 bytes (recorded in the ControlNet that reads it)."""
    return hashlib.sha256(table.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def save_class_embedding_table(
    path: str | os.PathLike,
    table: torch.Tensor,
    label_set: LabelSet,
    *,
    base_model: str = "",
    training_config_hash: str = "",
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write an `(N + 1, D)` table (null row last) as safetensors with its label set in the metadata.

    Raises:
        ValueError: the table is not 2-D float with ``label_set.num_classes + 1`` rows.
    """
    if table.ndim != 2 or not table.is_floating_point() or table.shape[0] != label_set.num_classes + 1:
        raise ValueError(
            f"table has shape {tuple(table.shape)} and dtype {table.dtype}; expected float "
            f"({label_set.num_classes + 1}, D) for label set {label_set.name!r} (N classes + the null row last)"
        )
    md = WeightsMetadata(
        kind="class_embedding_table",
        hint_encoding="embedding",
        label_set=label_set,
        base_model=base_model,
        training_config_hash=training_config_hash,
        extra={**dict(extra or {}), "table_fingerprint": table_fingerprint(table)},
    )
    return save_safetensors_atomic({_TABLE_KEY: table.detach().contiguous().cpu()}, path, metadata=md.to_safetensors())


def load_class_embedding_table(path: str | os.PathLike, label_set: LabelSet | None = None) -> ClassEmbeddingTable:
    """Read a table written by `save_class_embedding_table`, checking its label set against ``label_set``.

    Raises:
        MetadataError: not a table file, or trained on another label set (the message names both).
    """
    loaded = load_safetensors(path)
    metadata = WeightsMetadata.from_safetensors(loaded.metadata, source=str(path))
    metadata.check(kind="class_embedding_table", label_set=label_set, source=str(path))
    if _TABLE_KEY not in loaded.state_dict:
        raise MetadataError(f"{path}: a class-embedding table file without its {_TABLE_KEY!r} tensor")
    table = loaded.state_dict[_TABLE_KEY]
    if metadata.label_set is not None and table.shape[0] != metadata.label_set.num_classes + 1:
        raise MetadataError(
            f"{path}: table has {table.shape[0]} rows but its label set {metadata.label_set.name!r} needs "
            f"{metadata.label_set.num_classes + 1}"
        )
    return ClassEmbeddingTable(table, metadata)


@dataclass(frozen=True)
class ALDMImport:
    """What `import_aldm_checkpoint` wrote.

    Args:
        controlnet_path (`Path`): the ALDM-native ControlNet (safetensors file, or folder for ``diffusers-folder``).
        table_path (`Path`): the `(N + 1, D)` class-embedding table.
        config (`dict`): the `ALDMControlNetModel` config used.
        metadata (`WeightsMetadata`): the ControlNet's metadata (before the config fields are added).
        num_tensors (`int`): ControlNet tensors taken from the checkpoint.
    """

    controlnet_path: Path
    table_path: Path
    config: dict[str, Any]
    metadata: WeightsMetadata
    num_tensors: int


def read_control_model(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``control_model.*`` tensors of a ControlLDM checkpoint, read through a memory map.

    Accepts a Lightning dict (``{"state_dict": {...}, "epoch": ..., ...}``) or a raw state dict. Only the selected
    tensors are copied into RAM; the rest of the file is never read.

    Raises:
        WeightsFileError: the file is unreadable, unsafe, or holds no ``control_model.*`` tensors.
    """
    obj = load_torch_file(path, mmap=True)
    state = obj.get("state_dict") if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping) else obj
    if not isinstance(state, Mapping) or not any(isinstance(k, str) and k.startswith(LDM_PREFIX) for k in state):
        found = (
            sorted({str(k).split(".")[0] for k in state})[:8] if isinstance(state, Mapping) else type(state).__name__
        )
        raise WeightsFileError(
            f"{str(path)!r} holds no {LDM_PREFIX}* tensors (found {found}), so it is not an ALDM / ControlLDM "
            "checkpoint; a ControlNet-only file converts with l2i-convert controlnet"
        )
    selected = extract_controlnet_state_dict(obj, str(path), copy=True)
    del obj, state  # drop the references into the memory map
    return selected


def load_companion_table(controlnet_path: str | os.PathLike, label_set: LabelSet | None = None) -> ClassEmbeddingTable:
    """The class-embedding table that belongs to an ALDM-native ControlNet file or folder.

    The table is the file the ControlNet's metadata names (``l2i.table_file``, in the same folder) where that file
    exists, else `table_path_for` it (``<name>.table.safetensors``: both files renamed, e.g. a trainer export's
    ``controlnet.safetensors`` + ``controlnet.table.safetensors`` put in ComfyUI as ``x.safetensors`` +
    ``x.table.safetensors``). When the ControlNet records ``l2i.table_fingerprint`` the table must match it.

    Raises:
        WeightsFileError: no table file where it should be.
        MetadataError: the table belongs to another ControlNet or label set (the message names both).
    """
    path = Path(controlnet_path)
    header_path = path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path
    raw = read_safetensors_header(header_path).metadata if sniff_file_format(header_path) == "safetensors" else {}
    metadata = WeightsMetadata.from_safetensors(raw, source=str(path)) if has_l2i_metadata(raw) else None
    name = metadata.extra.get("table_file") if metadata is not None else None
    # the name recorded at export, else <name>.table.safetensors: a user who renames both files (as models/controlnet
    # wants, docs/COMFYUI.md) keeps a working pair; the fingerprint below still refuses another ControlNet's table
    candidates = list(dict.fromkeys([*([path.with_name(name)] if name else []), table_path_for(path)]))
    table_path = next((c for c in candidates if c.is_file()), None)
    if table_path is None:
        where = " or ".join(repr(str(c)) for c in candidates)
        raise WeightsFileError(
            f"no class-embedding table for {str(path)!r} at {where}; an ALDM-native ControlNet needs the "
            "(N + 1, D) table it was trained with: put it there or load it with load_class_embedding_table"
        )
    table = load_class_embedding_table(table_path, label_set)
    expected = metadata.extra.get("table_fingerprint") if metadata is not None else None
    if expected and expected != table_fingerprint(table.table):
        raise MetadataError(
            f"{str(table_path)!r} (fingerprint {table_fingerprint(table.table)}) is not the table {str(path)!r} was "
            f"made with (fingerprint {expected}); use that ControlNet's own table"
        )
    if metadata is not None and metadata.label_set is not None:
        table.metadata.check(label_set=metadata.label_set, source=str(table_path))
    return table


def _load_tensor(path: str | os.PathLike, what: str) -> torch.Tensor:
    obj = load_torch_file(path, mmap=False)
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            raise WeightsFileError(
                f"{str(path)!r} ({what}) holds a dict with {len(tensors)} tensors {sorted(map(str, tensors))[:5]}; "
                "expected one float tensor"
            )
        ((key, obj),) = tensors.items()
        logger.info("%s: using the tensor under key %r as the %s", path, key, what)
    if not isinstance(obj, torch.Tensor) or not obj.is_floating_point():
        raise WeightsFileError(
            f"{str(path)!r} ({what}) holds a {getattr(obj, 'dtype', type(obj).__name__)} "
            f"{type(obj).__name__}, expected a float tensor"
        )
    return obj.detach().clone()


def load_official_class_embeddings(
    class_embeddings: str | os.PathLike,
    null_embedding: str | os.PathLike,
    label_set: LabelSet | None = None,
) -> torch.Tensor:
    """Stack ALDM's class-embedding and null-embedding ``.pth`` files into our `(N + 1, D)` float32 table.

    Args:
        class_embeddings (`str` or `os.PathLike`): a torch file holding a float `(N, D)` tensor (row i = class i).
        null_embedding (`str` or `os.PathLike`): a torch file holding a float `(1, D)` or `(D,)` tensor.
        label_set (`LabelSet`, *optional*): checked to have N classes.

    Returns:
        `torch.Tensor`: `(N + 1, D)` float32, the null row last.

    Raises:
        WeightsFileError: unreadable/unsafe files or tensors of the wrong rank.
        WeightsError: D differs between the files, or N differs from the label set's class count.
    """
    classes = _load_tensor(class_embeddings, "class embeddings")
    null = _load_tensor(null_embedding, "null embedding")
    if classes.ndim != 2:
        raise WeightsFileError(
            f"{str(class_embeddings)!r}: class embeddings have shape {tuple(classes.shape)}, expected (N, D)"
        )
    if null.ndim == 1:
        null = null[None]
    if null.ndim != 2 or null.shape[0] != 1:
        raise WeightsFileError(
            f"{str(null_embedding)!r}: null embedding has shape {tuple(null.shape)}, expected (1, D)"
        )
    if null.shape[1] != classes.shape[1]:
        raise WeightsError(
            f"the class embeddings are {classes.shape[1]}-wide but the null embedding is {null.shape[1]}-wide; both "
            "files must come from the same release"
        )
    if label_set is not None and classes.shape[0] != label_set.num_classes:
        raise WeightsError(
            f"{str(class_embeddings)!r} has {classes.shape[0]} class embeddings, but label set {label_set.name!r} has "
            f"{label_set.num_classes} classes; pick the label set of the release (e.g. cityscapes: 19, ade20k: 150)"
        )
    return torch.cat([classes.float(), null.float()], dim=0)


def import_aldm_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    label_set: LabelSet | str | os.PathLike,
    class_embeddings: str | os.PathLike,
    null_embedding: str | os.PathLike,
    table_output: str | os.PathLike | None = None,
    base_model: str = ALDM_BASE_MODEL,
    to: str = "diffusers",
    dtype: torch.dtype | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> ALDMImport:
    """Convert an official ALDM ``.ckpt`` plus its class-embedding files into our ALDM-native files.

    Args:
        checkpoint (`str` or `os.PathLike`): the Lightning checkpoint (read through a memory map).
        output (`str` or `os.PathLike`): the ControlNet file to write (a folder for ``to="diffusers-folder"``).
        label_set (`LabelSet`, `str` or `os.PathLike`): the release's label set (built-in name or file).
        class_embeddings, null_embedding (`str` or `os.PathLike`): the official ``.pth`` files.
        table_output (`str` or `os.PathLike`, *optional*): where the table goes; `table_path_for(output)` by default.
        base_model (`str`, defaults to `ALDM_BASE_MODEL`): recorded in the metadata.
        to (`str`, defaults to `"diffusers"`): ControlNet layout, see `save_controlnet_file` (``"ldm"`` keeps the
            original ``control_model.*`` keys).
        dtype (`torch.dtype`, *optional*): e.g. ``torch.float16`` to halve the file; None keeps the checkpoint's.
        config_overrides (`Mapping`, *optional*): config values the weights cannot show (``norm_num_groups``,
            ``attention_head_dim``) when the checkpoint is not SD 1.5-shaped.

    Raises:
        WeightsFileError: unreadable or unsafe inputs.
        WeightsError: the checkpoint's ControlNet is not ALDM-native, or its hint width differs from the table's.
    """
    label_set = load_label_set(label_set)
    table = load_official_class_embeddings(class_embeddings, null_embedding, label_set)
    state_dict = read_control_model(checkpoint)
    fmt = detect_controlnet_format(state_dict)
    if fmt.hint_block != "aldm":
        raise WeightsError(
            f"{str(checkpoint)!r}: its ControlNet is a {fmt.description}, not ALDM's class-embedding block "
            "(input_hint_block.{0,2,4,6,8}); convert it with l2i-convert controlnet instead"
        )
    if fmt.hint_channels != table.shape[1]:
        raise WeightsError(
            f"the ControlNet's hint block reads {fmt.hint_channels}-wide embeddings but the class-embedding files are "
            f"{table.shape[1]}-wide; use the embedding files released with this checkpoint"
        )
    config = infer_controlnet_config(state_dict, **dict(config_overrides or {}))
    table_path = Path(table_output) if table_output is not None else table_path_for(output)
    save_class_embedding_table(
        table_path, table, label_set, base_model=base_model, extra={"source": "official ALDM class-embedding files"}
    )
    metadata = WeightsMetadata(
        kind="controlnet",
        hint_encoding="embedding",
        label_set=label_set,
        base_model=base_model,
        extra={
            "source": "official ALDM checkpoint",
            "table_file": table_path.name,
            "table_fingerprint": table_fingerprint(table),
        },
    )
    written = save_controlnet_file(output, state_dict, config, to=to, metadata=metadata, dtype=dtype)
    logger.info("imported %d ControlNet tensors into %s and the table into %s", len(state_dict), written, table_path)
    return ALDMImport(written, table_path, config, metadata, len(state_dict))
