"""The trainer's config: presets, files, dotted overrides, type checks with errors naming the key, the hash, the CLI."""

from __future__ import annotations

import pytest
import yaml

from layout2image.cli.train import main as train_main
from layout2image.trainer.config import (
    Config,
    ConfigError,
    config_from_dict,
    list_presets,
    load_config,
)
from layout2image.trainer.config_io import parse_override
from layout2image.trainer.models import TOY_WEIGHTS_DIR


def test_presets_load_and_differ_where_the_budget_differs():
    assert {"toy", "sd15-8gb", "sd15-12gb", "sd15-24gb"} <= set(list_presets())
    toy, p8, p12, p24 = (load_config(p) for p in ("toy", "sd15-8gb", "sd15-12gb", "sd15-24gb"))
    assert toy.train.precision == "no" and toy.train.cpu and not toy.discriminator.tiny
    assert (toy.adversarial.num_unroll_steps, toy.adversarial.lazy_every, toy.train.steps) == (3, 2, 300)
    # builtin:toy/... resolves to the shipped toy world, and mIoU never comes from D's starting point.
    assert toy.model.pretrained == str(TOY_WEIGHTS_DIR)
    assert toy.discriminator.pretrained == str(TOY_WEIGHTS_DIR / "discriminator_init")
    assert toy.validation.segmenter == str(TOY_WEIGHTS_DIR / "segmenter")
    assert not p8.adversarial.enabled and p8.optim.optimizer == "adamw8bit"
    assert p12.adversarial.decode_crop == 32 and p12.optim.optimizer == "adamw8bit" and p12.train.batch_size == 1
    assert p24.adversarial.decode_crop is None and p24.optim.optimizer == "adamw" and p24.train.batch_size == 2
    for cfg in (p8, p12, p24):
        assert cfg.train.precision == "bf16" and cfg.train.gradient_checkpointing
    assert p12.adversarial.num_unroll_steps == p24.adversarial.num_unroll_steps == 9


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        "toy",
        overrides=[
            "train.steps=100",
            "adversarial.num_unroll_steps=2",
            "optim.lr=3e-5",
            "data.transform.resolution=[32, 64]",
            "model.pretrained=123",  # a text field keeps the raw text
            "validation.negative_prompt=blurry: low quality",
            "model.null_layout_prob=null",
            "train.ema=true",
        ],
    )
    assert cfg.train.steps == 100 and cfg.adversarial.num_unroll_steps == 2
    assert cfg.optim.lr == pytest.approx(3e-5) and isinstance(cfg.optim.lr, float)
    assert cfg.data.transform.resolution == (32, 64) and cfg.data.transform.flip_prob == 0.5  # the rest kept
    assert cfg.model.pretrained == "123" and cfg.validation.negative_prompt == "blurry: low quality"
    assert cfg.model.null_layout_prob is None and cfg.model.layout_dropout == 0.0 and cfg.train.ema
    assert load_config(overrides=["model.mode=sdm_lora", "model.hint=onehot"]).model.layout_dropout == 0.2


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", r"unknown setting 'train.stepz'; did you mean 'steps'\?"),
        ("trian.steps=3", r"unknown setting 'trian'; did you mean 'train'\?"),
        ("train.steps=many", r"train.steps: expected an integer, got 'many'"),
        ("train.steps=2.5", r"train.steps: expected an integer, got 2.5"),
        ("train.ema=3", r"train.ema: expected true or false, got 3"),
        ("optim.betas=[0.9]", r"optim.betas: expected a list of 2 \(float, float\)"),
        ("train.steps.x=1", r"train.steps has no sub-settings"),
        ("data.transform.flip=1", r"unknown setting 'data.transform.flip'; did you mean 'flip_prob'\?"),
        ("model.mode=gan", r"model.mode='gan' is not valid; use one of \['controlnet', 'sdm_lora', 't2i_adapter'\]"),
        ("adversarial.lazy_every=0", r"invalid adversarial setting: lazy_every=0 must be >= 1"),
        ("train.precision=fp8", r"train.precision='fp8' is not valid"),
        ("train.steps", r"override 'train.steps' is not key=value"),
    ],
)
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("toy", overrides=[override])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="model.hint='rgb' is not a SPADE layout"):
        load_config(overrides=["model.mode=sdm_lora", "model.hint=rgb"])
    with pytest.raises(ConfigError, match="model.hint='embedding' is ControlNet/SPADE only"):
        load_config(overrides=["model.mode=t2i_adapter", "model.hint=embedding"])
    with pytest.raises(ConfigError, match="is the discriminator's starting point"):
        load_config(overrides=["discriminator.pretrained=models/seg", "validation.segmenter=models/seg"])
    with pytest.raises(ConfigError, match="model.decoder='taesd' needs model.taesd"):
        load_config(overrides=["model.decoder=taesd"])
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config("huge")


