"""Checkpoint files: a kill at any rename or delete of a save leaves a complete checkpoint to resume from, leftovers
are removed by the next save, a stale ``latest`` falls back to the newest complete checkpoint, and truncated or
corrupt files give one error naming the file and an earlier checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from layout2image.trainer import checkpoint as ckpt
from layout2image.trainer.checkpoint import (
    CheckpointError,
    CheckpointState,
    list_checkpoints,
    load_checkpoint_files,
    resolve_resume,
    save_checkpoint,
)


def _save(root: Path, step: int, value: float, **kwargs) -> Path:
    state = CheckpointState(step=step, epoch=0, batch=step, skipped_steps=0, config_hash="h")
    tensors = {"trainable": {"w": torch.full((3,), value)}}
    return save_checkpoint(root, state, tensors, {"g_optimizer": {"lr": 0.1}}, **kwargs)


def _resumable(output: Path) -> tuple[int, float]:
    """Resume as the trainer does: (step, first weight) of the checkpoint `latest` leads to; every file loads."""
    folder = resolve_resume("latest", output)
    state, tensors, objects = load_checkpoint_files(folder)
    assert objects["g_optimizer"] == {"lr": 0.1}
    return state.step, float(tensors["trainable"]["w"][0])


class _Kill(Exception):
    pass


def _kill_at(monkeypatch, n: int) -> list[str]:
    """Make the n-th call (1-based) of os.rename / os.replace / shutil.rmtree raise, as a kill there would stop the
    save. Returns the log of calls."""
    calls: list[str] = []
    originals = {"rename": os.rename, "replace": os.replace, "rmtree": shutil.rmtree}

    def wrap(name):
        def fn(*args, **kwargs):
            calls.append(name)
            if len(calls) == n:
                raise _Kill(f"killed at call {n} ({name})")
            return originals[name](*args, **kwargs)

        return fn

    monkeypatch.setattr(os, "rename", wrap("rename"))
    monkeypatch.setattr(os, "replace", wrap("replace"))
    monkeypatch.setattr(shutil, "rmtree", wrap("rmtree"))
    return calls


@pytest.mark.parametrize("same_step", [True, False], ids=["same-step-saved-again", "next-step"])
def test_a_kill_at_any_rename_or_delete_leaves_a_complete_checkpoint(tmp_path, monkeypatch, same_step):
    n = 1
    while True:
        output = tmp_path / f"run{n}"
        root = output / "checkpoints"
        _save(root, 2, 2.0)
        _save(root, 4, 4.0)
        with monkeypatch.context() as m:
            calls = _kill_at(m, n)
            try:
                _save(root, 4 if same_step else 6, 5.0)
                killed = False
            except _Kill:
                killed = True
        # Whatever was interrupted, `latest` leads to a complete checkpoint: the old step 4 or the new save.
        step, value = _resumable(output)
        assert (step, value) in {(4, 4.0), (4 if same_step else 6, 5.0)}, (n, calls)
        # The next save removes every leftover and resumes from the new state.
        _save(root, 8, 8.0)
        assert not [p.name for p in root.iterdir() if p.name.startswith(".")]
        assert _resumable(output) == (8, 8.0)
        if not killed:
            break
        n += 1
    assert n >= (4 if same_step else 3), f"only {n - 1} rename/delete call(s) were exercised"


def test_the_same_step_saved_again_gets_a_new_name_and_replaces_the_old(tmp_path):
    first = _save(tmp_path, 4, 1.0)
    second = _save(tmp_path, 4, 2.0)
    assert (first.name, second.name) == ("step_000004", "step_000004.1")
    assert not first.exists() and list_checkpoints(tmp_path) == [second]
    assert (tmp_path / "latest").read_text().strip() == "step_000004.1"
    assert float(load_file(second / "trainable.safetensors")["w"][0]) == 2.0


def test_checkpoint_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        folder = _save(tmp_path, 1, 1.0, config_yaml="train: {}\n")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == dict.fromkeys(["trainable.safetensors", "optimizer.pt", "state.json", "config.yaml"], 0o644)
    assert stat.S_IMODE((tmp_path / "latest").stat().st_mode) == 0o644


def test_latest_naming_a_missing_folder_falls_back_to_the_newest_complete(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    _save(root, 2, 2.0)
    _save(root, 4, 4.0)
    (root / "latest").write_text("step_000009\n")
    (root / "step_000006").mkdir()  # incomplete: no state.json
    with caplog.at_level("WARNING"):
        assert resolve_resume("latest", tmp_path) == root / "step_000004"
    assert "step_000009" in caplog.text and "newest complete checkpoint" in caplog.text
    (root / "latest").unlink()
    assert resolve_resume("latest", tmp_path) == root / "step_000004"
    shutil.rmtree(root)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_resume("latest", tmp_path)


@pytest.mark.parametrize(
    "damage, file",
    [
        (lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]), "trainable.safetensors"),
        (lambda f: f.write_bytes(b"\x00" * 7), "trainable.safetensors"),
        (lambda f: f.write_text("{not json"), "state.json"),
        (lambda f: f.write_text('{"step": "two"}'), "state.json"),
        (
            lambda f: f.write_text(
                json.dumps({"step": -1, "epoch": 0, "batch": 0, "skipped_steps": 0, "config_hash": "h"})
            ),
            "state.json",
        ),  # fmt: skip
        (lambda f: f.write_bytes(f.read_bytes()[:100]), "optimizer.pt"),
        (lambda f: f.unlink(), "trainable.safetensors"),
    ],
    ids=["truncated", "garbage", "not-json", "wrong-type", "negative", "truncated-optimizer", "missing"],
)
def test_damaged_checkpoint_files_are_named_with_an_earlier_checkpoint(tmp_path, damage, file):
    root = tmp_path / "checkpoints"
    earlier = _save(root, 2, 2.0)
    latest = _save(root, 4, 4.0)
    damage(latest / file)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_files(resolve_resume("latest", tmp_path))
    message = str(info.value)
    assert str(latest / file) in message and f"--resume {earlier}" in message
    assert "\n" not in message
    shutil.rmtree(earlier)
    with pytest.raises(CheckpointError, match="no earlier checkpoint"):
        load_checkpoint_files(latest)


def test_a_checkpoint_from_a_newer_trainer_is_refused(tmp_path):
    folder = _save(tmp_path, 1, 1.0)
    raw = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**raw, "format": ckpt.CHECKPOINT_FORMAT + 1, "new_field": 1}))
    with pytest.raises(CheckpointError, match="newer than this trainer"):
        load_checkpoint_files(folder)
