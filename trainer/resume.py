"""What a run folder may hold before a run starts, and which settings may change when a run is resumed.

**An earlier run in ``train.output_dir``** (a complete checkpoint or an ``export/``) is never replaced
silently: `check_output_folder` refuses it unless the run resumes, or the caller asked to overwrite
(``l2i-train --overwrite``). Overwriting moves the earlier run's files (`RUN_FILES`) into
``<output>/replaced-<UTC time>/`` (`move_earlier_run_aside`); the trainer deletes that folder once the new run has
saved its first checkpoint, so a new run that stops early (bad data, a wrong setting) loses nothing. The encoding
cache (``cache/``) stays: its entries are keyed by content and never stale. A folder with a ``config.yaml`` but no
checkpoint (a run stopped before its first save) holds nothing trained: a plain rerun starts there afresh (with a
log line, `is_unsaved_run`) instead of being refused with advice (``--resume``) that cannot work.

**On resume the saved config is the truth.** The config a checkpoint was written with (its own ``config.yaml``;
for checkpoints of older trainers, the run folder's ``config.yaml`` when its hash matches ``state.json``) is
compared, key by key, with the requested one (`reconcile_resume_config`). Only the settings in `RESUMABLE` may
differ: each is applied (the trainer reads them from the returned config) and recorded (`ConfigChange`: in
``state.json`` of every later checkpoint, as comments at the top of ``config.yaml`` and in the export's
``manifest.json``). Any other difference raises `ResumeConfigError` listing every key with its saved and requested
value, before the trainer writes anything. ``train.output_dir`` and ``train.resume`` are where and how, not what,
and are never compared.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.files import move_into_fresh_folder
from ..core.logging import get_logger
from .checkpoint import CONFIG_FILE, CheckpointState, list_checkpoints
from .config import Config, ConfigError, config_from_dict
from .config_io import read_config_file

__all__ = [
    "RESUMABLE",
    "RUN_FILES",
    "ConfigChange",
    "ResumeConfigError",
    "check_output_folder",
    "earlier_run_files",
    "is_unsaved_run",
    "move_earlier_run_aside",
    "reconcile_resume_config",
    "saved_config_file",
    "saved_config_of",
]

logger = get_logger(__name__)

#: Settings that may differ from the saved config on resume, and what a change does.
RESUMABLE: dict[str, str] = {
    "train.steps": "the run's length; a cosine/linear LR decay is recomputed over the new length from the current "
    "step, D's OneCycle schedule keeps its length (and stays at its end past it)",
    "train.checkpoint_every": "checkpoint cadence from the next step on",
    "train.keep_last": "how many checkpoints are kept, applied at the next save",
    "train.log_every": "TensorBoard cadence",
    "train.tensorboard": "TensorBoard logging on/off",
    "train.export_on_checkpoint": "whether each checkpoint also holds the export files",
    "train.num_workers": "DataLoader worker processes (every sample is a function of its index and epoch)",
    "validation.every": "validation cadence",
    "validation.at_end": "validation after the last step",
    "export.controlnet_formats": "ControlNet files written by the next export",
    "export.dtype": "dtype of the next export's files",
    "export.use_ema": "whether the next export holds the EMA weights",
    "export.discriminator": "whether the next export holds the discriminator",
    "data.root": "where the dataset is (a moved copy of the same data; it is checked again)",
}

#: Keys never compared: where the run is written and where it resumes from.
_NOT_COMPARED = ("train.output_dir", "train.resume")

#: What a run writes into its output folder (moved aside by ``--overwrite``; ``cache/`` stays).
RUN_FILES = ("config.yaml", "checkpoints", "export", "validation", "logs", ".tmp-export")


class ResumeConfigError(ConfigError):
    """Resuming with settings that differ from the saved run's (beyond `RESUMABLE`); names every key."""


@dataclass
class ConfigChange:
    """One setting changed on resume: its dotted key, the saved and the requested value, the step it took effect."""

    key: str
    saved: Any
    requested: Any
    step: int

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "key": self.key, "saved": self.saved, "requested": self.requested}

    def describe(self) -> str:
        return f"{self.key}: {self.saved!r} -> {self.requested!r} at step {self.step}"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"section.key": leaf}`` (lists are leaves)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------------------------------- output folder


def earlier_run_files(output: str | os.PathLike) -> list[str]:
    """The `RUN_FILES` present in ``output`` when it holds an earlier run (a config.yaml, checkpoints or an
    export), else an empty list."""
    output = Path(output)
    if not output.is_dir():
        return []
    present = [name for name in RUN_FILES if (output / name).exists()]
    # A config.yaml alone (a run stopped before its first checkpoint) holds nothing trained: not protected.
    has_run = (output / "export").exists() or bool(list_checkpoints(output / "checkpoints"))
    return present if has_run else []


def is_unsaved_run(output: str | os.PathLike) -> bool:
    """``output`` holds a config.yaml but no checkpoint and no export: a run stopped before its first save."""
    output = Path(output)
    return (output / CONFIG_FILE).is_file() and not earlier_run_files(output)