def test_check_ready_names_what_is_missing():
    cfg = load_config("sd15-12gb")
    with pytest.raises(ConfigError, match="model.pretrained is not set"):
        cfg.check_ready()
    cfg = load_config("sd15-12gb", overrides=["model.pretrained=x", "data.root=d", "train.output_dir=o"])
    with pytest.raises(ConfigError, match="needs a discriminator: set discriminator.pretrained"):
        cfg.check_ready()


def test_files_merge_and_the_resolved_config_round_trips(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  steps: 7\n  batch_size: 3\nmodel:\n  hint: onehot\n")
    (tmp_path / "b.toml").write_text("[train]\nsteps = 9\n[adversarial]\nnum_unroll_steps = 1\n")
    cfg = load_config("toy", files=[tmp_path / "a.yaml", tmp_path / "b.toml"], overrides=["train.seed=5"])
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.seed) == (9, 3, 5)
    assert cfg.model.hint == "onehot" and cfg.adversarial.num_unroll_steps == 1
    cfg.save(tmp_path / "config.yaml")
    again = load_config(files=[tmp_path / "config.yaml"])
    assert again == cfg and again.hash() == cfg.hash() and len(cfg.hash()) == 16
    # The run folder, resume and workers do not change the hash; a training setting does.
    moved = load_config(
        files=[tmp_path / "config.yaml"], overrides=["train.output_dir=elsewhere", "train.num_workers=7"]
    )
    assert moved.hash() == cfg.hash()
    assert load_config(files=[tmp_path / "config.yaml"], overrides=["optim.lr=1"]).hash() != cfg.hash()
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(files=[tmp_path / "bad.yaml"])
    with pytest.raises(ConfigError, match="unknown setting 'train.bogus'"):
        config_from_dict({"train": {"bogus": 1}})


def test_defaults_build_and_dump():
    cfg = Config()
    data = yaml.safe_load(cfg.to_yaml())
    assert list(data) == ["model", "data", "adversarial", "discriminator", "optim", "train", "validation", "export"]
    assert data["model"]["hint_block_out_channels"] == [768, 512, 256, 256]
    assert parse_override(Config, "model.sdm_lora.layout_size=[64, 64]") == (
        ["model", "sdm_lora", "layout_size"],
        [64, 64],
    )


def test_cli_print_config_and_bad_set(capsys):
    assert (
        train_main(["--preset", "toy", "--data", "d", "--output", "o", "--set", "train.steps=5", "--print-config"])
        == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 5 and printed["data"]["root"] == "d" and printed["train"]["output_dir"] == "o"
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--preset", "toy", "--set", "train.stepz=5", "--print-config"])
    assert exit_info.value.code == 2
    assert "unknown setting 'train.stepz'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--preset", "toy", "--output", "o", "--set", "model.pretrained=null"])  # no model, no data
    assert exit_info.value.code == 2
    assert "model.pretrained is not set" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--preset", "toy", "--output", "o"])  # the toy base is built in, the data is not
    assert exit_info.value.code == 2
    assert "data.root is not set" in capsys.readouterr().err


