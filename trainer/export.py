"""The files a run hands to users, written on each checkpoint and at the end (``<output>/export/``).

==============  =====================================================================================================
mode            files
==============  =====================================================================================================
controlnet      ``controlnet/`` (diffusers folder: ``load_controlnet``/``ControlNetModel.from_pretrained``),
                ``controlnet.safetensors`` (one diffusers-layout file: ComfyUI, A1111, Forge), optionally
                ``controlnet.ldm.safetensors`` (``control_model.*`` keys); with the ``embedding`` hint also
                ``controlnet.table.safetensors``, the `(N + 1, D)` class-embedding table ALDM's hint is made from
sdm_lora        ``lora.safetensors`` (PEFT LoRA in the diffusers format: ``unet.``-prefixed keys, ``lora_A``/``lora_B``,
                with ``lora_adapter_metadata`` so ``pipe.load_lora_weights`` restores rank and alpha),
                ``spade.safetensors`` (the SPADE modules, ``sites.<site>.sem_*``); ``sdm_lora.table.safetensors``
                for the ``embedding`` layout; and, for the UIs, ``sdm_lora.safetensors`` (the kohya LoRA:
                ComfyUI "Load LoRA", A1111/Forge, ``pipe.load_lora_weights``; `weights.save_sdm_lora`) with its
                companion ``sdm_lora.spade.safetensors`` (read by the pack's SDM-LoRA loader and A1111 script).
                Stock loaders apply the LoRA alone: SPADE needs this project's nodes or sampler.
t2i_adapter     ``t2i_adapter/`` (diffusers folder)
all             ``discriminator/`` (transformers folder, `build_discriminator(pretrained=...)` reloads it) and
                ``manifest.json`` (what was written, the step, the config hash)
==============  =====================================================================================================

Every safetensors file we write carries `layout2image.weights.WeightsMetadata` (format version, kind, label set
and its fingerprint, layout encoding, base model, config hash). ``weights.metadata.KINDS`` has no
``t2i_adapter`` kind yet, so the T2I-Adapter file gets the same ``l2i.*`` keys written directly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.files import atomic_write_text, default_file_mode, save_safetensors_atomic
from ..core.logging import get_logger
from ..core.sdm_lora import SDMLoraStateDicts, get_sdm_lora_state_dicts
from ..core.spade import get_spade_adapter
from ..weights.metadata import FORMAT_VERSION, WeightsMetadata

__all__ = ["EXPORT_FORMAT", "ExportResult", "export_models", "load_sdm_lora_export"]

logger = get_logger(__name__)

EXPORT_FORMAT = 1
LORA_FILE = "lora.safetensors"
SPADE_FILE = "spade.safetensors"
KOHYA_LORA_FILE = "sdm_lora.safetensors"
_LORA_PREFIX = "unet."
_DTYPES = {"fp32": None, "fp16": torch.float16}


@dataclass
class ExportResult:
    """What `export_models` wrote.

    Args:
        folder (`Path`): the export folder.
        files (`list[Path]`): files and folders written, relative to ``folder``.
        notes (`list[str]`): remarks (also logged), e.g. formats that were not available.
    """

    folder: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in state.items()
    }


def _save_pretrained(model, path: Path, **kwargs) -> None:
    """``model.save_pretrained(path)`` (diffusers or transformers), then the umask's mode on every file in ``path``.

    safetensors' ``save_file`` (0.8, under both libraries' ``save_pretrained``) leaves its file ``0o600``: a UI
    running as another user could not read the export. ``path`` is a folder this export owns, so every file in it
    is ours to fix.
    """
    model.save_pretrained(path, **kwargs)
    mode = default_file_mode()
    for file in path.rglob("*"):
        if file.is_file() and not file.is_symlink():
            os.chmod(file, mode)


def _metadata(models, kind: str, config_hash: str, **extra: str) -> WeightsMetadata:
    return WeightsMetadata(
        kind=kind,
        hint_encoding=models.hint_encoding,
        label_set=models.label_set,
        base_model=models.base_model_name,
        training_config_hash=config_hash,
        extra=extra,
    )


def _save_table(models, path: Path, config_hash: str, result: ExportResult) -> dict[str, str]:
    from ..weights import save_class_embedding_table, table_fingerprint

    save_class_embedding_table(
        path, models.table, models.label_set, base_model=models.base_model_name, training_config_hash=config_hash
    )
    result.files.append(path.relative_to(result.folder))
    return {"table_file": path.name, "table_fingerprint": table_fingerprint(models.table)}


def _export_controlnet(models, folder: Path, formats, dtype, config_hash: str, result: ExportResult) -> None:
    controlnet = models.adapter
    extra = {}
    if models.table is not None:
        extra = _save_table(models, folder / "controlnet.table.safetensors", config_hash, result)
    md = _metadata(models, "controlnet", config_hash, **extra)
    try:
        from ..weights import save_controlnet
    except ImportError:  # weights/ without the ControlNet formats: diffusers' own folder only
        save_controlnet = None
    targets = {
        "diffusers-folder": "controlnet",
        "diffusers": "controlnet.safetensors",
        "ldm": "controlnet.ldm.safetensors",
    }
    for fmt in formats:
        path = folder / targets[fmt]
        if save_controlnet is None:
            if fmt != "diffusers-folder":
                result.notes.append(f"weights.save_controlnet is not available: {fmt!r} ControlNet export skipped")
                continue
            _save_pretrained(controlnet, path, safe_serialization=True)
        else:
            save_controlnet(controlnet, path, to=fmt, metadata=md, dtype=dtype)
        result.files.append(path.relative_to(folder))


def _export_t2i_adapter(models, folder: Path, dtype, config_hash: str, result: ExportResult) -> None:
    from safetensors.torch import load_file

    path = folder / "t2i_adapter"
    _save_pretrained(models.adapter, path, safe_serialization=True)
    weights = path / "diffusion_pytorch_model.safetensors"
    md = _metadata(models, "controlnet", config_hash).to_safetensors()
    md["l2i.kind"] = "t2i_adapter"  # not in weights.metadata.KINDS yet (see the module docstring)
    save_safetensors_atomic(_cast(load_file(str(weights)), dtype), weights, metadata=md)
    result.files.append(path.relative_to(folder))


def _export_sdm_lora(models, folder: Path, dtype, config_hash: str, result: ExportResult) -> None:
    parts = get_sdm_lora_state_dicts(models.adapter)
    cfg = models.sdm_lora_config
    lora_config = {
        "r": cfg.rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": list(cfg.all_target_modules),
        "init_lora_weights": True,
    }
    md = _metadata(models, "lora", config_hash, lora_config=json.dumps(lora_config, sort_keys=True)).to_safetensors()
    # diffusers' LoRA loader reads rank/alpha from this key (keys packed with the component prefix).
    md["lora_adapter_metadata"] = json.dumps({f"unet.{k}": v for k, v in lora_config.items()}, sort_keys=True)
    lora = {_LORA_PREFIX + k: v for k, v in _cast(parts.lora, dtype).items()}
    save_safetensors_atomic(lora, folder / LORA_FILE, metadata=md)
    result.files.append(Path(LORA_FILE))

    adapter = get_spade_adapter(models.adapter)
    extra = {"spade_config": json.dumps(dict(adapter.config), sort_keys=True, default=list)}
    if models.table is not None:
        extra.update(_save_table(models, folder / "sdm_lora.table.safetensors", config_hash, result))
    spade_md = _metadata(models, "spade", config_hash, **extra).to_safetensors()
    save_safetensors_atomic(_cast(parts.spade, dtype), folder / SPADE_FILE, metadata=spade_md)
    result.files.append(Path(SPADE_FILE))

    # What ComfyUI / A1111 / diffusers load: a kohya LoRA (module names per kohya_names_for: diffusers names for
    # SD 1.x/2.x layouts, ldm names otherwise; .alpha = lora_alpha) + its SPADE companion file.
    from ..weights.spade_file import save_sdm_lora

    files = save_sdm_lora(
        models.adapter,
        folder / KOHYA_LORA_FILE,
        models.label_set,
        hint_encoding=models.hint_encoding,
        base_model=models.base_model_name,
        training_config_hash=config_hash,
        dtype=dtype,
    )
    result.files += [files.lora_path.relative_to(folder), files.spade_path.relative_to(folder)]


def export_models(models, folder: str | os.PathLike, config, *, config_hash: str, step: int) -> ExportResult:
    """Write the user-facing files of ``models`` into ``folder`` (see the module docstring).

    Args:
        models (`TrainingModels`): the run's models (the caller swaps EMA weights in first if wanted).
        folder (`str` or `os.PathLike`): created if missing; files of the same names are replaced.
        config (`Config`): the run's config (``export`` section).
        config_hash (`str`): `Config.hash`, recorded in every file.
        step (`int`): optimizer steps done, recorded in the manifest.

    Returns:
        `ExportResult`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    result = ExportResult(folder)
    dtype = _DTYPES[config.export.dtype]
    if models.mode == "controlnet":
        _export_controlnet(models, folder, config.export.controlnet_formats, dtype, config_hash, result)
    elif models.mode == "sdm_lora":
        _export_sdm_lora(models, folder, dtype, config_hash, result)
    elif models.mode == "t2i_adapter":
        _export_t2i_adapter(models, folder, dtype, config_hash, result)
    else:
        raise ValueError(f"mode={models.mode!r} has no export; expected controlnet, sdm_lora or t2i_adapter")
    if models.discriminator is not None and config.export.discriminator:
        _save_pretrained(models.discriminator, folder / "discriminator")
        result.files.append(Path("discriminator"))
    manifest = {
        "format": EXPORT_FORMAT,
        "metadata_format_version": FORMAT_VERSION,
        "mode": models.mode,
        "hint_encoding": models.hint_encoding,
        "label_set": models.label_set.name,
        "label_set_fingerprint": models.label_set.fingerprint(),
        "base_model": models.base_model_name,
        "training_config_hash": config_hash,
        "step": step,
        "files": [str(p) for p in result.files],
        "notes": result.notes,
    }
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    for note in result.notes:
        logger.info("export: %s", note)
    # Debug only: callers write into a temporary folder renamed afterwards, and log the final path themselves.
    logger.debug("exported %s to %s: %s", models.mode, folder, ", ".join(map(str, result.files)))
    return result


def load_sdm_lora_export(folder: str | os.PathLike) -> SDMLoraStateDicts:
    """Read ``lora.safetensors`` + ``spade.safetensors`` of an export folder as state dicts for
    `layout2image.core.sdm_lora.load_sdm_lora_state_dicts` (the ``unet.`` prefix removed).

    Raises:
        FileNotFoundError: a file is missing (named).
    """
    from ..weights import load_safetensors

    folder = Path(folder)
    for name in (LORA_FILE, SPADE_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{str(folder / name)!r} does not exist; give an SDM-LoRA export folder")
    lora = load_safetensors(folder / LORA_FILE).state_dict
    spade = load_safetensors(folder / SPADE_FILE).state_dict
    lora = {k[len(_LORA_PREFIX) :] if k.startswith(_LORA_PREFIX) else k: v.float() for k, v in lora.items()}
    return SDMLoraStateDicts(lora=lora, spade={k: v.float() for k, v in spade.items()})
