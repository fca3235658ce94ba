"""The training loop on tiny models: one adversarial step per mode, exports that load back, exact resume, the NaN
guard, checkpoint pruning, the data order and the optimizers; stopping (Ctrl-C, SIGTERM) and resuming.

The tiny world (written once per session): a diffusers folder with a UNet of (32, 64) blocks, a 2x VAE, a CLIP text
model of width 16 with a 54-token tokenizer, the SD 1.5 scheduler config; an 8-sample toy dataset at 32x32; and an
evaluation segmenter (random tiny SegFormer saved as a discriminator folder).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from layout2image.cli.train import main as train_main
from layout2image.core.labels import load_label_set
from layout2image.testing import write_tiny_sd
from layout2image.trainer.build import build_generator_optimizer, is_bitsandbytes_available, is_tensorboard_available
from layout2image.trainer.checkpoint import list_checkpoints, prune_checkpoints
from layout2image.trainer.config import OptimConfig, load_config
from layout2image.trainer.loop import ResumableBatchSampler, Trainer
from layout2image.trainer.resume import ResumeConfigError
from layout2image.trainer.step import LayoutDiffusionStep


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    from layout2image.core.discriminator import build_discriminator, tiny_segmenter_config
    from layout2image.core.toy import write_dataset

    root = tmp_path_factory.mktemp("tiny_world")
    write_tiny_sd(root / "sd")
    write_dataset(root / "data", 8, size=32, preview_rows=0)
    label_set = load_label_set(root / "data" / "labelset.yaml")
    segmenter = build_discriminator(
        label_set, config=tiny_segmenter_config(), generator=torch.Generator().manual_seed(9)
    )
    segmenter.save_pretrained(root / "segmenter")
    return root


def _config(world: Path, out: Path, *overrides: str):
    return load_config("toy", overrides=_overrides(world, out, *overrides))


def _overrides(world: Path, out: Path, *overrides: str) -> list[str]:
    """The `--set` list of `_config` (the CLI takes ``--preset toy --set`` with these)."""
    base = [
        f"model.pretrained={world / 'sd'}",
        f"data.root={world / 'data'}",
        f"train.output_dir={out}",
        "data.transform.resolution=32",
        "model.hint_block_out_channels=[8, 8, 8, 8]",
        "model.sdm_lora.rank=4",
        "model.sdm_lora.lora_alpha=4",
        "model.sdm_lora.spade_hidden_channels=8",
        "train.batch_size=2",
        "train.num_workers=0",
        "train.checkpoint_every=0",
        "adversarial.lazy_every=1",
        "adversarial.num_unroll_steps=1",
        "adversarial.warmup_start=0",
        "adversarial.warmup_end=0",
        "validation.every=0",
        "validation.at_end=false",
        "validation.num_images=2",
        "validation.num_steps=2",
        "validation.batch_size=4",
        # The toy preset's base is the shipped toy world; these tests use the tiny SD above and a random D.
        "model.hint=embedding",
        "discriminator.pretrained=null",
        "discriminator.tiny=true",
        "validation.segmenter=null",
    ]
    return base + list(overrides)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


MODES = [
    ("controlnet", "rgb"),
    ("controlnet", "onehot"),
    ("controlnet", "embedding"),
    ("sdm_lora", "onehot"),
    ("t2i_adapter", "rgb"),
]


@pytest.mark.parametrize("mode, hint", MODES, ids=[f"{m}-{h}" for m, h in MODES])
def test_one_adversarial_step_per_mode_changes_only_trainable_weights_and_exports(tiny_world, tmp_path, mode, hint):
    extra = [f"model.mode={mode}", f"model.hint={hint}", "train.steps=1"]
    validate = (mode, hint) == ("controlnet", "embedding")
    if validate:
        extra += ["validation.at_end=true", f"validation.segmenter={tiny_world / 'segmenter'}"]
    trainer = Trainer(_config(tiny_world, tmp_path / "run", *extra))
    models = trainer.models
    trainable = {id(p) for p in models.parameters}
    frozen_before = {
        name: {k: v.detach().clone() for k, v in module.named_parameters() if id(v) not in trainable}
        for name, module in models.frozen_modules().items()
    }
    trainable_before = models.trainable_state_dict()
    d_before = _snapshot(models.discriminator)

    result = trainer.run()

    (outcome,) = result.history
    assert outcome.adversarial and not outcome.skipped and result.skipped_steps == 0
    assert {"loss", "loss_noise", "loss_adv", "d_loss"} <= set(outcome.terms)
    assert all(torch.isfinite(torch.tensor(v)) for v in outcome.terms.values())
    for name, params in frozen_before.items():
        now = dict(models.frozen_modules()[name].named_parameters())
        changed = [k for k, v in params.items() if not torch.equal(now[k], v)]
        assert not changed, f"frozen {name} weights changed: {changed[:3]}"
    after = models.trainable_state_dict()
    assert any(not torch.equal(after[k], v) for k, v in trainable_before.items()), "no trainable weight moved"
    assert any(not torch.equal(models.discriminator.state_dict()[k], v) for k, v in d_before.items())
    assert all(p.dtype == torch.float32 for p in models.parameters)

    # Exports load back with the weights that were trained.
    export = tmp_path / "run" / "export"
    assert result.export is not None and result.export.folder == export
    manifest = json.loads((export / "manifest.json").read_text())
    assert (
        manifest["mode"] == mode and manifest["training_config_hash"] == trainer.config_hash and manifest["step"] == 1
    )
    if mode == "controlnet":
        from layout2image.core.controlnet import load_controlnet
        from layout2image.weights import controlnet_from_file

        loaded = load_controlnet(export / "controlnet")
        single = controlnet_from_file(export / "controlnet.safetensors", label_set=models.label_set)
        for model in (loaded, single):
            state = model.state_dict()
            assert all(torch.equal(state[k], after[k]) for k in after)
        meta = _header(export / "controlnet.safetensors")
        assert meta["l2i.kind"] == "controlnet" and meta["l2i.hint_encoding"] == hint
        assert meta["l2i.training_config_hash"] == trainer.config_hash
        assert meta["l2i.label_set_fingerprint"] == models.label_set.fingerprint()
        if hint == "embedding":
            from layout2image.weights import load_class_embedding_table

            table = load_class_embedding_table(export / "controlnet.table.safetensors", models.label_set).table
            assert torch.equal(table, models.table) and meta["l2i.table_file"] == "controlnet.table.safetensors"
    elif mode == "sdm_lora":
        from diffusers import UNet2DConditionModel

        from layout2image.core.sdm_lora import add_sdm_lora, load_sdm_lora_state_dicts
        from layout2image.trainer.export import load_sdm_lora_export

        unet = UNet2DConditionModel.from_pretrained(tiny_world / "sd", subfolder="unet")
        add_sdm_lora(unet, models.sdm_lora_config)
        load_sdm_lora_state_dicts(unet, load_sdm_lora_export(export))
        state = dict(unet.named_parameters())
        assert all(torch.equal(state[k], after[k]) for k in after)
        assert _header(export / "lora.safetensors")["l2i.kind"] == "lora"
        assert _header(export / "spade.safetensors")["l2i.kind"] == "spade"
        assert all(k.startswith("unet.") for k in load_file(export / "lora.safetensors"))
        # The UI files: a kohya LoRA + SPADE companion that load back into a plain UNet with the same weights.
        from layout2image.weights import load_sdm_lora

        fresh = UNet2DConditionModel.from_pretrained(tiny_world / "sd", subfolder="unet")
        load_sdm_lora(fresh, export / "sdm_lora.safetensors", models.label_set)
        fresh_state = dict(fresh.named_parameters())
        assert all(torch.equal(fresh_state[k], after[k]) for k in after)
        assert all(k.startswith("lora_unet_") for k in load_file(export / "sdm_lora.safetensors"))
    else:
        from diffusers import T2IAdapter

        adapter = T2IAdapter.from_pretrained(export / "t2i_adapter")
        assert all(torch.equal(adapter.state_dict()[k], after[k]) for k in after)
    assert (export / "discriminator" / "config.json").is_file()
    if validate:
        (val,) = result.validations
        assert (val.folder / "grid.png").is_file() and val.folder.name == "step_000001"
        metrics = json.loads((val.folder / "metrics.json").read_text())
        assert 0.0 <= metrics["miou"] <= 1.0 and metrics["seeds"] == [1234, 1411]
        assert val.grid.shape[1] > 3 * 32  # layout | sample | prediction (+ legend)


def test_resume_gives_the_same_next_steps_as_an_uninterrupted_run(tiny_world, tmp_path):
    settings = (
        "train.steps=4",
        "train.checkpoint_every=2",
        "train.keep_last=1",
        "train.gradient_accumulation_steps=2",  # 8 samples / batch 2 = 4 batches an epoch: crosses epochs
        "train.ema=true",
        "adversarial.lazy_every=2",
        "model.null_layout_prob=0.5",
        "train.export_on_checkpoint=false",
    )
    full = Trainer(_config(tiny_world, tmp_path / "full", *settings)).run()
    assert [h.step for h in full.history] == [0, 1, 2, 3]
    # keep_last=1: only the final checkpoint is left, and `latest` names it.
    checkpoints = tmp_path / "full" / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_000004"]
    assert (checkpoints / "latest").read_text().strip() == "step_000004"
    assert not list(checkpoints.glob(".tmp-*"))

    interrupted = Trainer(_config(tiny_world, tmp_path / "split", *settings)).run(stop_at=2)
    assert interrupted.steps_done == 2 and interrupted.export is None
    resumed = Trainer(_config(tiny_world, tmp_path / "split", *settings, "train.resume=latest"))
    assert resumed.step == 2 and resumed.position == (1, 0)
    rest = resumed.run()
    assert [h.step for h in rest.history] == [2, 3]
    for a, b in zip(full.history[2:], rest.history):
        assert a.adversarial == b.adversarial
        for key in a.terms:
            assert b.terms[key] == pytest.approx(a.terms[key], abs=1e-6), f"step {a.step} {key}"
    final_a = load_file(checkpoints / "step_000004" / "trainable.safetensors")
    final_b = load_file(tmp_path / "split" / "checkpoints" / "step_000004" / "trainable.safetensors")
    assert max(float((final_a[k] - final_b[k]).abs().max()) for k in final_a) <= 1e-6
    for stem in ("ema", "discriminator"):
        a = load_file(checkpoints / "step_000004" / f"{stem}.safetensors")
        b = load_file(tmp_path / "split" / "checkpoints" / "step_000004" / f"{stem}.safetensors")
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a), stem


def test_nan_guard_skips_and_counts_the_step(tiny_world, tmp_path):
    trainer = Trainer(_config(tiny_world, tmp_path / "run", "model.hint=rgb", "train.steps=3"))
    trainer.train_step()
    before = trainer.models.trainable_state_dict()
    d_before = _snapshot(trainer.models.discriminator)
    encode = trainer.encode

    def poisoned(batch, generator):
        encoded = encode(batch, generator)
        encoded.latents[0, 0, 0, 0] = float("nan")
        return encoded

    trainer.encode = poisoned
    outcome = trainer.train_step()
    assert outcome.skipped and outcome.d_skipped and trainer.skipped_steps == 1 and trainer.step == 2
    after = trainer.models.trainable_state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(torch.equal(trainer.models.discriminator.state_dict()[k], v) for k, v in d_before.items())
    trainer.encode = encode
    assert not trainer.train_step().skipped and trainer.skipped_steps == 1


def test_sampler_order_is_seeded_per_epoch_and_resumable():
    sampler = ResumableBatchSampler(10, 3, seed=1)
    assert sampler.batches_per_epoch == 3
    stream = iter(sampler)
    first = [next(stream) for _ in range(7)]
    assert [b[0][1] for b in first] == [0, 0, 0, 1, 1, 1, 2]
    assert sorted(i for b in first[:3] for i, _ in b) != list(range(9))  # shuffled, one sample dropped per epoch
    assert sampler.advance(0, 2) == (1, 0) and sampler.advance(1, 1, 4) == (2, 2)
    later = iter(ResumableBatchSampler(10, 3, seed=1, epoch=1, batch=1))
    assert [next(later) for _ in range(3)] == first[4:7]
    ranks = [next(iter(ResumableBatchSampler(10, 2, seed=1, num_replicas=2, rank=r))) for r in (0, 1)]
    assert not {i for i, _ in ranks[0]} & {i for i, _ in ranks[1]}
    with pytest.raises(ValueError, match="more than the 4 training samples"):
        ResumableBatchSampler(4, 3, seed=0, num_replicas=2)


def test_prune_keeps_the_newest_and_latest(tmp_path):
    for step in (2, 4, 6, 8):
        folder = tmp_path / f"step_{step:06d}"
        folder.mkdir()
        (folder / "state.json").write_text("{}")
    (tmp_path / "step_000010").mkdir()  # incomplete: no state.json, never listed
    (tmp_path / "latest").write_text("step_000004\n")
    deleted = prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in deleted) == ["step_000002"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004", "step_000006", "step_000008"]


def test_generator_optimizers():
    params = [torch.nn.Parameter(torch.randn(64, 32))]
    params[0].grad = torch.ones_like(params[0])
    adamw = build_generator_optimizer(params, OptimConfig(lr=1e-3))
    assert isinstance(adamw, torch.optim.AdamW)
    if is_bitsandbytes_available():
        before = params[0].detach().clone()
        opt = build_generator_optimizer(params, OptimConfig(optimizer="adamw8bit", lr=1e-3))
        opt.step()
        assert type(opt).__name__ == "AdamW8bit" and not torch.equal(before, params[0])


def test_missing_bitsandbytes_gives_a_pip_hint(monkeypatch):
    import layout2image.trainer.build as build

    monkeypatch.setattr(build, "is_bitsandbytes_available", lambda: False)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        build.build_generator_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimConfig(optimizer="adamw8bit"))


@pytest.mark.skipif(not is_tensorboard_available(), reason="tensorboard is not installed (the train extra has it)")
def test_tensorboard_logs_losses_validation_and_the_config(tiny_world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = ("train.steps=2", "train.log_every=1", "train.tensorboard=true", "validation.at_end=true")
    result = Trainer(_config(tiny_world, tmp_path / "run", *settings)).run()
    assert result.steps_done == 2
    events = sorted((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0, "tensors": 0}).Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr"} <= set(scalars)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert "validation" in acc.Tags()["images"]
    assert any("config" in tag for tag in acc.Tags()["tensors"])  # the resolved config as text


# ---------------------------------------------------------------------------------------------------- run folders


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(world: Path, out: Path, *overrides: str, flags: tuple[str, ...] = ()) -> int:
    return train_main(["--preset", "toy", "--output", str(out), *flags, "--set", *_overrides(world, out, *overrides)])


def _one_line_error(capsys) -> str:
    """The error line of stderr (progress bars may come before it): one line, no traceback."""
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1] if err else ""
    assert last.startswith("l2i-train: error: ") and "Traceback" not in err, err
    assert err.count("l2i-train: error") == 1, err
    return last


def test_an_output_folder_holding_a_run_is_refused_unless_resume_or_overwrite(tiny_world, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(tiny_world, out, "train.steps=2", "train.checkpoint_every=1", "train.keep_last=0") == 0
    before = _tree(out)
    assert {"checkpoints/step_000002/trainable.safetensors", "export/manifest.json", "config.yaml"} <= set(before)
    capsys.readouterr()

    assert _cli(tiny_world, out, "train.steps=1") == 2  # neither --resume nor --overwrite: refused, nothing written
    err = _one_line_error(capsys)
    assert "already holds a run" in err and "--resume latest" in err and "--overwrite" in err
    assert _tree(out) == before

    # --overwrite starts afresh: none of the earlier checkpoints or export is left once the new run has saved.
    assert _cli(tiny_world, out, "train.steps=1", flags=("--overwrite",)) == 0
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_000001"]
    assert json.loads((out / "export" / "manifest.json").read_text())["step"] == 1
    assert not list(out.glob("replaced-*"))
    fresh = _tree(out)

    # An overwrite that fails before its first checkpoint keeps the earlier run, moved aside intact.
    assert (
        _cli(tiny_world, out, "train.steps=1", f"model.pretrained={tmp_path / 'no-model'}", flags=("--overwrite",))
        == 2
    )
    assert "no-model" in _one_line_error(capsys)
    (replaced,) = out.glob("replaced-*")
    kept = _tree(replaced)
    assert kept == {k: v for k, v in fresh.items() if not k.startswith("cache/")}  # the encoding cache stays


def test_resume_refuses_changed_settings_before_writing_anything(tiny_world, tmp_path, capsys):
    out = tmp_path / "run"
    settings = ("train.steps=4", "train.checkpoint_every=2")
    Trainer(_config(tiny_world, out, *settings)).run(stop_at=2)
    before = _tree(out)
    saved = load_config(files=[out / "config.yaml"])
    for change, key, requested in [
        ("optim.lr=0.002", "optim.lr", "0.002"),
        ("train.batch_size=4", "train.batch_size", "4"),
        ("model.hint=rgb", "model.hint", "'rgb'"),
    ]:
        with pytest.raises(ResumeConfigError) as info:
            Trainer(_config(tiny_world, out, *settings, "train.resume=latest", change))
        section, name = key.split(".")
        assert f"{key}: saved {getattr(getattr(saved, section), name)!r}, requested {requested}" in str(info.value)
        assert _tree(out) == before, change
    # Through the CLI (settings read from the saved config): one line, exit 2, still nothing written.
    assert train_main(["--output", str(out), "--resume", "latest", "--set", "optim.lr=0.002"]) == 2
    assert "optim.lr: saved" in _one_line_error(capsys)
    assert _tree(out) == before


def test_resume_applies_and_records_the_allowed_changes(tiny_world, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(_config(tiny_world, out, "train.steps=2", "train.keep_last=0")).run()
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["step"] == 2 and "config_changes" not in manifest
    changes = ["train.steps=4", "train.checkpoint_every=1", "export.dtype=fp16"]
    assert train_main(["--output", str(out), "--resume", "latest", "--set", *changes]) == 0
    assert capsys.readouterr().out.startswith("done: 4 steps")
    # Applied: two more steps, a checkpoint after each (checkpoint_every=1), a float16 export.
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_000002", "step_000003", "step_000004"]
    for name in ("controlnet.safetensors", "controlnet/diffusion_pytorch_model.safetensors"):
        assert {t.dtype for t in load_file(out / "export" / name).values()} == {torch.float16}, name
    # Recorded, with the step: state.json, config.yaml (values and a comment), the export's manifest.
    expected = [
        {"step": 2, "key": "export.dtype", "saved": "fp32", "requested": "fp16"},
        {"step": 2, "key": "train.checkpoint_every", "saved": 0, "requested": 1},
        {"step": 2, "key": "train.steps", "saved": 2, "requested": 4},
    ]
    state = json.loads((out / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["config_changes"] == expected
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["config_changes"] == expected and manifest["step"] == 4
    text = (out / "config.yaml").read_text()
    assert "# Settings changed on resume" in text and "#   step 2: train.steps: 2 -> 4" in text
    resolved = load_config(files=[out / "config.yaml"])
    assert (resolved.train.steps, resolved.train.checkpoint_every, resolved.export.dtype) == (4, 1, "fp16")
    assert (out / "checkpoints" / "step_000004" / "config.yaml").read_text() == text


def _copy_data(world: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(world / "data", data)
    return data


def _put_label_id(label: Path, value: int) -> None:
    """Put the id ``value`` into one pixel of a palette label map (its palette kept)."""
    from PIL import Image

    with Image.open(label) as img:
        arr, palette = np.array(img), img.getpalette()
    arr[0, 0] = value
    out = Image.fromarray(arr, "P")
    out.putpalette(palette)
    out.save(label)


def test_bad_data_is_reported_before_training_with_nothing_written(tiny_world, tmp_path, capsys):
    data = _copy_data(tiny_world, tmp_path)
    label = data / "labels" / "toy_000002.png"
    _put_label_id(label, 42)  # the toy label set has 8 classes and the ignore id 255
    image = data / "images" / "toy_000005.png"
    image.write_bytes(image.read_bytes()[:200])  # header intact, pixels cut
    out = tmp_path / "run"
    assert _cli(tiny_world, out, f"data.root={data}") == 2
    err = _one_line_error(capsys)
    assert "data check: 2 of 8 training sample(s) cannot be used" in err
    assert str(label) in err and str(image) in err
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()


def test_a_sample_that_breaks_mid_run_saves_a_checkpoint_and_names_the_file(tiny_world, tmp_path, capsys, monkeypatch):
    import layout2image.trainer.loop as loop

    data = _copy_data(tiny_world, tmp_path)
    out = tmp_path / "run"
    settings = ("train.steps=2", "train.num_workers=1", "train.keep_last=0", f"data.root={data}")
    config = _config(tiny_world, out, *settings)
    # The file read at step 1 breaks after the data check (simulated by skipping the check).
    order = ResumableBatchSampler(8, config.train.batch_size, config.train.seed).order(0)
    stem = sorted(p.stem for p in (data / "labels").iterdir())[order[2]]
    label = data / "labels" / f"{stem}.png"
    good = label.read_bytes()
    _put_label_id(label, 42)
    with monkeypatch.context() as m:
        m.setattr(loop, "check_dataset", lambda *args, **kwargs: None)
        assert _cli(tiny_world, out, *settings) == 2
    err = _one_line_error(capsys)
    assert "step 1: a training sample could not be read" in err and str(label) in err and "--resume latest" in err
    (saved,) = list_checkpoints(out / "checkpoints")
    state = json.loads((saved / "state.json").read_text())
    assert (saved.name, state["step"], state["epoch"], state["batch"]) == ("step_000001", 1, 0, 1)
    assert str(saved) in err

    # Fixed, the run resumes at the failed step and finishes.
    label.write_bytes(good)
    assert train_main(["--output", str(out), "--resume", "latest"]) == 0
    assert capsys.readouterr().out.startswith("done: 2 steps")

    # A damaged checkpoint: one line naming the file and the earlier checkpoint; nothing written.
    final = out / "checkpoints" / "step_000002"
    for name, damage in [
        ("trainable.safetensors", lambda f: f.write_bytes(f.read_bytes()[:-100])),
        ("state.json", lambda f: f.write_text("{not json")),
    ]:
        keep = (final / name).read_bytes()
        damage(final / name)
        before = _tree(out)
        assert train_main(["--output", str(out), "--resume", "latest", "--set", "train.steps=3"]) == 2
        err = _one_line_error(capsys)
        assert str(final / name) in err and f"--resume {out / 'checkpoints' / 'step_000001'}" in err
        assert _tree(out) == before
        (final / name).write_bytes(keep)


# ---------------------------------------------------------------------------------------------------- stop and resume
#: 4 steps crossing an epoch (8 samples, batch 2, 2 batches a step), EMA, D every other step (steps 0 and 2).
STOP_SETTINGS = (
    "train.steps=4",
    "train.keep_last=0",
    "train.gradient_accumulation_steps=2",
    "train.ema=true",
    "adversarial.lazy_every=2",
    "model.null_layout_prob=0.5",
    "train.export_on_checkpoint=false",
)


@pytest.fixture(scope="module")
def uninterrupted(tiny_world, tmp_path_factory) -> Path:
    """The final checkpoint of an uninterrupted run of `STOP_SETTINGS`."""
    out = tmp_path_factory.mktemp("full")
    Trainer(_config(tiny_world, out, *STOP_SETTINGS)).run()
    return out / "checkpoints" / "step_000004"


def _raise_at(monkeypatch, method: str, step: int, action) -> None:
    """Make ``LayoutDiffusionStep.<method>`` run ``action()`` after its first call at ``step``."""
    original = getattr(LayoutDiffusionStep, method)
    done = []

    def patched(self, *args, **kwargs):
        out = original(self, *args, **kwargs)  # first the forward/backward (D's BatchNorm statistics change)
        if self.step_index == step and not done:
            done.append(True)
            action()
        return out

    monkeypatch.setattr(LayoutDiffusionStep, method, patched)
    # The step index reaches the step code through the trainer: record it on the step object each step.
    train_step = Trainer.train_step

    def recording(self):
        self.step_fn.step_index = self.step
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", recording)


def _raise_keyboard_interrupt():
    raise KeyboardInterrupt


def _interrupted_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


# D's forward (step 2, adversarial: BatchNorm statistics change) and G's forward (step 3): both before any update.
@pytest.mark.parametrize(("method", "step"), [("discriminator_step", 2), ("generator_step", 3)])
def test_an_interrupt_inside_a_step_saves_a_checkpoint_that_resumes_exactly(
    tiny_world,
    uninterrupted,
    tmp_path,
    capsys,
    monkeypatch,
    method,
    step,
):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _raise_at(m, method, step, _raise_keyboard_interrupt)
        assert _cli(tiny_world, out, *STOP_SETTINGS) == 130
    folder = out / "checkpoints" / f"step_{step:06d}"
    assert _interrupted_line(capsys) == (
        f"l2i-train: interrupted at step {step}; checkpoint {folder} saved; continue with --resume latest"
    )
    state = json.loads((folder / "state.json").read_text())
    # The abandoned step is rewound: the checkpoint resumes it from its first batch (2 batches a step, 4 an epoch).
    assert (state["step"], state["epoch"], state["batch"]) == (step, step // 2, 2 * (step % 2))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [folder.name]

    assert train_main(["--output", str(out), "--resume", "latest"]) == 0
    assert capsys.readouterr().out.startswith("done: 4 steps")
    final = out / "checkpoints" / "step_000004"
    for stem in ("trainable", "ema", "discriminator"):
        a, b = load_file(uninterrupted / f"{stem}.safetensors"), load_file(final / f"{stem}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a), stem


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_lets_the_step_in_progress_finish_then_saves(tiny_world, tmp_path, capsys, monkeypatch, signum):
    out = tmp_path / "run"
    settings = ("train.steps=3", "train.keep_last=0")
    with monkeypatch.context() as m:
        # A real signal to this process in the middle of step 1: the handler defers it to the step's end.
        _raise_at(m, "generator_step", 1, lambda: os.kill(os.getpid(), signum))
        assert _cli(tiny_world, out, *settings) == 130
    assert _interrupted_line(capsys).startswith("l2i-train: interrupted at step 2; checkpoint ")
    (saved,) = list_checkpoints(out / "checkpoints")
    assert json.loads((saved / "state.json").read_text())["step"] == 2
    # The handlers are put back.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_an_interrupt_between_the_optimizer_updates_saves_nothing_of_that_step(
    tiny_world,
    tmp_path,
    capsys,
    monkeypatch,
):
    out = tmp_path / "run"
    # Step 0 is adversarial: D has stepped when G's forward is interrupted; that state is not a step boundary.
    with monkeypatch.context() as m:
        _raise_at(m, "generator_step", 0, _raise_keyboard_interrupt)
        assert _cli(tiny_world, out, "train.steps=2") == 130
    line = _interrupted_line(capsys)
    assert "interrupted at step 0 (during that step's optimizer update" in line and "no checkpoint was saved" in line
    assert not list_checkpoints(out / "checkpoints")


def test_a_folder_left_before_the_first_checkpoint_is_no_dead_end(tiny_world, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    out.mkdir()
    _config(tiny_world, out, "train.steps=1").save(out / "config.yaml")  # what a run killed while loading leaves
    (out / "checkpoints").mkdir()

    # --resume: no checkpoint to continue; the error says how to start afresh (and never blames a setting).
    for argv in (
        ["--output", str(out), "--resume", "latest"],
        ["--preset", "toy", "--output", str(out), "--resume", "latest"],
    ):
        assert train_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "no checkpoint in" in err and "without --resume" in err and "--overwrite" in err, err
        assert "model.pretrained" not in err

    # A plain rerun is not refused: nothing trained is there. It says so, and logs the export's final path.
    caplog.set_level(logging.INFO, logger="layout2image")
    assert _cli(tiny_world, out, "train.steps=1") == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("stopped before its first checkpoint" in m for m in messages), messages
    assert any(m.startswith(f"exported controlnet to {out / 'export'}:") for m in messages), messages
    assert not any(".tmp-export" in m for m in messages), messages
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_000001"]

    # Now it holds a run: refused as before.
    assert _cli(tiny_world, out, "train.steps=1") == 2
    assert "already holds a run" in capsys.readouterr().err


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tiny_world, tmp_path, capsys, l2i_caplog):
    out = tmp_path / "run"
    assert _cli(tiny_world, out, "train.steps=3", "train.checkpoint_every=1", "train.keep_last=2") == 0
    root = out / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step_000002", "step_000003"]
    damaged = root / "step_000003" / "trainable.safetensors"
    size = damaged.stat().st_size // 2
    os.truncate(damaged, size)
    capsys.readouterr()

    assert train_main(["--output", str(out), "--resume", "latest", "--set", "train.steps=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--resume {root / 'step_000002'}" in err

    # As the error advises: the damaged step 3 belongs to an abandoned branch, moved aside (not deleted).
    argv = ["--output", str(out), "--resume", str(root / "step_000002"), "--set", "train.steps=4"]
    assert train_main(argv) == 0
    (aside,) = root.glob("abandoned-*")
    assert (aside / "step_000003" / "trainable.safetensors").stat().st_size == size
    assert any("abandoned branch" in r.getMessage() and "step_000003" in r.getMessage() for r in l2i_caplog.records)
    # keep_last=2 saw only the resumed lineage: the new steps 3 and 4, both whole.
    assert [p.name for p in list_checkpoints(root)] == ["step_000003", "step_000004"]
    assert (root / "latest").read_text().strip() == "step_000004"
    for folder in list_checkpoints(root):
        load_file(folder / "trainable.safetensors")
    assert _tree(aside)  # kept intact
