"""Training checkpoints: written atomically, pruned to the last N, found again through ``latest``.

Layout of ``<output>/checkpoints/``::

    step_000500/
      state.json              step (optimizer steps done), data position (epoch, batch), skipped steps, config hash,
                              the settings changed on resume so far
      config.yaml             the run's config as it was when this checkpoint was written (the truth on resume)
      trainable.safetensors   the trained weights by parameter name, float32
      discriminator.safetensors   D's state dict (weights and BatchNorm statistics), when adversarial
      ema.safetensors         EMA of the trained weights, when train.ema
      optimizer.pt            optimizer, LR-schedule and grad-scaler states (torch.save of plain containers)
      export/                 the user-facing files (trainer/export.py), when train.export_on_checkpoint
    step_000500.1/            the same step saved again (e.g. after a resume with new export settings)
    latest                    a text file naming the newest complete checkpoint folder

How a save stays safe when the process is killed at any point: the checkpoint is written into
``.tmp-step_000500-<pid>/``, every file is flushed to disk (fsync), and the folder is renamed to a name no other
folder has (``step_000500``, or ``step_000500.1``, ``.2``, ... when that step was saved before); only then is
``latest`` replaced (write + rename), and only after that are older folders of the same step moved to
``.tmp-old-*`` and deleted. So ``latest`` never names a folder that is gone or half-written. Leftover ``.tmp-*``
folders (and ``latest``'s temporary files) of an interrupted save are removed by the next save
(`remove_leftovers`), and `resolve_resume` falls back to the newest complete checkpoint, with a warning, if
``latest`` names a folder that is missing anyway (deleted by hand, or an older trainer's interrupted save).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..core.files import atomic_path, atomic_write_text, fsync_dir, move_into_fresh_folder, save_safetensors_atomic
from ..core.logging import get_logger

__all__ = [
    "CHECKPOINT_FORMAT",
    "CONFIG_FILE",
    "CheckpointError",
    "CheckpointState",
    "checkpoint_step",
    "list_checkpoints",
    "load_checkpoint_files",
    "newer_checkpoints",
    "prune_checkpoints",
    "read_checkpoint_state",
    "remove_leftovers",
    "resolve_resume",
    "save_checkpoint",
    "set_aside_newer",
]

logger = get_logger(__name__)

CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"^step_(\d{6,})(?:\.(\d+))?$")
LATEST = "latest"
CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"


class CheckpointError(ValueError):
    """A checkpoint file cannot be read (truncated, corrupt, from a newer trainer); the message names the file."""


@dataclass
class CheckpointState:
    """What ``state.json`` records.

    Args:
        step (`int`): optimizer steps done; the next step to run.
        epoch (`int`), batch (`int`): position of the next batch in the data order (epoch, batch within it).
        skipped_steps (`int`): steps whose update the NaN/inf guard skipped so far.
        config_hash (`str`): `Config.hash` of the run that wrote it.
        ema_updates (`int`): updates of the EMA (its decay warm-up).
        config_changes (`list[dict]`): settings changed on resume so far, each ``{"step", "key", "saved",
            "requested"}`` (`layout2image.trainer.resume`).
        format (`int`): `CHECKPOINT_FORMAT`.
    """

    step: int
    epoch: int
    batch: int
    skipped_steps: int
    config_hash: str
    ema_updates: int = 0
    config_changes: list[dict[str, Any]] = field(default_factory=list)
    format: int = CHECKPOINT_FORMAT


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def _sort_key(path: Path) -> tuple[int, int] | None:
    m = _NAME.match(path.name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step a checkpoint folder's name records (``step_000500`` and ``step_000500.1`` -> 500), else None."""
    key = _sort_key(Path(path))
    return key[0] if key else None


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def remove_leftovers(root: str | os.PathLike) -> list[Path]:
    """Delete what interrupted saves left in a checkpoints folder: ``.tmp-*`` folders (half-written checkpoints,
    replaced ones not yet deleted) and ``latest``'s temporary files. Returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".tmp-") or (path.name.startswith(f".{LATEST}.") and path.name.endswith(".tmp")):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        logger.info(
            "removed %d leftover(s) of an interrupted checkpoint save: %s", len(removed), [p.name for p in removed]
        )
    return removed


def _free_name(root: Path, step: int) -> str:
    """``step_000500``, or the next ``step_000500.N`` when a folder of that step exists (complete or not)."""
    base = checkpoint_name(step)
    taken = {p.name for p in root.iterdir() if checkpoint_step(p) == step}
    if base not in taken:
        return base
    version = 1 + max((_sort_key(root / n) or (0, 0))[1] for n in taken)
    return f"{base}.{version}"


def save_checkpoint(
    root: str | os.PathLike,
    state: CheckpointState,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    objects: Mapping[str, Any],
    *,
    write_extra: Callable[[Path], None] | None = None,
    keep_last: int = 0,
    config_yaml: str | None = None,
) -> Path:
    """Write one checkpoint atomically and point ``latest`` at it.

    Args:
        root (`str` or `os.PathLike`): the checkpoints folder (``<output>/checkpoints``).
        state (`CheckpointState`): written as ``state.json``.
        tensors (`Mapping[str, Mapping[str, torch.Tensor]]`): file stem -> state dict, each written as
            ``<stem>.safetensors`` (float tensors as given).
        objects (`Mapping[str, Any]`): optimizer/schedule states, written together as ``optimizer.pt``.
        write_extra (`Callable[[Path], None]`, *optional*): writes more files into the temporary folder (exports).
        keep_last (`int`, defaults to 0): keep this many newest checkpoints (0 keeps all).
        config_yaml (`str`, *optional*): the run's config, written as ``config.yaml``.

    Returns:
        `Path`: the checkpoint folder (``step_NNNNNN``, or ``step_NNNNNN.V`` when that step was saved before; see
        the module docstring for the order of the renames).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root)
    name = _free_name(root, state.step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        # Files inside the temporary folder need no atomic rename of their own (the folder's rename is the commit);
        # the helpers give them the umask's mode (safetensors alone writes 0600) and fsync comes once below.
        for stem, sd in tensors.items():
            save_safetensors_atomic(
                {k: v.detach().cpu().contiguous() for k, v in sd.items()}, tmp / f"{stem}.safetensors"
            )
        with atomic_path(tmp / "optimizer.pt", fsync=False) as path:
            torch.save(dict(objects), path)
        if config_yaml is not None:
            atomic_write_text(tmp / CONFIG_FILE, config_yaml)
        if write_extra is not None:
            write_extra(tmp)
        atomic_write_text(tmp / STATE_FILE, json.dumps(asdict(state), indent=2) + "\n")
        _fsync_tree(tmp)
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The pointer moves only to a complete folder, and nothing it named before is removed until it has moved.
    atomic_write_text(root / LATEST, name + "\n")
    for old in sorted(root.iterdir()):
        if old != final and checkpoint_step(old) == state.step:  # the same step saved before: replaced
            doomed = root / f".tmp-old-{old.name}-{os.getpid()}"
            os.rename(old, doomed)
            shutil.rmtree(doomed)
    logger.info("saved checkpoint %s", final)
    if keep_last:
        prune_checkpoints(root, keep_last)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders (with ``state.json``), oldest first (by step, then by save)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(key, p) for p in root.iterdir() if (key := _sort_key(p)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints (never the one ``latest`` names); returns the deleted."""
    root = Path(root)
    checkpoints = list_checkpoints(root)
    latest = (root / LATEST).read_text(encoding="utf-8").strip() if (root / LATEST).is_file() else None
    deleted = []
    for path in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        if path.name == latest:
            continue
        # Renamed first: a kill during the delete must not leave a half-deleted folder under a step_* name.
        doomed = root / f".tmp-old-{path.name}-{os.getpid()}"
        os.rename(path, doomed)
        shutil.rmtree(doomed)
        deleted.append(path)
    if deleted:
        logger.info("removed %d old checkpoint(s): %s", len(deleted), ", ".join(p.name for p in deleted))
    return deleted


def _read_pointer(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def resolve_resume(spec: str, output_dir: str | os.PathLike) -> Path:
    """``'latest'`` (the folder ``<output>/checkpoints/latest`` names) or a checkpoint folder -> its path.

    If ``latest`` is missing, unreadable or names a folder that is gone or incomplete (no ``state.json``), the
    newest complete checkpoint is used instead, with a warning.

    Raises:
        FileNotFoundError: no checkpoint to resume from (naming what was looked for).
    """
    root = Path(output_dir) / "checkpoints"
    if spec == LATEST:
        name = _read_pointer(root)
        path = root / name if name else None
        if path is None or not (path / STATE_FILE).is_file():
            found = list_checkpoints(root)
            if not found:
                why = (
                    f"the run in {str(output_dir)!r} stopped before saving one"
                    if (Path(output_dir) / CONFIG_FILE).is_file()
                    else f"no run was started in {str(output_dir)!r}"
                )
                raise FileNotFoundError(
                    f"--resume latest: no checkpoint in {str(root)!r}: {why}, so there is nothing to continue; start "
                    "afresh: run again without --resume (or with --overwrite)"
                )
            what = f"names {name!r}, which is not a complete checkpoint" if name else "is missing or empty"
            logger.warning("%s %s; resuming from the newest complete checkpoint, %s", root / LATEST, what, found[-1])
            path = found[-1]
    else:
        path = Path(spec)
        # A bare name (``step_000500``) is looked up in the run's checkpoints folder; a path is taken as given.
        if not path.exists() and len(path.parts) == 1:
            path = root / spec
        if not path.exists():
            raise FileNotFoundError(f"--resume {spec!r}: {str(path)!r} does not exist; {_available(root)}")
        if not path.is_dir():
            raise NotADirectoryError(
                f"--resume {spec!r}: {str(path)!r} is a file, not a checkpoint folder; {_available(root)}"
            )
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {spec!r}: {str(path)!r} is not a checkpoint folder (no state.json); {_available(root)}"
        )
    return path


def _available(root: Path) -> str:
    """What a wrong ``--resume`` can use instead: the checkpoints of ``root``, or how to start afresh."""
    found = list_checkpoints(root)
    if found:
        shown = ", ".join(str(p) for p in found[-3:])
        return f"give --resume latest or one of the checkpoints in {str(root)!r}: {shown}"
    return f"there is no checkpoint in {str(root)!r}; start afresh without --resume (or with --overwrite)"


def newer_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The checkpoint folders (complete or not) in ``folder``'s checkpoints folder saved after it, oldest first."""
    folder = Path(folder)
    mine = _sort_key(folder)
    if mine is None or not folder.parent.is_dir():
        return []
    found = [(key, p) for p in folder.parent.iterdir() if (key := _sort_key(p)) and key > mine and p.is_dir()]
    return [p for _, p in sorted(found)]


def set_aside_newer(folder: str | os.PathLike) -> Path | None:
    """Resuming from ``folder`` when newer checkpoints exist: they belong to an abandoned branch of the run.

    They are moved (never deleted) into ``<checkpoints>/abandoned-<UTC time>/`` so that pruning (``keep_last``)
    sees only the resumed lineage, and ``latest`` is pointed at ``folder``. Returns the new folder, or None.
    """
    folder = Path(folder)
    newer = newer_checkpoints(folder)
    if not newer:
        return None
    root = folder.parent
    aside = move_into_fresh_folder(root, "abandoned", newer)
    atomic_write_text(root / LATEST, folder.name + "\n")
    logger.warning(
        "resuming from %s, which is not the newest checkpoint: the newer %s (an abandoned branch of this run) moved "
        "to %s; delete that folder once you no longer need it",
        folder.name,
        ", ".join(p.name for p in newer),
        aside,
    )
    return aside


def _earlier_hint(folder: Path) -> str:
    earlier = [
        p for p in list_checkpoints(folder.parent) if p != folder and _sort_key(p) < (_sort_key(folder) or (0, 0))
    ]
    if earlier:
        return f"; resume from an earlier checkpoint instead: --resume {earlier[-1]}"
    return "; no earlier checkpoint is left in this run"


def read_checkpoint_state(folder: str | os.PathLike) -> CheckpointState:
    """``state.json`` of a checkpoint folder, checked.

    Raises:
        CheckpointError: the file is unreadable, not JSON, lacks a field or has one of the wrong type, or comes
            from a newer trainer (the file is named, and an earlier checkpoint suggested if there is one).
    """
    folder = Path(folder)
    path = folder / STATE_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
        known = {f.name for f in fields(CheckpointState)}
        unknown = sorted(set(raw) - known)
        if unknown and raw.get("format", 0) <= CHECKPOINT_FORMAT:
            raise ValueError(f"unknown field(s) {unknown}")
        if raw.get("format", 0) > CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"checkpoint {str(folder)!r} has format {raw.get('format')}, newer than this trainer's "
                f"{CHECKPOINT_FORMAT}; update layout2image"
            )
        state = CheckpointState(**raw)
        for name in ("step", "epoch", "batch", "skipped_steps", "ema_updates"):
            value = getattr(state, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} is not a non-negative integer")
        if not isinstance(state.config_hash, str) or not isinstance(state.config_changes, list):
            raise ValueError("config_hash must be text and config_changes a list")
    except CheckpointError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} cannot be read ({' '.join(str(e).split())}){_earlier_hint(folder)}"
        ) from None
    return state


