"""Read weight files without unpickling arbitrary objects, with clear errors for broken files.

* ``.safetensors``: read through ``safetensors`` (no code runs); a truncated, empty or corrupt file gives a
  `WeightsFileError` that says which of these it is and by how many bytes.
* torch files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``): only ``torch.load(weights_only=True)``, memory-mapped when
  the file is in torch's zip format, so a 5.7 GB checkpoint costs address space, not RAM, until a tensor is
  touched. A file whose pickle needs any other object (a class, a function, ``os.system``) is refused with
  `UnsafeCheckpointError`; nothing in it runs. There is no switch to allow it.

The container is recognised by its first bytes, never by the file name (design/style.md rule 14):

==================  ====================================================================
``file_format``     signature
==================  ====================================================================
``"safetensors"``   8-byte little-endian header length, then a JSON header starting ``{``
``"torch-zip"``     ``PK\\x03\\x04`` (``torch.save`` since torch 1.6; mmap works)
``"torch-legacy"``  ``\\x80`` (a bare pickle: torch < 1.6 files; loaded without mmap)
==================  ====================================================================
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.logging import get_logger

__all__ = [
    "FILE_FORMATS",
    "LoadedSafetensors",
    "SafetensorsHeader",
    "TensorInfo",
    "UnsafeCheckpointError",
    "WeightsError",
    "WeightsFileError",
    "load_safetensors",
    "load_torch_file",
    "read_safetensors_header",
    "sniff_file_format",
]

logger = get_logger(__name__)

#: Containers `sniff_file_format` recognises.
FILE_FORMATS = ("safetensors", "torch-legacy", "torch-zip")

_ZIP_MAGIC = b"PK\x03\x04"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_DTYPE_SIZES.update({"U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1})


class WeightsError(ValueError):
    """A weight file or state dict is not what the caller needs (base class of the errors in ``weights/``)."""


class WeightsFileError(WeightsError):
    """A file cannot be read as weights: missing, empty, truncated, corrupt, or of an unknown container."""


class UnsafeCheckpointError(WeightsFileError):
    """A torch pickle needs objects other than tensors and plain containers; loading it could run code."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as described by a file header (no data read).

    Args:
        dtype (`str`): safetensors dtype name (``"F32"``, ``"F16"``, ...) or the torch dtype for torch files.
        shape (`tuple[int, ...]`): the tensor's shape.
    """

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    """The header of a safetensors file: its ``__metadata__`` and every tensor's dtype and shape.

    Args:
        metadata (`dict[str, str]`): the string-to-string ``__metadata__`` table (empty when absent).
        tensors (`dict[str, TensorInfo]`): key -> dtype and shape, in file order.
    """

    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]


@dataclass(frozen=True)
class LoadedSafetensors:
    """A loaded safetensors file.

    Args:
        state_dict (`dict[str, torch.Tensor]`): key -> tensor, on the requested device.
        metadata (`dict[str, str]`): the ``__metadata__`` table (empty when absent).
    """

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str]


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise WeightsFileError(f"{str(path)!r} does not exist")
    if path.is_dir():
        raise WeightsFileError(f"{str(path)!r} is a folder, not a weight file")


def sniff_file_format(path: str | os.PathLike) -> str:
    """Name the container of a weight file from its first bytes (one of `FILE_FORMATS`).

    Raises:
        WeightsFileError: the file is missing, empty, or starts like none of the known containers.
    """
    path = Path(path)
    _check_exists(path)
    size = path.stat().st_size
    if size == 0:
        raise WeightsFileError(f"{str(path)!r} is empty (0 bytes); the download or copy did not finish")
    with path.open("rb") as f:
        head = f.read(9)
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    # safetensors before pickle: the header length's low byte may well be 0x80
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= _MAX_HEADER:
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, protocol 2..5
        return "torch-legacy"
    raise WeightsFileError(
        f"{str(path)!r} ({size} bytes) is not a weight file this pack reads: it starts with {head[:8]!r}, which is "
        "neither safetensors (an 8-byte header length, then '{'), a torch zip file ('PK\\x03\\x04') nor a torch "
        "pickle ('\\x80'); it may be corrupt, or an HTML error page saved under a model's name"
    )


def _safetensors_diagnosis(path: Path) -> str:
    """Why safetensors refused ``path``, in words, from the raw header (called only after a failure)."""
    size = path.stat().st_size
    if size < 8:
        return f"the file is only {size} bytes, shorter than safetensors' 8-byte header length (empty or truncated)"
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER:
            return f"its header claims {n} bytes, more than safetensors allows: not a safetensors file, or corrupt"
        if 8 + n > size:
            return (
                f"the file is truncated inside its header ({size} bytes on disk, the header alone needs {8 + n}); "
                "the download or copy was interrupted"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"its JSON header is corrupt ({e})"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        return (
            f"the file is truncated: its header describes {8 + n + end} bytes but only {size} are on disk "
            f"({8 + n + end - size} missing); the download or copy was interrupted, fetch the file again"
        )
    return "its header is inconsistent (overlapping or out-of-order tensors)"


def _safetensors_error(path: Path, error: Exception) -> WeightsFileError:
    return WeightsFileError(f"cannot read {str(path)!r} as safetensors: {_safetensors_diagnosis(path)} [{error}]")


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read the metadata and the tensor shapes of a safetensors file without reading any tensor data.

    Raises:
        WeightsFileError: the file is missing, empty, truncated or corrupt (the message says which).
    """
    from safetensors import safe_open

    path = Path(path)
    _check_exists(path)
    if path.stat().st_size == 0:
        raise WeightsFileError(f"{str(path)!r} is empty (0 bytes); the download or copy did not finish")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {}
            for key in f.keys():
                sl = f.get_slice(key)
                tensors[key] = TensorInfo(str(sl.get_dtype()), tuple(int(s) for s in sl.get_shape()))
    except Exception as e:  # SafetensorError is raised for every kind of bad file
        raise _safetensors_error(path, e) from None
    return SafetensorsHeader(metadata=metadata, tensors=tensors)


