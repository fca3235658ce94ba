"""l2i-demo: a shortened demo runs end to end on the shipped toy world and writes its files; the comparison table."""

from __future__ import annotations

import json
import math

import pytest

from layout2image.cli.demo import main as demo_main
from layout2image.core.toy import DOMAINS
from layout2image.trainer.demo import (
    VAL_START,
    ComparisonResult,
    DemoResult,
    comparison_markdown,
    demo_config,
    prepare_demo_data,
)
from layout2image.trainer.models import TOY_WEIGHTS_DIR

needs_shipped = pytest.mark.skipif(
    not (TOY_WEIGHTS_DIR / "model_index.json").is_file(), reason="weights/toy has not been trained yet"
)

# A handful of steps, two validation layouts, two DDIM steps: the whole pipeline in seconds.
SHORT = ["--steps", "2", "--num-train", "4", "--num-val", "2", "--threads", "0"]
SHORT_SET = ["--set", "validation.num_steps=2", "validation.batch_size=2", "train.checkpoint_every=0"]


def test_demo_data_is_written_once_and_validation_is_held_out(tmp_path):
    root = prepare_demo_data(tmp_path / "data", num_train=3, num_val=2, size=32)
    train, val = (
        sorted(p.name for p in (root / "train" / "images").iterdir()),
        sorted(p.name for p in (root / "val" / "images").iterdir()),
    )
    assert train == ["toy_000000.png", "toy_000001.png", "toy_000002.png"]
    assert val == [f"toy_{VAL_START:06d}.png", f"toy_{VAL_START + 1:06d}.png"]
    stamp = (root / "val" / "images" / val[0]).stat().st_mtime_ns
    prepare_demo_data(root, num_train=3, num_val=2, size=32)  # complete: reused, not rewritten
    assert (root / "val" / "images" / val[0]).stat().st_mtime_ns == stamp
    prepare_demo_data(root, num_train=2, num_val=2, size=32)  # another request: rewritten
    assert len(list((root / "train" / "images").iterdir())) == 2


@needs_shipped
def test_demo_config_uses_the_shipped_world_and_never_scores_with_d(tmp_path):
    cfg = demo_config(tmp_path / "data", tmp_path / "run", steps=7, seed=3, adversarial=False)
    assert cfg.model.pretrained == str(TOY_WEIGHTS_DIR)
    assert cfg.validation.segmenter == str(TOY_WEIGHTS_DIR / "segmenter")
    assert cfg.discriminator.pretrained == str(TOY_WEIGHTS_DIR / "discriminator_init")
    assert (cfg.train.steps, cfg.train.seed, cfg.adversarial.enabled) == (7, 3, False)
    assert cfg.validation.at_start and cfg.validation.at_end
    assert (cfg.data.split, cfg.data.val_split) == ("train", "val")


@needs_shipped
def test_short_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo_main(["--out", str(out), *SHORT, *SHORT_SET]) == 0
    printed = capsys.readouterr().out
    assert "layout mIoU" in printed and str(out / "grid.png") in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adversarial"] and summary["steps"] == 2
    for key in ("miou_before", "miou_after", "miou_domains"):
        assert 0.0 <= summary[key] <= 1.0
    assert set(summary["domain_stats"]) == set(DOMAINS)
    assert math.isclose(
        summary["night_minus_day_brightness"],
        summary["domain_stats"]["night"]["brightness"] - summary["domain_stats"]["day"]["brightness"],
        abs_tol=2e-4,
    )
    assert summary["seconds_per_step"] > 0
    assert [s for s, _ in summary["miou_curve"]] == [0, 2]
    assert (
        summary["miou_curve"][0][1] == summary["miou_before"] and summary["miou_curve"][1][1] == summary["miou_after"]
    )
    for name in ("grid.png", "grid_before.png", "domains.png"):
        assert (out / name).stat().st_size > 0
    export = out / "run" / "export"
    assert (export / "controlnet" / "config.json").is_file() and (export / "controlnet.safetensors").is_file()
    # Two validations (before, after), scored by the evaluation segmenter.
    metrics = sorted((out / "run" / "validation").glob("step_*/metrics.json"))
    assert [p.parent.name for p in metrics] == ["step_000000", "step_000002"]
    assert json.loads(metrics[0].read_text())["segmenter"] == str(TOY_WEIGHTS_DIR / "segmenter")


@needs_shipped
def test_plain_demo_is_deterministic(tmp_path):
    runs = []
    for name in ("a", "b"):
        assert demo_main(["--out", str(tmp_path / name), "--plain", *SHORT, *SHORT_SET]) == 0
        runs.append(json.loads((tmp_path / name / "summary.json").read_text()))
    keys = ("miou_before", "miou_after", "miou_domains", "domain_stats")
    assert not runs[0]["adversarial"] and [runs[0][k] for k in keys] == [runs[1][k] for k in keys]


def test_demo_rejects_bad_settings(tmp_path, capsys):
    assert demo_main(["--out", str(tmp_path / "x"), *SHORT, "--set", "optim.lrr=1"]) == 1
    assert "optim.lrr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo_main(["--steps", "0"])


def _result(seed: int, adversarial: bool, miou: float) -> DemoResult:
    stats = {d: {"brightness": 0.5, "saturation": 0.3, "contrast": 0.1, "white_fraction": 0.0} for d in DOMAINS}
    return DemoResult(
        out=None, adversarial=adversarial, seed=seed, steps=10, miou_before=0.2, miou_after=miou,
        miou_domains=miou - 0.01, miou_curve=[[0, 0.2], [10, miou]], domain_stats=stats, night_minus_day_brightness=-0.3, seconds_per_step=0.5,
        train_seconds=5.0, seconds=6.0,
    )  # fmt: skip


def test_comparison_table_reports_mean_and_spread():
    comparison = ComparisonResult(
        {"plain": [_result(0, False, 0.3), _result(1, False, 0.5)], "ALDM": [_result(0, True, 0.6)] * 2},
        seeds=[0, 1],
        steps=10,
    )
    table = comparison_markdown(comparison)
    assert "| plain | 0.200 ± 0.000 | 0.400 ± 0.141 |" in table
    assert "| ALDM | 0.200 ± 0.000 | 0.600 ± 0.000 |" in table
    assert "seed 1: 0.500 / 0.490" in table
    assert "- plain: step 0 0.200, step 10 0.400" in table
