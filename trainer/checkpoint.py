"""Training checkpoints: written atomically, pruned to the last N, found again through ``latest``.

Layout of ``<output>/checkpoints/``::

    step_000500/
      state.json              step (optimizer steps done), data position (epoch, batch), skipped steps, config hash
      trainable.safetensors   the trained weights by parameter name, float32
      discriminator.safetensors   D's state dict (weights and BatchNorm statistics), when adversarial
      ema.safetensors         EMA of the trained weights, when train.ema
      optimizer.pt            optimizer, LR-schedule and grad-scaler states (torch.save of plain containers)
      export/                 the user-facing files (trainer/export.py), when train.export_on_checkpoint
    latest                    a text file naming the newest complete checkpoint folder

A checkpoint is written into ``.tmp-step_000500-<pid>/``, every file is flushed to disk (fsync), and the folder
is renamed into place; only then is ``latest`` replaced (write + rename). An interrupted save leaves a ``.tmp-*``
folder that the next save removes, never a half checkpoint under a ``step_*`` name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.logging import get_logger

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointState",
    "list_checkpoints",
    "load_checkpoint_files",
    "prune_checkpoints",
    "resolve_resume",
    "save_checkpoint",
]

logger = get_logger(__name__)

CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"^step_(\d{6,})$")
LATEST = "latest"


@dataclass
class CheckpointState:
    """What ``state.json`` records.

    Args:
        step (`int`): optimizer steps done; the next step to run.
        epoch (`int`), batch (`int`): position of the next batch in the data order (epoch, batch within it).
        skipped_steps (`int`): steps whose update the NaN/inf guard skipped so far.
        config_hash (`str`): `Config.hash` of the run that wrote it.
        ema_updates (`int`): updates of the EMA (its decay warm-up).
        format (`int`): `CHECKPOINT_FORMAT`.
    """

    step: int
    epoch: int
    batch: int
    skipped_steps: int
    config_hash: str
    ema_updates: int = 0
    format: int = CHECKPOINT_FORMAT


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(
    root: str | os.PathLike,
    state: CheckpointState,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    objects: Mapping[str, Any],
    *,
    write_extra: Callable[[Path], None] | None = None,
    keep_last: int = 0,
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

    Returns:
        `Path`: the checkpoint folder.
    """
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = checkpoint_name(state.step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        for stem, sd in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / f"{stem}.safetensors"))
        torch.save(dict(objects), tmp / "optimizer.pt")
        if write_extra is not None:
            write_extra(tmp)
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():  # the same step saved twice (e.g. the final save after a periodic one)
            old = root / f".tmp-old-{name}-{os.getpid()}"
            final.rename(old)
            shutil.rmtree(old)
        tmp.rename(final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(root / LATEST, name + "\n")
    logger.info("saved checkpoint %s", final)
    if keep_last:
        prune_checkpoints(root, keep_last)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders (with ``state.json``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "state.json").is_file()
    ]
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
        shutil.rmtree(path)
        deleted.append(path)
    if deleted:
        logger.info("removed %d old checkpoint(s): %s", len(deleted), ", ".join(p.name for p in deleted))
    return deleted


def resolve_resume(spec: str, output_dir: str | os.PathLike) -> Path:
    """``'latest'`` (the folder ``<output>/checkpoints/latest`` names) or a checkpoint folder -> its path.

    Raises:
        FileNotFoundError: naming what was looked for.
    """
    root = Path(output_dir) / "checkpoints"
    if spec == LATEST:
        pointer = root / LATEST
        if not pointer.is_file():
            raise FileNotFoundError(
                f"--resume latest: {str(pointer)!r} does not exist; no checkpoint was saved in {str(output_dir)!r} yet"
            )
        path = root / pointer.read_text(encoding="utf-8").strip()
    else:
        path = Path(spec)
        if not path.is_absolute() and not path.exists():
            path = root / spec
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"resume: {str(path)!r} is not a checkpoint folder (no state.json)")
    return path


def load_checkpoint_files(folder: str | os.PathLike) -> tuple[CheckpointState, dict[str, dict], dict[str, Any]]:
    """Read a checkpoint: (state, {stem: state dict}, optimizer/schedule states)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    raw = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if raw.get("format", 0) > CHECKPOINT_FORMAT:
        raise ValueError(f"{folder}: checkpoint format {raw.get('format')} is newer than this trainer; update it")
    state = CheckpointState(**raw)
    tensors = {p.stem: load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}
    objects = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    return state, tensors, objects
