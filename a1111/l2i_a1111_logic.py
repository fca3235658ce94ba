"""Everything the "Layout2Image SDM SPADE" AUTOMATIC1111/Forge script does, without importing A1111.

The script (``scripts/l2i_sdm_spade.py``) only turns A1111's objects into plain values and calls this module; the
maths and file handling are the pack's own:

* the SPADE companion file is read and checked by ``weights.load_spade_file`` (metadata, label set, shapes);
* the label map upload is read by ``core.labels.read_label_map`` (a colour PNG snapped to the label set's
  palette with an unknown-colour report, an id PNG, or ``.npy``), then nearest-resized to the image size;
* the GroupNorms of the CompVis UNet (``shared.sd_model.model.diffusion_model``) are patched by
  ``core.spade.LdmSPADEPatch``: the sites mapped by ``ldm_site_paths``, the layout encoded per feature size by
  ``SPADELayoutEncoder``, the batch laid out by ``tile_layout_rows`` (A1111's CFG batch: cond rows, then uncond
  rows), the start/end window read from each call's timestep, and the formula ``core.spade.spade_group_norm``.

A run's life: `begin_run` in the script's ``process`` (files read, errors raised before any sampling, infotext
written), `SpadeRun.attach` in ``process_before_every_sampling`` (patch, or update it for the hires pass),
`SpadeRun.close` in ``postprocess``; `restore_stale` at the start of every run undoes a patch left by a run that
failed before its ``postprocess``.

This file lives beside the script, outside the ``layout2image`` package: A1111 puts the extension folder on
``sys.path`` while it loads the script, so the module name is unique (``l2i_a1111_logic``). ``layout2image`` itself
is imported from the installed package, or else from the checkout this extension folder belongs to
(`ensure_layout2image`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

_HERE = Path(__file__).resolve().parent
#: Environment variable naming a layout2image checkout, for an extension folder copied away from it.
CHECKOUT_ENV = "LAYOUT2IMAGE_PATH"


def ensure_layout2image(extension_dir: str | os.PathLike | None = None) -> ModuleType:
    """Import ``layout2image``: the installed package, or else the checkout that holds this extension.

    Looked for, in order: an importable ``layout2image``; the folder named by ``$LAYOUT2IMAGE_PATH``; the parent of
    the extension folder (after resolving symlinks: ``extensions/l2i-sdm-spade -> <checkout>/a1111``). A checkout is
    imported under the name ``layout2image`` (it is the package: its root holds ``__init__.py``).

    Raises:
        ImportError: none of them, with what to do.
    """
    try:
        return importlib.import_module("layout2image")
    except ImportError:
        pass
    base = Path(extension_dir) if extension_dir is not None else _HERE
    candidates = [Path(os.environ[CHECKOUT_ENV])] if os.environ.get(CHECKOUT_ENV) else []
    candidates.append(base.resolve().parent)
    for root in candidates:
        if (root / "__init__.py").is_file() and (root / "core" / "spade" / "ldm.py").is_file():
            spec = importlib.util.spec_from_file_location(
                "layout2image", root / "__init__.py", submodule_search_locations=[str(root)]
            )
            module = importlib.util.module_from_spec(spec)
            sys.modules["layout2image"] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules["layout2image"]
                raise
            return module
    raise ImportError(
        "Layout2Image SDM SPADE: the layout2image package is not importable. Either symlink this extension folder "
        "from a layout2image checkout (extensions/l2i-sdm-spade -> <checkout>/a1111), set "
        f"${CHECKOUT_ENV} to the checkout, or install it into the webui's Python (pip install <checkout>); then run "
        "the checkout's install.py for its requirements"
    )


ensure_layout2image()

from layout2image.core.labels import (  # noqa: E402
    BUILTIN_LABEL_SETS,
    LabelSet,
    load_label_set,
    read_label_map,
    resize_nearest,
)
from layout2image.core.logging import get_logger  # noqa: E402
from layout2image.core.spade import LdmSPADEPatch, SPADELayoutEncoder, ldm_site_paths  # noqa: E402
from layout2image.weights.metadata import MetadataError, describe_label_set  # noqa: E402
from layout2image.weights.spade_file import SPADE_SUFFIX, SPADEFile, load_spade_file  # noqa: E402

__all__ = [
    "ARG_NAMES",
    "FROM_FILE",
    "INFOTEXT_KEYS",
    "SCRIPT_TITLE",
    "A1111SpadeError",
    "SpadeRun",
    "SpadeSettings",
    "begin_run",
    "check_sd15",
    "ensure_layout2image",
    "infotext_params",
    "label_set_choices",
    "ldm_unet_of",
    "load_spade",
    "read_layout",
    "resolve_spade_path",
    "restore_stale",
    "uploaded_path",
]

logger = get_logger("layout2image.a1111")

SCRIPT_TITLE = "Layout2Image SDM SPADE"
#: Label-set choice meaning "whatever the SPADE file was trained on".
FROM_FILE = "(from the SPADE file)"
#: The script's ``ui`` components, in the order their values arrive in ``*args``.
ARG_NAMES = ("enabled", "spade_file", "label_map", "label_set", "tolerance", "strength", "start", "end")
#: ``p.extra_generation_params`` keys (also used to paste infotext back into the UI).
INFOTEXT_KEYS = {
    "spade_file": "L2I SPADE",
    "label_set": "L2I SPADE label set",
    "layout": "L2I SPADE layout",
    "strength": "L2I SPADE strength",
    "start": "L2I SPADE start",
    "end": "L2I SPADE end",
}


class A1111SpadeError(ValueError):
    """The script's inputs cannot be used (missing file or label map, wrong base model, bad settings)."""