def check_output_folder(output: str | os.PathLike, *, resume: bool, overwrite: bool) -> list[str]:
    """Refuse an output folder holding an earlier run unless resuming or overwriting (writes nothing).

    Returns:
        `list[str]`: the earlier run's files (to move aside when ``overwrite``).

    Raises:
        FileExistsError: ``output`` holds a run and neither ``resume`` nor ``overwrite`` is set.
    """
    found = earlier_run_files(output)
    if found and not resume and not overwrite:
        raise FileExistsError(
            f"--output {str(output)!r} already holds a run ({', '.join(found)}); continue it with --resume latest, "
            "start afresh with --overwrite (the earlier run is moved to replaced-<time>/ in that folder and deleted "
            "once the new run saves its first checkpoint), or choose another --output"
        )
    return found if overwrite and not resume else []


def move_earlier_run_aside(output: str | os.PathLike, names: list[str]) -> Path | None:
    """Move ``names`` (from `check_output_folder`) into ``output/replaced-<UTC time>/``; returns that folder."""
    if not names:
        return None
    output = Path(output)
    folder = move_into_fresh_folder(output, "replaced", [output / name for name in names])
    logger.warning(
        "--overwrite: moved the earlier run's %s to %s; it is deleted once this run saves its first checkpoint",
        ", ".join(names),
        folder,
    )
    return folder


# ---------------------------------------------------------------------------------------------------- resume


def saved_config_of(folder: str | os.PathLike, state: CheckpointState) -> tuple[Config | None, Path | None]:
    """The config a checkpoint was written with, and the file it came from (None, None when unknown).

    The checkpoint's own ``config.yaml`` first; else (checkpoints of older trainers) the run folder's, if its hash
    is the one ``state.json`` records.

    Raises:
        ResumeConfigError: a saved config file exists but cannot be read.
    """
    folder = Path(folder)
    for path, own in ((folder / CONFIG_FILE, True), (folder.parent.parent / CONFIG_FILE, False)):
        if not path.is_file():
            continue
        try:
            config = config_from_dict(read_config_file(path))
        except ConfigError as e:
            raise ResumeConfigError(f"resume: the saved config {str(path)!r} cannot be read: {e}") from None
        if own or config.hash() == state.config_hash:
            return config, path
    return None, None


def saved_config_file(resume: str, output: str | os.PathLike) -> Path | None:
    """The ``config.yaml`` a resume reads its settings from (the checkpoint's, else the run folder's), if any."""
    from .checkpoint import resolve_resume

    try:
        folder = resolve_resume(resume, output)
    except OSError:
        return None
    for path in (folder / CONFIG_FILE, folder.parent.parent / CONFIG_FILE):
        if path.is_file():
            return path
    return None


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)


def reconcile_resume_config(
    requested: Config, folder: str | os.PathLike, state: CheckpointState
) -> tuple[Config, list[ConfigChange]]:
    """The config to resume with: ``requested``, if it differs from the saved one only in `RESUMABLE` keys.

    Args:
        requested (`Config`): the config the user asked for (with ``train.resume`` set).
        folder (`str` or `os.PathLike`): the checkpoint folder.
        state (`CheckpointState`): its ``state.json``.

    Returns:
        `tuple[Config, list[ConfigChange]]`: the config to run, and the changes made now (at ``state.step``).

    Raises:
        ResumeConfigError: other settings differ (every key listed with the saved and the requested value), or
            ``train.steps`` is below the checkpoint's step, or no saved config is found and the requested config's
            hash differs from the one the checkpoint records.
    """
    folder = Path(folder)
    saved, source = saved_config_of(folder, state)
    if saved is None:
        if requested.hash() == state.config_hash:
            return requested, []
        raise ResumeConfigError(
            f"resume from {str(folder)!r}: it has no saved config.yaml (nor does its run folder, with its config "
            f"hash {state.config_hash}), and the requested config hashes to {requested.hash()}: the settings differ "
            "but which ones cannot be told. Resume with the run's exact config (--config <its config.yaml>), or "
            "start a new run in another --output"
        )
    old, new = flatten(saved.to_dict()), flatten(requested.to_dict())
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in _NOT_COMPARED)
    refused = [k for k in changed if k not in RESUMABLE]
    if refused:
        listed = "; ".join(f"{k}: saved {_show(old.get(k))}, requested {_show(new.get(k))}" for k in refused)
        raise ResumeConfigError(
            f"resume from {str(folder)!r}: {len(refused)} setting(s) differ from the run's saved config "
            f"{str(source)!r}, which is the truth on resume: {listed}. Drop them from --set/--config (with only "
            "--output and --resume, l2i-train reads the saved config), or start a new run in another --output. "
            f"Settings that may change on resume: {', '.join(RESUMABLE)}"
        )
    if requested.train.steps < state.step:
        raise ResumeConfigError(
            f"resume from {str(folder)!r}: train.steps={requested.train.steps} is below the checkpoint's step "
            f"{state.step}; give train.steps >= {state.step}"
        )
    changes = [ConfigChange(k, old.get(k), new.get(k), state.step) for k in changed]
    for change in changes:
        logger.warning("resume: %s (%s)", change.describe(), RESUMABLE[change.key])
    return requested, changes


def changes_header(changes: list[dict[str, Any]]) -> str | None:
    """YAML comment lines recording the settings changed on resume (for the top of ``config.yaml``)."""
    if not changes:
        return None
    lines = ["Settings changed on resume (the values below are the current ones):"]
    lines += [f"  step {c['step']}: {c['key']}: {_show(c['saved'])} -> {_show(c['requested'])}" for c in changes]
    return "".join(f"# {line}\n" for line in lines)
