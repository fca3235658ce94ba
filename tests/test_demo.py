"""l2i-demo: a shortened demo runs end to end on the shipped toy world and writes its files; the comparison table."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from layout2image.cli.demo import _reference_note, _summary
from layout2image.cli.demo import main as demo_main
from layout2image.core.toy import DOMAINS
from layout2image.trainer.demo import (
    DEMO_MARKER,
    VAL_START,
    ComparisonResult,
    DemoResult,
    _prompt_template,
    base_domain_figures,
    check_demo_folder,
    comparison_markdown,
    demo_config,
    documented_comparison,
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


def _bare_grid_size(rows: int, cols: int, tile: int = 128, pad: int = 2) -> tuple[int, int]:
    return rows * (tile + pad) + pad, cols * (tile + pad) + pad


def _check_annotated(path: Path, rows: int, cols: int) -> None:
    """The picture is the bare grid plus text: taller (caption + header), wider (prompts + legend), and the strip
    above the tiles carries text over every tile column."""
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB"))
    height, width = _bare_grid_size(rows, cols)
    assert image.shape[0] > height + 20 and image.shape[1] > width + 200, image.shape
    top = image.shape[0] - height  # the grid sits at the bottom left (the legend is shorter than the grid)
    for c in range(cols):
        x = 2 + c * 130
        assert (image[:top, x : x + 128] != 255).any(), f"{path.name}: no text above tile column {c}"
    assert (image[top + 2 : top + 130, 2:130] != 255).any()  # the first layout tile is where it should be


@needs_shipped
def test_short_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo_main(["--out", str(out), *SHORT, *SHORT_SET]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "layout mIoU" in printed and str(out / "grid.png") in printed
    summary = json.loads((out / "summary.json").read_text())
    # The figures, not a verdict: the brightness per word and night - day, next to the base model's own figure.
    assert "still work" not in printed
    stats = summary["domain_stats"]
    words = ", ".join(f"{d} {stats[d]['brightness']:.2f}" for d in DOMAINS)
    assert f"mean sample brightness (0 black .. 1 white): {words}" in printed
    base = base_domain_figures("builtin:toy")["night_minus_day_brightness"]
    assert summary["base_night_minus_day_brightness"] == base
    assert f"night - day {summary['night_minus_day_brightness']:+.3f}; the base model alone: {base:+.3f}" in printed
    assert "ALDM ControlNet, seed 0: 2 steps" in printed
    # A 2-step run is not the documented 300-step run: no comparison with the README's figure.
    assert "README" not in printed
    # Progress: a line before each phase and bars for the loops, on stderr.
    for phase in ("writing the train split", "loading the trainer", "training an ALDM ControlNet for 2 steps",
                  "validation at step 0", "validation at step 2", "sampling 2 validation layouts once per domain word",
                  "domain words (2 layouts x 4 words)"):  # fmt: skip
        assert phase in captured.err, phase
    _check_annotated(out / "grid.png", rows=2, cols=3)
    _check_annotated(out / "domains.png", rows=2, cols=1 + len(DOMAINS))
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

    # A second run into the same folder is refused before anything is written; --overwrite replaces the earlier
    # run (a plain one now: same folder names), reuses the dataset, and leaves no replaced-*/ behind.
    stamp = (out / "summary.json").stat().st_mtime_ns
    assert demo_main(["--out", str(out), "--plain", *SHORT, *SHORT_SET]) == 2
    err = capsys.readouterr().err
    assert (
        f"l2i-demo: error: --out {str(out)!r} already holds an earlier demo run (domains.png, grid.png, grid_before.png, run, ... (5 in all));"
        in err
    )
    assert "--overwrite" in err and "another --out" in err and "Traceback" not in err
    assert (out / "summary.json").stat().st_mtime_ns == stamp
    (out / "run" / "config.yaml").write_text(
        "# the user edited the earlier run\n" + (out / "run" / "config.yaml").read_text()
    )
    assert demo_main(["--out", str(out), "--plain", "--overwrite", *SHORT, *SHORT_SET]) == 0
    err = capsys.readouterr().err
    assert (
        "reusing the train split" in err
        and "moved the earlier run's domains.png, grid.png, grid_before.png, run, summary.json to" in err
    )
    assert not json.loads((out / "summary.json").read_text())["adversarial"]
    assert "the user edited" not in (out / "run" / "config.yaml").read_text()
    assert not list(out.glob("replaced-*"))


def _fake_demo(out: Path, *extra: str) -> Path:
    """A folder shaped like a finished demo run (no training): marker, data cache, run/, figures."""
    for split in ("train", "val"):
        (out / "data" / split).mkdir(parents=True)
        (out / "data" / split / DEMO_MARKER).write_text("{}\n")
    (out / "run" / "export").mkdir(parents=True)
    (out / "run" / "config.yaml").write_text("x\n")
    for name in ("grid.png", "summary.json", DEMO_MARKER, *extra):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x\n")
    return out


def test_demo_refuses_a_folder_it_did_not_write_and_deletes_nothing(tmp_path, capsys):
    """The review's case: an --out with the user's run/ and data/train files is refused (even with --overwrite)
    before anything is written; both files stay."""
    out = tmp_path / "proj"
    (out / "run").mkdir(parents=True)
    (out / "data" / "train").mkdir(parents=True)
    (out / "run" / "notes.txt").write_text("mine\n")
    (out / "data" / "train" / "mine.txt").write_text("mine\n")
    for flags in ([], ["--overwrite"], ["--compare", "--overwrite"]):
        assert demo_main(["--out", str(out), *flags, *SHORT]) == 2
        err = capsys.readouterr().err
        line = next(x for x in err.splitlines() if x.startswith("l2i-demo: error:"))
        assert f"--out {str(out)!r} is not empty and holds no earlier demo (data, run)" in line
        assert "never replaces files it did not write" in line and "another --out" in line
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "data/train/mine.txt",
        "run/notes.txt",
    ]


def test_check_demo_folder_cases(tmp_path):
    assert check_demo_folder(tmp_path / "new") == [] and check_demo_folder(tmp_path) == []  # new, empty
    demo = _fake_demo(tmp_path / "demo")
    with pytest.raises(FileExistsError, match="already holds an earlier demo run \\(grid.png, run, summary.json\\)"):
        check_demo_folder(demo)
    assert check_demo_folder(demo, overwrite=True) == ["grid.png", "run", "summary.json"]
    assert check_demo_folder(demo, comparison=True) == []  # --compare into a demo folder writes other names
    # Files the demo did not write, beside the run or inside run/: refused even with --overwrite.
    for extra in ("notes.txt", "run/notes.txt", "aldm_seed0/run/mine.ckpt"):
        other = _fake_demo(tmp_path / extra.replace("/", "_"), extra)
        with pytest.raises(FileExistsError, match=f"did not write beside its earlier run \\({extra}\\)"):
            check_demo_folder(other, overwrite=True, comparison=extra.startswith("aldm"))
    comparison = _fake_demo(tmp_path / "cmp", "comparison.json", "plain_seed0/summary.json")
    with pytest.raises(
        FileExistsError, match=r"earlier comparison \(l2i-demo --compare\) \(comparison.json, plain_seed0\)"
    ):
        check_demo_folder(comparison, comparison=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        check_demo_folder(tmp_path / "file")


def test_an_interrupted_demo_data_write_is_completed(tmp_path, monkeypatch):
    """Ctrl-C while the demo writes its dataset: the next demo completes the split (no refusal, no rewrite)."""
    from layout2image.core.toy import dataset

    real, seen = dataset.save_label_map, []

    def save(*args, **kwargs):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(1)
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(dataset, "save_label_map", save)
        with pytest.raises(KeyboardInterrupt):
            prepare_demo_data(tmp_path / "data", num_train=4, num_val=2, size=32)
    first = tmp_path / "data" / "train" / "images" / "toy_000000.png"
    stamp = first.stat().st_mtime_ns
    prepare_demo_data(tmp_path / "data", num_train=4, num_val=2, size=32)
    assert first.stat().st_mtime_ns == stamp and len(list(first.parent.iterdir())) == 4
    prepare_demo_data(tmp_path / "data", num_train=3, num_val=2, size=32)  # other settings: the demo's own, rewritten
    assert len(list(first.parent.iterdir())) == 3


@needs_shipped
def test_plain_demo_is_deterministic(tmp_path):
    runs = []
    for name in ("a", "b"):
        assert demo_main(["--out", str(tmp_path / name), "--plain", *SHORT, *SHORT_SET]) == 0
        runs.append(json.loads((tmp_path / name / "summary.json").read_text()))
    keys = ("miou_before", "miou_after", "miou_domains", "domain_stats")
    assert not runs[0]["adversarial"] and [runs[0][k] for k in keys] == [runs[1][k] for k in keys]


def test_demo_rejects_bad_settings(tmp_path, capsys):
    assert demo_main(["--out", str(tmp_path / "x"), *SHORT, "--set", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("l2i-demo: error:")]
    assert len(errors) == 1 and "optim.lrr" in errors[0] and "Traceback" not in err
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


def test_prompt_template_brackets_the_phrase_that_differs():
    prompts = [
        "a town street on a sunny day with a car",
        "a town street at night with a car",
        "a town street in snow with a car",
    ]
    assert _prompt_template(prompts) == "a town street [on a sunny day | at night | in snow] with a car"
    assert _prompt_template(["a street, in fog", "a street, at night"]) == "a street, [in fog | at night]"
    assert _prompt_template(["same words"] * 3) == "same words"


def _documented(steps: int = 10) -> dict:
    runs = [_result(seed, True, miou).to_dict() for seed, miou in ((0, 0.62), (1, 0.55), (2, 0.56))]
    return {"seeds": [0, 1, 2], "steps": steps, "runs": {"ALDM": runs, "plain": []}}


def test_summary_says_which_figure_is_one_seed_and_which_the_mean():
    demo = _result(0, True, 0.6)
    demo.files = dict.fromkeys(("grid", "grid_before", "domains", "export", "summary"), "f")
    note = _reference_note(demo, _documented())
    assert note is not None
    assert "one seed's figure" in note and "the documented seed-0 run gave 0.620" in note
    assert "0.577 ± 0.038 is the mean ± standard deviation over seeds 0, 1, 2" in note
    assert _reference_note(demo, _documented(steps=300)) is None  # other steps: not comparable
    assert _reference_note(_result(0, False, 0.3), _documented()) is None  # no plain runs documented
    assert _reference_note(demo, None) is None
    lines = _summary(demo, _documented())
    assert lines[0].startswith("ALDM ControlNet, seed 0: 10 steps") and lines[2] == note
    assert "night - day -0.300" in lines[4] and "base model alone" not in lines[4]  # no base figure known


def test_readme_quotes_the_documented_comparison_as_a_three_seed_mean():
    """The README's status figure is the documented comparison's mean ± sd, and it says so."""
    documented = documented_comparison()
    assert documented is not None
    values = np.array([r["miou_after"] for r in documented["runs"]["ALDM"]])
    quoted = f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    status = readme[readme.index("## Status") :]
    sentence = status[status.index(quoted) - 200 : status.index(quoted) + 400]
    assert re.search(r"mean ± standard deviation over seeds 0, 1,\s+2", sentence), sentence
    seed0 = next(r["miou_after"] for r in documented["runs"]["ALDM"] if r["seed"] == 0)
    assert f"{seed0:.2f}" in sentence  # the single run a user gets with the default seed


def test_ctrl_c_is_one_line_that_says_what_is_kept(tmp_path, monkeypatch, capsys):
    from layout2image.trainer import demo

    out = tmp_path / "demo"

    def interrupted(where, **kwargs):
        (Path(where) / "run").mkdir(parents=True)  # training had begun
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    assert demo_main(["--out", str(out), *SHORT]) == 130
    err = capsys.readouterr().err
    line = err.splitlines()[-1]
    assert line.startswith("l2i-demo: interrupted; the dataset written so far in ") and "Traceback" not in err
    assert line.endswith("to start over, run l2i-demo again with --overwrite")