# ---------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class SpadeSettings:
    """The script's UI values.

    Args:
        enabled (`bool`): run SPADE at all.
        spade_file (`str`): the ``<name>.spade.safetensors`` file: a path, or a name in the given search folders
            (A1111's ``models/Lora``), with or without the suffix.
        label_map (`Any`): the uploaded label map: a path, or what Gradio gives for a file (an object with
            ``.name``, or a dict with ``"name"``/``"path"``); None when nothing is uploaded.
        label_set (`str`): `FROM_FILE`, or a label set (built-in name or file) the colour map uses; it must be the
            file's.
        tolerance (`float`): colour snapping distance in RGB units (0 = exact palette colours only).
        strength (`float`): scales γ and β (0: no modulation, 1: as trained).
        start (`float`), end (`float`): the part of the schedule with SPADE on (0 = first step, 1 = last).
    """

    enabled: bool = False
    spade_file: str = ""
    label_map: Any = None
    label_set: str = FROM_FILE
    tolerance: float = 16.0
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        for name in ("tolerance", "strength", "start", "end"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
                raise A1111SpadeError(f"`{name}` must be a finite number, got {value!r}")
        if self.tolerance < 0:
            raise A1111SpadeError(f"`tolerance` must be >= 0 (an RGB distance), got {self.tolerance}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise A1111SpadeError(f"need 0 <= start <= end <= 1, got start {self.start} and end {self.end}")

    @classmethod
    def from_script_args(cls, args: Sequence[Any]) -> SpadeSettings:
        """Build from the script's ``*args`` (the `ARG_NAMES` order); missing trailing values keep their defaults."""
        if len(args) > len(ARG_NAMES):
            raise A1111SpadeError(f"expected at most {len(ARG_NAMES)} script arguments {ARG_NAMES}, got {len(args)}")
        values = dict(zip(ARG_NAMES, args))
        for name in ("tolerance", "strength", "start", "end"):
            if name in values and values[name] is not None:
                values[name] = float(values[name])
        values["enabled"] = bool(values.get("enabled", False))
        values["spade_file"] = str(values.get("spade_file") or "")
        values["label_set"] = str(values.get("label_set") or FROM_FILE)
        return cls(**{k: v for k, v in values.items() if v is not None or k == "label_map"})


def label_set_choices() -> list[str]:
    """The label-set dropdown: `FROM_FILE`, then the built-in sets (a YAML/JSON path may be typed in too)."""
    return [FROM_FILE, *BUILTIN_LABEL_SETS]


# ---------------------------------------------------------------------------------------------------- files
def uploaded_path(value: Any) -> Path | None:
    """The path of an uploaded file as Gradio 3 or 4 passes it (tempfile object, dict, str), or None."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise A1111SpadeError(f"upload one label map, got {len(value)} files")
        return uploaded_path(value[0])
    if isinstance(value, Mapping):
        value = value.get("path") or value.get("name")
    elif not isinstance(value, (str, os.PathLike)) and hasattr(value, "name"):
        value = value.name
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise A1111SpadeError(f"cannot tell the uploaded label map's path from {type(value).__name__}")
    return Path(value)


def resolve_spade_path(text: str, search_dirs: Iterable[str | os.PathLike] = ()) -> Path:
    """Find the SPADE companion file the user named.

    Args:
        text (`str`): a path, or a file name (with or without ``.spade.safetensors``) in one of ``search_dirs``
            (searched recursively, like A1111's Lora folder). A LoRA file name ``<name>.safetensors`` resolves to its
            companion ``<name>.spade.safetensors``.
        search_dirs (`Iterable`): folders to look in.

    Raises:
        A1111SpadeError: empty, or no such file (the folders searched are named).
    """
    text = (text or "").strip().strip('"')
    if not text:
        raise A1111SpadeError("no SPADE file given: enter the <name>.spade.safetensors file (a path or a name)")
    names = [text]
    if not text.endswith(SPADE_SUFFIX):
        stem = text[: -len(".safetensors")] if text.endswith(".safetensors") else text
        names = [stem + SPADE_SUFFIX, text]
    for name in names:
        path = Path(name).expanduser()
        if path.is_file():
            return path
    dirs = [Path(d) for d in search_dirs if d]
    for folder in dirs:
        for name in names:
            direct = folder / name
            if direct.is_file():
                return direct
            found = sorted(folder.rglob(Path(name).name)) if folder.is_dir() else []
            if found:
                return found[0]
    where = ", ".join(str(d) for d in dirs) or "no folder"
    raise A1111SpadeError(f"SPADE file {text!r} not found (as a path, or in {where}); expected <name>{SPADE_SUFFIX}")


@dataclass(frozen=True)
class LoadedSpade:
    """A SPADE companion file ready to patch with.

    Args:
        file (`SPADEFile`): what ``weights.load_spade_file`` read (metadata, config, sites).
        adapter (`SPADEAdapter`): the SPADE modules, eval mode, frozen, fp32 on the CPU.
        table (`torch.Tensor`, *optional*): `(N + 1, D)` class-embedding table for the ``embedding`` encoding.
    """

    file: SPADEFile
    adapter: nn.Module
    table: torch.Tensor | None = None

    @property
    def label_set(self) -> LabelSet:
        return self.file.metadata.label_set

    @property
    def encoding(self) -> str:
        return self.file.metadata.hint_encoding


def load_spade(path: str | os.PathLike, label_set: LabelSet | None = None) -> LoadedSpade:
    """Read a ``<name>.spade.safetensors`` companion (``weights.load_spade_file``) and build its SPADE modules.

    Args:
        path (`str` or `os.PathLike`): the companion file.
        label_set (`LabelSet`, *optional*): the label set the user says the map uses; must be the file's.

    Raises:
        MetadataError: not a SPADE companion, label set mismatch (both named), or no label set recorded.
        WeightsError: broken file.
    """
    path = Path(path)
    try:
        spade_file = load_spade_file(path, label_set=label_set)
    except MetadataError as e:
        if "l2i.sites" in str(e):
            raise MetadataError(
                f"{e}. The A1111 script reads the SPADE companion <name>{SPADE_SUFFIX} written beside the kohya LoRA "
                "(in a trainer export: sdm_lora.spade.safetensors, not spade.safetensors)"
            ) from None
        raise
    if spade_file.metadata.label_set is None:
        raise MetadataError(f"{path} records no label set; the label map cannot be decoded without it")
    table = None
    if spade_file.metadata.hint_encoding == "embedding":
        from layout2image.weights import load_companion_table

        table = load_companion_table(path, spade_file.metadata.label_set).table.float()
    adapter = spade_file.build_adapter().eval().requires_grad_(False)
    return LoadedSpade(spade_file, adapter, table)


def read_layout(
    path: str | os.PathLike, label_set: LabelSet, width: int, height: int, tolerance: float = 16.0
) -> torch.Tensor:
    """Read the label map upload and bring it to the image size.

    Args:
        path (`str` or `os.PathLike`): a colour PNG in ``label_set``'s palette (snapped within ``tolerance``), a
            1-channel/palette-mode id PNG, or an `(H, W)` ``.npy`` of ids.
        label_set (`LabelSet`): the SPADE file's label set.
        width (`int`), height (`int`): the image size (``p.width``, ``p.height``); the map is nearest-resized to it.
        tolerance (`float`): colour snapping distance.

    Returns:
        `torch.Tensor`: `(1, height, width)` int64 ids (the label set's ignore id where unlabelled).

    Raises:
        LabelMapError: unreadable file, unknown colours (with the colours, their pixel counts and places), ids out
            of range.
    """
    read = read_label_map(path, label_set, tolerance=float(tolerance))
    if read.report is not None and read.report.snapped_pixels:
        logger.info("label map: %s", read.report.summary().splitlines()[0])
    ids = read.ids
    h, w = ids.shape
    if abs(w / h - width / height) > 0.01 * (width / height):
        logger.warning(
            "label map is %dx%d but the image %dx%d: it is stretched to the image (nearest), regions move",
            w,
            h,
            width,
            height,
        )
    if (h, w) != (height, width):
        ids = resize_nearest(ids, (int(height), int(width)))
    return torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))[None]


def layout_fingerprint(ids: torch.Tensor) -> str:
    """A short hash of the label ids, recorded in the infotext (the map itself cannot go there)."""
    data = ids.detach().cpu().contiguous().numpy().astype(np.int64)
    return hashlib.sha256(str(data.shape).encode() + data.tobytes()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------------- the model
def check_sd15(sd_model: Any) -> None:
    """Refuse models other than SD 1.x (the A1111 flags ``is_sdxl``, ``is_sd2``, ``is_sd3``, ``is_ssd``)."""
    for flag, name in (("is_sdxl", "SDXL"), ("is_sd3", "SD 3"), ("is_sd2", "SD 2.x"), ("is_ssd", "SSD-1B")):
        if bool(getattr(sd_model, flag, False)):
            raise A1111SpadeError(
                f"Layout2Image SDM SPADE supports SD 1.5 models only; the loaded checkpoint is {name}. Load an SD 1.5 "
                "checkpoint (the one the SDM-LoRA was trained on) or disable the script"
            )


def ldm_unet_of(sd_model: Any) -> nn.Module:
    """The ldm ``UNetModel`` to patch: A1111's ``sd_model.model.diffusion_model``; Forge's ``forge_objects.unet``.

    Raises:
        A1111SpadeError: neither is there.
    """
    forge = getattr(sd_model, "forge_objects", None)
    if forge is not None and getattr(forge, "unet", None) is not None:
        unet = getattr(getattr(forge.unet, "model", None), "diffusion_model", None)
        if isinstance(unet, nn.Module):
            return unet
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    if not isinstance(unet, nn.Module):
        raise A1111SpadeError(
            f"cannot find the UNet of {type(sd_model).__name__} (expected sd_model.model.diffusion_model); this "
            "webui version is not supported"
        )
    return unet


def restore_stale(diffusion_model: nn.Module) -> bool:
    """Undo a SPADE patch left on ``diffusion_model`` by a run that failed before its ``postprocess``."""
    restored = LdmSPADEPatch.restore_any(diffusion_model)
    if restored:
        logger.warning("removed a SPADE patch left over from an earlier (failed) generation")
    return restored


# ---------------------------------------------------------------------------------------------------- a run
def infotext_params(settings: SpadeSettings, spade_path: Path, label_set: LabelSet, ids: torch.Tensor) -> dict:
    """The ``p.extra_generation_params`` entries of a run (`INFOTEXT_KEYS`)."""
    name = spade_path.name
    return {
        INFOTEXT_KEYS["spade_file"]: name[: -len(SPADE_SUFFIX)] if name.endswith(SPADE_SUFFIX) else name,
        INFOTEXT_KEYS["label_set"]: label_set.name,
        INFOTEXT_KEYS["layout"]: layout_fingerprint(ids),
        INFOTEXT_KEYS["strength"]: f"{settings.strength:g}",
        INFOTEXT_KEYS["start"]: f"{settings.start:g}",
        INFOTEXT_KEYS["end"]: f"{settings.end:g}",
    }


class SpadeRun:
    """One generation's SPADE state (built in ``process``, attached before each sampling, closed in postprocess).

    Args:
        settings (`SpadeSettings`): the UI values (``enabled`` must be true).
        width (`int`), height (`int`): the image size.
        search_dirs (`Iterable`): where SPADE file names are looked up (A1111's Lora folders).
        num_timesteps (`int`): the model's training timesteps (SD 1.5: 1000), for the start/end window.
        weight_hook (`Callable`, *optional*): passed to `LdmSPADEPatch` (A1111's norm-LoRA weight update).

    Raises:
        A1111SpadeError, MetadataError, LabelMapError, WeightsError: with what to fix, before any sampling.
    """

    def __init__(
        self,
        settings: SpadeSettings,
        width: int,
        height: int,
        search_dirs: Iterable[str | os.PathLike] = (),
        num_timesteps: int = 1000,
        weight_hook: Callable[[nn.Module], None] | None = None,
    ):
        self.settings = settings
        self.spade_path = resolve_spade_path(settings.spade_file, search_dirs)
        wanted = None if settings.label_set in ("", FROM_FILE) else load_label_set(settings.label_set)
        self.spade = load_spade(self.spade_path, label_set=wanted)
        label_path = uploaded_path(settings.label_map)
        if label_path is None:
            raise A1111SpadeError(
                "Layout2Image SDM SPADE is enabled but no label map is uploaded: upload a colour PNG in the "
                f"{describe_label_set(self.spade.label_set)} palette, an id PNG or an .npy"
            )
        self.ids = read_layout(label_path, self.spade.label_set, width, height, settings.tolerance)
        self.encoder = SPADELayoutEncoder(self.ids, self.spade.label_set, self.spade.encoding, self.spade.table)
        self.num_timesteps = int(num_timesteps)
        self.weight_hook = weight_hook
        self.patch: LdmSPADEPatch | None = None
        self.infotext = infotext_params(settings, self.spade_path, self.spade.label_set, self.ids)

    def attach(self, diffusion_model: nn.Module) -> LdmSPADEPatch:
        """Patch ``diffusion_model`` (idempotent: a second call, e.g. for the hires pass, keeps the patch).

        Raises:
            LdmSiteError: the UNet lacks the file's sites (another base model).
            A1111SpadeError: the file's recorded ldm sites differ from this UNet's.
        """
        if self.patch is not None and self.patch.is_patched and self.patch.diffusion_model is diffusion_model:
            return self.patch
        self.close()
        restore_stale(diffusion_model)
        recorded = self.spade.file.ldm_sites
        if recorded:
            mapped = list(ldm_site_paths(diffusion_model, self.spade.adapter.site_names).values())
            if list(recorded) != mapped:
                diff = next((a, b) for a, b in zip(recorded, mapped) if a != b) if len(recorded) == len(mapped) else ()
                raise A1111SpadeError(
                    f"{self.spade_path.name} was made for a UNet whose SPADE sites are {len(recorded)} ldm modules "
                    f"{'(first difference: file ' + repr(diff[0]) + ', model ' + repr(diff[1]) + ')' if diff else ''}; "
                    f"this UNet maps them to {len(mapped)}. Use the base model the SDM-LoRA was trained on (SD 1.5)"
                )
        s = self.settings
        patch = LdmSPADEPatch(
            diffusion_model,
            self.spade.adapter,
            self.encoder,
            strength=s.strength,
            start=s.start,
            end=s.end,
            num_timesteps=self.num_timesteps,
            weight_hook=self.weight_hook,
        )
        patch.patch()
        self.patch = patch
        logger.info(
            "SPADE on %d GroupNorms from %s, strength %g, steps %g-%g",
            len(patch.paths),
            self.spade_path.name,
            s.strength,
            s.start,
            s.end,
        )
        return patch

    def close(self) -> None:
        """Restore the UNet (safe to call twice)."""
        if self.patch is not None:
            self.patch.restore()
            self.patch = None


def begin_run(
    settings: SpadeSettings,
    width: int,
    height: int,
    search_dirs: Iterable[str | os.PathLike] = (),
    num_timesteps: int = 1000,
    weight_hook: Callable[[nn.Module], None] | None = None,
) -> SpadeRun | None:
    """A `SpadeRun` for these settings, or None when the script is disabled."""
    if not settings.enabled:
        return None
    return SpadeRun(settings, width, height, search_dirs, num_timesteps, weight_hook)