def load_checkpoint_files(folder: str | os.PathLike) -> tuple[CheckpointState, dict[str, dict], dict[str, Any]]:
    """Read a checkpoint: (state, {stem: state dict}, optimizer/schedule states).

    Raises:
        CheckpointError: a file is missing, truncated or corrupt (named, with an earlier checkpoint to resume from
            when there is one).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    state = read_checkpoint_state(folder)

    def fail(path: Path, e: BaseException) -> CheckpointError:
        reason = " ".join(str(e).split()) or type(e).__name__
        return CheckpointError(
            f"checkpoint file {str(path)!r} cannot be read ({reason}); it may have been cut short by a full disk or "
            f"an interrupted copy{_earlier_hint(folder)}"
        )

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            tensors[path.stem] = load_file(str(path))
        except Exception as e:  # safetensors' SafetensorError is no ValueError/OSError subclass
            raise fail(path, e) from None
    if "trainable" not in tensors:
        raise fail(folder / "trainable.safetensors", FileNotFoundError("missing"))
    try:
        objects = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip is a RuntimeError, a bad pickle an UnpicklingError
        raise fail(folder / "optimizer.pt", e) from None
    if not isinstance(objects, dict):
        raise fail(folder / "optimizer.pt", ValueError(f"expected a dict, got {type(objects).__name__}"))
    return state, tensors, objects