def test_builtin_paths_resolve_or_fail_clearly():
    cfg = load_config(overrides=["validation.segmenter=builtin:toy/segmenter"])
    assert cfg.validation.segmenter == str(TOY_WEIGHTS_DIR / "segmenter")
    for bad in ("builtin:toy/nothing_here", "builtin:", "builtin:../trainer"):
        with pytest.raises(ConfigError, match=r"model\.pretrained: .*not in this install"):
            load_config(overrides=[f"model.pretrained={bad}"])
    # The same folder for D's start and for mIoU is refused, however it is spelled.
    with pytest.raises(ConfigError, match="discriminator's starting point"):
        load_config(
            overrides=[
                "validation.segmenter=builtin:toy/segmenter",
                f"discriminator.pretrained={TOY_WEIGHTS_DIR / 'segmenter'}",
            ]
        )


def test_toy_base_preset_goes_to_the_toy_base_trainer(monkeypatch, capsys):
    from layout2image.cli import toy_base
    from layout2image.cli.train import _toy_base_argv

    assert _toy_base_argv(["--preset", "toy", "--output", "o"]) is None
    assert _toy_base_argv(["--preset", "toy-base", "--output", "w", "--minutes", "2", "--set", "seed=3"]) == [
        "--out", "w", "--minutes", "2", "--set", "seed=3"
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:  # a ToyBaseConfig field that does not exist: exit 2, named
        toy_base.main(["--out", "w", "--set", "unet_channelz=[8]"])
    assert exit_info.value.code == 2 and "unet_channelz" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(toy_base, "main", lambda argv: seen.append(argv) or 0)
    assert train_main(["--preset", "toy-base", "--output", "w"]) == 0 and seen == [["--out", "w"]]


def test_cli_help_imports_no_trainer_and_answers_fast():
    """``l2i-train --help`` builds its parser from argparse and the preset names only (it took 21-27 s when the
    trainer config imported torch, diffusers and peft)."""
    import subprocess
    import sys

    code = (
        "import sys, layout2image.cli.train as t; p = t.build_parser(); p.format_help(); "
        "print(sorted(m for m in ('torch', 'diffusers', 'peft', 'transformers', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"])
    assert exit_info.value.code == 0


def test_cli_resume_and_overwrite_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--output", "o", "--resume", "latest", "--overwrite"])
    assert exit_info.value.code == 2 and "pass only one" in capsys.readouterr().err


def _cli_error(capsys, argv: list[str]) -> str:
    """Run l2i-train with bad paths: exit status 2 and one error line (no usage, no traceback)."""
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("l2i-train: error: ") and "Traceback" not in err, err
    return err


