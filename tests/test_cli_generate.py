"""l2i-generate / pipelines.dataset: the output is a folder dataset the trainer reads; per-item seeds and fixed chunks
(1 or 2 processes, killed or not: the same bytes); resume; refusal of another run's folder; named errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from layout2image.cli.generate import _SCHEDULERS, main
from layout2image.core.controlnet import build_controlnet
from layout2image.core.labels import get_label_set, save_label_map
from layout2image.core.sampling import SCHEDULERS
from layout2image.pipelines import LayoutPipeline
from layout2image.pipelines.dataset import (
    GenerateError,
    GenerateSettings,
    generate_dataset,
    list_layouts,
    plan_items,
    read_prompt_file,
)
from layout2image.testing import tiny_unet_config, write_tiny_sd
from layout2image.weights import WeightsMetadata, save_controlnet

LABELS = get_label_set("toy")
N = LABELS.num_classes
SIZE = 16
STEPS = 2
SETTINGS = dict(steps=STEPS, chunk_size=2, seed=5, domains={"night": "{caption}, at night", "fog": "{caption}, fog"})


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    base = write_tiny_sd(root / "base", unet=tiny_unet_config(cross_attention_dim=16))
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    control = build_controlnet(unet, "onehot", num_classes=N, conditioning_embedding_out_channels=(8, 8))
    md = WeightsMetadata(kind="controlnet", hint_encoding="onehot", label_set=LABELS, base_model="tiny")
    adapter = save_controlnet(control, root / "control.safetensors", metadata=md)
    return {"base": base, "adapter": adapter, "pipe": LayoutPipeline.from_pretrained(base, adapter)}


def _dataset(root: Path, num: int = 3, label_set=LABELS) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(num):
        ids = rng.integers(0, N, size=(SIZE, SIZE))
        save_label_map(root / "labels" / f"scene_{i}.png", ids, LABELS)
        Image.new("RGB", (SIZE, SIZE)).save(root / "images" / f"scene_{i}.png") if (root / "images").is_dir() else None
        lines.append(json.dumps({"file": f"scene_{i}.png", "caption": f"scene number {i}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    label_set.save(root / "labelset.yaml")
    return root


@pytest.fixture
def data(tmp_path):
    (tmp_path / "data" / "labels").mkdir(parents=True)
    (tmp_path / "data" / "images").mkdir()
    return _dataset(tmp_path / "data")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class _Killed(Exception):
    """What `_pipe_killed_at_call` raises: a run stopped in the middle."""


def _pipe_killed_at_call(pipe, n: int):
    """A stand-in for ``pipe`` (same attributes generate_dataset reads) that raises `_Killed` on its n-th call."""
    calls = []

    def killing(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise _Killed
        return pipe(*args, **kwargs)

    killing.label_set, killing.adapter_kind, killing.model_files = pipe.label_set, pipe.adapter_kind, pipe.model_files
    return killing


def test_output_is_a_folder_dataset_the_trainer_reads(model, data, tmp_path):
    from layout2image.trainer.data import FolderDataset, TransformConfig

    out = tmp_path / "out"
    result = generate_dataset(model["pipe"], data, out, GenerateSettings(**SETTINGS))
    assert result.complete and result.written == 6 and result.skipped == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        f"scene_{i}_{d}.png" for i in range(3) for d in ("fog", "night")
    ]
    assert not (out / ".l2i-generate").exists()
    ds = FolderDataset(out, transform=TransformConfig(resolution=None, resize="none", crop="none", flip_prob=0.0))
    assert len(ds) == 6
    sample = ds[0]
    assert sample["caption"] == "scene number 0, fog" and tuple(sample["labels"].shape) == (SIZE, SIZE)
    src = np.asarray(Image.open(data / "labels" / "scene_0.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "labels" / "scene_0_fog.png")), src)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["label_set"] == "toy" and manifest["settings"]["steps"] == STEPS
    assert [m["path"] for m in manifest["models"]] == [str(model["base"].resolve()), str(model["adapter"].resolve())]
    assert len(manifest["models"][1]["sha256"]) == 64 and "unet/config.json" in manifest["models"][0]["files"]
    images = manifest["images"]
    assert [(r["file"], r["domain"], r["seed"]) for r in images[:3]] == [
        ("scene_0_night.png", "night", 5),
        ("scene_0_fog.png", "fog", 6),
        ("scene_1_night.png", "night", 7),
    ]


def test_two_processes_killed_runs_and_resume_write_the_same_bytes(model, data, tmp_path):
    settings = GenerateSettings(**SETTINGS)
    reference = tmp_path / "ref"
    generate_dataset(model["pipe"], data, reference, settings)
    expected = _files(reference)

    # Two processes (run one after the other, as accelerate would run them side by side): process 0 cannot finish
    # alone; once process 1 has done its chunks, process 0's rerun skips everything and writes the final files.
    sharded = tmp_path / "sharded"
    first = generate_dataset(model["pipe"], data, sharded, settings, process_index=0, num_processes=2)
    assert not first.complete and first.written == 4  # chunks 0 and 2 of 0, 1, 2
    generate_dataset(model["pipe"], data, sharded, settings, process_index=1, num_processes=2)
    last = generate_dataset(model["pipe"], data, sharded, settings)
    assert last.complete and last.written == 0 and last.skipped == 6
    assert _files(sharded) == expected

    # A run killed in the middle of its second chunk (an image of it written), then rerun, equals the reference.
    killing = _pipe_killed_at_call(model["pipe"], 2)
    killed = tmp_path / "killed"
    with pytest.raises(_Killed):
        generate_dataset(killing, data, killed, settings)
    assert len(list((killed / "images").iterdir())) == 2 and not (killed / "captions.jsonl").exists()
    rerun = generate_dataset(model["pipe"], data, killed, settings)
    assert rerun.skipped == 2 and rerun.written == 4 and rerun.complete
    assert _files(killed) == expected
    # A finished run is not redone.
    again = generate_dataset(model["pipe"], data, killed, settings)
    assert again.written == 0 and again.complete


def test_another_runs_folder_is_refused_unless_overwrite(model, data, tmp_path):
    out = tmp_path / "out"
    generate_dataset(model["pipe"], data, out, GenerateSettings(**SETTINGS), limit=1)
    other = GenerateSettings(**{**SETTINGS, "seed": 6})
    with pytest.raises(FileExistsError, match="already holds another run's manifest.*--overwrite"):
        generate_dataset(model["pipe"], data, out, other, limit=1)
    result = generate_dataset(model["pipe"], data, out, other, limit=1, overwrite=True)
    assert result.complete and json.loads((out / "manifest.json").read_text())["settings"]["seed"] == 6
    # A folder with data that no run wrote is refused too.
    foreign = tmp_path / "foreign"
    (foreign / "images").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="data that no l2i-generate run wrote"):
        generate_dataset(model["pipe"], data, foreign, other, limit=1)


def test_label_set_mismatch_between_adapter_and_dataset_is_named(model, tmp_path):
    (tmp_path / "d" / "labels").mkdir(parents=True)
    data = _dataset(tmp_path / "d", 1, label_set=get_label_set("cityscapes"))
    with pytest.raises(GenerateError, match=r"label set mismatch.*'cityscapes'.*adapter reads 'toy'"):
        generate_dataset(model["pipe"], data, tmp_path / "out", GenerateSettings(**SETTINGS))
    assert not (tmp_path / "out").exists()  # nothing written


def test_inputs_prompts_and_domains(tmp_path):
    (tmp_path / "maps").mkdir()
    for name in ("b", "a"):
        save_label_map(tmp_path / "maps" / f"{name}.png", np.zeros((SIZE, SIZE), dtype=np.int64), LABELS)
    layouts, ls_file = list_layouts(tmp_path / "maps")
    assert [x.stem for x in layouts] == ["a", "b"] and ls_file is None and layouts[0].caption is None
    (tmp_path / "list.txt").write_text("maps/b.png\n# a comment\nmaps/a.png\n")
    assert [x.stem for x in list_layouts(tmp_path / "list.txt")[0]] == ["a", "b"]
    (tmp_path / "bad.txt").write_text("maps/c.png\n")
    with pytest.raises(GenerateError, match="line 1: label map .*c.png' does not exist"):
        list_layouts(tmp_path / "bad.txt")
    (tmp_path / "empty.txt").write_text("# nothing listed\n")
    with pytest.raises(GenerateError, match="holds no label maps"):
        list_layouts(tmp_path / "empty.txt")

    prompts = tmp_path / "p.txt"
    prompts.write_text("# domains\nnight\ndusk: {caption} at dusk, {domain} light\n")
    templates = read_prompt_file(prompts)
    assert templates == {"night": "{caption}, at night", "dusk": "{caption} at dusk, {domain} light"}
    prompts.write_text("x: {caption} {what}\n")
    with pytest.raises(GenerateError, match="line 1: template .* is not valid"):
        read_prompt_file(prompts)

    from layout2image.pipelines.dataset import Layout, domain_templates

    toy = Layout("t", Path("t.png"), "a street on a sunny day with a car", "day")
    items = plan_items([toy], [toy.caption], domain_templates(["night", "rain"]), samples=2, seed=10)
    assert [(i.id, i.prompt, i.seed) for i in items] == [
        ("t_night_0", "a street at night with a car", 10),  # the toy caption's own domain phrase is replaced
        ("t_night_1", "a street at night with a car", 11),
        ("t_rain_0", "a street in the rain with a car", 12),
        ("t_rain_1", "a street in the rain with a car", 13),
    ]


def test_cli_runs_and_reports_bad_input_in_one_line(model, data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--base", str(model["base"]), "--adapter", str(model["adapter"]), "--input", str(data), "--out", str(out)]
    assert main([*argv, "--steps", "1", "--limit", "1", "--domains", "snow", "--scheduler", "euler_a"]) == 0
    assert "1 images generated" in capsys.readouterr().out
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert captions == [
        {"file": "scene_0_snow.png", "caption": "scene number 0, in heavy snow", "domain": "snow",
         "source": "scene_0", "sample": 0, "seed": 0}
    ]  # fmt: skip
    assert main([*argv, "--steps", "2", "--limit", "1", "--domains", "snow", "--scheduler", "euler_a"]) == 2
    err = capsys.readouterr().err.strip()  # refused before any model is loaded: one line, nothing else
    assert err.startswith("l2i-generate: error: --out") and "another run's manifest (settings differ: steps)" in err
    assert "\n" not in err
    bad = [
        "--base",
        str(model["base"]),
        "--adapter",
        str(tmp_path / "no"),
        "--input",
        str(data),
        "--out",
        str(tmp_path / "o2"),
    ]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("l2i-generate: error: adapter") and "does not exist" in err
    assert main([*argv[:-1], str(tmp_path / "o3"), "--scheduler", "nope"]) == 2
    assert "scheduler 'nope' is not known" in capsys.readouterr().err
    assert set(_SCHEDULERS) == set(SCHEDULERS)


def test_two_real_processes_write_the_same_bytes_as_one(model, data, tmp_path):
    """torchrun with 2 CPU processes (gloo; what `accelerate launch --multi_gpu --num_processes 2` starts on a machine
    without GPUs) shards the chunks and writes the same files as one process."""
    import os
    import subprocess
    import sys

    args = ["--base", str(model["base"]), "--adapter", str(model["adapter"]), "--input", str(data), "--steps", "2"]
    args += ["--domains", "night", "fog", "--chunk-size", "1", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run(
        [*cmd, "-m", "layout2image.cli.generate", *args, "--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "of 2)" in run.stdout  # process 0 reports the process count it shared the work with
    assert _files(tmp_path / "two") == _files(tmp_path / "one")


def test_a_run_killed_with_sigkill_then_rerun_equals_an_uninterrupted_run(model, data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["--base", str(model["base"]), "--adapter", str(model["adapter"]), "--input", str(data), "--steps", "8"]
    args += ["--domains", "night", "fog", "--samples", "3", "--chunk-size", "1", "--device", "cpu", "--threads", "1"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "layout2image.cli.generate", *args, "--out", str(killed)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not (killed / ".l2i-generate" / "chunk_000001.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    manifest = json.loads((killed / "manifest.json").read_text())
    assert not manifest["complete"], "the run finished before the kill: give it more work"
    assert main([*args, "--out", str(killed)]) == 0
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert _files(killed) == _files(tmp_path / "whole")


def test_ctrl_c_says_what_is_kept(model, data, tmp_path, monkeypatch):
    import layout2image.pipelines.dataset as dataset
    from layout2image.cli.generate import _generate, build_parser

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset, "generate_dataset", interrupted)
    argv = ["--base", str(model["base"]), "--adapter", str(model["adapter"]), "--input", str(data)]
    args = build_parser().parse_args([*argv, "--out", str(tmp_path / "out")])
    with pytest.raises(KeyboardInterrupt, match="finished chunks in .*out are kept; rerun the same command"):
        _generate(args)


# ---------------------------------------------------------------------------------------------------- mIoU filter
FILTERED = {**SETTINGS, "domains": {"night": "{caption}, at night"}, "chunk_size": 2}


def test_filter_scores_are_each_images_layout_miou(model, data, tmp_path):
    from layout2image.core.evaluation import layout_alignment
    from layout2image.core.segmenters import load_segmenter

    out = tmp_path / "out"
    result = generate_dataset(model["pipe"], data, out, GenerateSettings(**FILTERED), segmenter="builtin:toy")
    assert result.complete and result.dropped == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["segmenter"]["files"]["config.json"]) == 64 and "filter" not in manifest
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["miou"] for r in captions] == [r["miou"] for r in manifest["images"]] and len(captions) == 3
    segmenter = load_segmenter("builtin:toy")
    for record in captions:  # the score l2i-eval would give the image alone
        stem = record["file"][:-4]
        alone = layout_alignment(
            [(stem, out / "images" / record["file"], out / "labels" / record["file"])], segmenter, LABELS
        )
        assert record["miou"] == pytest.approx(alone.overall.miou, abs=1e-9)
        assert "flagged" not in record and "dropped" not in record


def _fixed_scores(monkeypatch, scores: dict[int, float]):
    """Score item i (by seed: FILTERED's seed is 5) as scores[i], whatever the image."""
    import layout2image.pipelines.dataset as dataset

    calls = []

    def fake(segmenter, images, ids, label_set):
        calls.append(len(images))
        return [scores[n] for n in range(sum(calls) - len(images), sum(calls))]

    monkeypatch.setattr(dataset, "_scores", fake)
    return calls


def test_filter_drop_removes_exactly_the_images_under_the_threshold_and_flag_keeps_them(
    model, data, tmp_path, monkeypatch
):
    from layout2image.trainer.data import FolderDataset, TransformConfig

    _fixed_scores(monkeypatch, {0: 0.9, 1: 0.2, 2: 0.5})
    drop = GenerateSettings(**FILTERED, filter_miou=0.5, filter_action="drop")
    result = generate_dataset(model["pipe"], data, tmp_path / "drop", drop, segmenter="builtin:toy")
    assert result.complete and (result.dropped, result.flagged) == (1, 0)
    out = tmp_path / "drop"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["scene_0_night.png", "scene_2_night.png"]
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["scene_0_night.png", "scene_2_night.png"]
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [(r["file"], r["miou"]) for r in captions] == [("scene_0_night.png", 0.9), ("scene_2_night.png", 0.5)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["filter"] == {"miou": 0.5, "action": "drop", "dropped": 1, "flagged": 0}
    dropped = [r for r in manifest["images"] if r.get("dropped")]
    assert [(r["file"], r["miou"], r["seed"]) for r in dropped] == [("scene_1_night.png", 0.2, 6)]
    ds = FolderDataset(out, transform=TransformConfig(resolution=None, resize="none", crop="none", flip_prob=0.0))
    assert len(ds) == 2  # the trainer reads the filtered folder as it is

    _fixed_scores(monkeypatch, {0: 0.9, 1: 0.2, 2: 0.5})
    flag = GenerateSettings(**FILTERED, filter_miou=0.5, filter_action="flag")
    result = generate_dataset(model["pipe"], data, tmp_path / "flag", flag, segmenter="builtin:toy")
    assert (result.dropped, result.flagged) == (0, 1)
    captions = [json.loads(line) for line in (tmp_path / "flag" / "captions.jsonl").read_text().splitlines()]
    assert [(r["file"], r["flagged"]) for r in captions] == [
        ("scene_0_night.png", False),
        ("scene_1_night.png", True),
        ("scene_2_night.png", False),
    ]
    assert len(list((tmp_path / "flag" / "images").iterdir())) == 3
    # the kept images are the same bytes as in the dropping run
    for name in ("scene_0_night.png", "scene_2_night.png"):
        assert (tmp_path / "flag" / "images" / name).read_bytes() == (out / "images" / name).read_bytes()

    # another threshold is another run: refused before any model is loaded
    from layout2image.pipelines.dataset import precheck_output_folder

    with pytest.raises(FileExistsError, match="settings differ: filter_miou"):
        precheck_output_folder(
            out, GenerateSettings(**FILTERED, filter_miou=0.6, filter_action="drop"), overwrite=False
        )
    with pytest.raises(FileExistsError, match="another run's manifest"):  # a scoring run differs from a plain one
        generate_dataset(model["pipe"], data, tmp_path / "flag", GenerateSettings(**FILTERED))


def test_filter_resume_after_a_kill_and_two_processes_equal_an_uninterrupted_run(model, data, tmp_path):
    settings = GenerateSettings(**{**FILTERED, "chunk_size": 1}, filter_miou=0.0, filter_action="drop")
    reference = tmp_path / "ref"
    generate_dataset(model["pipe"], data, reference, settings, segmenter="builtin:toy")
    scores = sorted({r["miou"] for r in json.loads((reference / "manifest.json").read_text())["images"]})
    # a threshold between the observed scores (the middle one is kept: not under)
    assert len(scores) >= 2, f"the tiny model's images all score the same ({scores}); the test cannot split them"
    threshold = (scores[0] + scores[1]) / 2
    settings.filter_miou = threshold
    reference = tmp_path / "ref2"
    generate_dataset(model["pipe"], data, reference, settings, segmenter="builtin:toy")
    manifest = json.loads((reference / "manifest.json").read_text())
    assert [r["file"] for r in manifest["images"] if r.get("dropped")] == [
        r["file"] for r in manifest["images"] if r["miou"] < threshold
    ] and manifest["filter"]["dropped"] >= 1
    expected = _files(reference)

    killing = _pipe_killed_at_call(model["pipe"], 3)
    killed = tmp_path / "killed"
    with pytest.raises(_Killed):
        generate_dataset(killing, data, killed, settings, segmenter="builtin:toy")
    rerun = generate_dataset(model["pipe"], data, killed, settings, segmenter="builtin:toy")
    assert rerun.complete and rerun.skipped == 2 and rerun.written == 1
    assert _files(killed) == expected

    sharded = tmp_path / "sharded"  # processes 0 and 1 of 2, one after the other, then process 0 finishes the files
    for index in (0, 1):
        generate_dataset(
            model["pipe"], data, sharded, settings, process_index=index, num_processes=2, segmenter="builtin:toy"
        )
    assert generate_dataset(model["pipe"], data, sharded, settings, segmenter="builtin:toy").written == 0
    assert _files(sharded) == expected


def test_filter_cli_and_a_segmenter_whose_classes_do_not_match(model, data, tmp_path, capsys, monkeypatch):
    from transformers import SegformerForSemanticSegmentation

    from layout2image.core.discriminator.segmenter import tiny_segmenter_config

    city = get_label_set("cityscapes")
    config = tiny_segmenter_config("segformer")
    config.id2label = dict(enumerate(city.names))
    config.label2id = {n: i for i, n in enumerate(city.names)}
    torch.manual_seed(0)
    SegformerForSemanticSegmentation(config).save_pretrained(tmp_path / "seg")

    import layout2image.pipelines.dataset as dataset

    sampled = []
    monkeypatch.setattr(dataset, "_run_chunk", lambda *a, **k: sampled.append(1))
    argv = ["--base", str(model["base"]), "--adapter", str(model["adapter"]), "--input", str(data), "--steps", "1"]
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out), "--filter-miou", "0.5", "--segmenter", str(tmp_path / "seg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("l2i-generate: error: the segmenter in") and "has no class named" in err[-1]
    assert "'toy'" in err[-1] and not sampled and not out.exists()
    with pytest.raises(SystemExit) as exited:  # argparse's own check: usage, then the error line
        main([*argv, "--out", str(out), "--filter-miou", "1.5"])
    assert exited.value.code == 2
    assert "--filter-miou: expected an mIoU threshold in [0, 1], got '1.5'" in capsys.readouterr().err
    assert main([*argv, "--out", str(out), "--segmenter", str(tmp_path / "none")]) == 2
    assert "`--segmenter`" in capsys.readouterr().err.strip().splitlines()[-1] and not sampled
    with pytest.raises(GenerateError, match="needs a segmenter"):
        generate_dataset(model["pipe"], data, out, GenerateSettings(**FILTERED, filter_miou=0.5))
    monkeypatch.undo()

    # the CLI end to end: builtin:toy by default, a threshold of 1 flags every image that is not perfect
    assert main([*argv, "--out", str(out), "--limit", "2", "--filter-miou", "1", "--threads", "1"]) == 0
    assert "mIoU < 1.0: 0 dropped, 2 flagged" in capsys.readouterr().out
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["flagged"] for r in captions] == [True, True] and all(0 <= r["miou"] < 1 for r in captions)