def load_safetensors(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", keys: Iterable[str] | None = None
) -> LoadedSafetensors:
    """Load a safetensors file (or only ``keys`` of it) with its metadata.

    Args:
        path (`str` or `os.PathLike`): the file.
        device (`str` or `torch.device`, defaults to `"cpu"`): where the tensors are put.
        keys (`Iterable[str]`, *optional*): load only these tensors (the others are never read).

    Raises:
        WeightsFileError: missing, empty, truncated or corrupt file, or a requested key that is not in it.
    """
    from safetensors import safe_open

    path = Path(path)
    _check_exists(path)
    if path.stat().st_size == 0:
        raise WeightsFileError(f"{str(path)!r} is empty (0 bytes); the download or copy did not finish")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            available = list(f.keys())
            wanted = available if keys is None else list(keys)
            absent = sorted(set(wanted) - set(available))
            if absent:
                raise WeightsFileError(f"{str(path)!r} has no tensor(s) {absent[:10]}; it holds {len(available)} keys")
            state_dict = {k: f.get_tensor(k) for k in wanted}
    except WeightsFileError:
        raise
    except Exception as e:
        raise _safetensors_error(path, e) from None
    return LoadedSafetensors(state_dict=state_dict, metadata=metadata)


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    """Every object the pickle names (listed by torch without unpickling), or the one in the error."""
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy files, older torch
        names = []
    found = _GLOBAL_RE.search(str(error))
    if not names and found:
        names = [found.group(1)]
    return names


def _unsafe_message(path: Path, error: Exception) -> str:
    names = _unsafe_globals(path, error)
    if len(names) == 1:
        what = f"the object {names[0]!r}"
    elif names:
        what = f"the objects {', '.join(repr(n) for n in names[:10])}"
    else:
        what = "objects other than tensors and plain containers"
    return (
        f"refusing to load {str(path)!r}: its pickle needs {what}, and building it would run code from the file "
        "(a pickle can call any function, e.g. os.system). layout2image only reads torch files with "
        "torch.load(weights_only=True), which accepts tensors, numbers, strings and lists/dicts of them, and never "
        "unpickles anything else. Ask for a .safetensors version of the file; or, only if you fully trust its "
        "source, re-save just its tensors yourself outside layout2image, e.g. "
        "torch.save(torch.load(path, weights_only=False)['state_dict'], 'clean.ckpt')"
    )


def load_torch_file(path: str | os.PathLike, *, mmap: bool = True) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")``, memory-mapped where the file allows it.

    With ``mmap=True`` and a zip-format file, tensors are views into the mapped file: pages are read only when a
    tensor's data is touched, so selecting a few tensors from a multi-GB checkpoint (and ``.clone()``-ing them)
    costs about their size in RAM. Legacy (pre-zip) files cannot be mapped and are read whole, with a warning.

    Returns:
        whatever the file holds: usually a dict of tensors, or a Lightning dict with a ``"state_dict"`` entry.

    Raises:
        UnsafeCheckpointError: the pickle needs an object weights-only loading refuses (nothing from it runs).
        WeightsFileError: the file is missing, empty, not a torch file, truncated or corrupt.
    """
    import pickle
    import zipfile

    path = Path(path)
    file_format = sniff_file_format(path)
    if file_format == "safetensors":
        raise WeightsFileError(f"{str(path)!r} is a safetensors file; read it with load_safetensors, not torch.load")
    if file_format == "torch-zip" and not zipfile.is_zipfile(path):  # no end-of-archive record
        raise WeightsFileError(
            f"cannot read {str(path)!r}: it starts like a torch zip file but has no end-of-archive record, so it is "
            f"truncated or corrupt ({path.stat().st_size} bytes; an interrupted download or copy?); fetch it again"
        )
    use_mmap = bool(mmap) and file_format == "torch-zip"
    if mmap and not use_mmap:
        logger.warning(
            "%s is a legacy (pre-zip) torch file, which cannot be memory-mapped; reading it whole into RAM", path
        )
    try:
        if path.name.lower().endswith(".safetensors"):
            # torch.load picks safetensors by this suffix; the content says torch, so hand it an open file (which
            # cannot be memory-mapped)
            logger.warning("%s is a torch file named like a safetensors file; reading it without mmap", path)
            with path.open("rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        text = str(e)
        if _GLOBAL_RE.search(text) or "allowlisted" in text or "Can only" in text:
            raise UnsafeCheckpointError(_unsafe_message(path, e)) from None
        raise WeightsFileError(
            f"cannot read {str(path)!r}: its pickle is corrupt or uses instructions weights-only loading refuses "
            f"({text.strip().splitlines()[-1] if text.strip() else type(e).__name__})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        text = str(e)
        hint = ""
        if "central directory" in text or isinstance(e, (EOFError, zipfile.BadZipFile)):
            hint = "the file is truncated or corrupt (an interrupted download or copy?); fetch it again. "
        raise WeightsFileError(
            f"cannot read {str(path)!r} as a torch file: {hint}[{type(e).__name__}: {text}]"
        ) from None