def test_cli_names_a_bad_resume_path_before_any_setting(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("train:\n  steps: 3\n")
    err = _cli_error(capsys, ["--output", "nonexist", "--resume", "latest"])
    assert "--output 'nonexist' does not exist" in err
    for preset in ([], ["--preset", "toy", "--data", "data"]):
        # A relative path is named as given (never joined to the checkpoints folder a second time).
        err = _cli_error(capsys, [*preset, "--output", "run", "--resume", "run/checkpoints/step_000099"])
        assert "'run/checkpoints/step_000099' does not exist" in err and "checkpoints/run" not in err, err
        assert "--overwrite" in err and "model.pretrained" not in err
    err = _cli_error(capsys, ["--output", "run", "--resume", "run/config.yaml"])
    assert "'run/config.yaml' is a file, not a checkpoint folder" in err
    err = _cli_error(capsys, ["--output", "run", "--resume", "latest"])
    assert "no checkpoint in 'run/checkpoints'" in err and "--overwrite" in err and "without --resume" in err


def test_cli_names_bad_output_data_and_config_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "labelset.yaml").write_text("classes: []\n")
    err = _cli_error(capsys, ["--preset", "toy", "--data", "d", "--output", "labelset.yaml/x"])
    assert "--output 'labelset.yaml/x' cannot be created: 'labelset.yaml' is a file, not a folder" in err
    err = _cli_error(capsys, ["--preset", "toy", "--data", "labelset.yaml", "--output", "out"])
    assert "--data 'labelset.yaml' is a file, not a folder" in err
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(SystemExit):
        train_main(["--config", "empty.yaml", "--print-config"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "config file 'empty.yaml' is empty" in err
    (tmp_path / "broken.yaml").write_text("train:\n  steps: [1, 2\n  foo: 3\n")
    with pytest.raises(SystemExit):
        train_main(["--config", "broken.yaml", "--print-config"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("l2i-train: error: cannot parse 'broken.yaml': line 3, column ") and "expected" in err
    assert not (tmp_path / "out").exists()


def test_a_file_given_as_dataset_folder_is_named_as_a_file(tmp_path):
    from layout2image.trainer.data.folder import list_folder

    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        list_folder(tmp_path / "f.png")


def test_resume_config_rules(tmp_path):
    from layout2image.trainer.checkpoint import CheckpointState
    from layout2image.trainer.resume import ResumeConfigError, reconcile_resume_config

    def config(*overrides):
        return load_config("toy", overrides=["train.steps=20", "data.root=d", "train.output_dir=o", *overrides])

    saved = config()
    folder = tmp_path / "checkpoints" / "step_000010"
    folder.mkdir(parents=True)
    state = CheckpointState(step=10, epoch=0, batch=10, skipped_steps=0, config_hash=saved.hash())
    # No saved config.yaml anywhere (an older trainer's checkpoint): the recorded hash decides.
    assert reconcile_resume_config(config("train.resume=latest"), folder, state)[1] == []
    with pytest.raises(ResumeConfigError, match="which ones cannot be told"):
        reconcile_resume_config(config("optim.lr=0.5"), folder, state)
    saved.save(folder / "config.yaml")
    with pytest.raises(ResumeConfigError, match="train.steps=5 is below the checkpoint's step 10"):
        reconcile_resume_config(config("train.steps=5"), folder, state)
    resumed, changes = reconcile_resume_config(
        config("train.steps=30", "data.root=e", "train.keep_last=9"), folder, state
    )
    assert resumed.train.steps == 30 and resumed.data.root == "e"
    assert [c.describe() for c in changes] == [
        "data.root: 'd' -> 'e' at step 10",
        "train.keep_last: 2 -> 9 at step 10",
        "train.steps: 20 -> 30 at step 10",
    ]
    with pytest.raises(ResumeConfigError) as info:  # every refused key listed, the allowed ones not
        reconcile_resume_config(config("optim.lr=0.5", "train.seed=3", "train.steps=30"), folder, state)
    message = str(info.value)
    assert "2 setting(s) differ" in message and "optim.lr: saved 0.001, requested 0.5" in message
    assert "train.seed: saved 0, requested 3" in message and "train.steps: saved" not in message


def test_resuming_another_runs_checkpoint_into_a_folder_with_its_own_run_is_refused(tmp_path):
    import torch

    from layout2image.trainer.checkpoint import CheckpointState, save_checkpoint
    from layout2image.trainer.loop import Trainer

    state = CheckpointState(step=1, epoch=0, batch=1, skipped_steps=0, config_hash="h")
    other = save_checkpoint(tmp_path / "a" / "checkpoints", state, {"trainable": {"w": torch.zeros(1)}}, {})
    save_checkpoint(tmp_path / "b" / "checkpoints", state, {"trainable": {"w": torch.zeros(1)}}, {})  # b's own run
    (tmp_path / "b" / "config.yaml").write_text("train: {}\n")
    before = sorted(p.name for p in (tmp_path / "b").iterdir())
    config = load_config(
        "toy", overrides=["data.root=d", f"train.output_dir={tmp_path / 'b'}", f"train.resume={other}"]
    )
    with pytest.raises(FileExistsError, match="checkpoint of another run"):
        Trainer(config)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == before
