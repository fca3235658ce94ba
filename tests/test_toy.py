"""The toy world: scenes, rendering domains, captions, the dataset folder and ``l2i-toy``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from layout2image.cli.toy import main as toy_main
from layout2image.core.labels import get_label_set, read_label_map
from layout2image.core.toy import (
    DOMAINS,
    HELDOUT_START,
    IGNORE_INDEX,
    TOY_CLASSES,
    image_stats,
    make_caption,
    make_label_map,
    make_sample,
    make_scene,
    render_scene,
    sample_rng,
    scene_from_labels,
    write_dataset,
)

# Domain effects measured over a batch of scenes rendered in every domain (the same scenes and noise).
NUM_STAT_SCENES = 24
NIGHT_MAX_BRIGHTNESS_RATIO = 0.6  # night brightness < 0.6 x day
SNOW_MIN_WHITE_GAIN = 0.2  # white fraction of snow exceeds day's by this much
SNOW_MAX_SATURATION_RATIO = 0.6
FOG_MAX_CONTRAST_RATIO = 0.8


@pytest.fixture(scope="module")
def domain_stats():
    images = {d: [] for d in DOMAINS}
    for index in range(NUM_STAT_SCENES):
        scene = make_scene(64, seed=3, index=index)
        for domain in DOMAINS:
            images[domain].append(render_scene(scene, domain, sample_rng(3, index, 1)))
    return {d: image_stats(np.stack(v)) for d, v in images.items()}


def test_label_set_matches_scene_classes():
    label_set = get_label_set("toy")
    assert tuple(label_set.names) == TOY_CLASSES
    assert label_set.ignore_index == IGNORE_INDEX
    assert len(TOY_CLASSES) >= 7
    assert len({tuple(c) for c in label_set.palette.tolist()}) == label_set.num_classes


@pytest.mark.parametrize("size", [128, 32, (48, 64)])
def test_scene_shapes_and_ids(size):
    h, w = (size, size) if isinstance(size, int) else size
    sample = make_sample(5, seed=1, size=size)
    assert sample.labels.shape == (h, w) and sample.labels.dtype == np.int64
    assert sample.image.shape == (h, w, 3) and sample.image.dtype == np.uint8
    ids = np.unique(sample.labels)
    assert set(ids.tolist()) <= set(range(len(TOY_CLASSES))) | {IGNORE_INDEX}


def test_determinism():
    a, b = make_sample(7, seed=11, size=64), make_sample(7, seed=11, size=64)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.caption == b.caption and a.domain == b.domain
    other_seed, other_index = make_sample(7, seed=12, size=64), make_sample(8, seed=11, size=64)
    assert not np.array_equal(a.labels, other_seed.labels)
    assert not np.array_equal(a.labels, other_index.labels)


def test_sample_reproducible_alone(tmp_path):
    write_dataset(tmp_path / "ds", 6, seed=4, size=32, preview_rows=0)
    alone = make_sample(5, seed=4, size=32)
    stored = np.asarray(Image.open(tmp_path / "ds" / "images" / f"{alone.stem}.png").convert("RGB"))
    np.testing.assert_array_equal(stored, alone.image)


def test_layout_agrees_across_sizes():
    big, small = make_label_map(128, seed=0, index=3), make_label_map(32, seed=0, index=3)
    assert (big[2::4, 2::4] == small).mean() > 0.8


def test_street_structure():
    labels = make_label_map(128, seed=0, index=0)
    sky, road = TOY_CLASSES.index("sky"), TOY_CLASSES.index("road")
    assert (labels[:8] == sky).mean() > 0.3, "the top rows are mostly sky"
    assert not (labels[-8:] == sky).any(), "no sky at the bottom"
    assert (labels[-4:] == road).mean() > 0.3, "the road reaches the bottom edge"


def test_every_class_and_ignore_appear():
    present = np.zeros(256, dtype=int)
    for index in range(50):
        present += np.bincount(make_label_map(64, seed=0, index=index).ravel(), minlength=256)[:256] > 0
    for class_id, name in enumerate(TOY_CLASSES):
        assert present[class_id] >= 10, f"class {name!r} appears in only {present[class_id]} of 50 scenes"
    assert present[IGNORE_INDEX] >= 25, f"ignore appears in only {present[IGNORE_INDEX]} of 50 scenes"


def test_night_darker(domain_stats):
    day, night = domain_stats["day"], domain_stats["night"]
    ratio = night.brightness / day.brightness
    assert ratio < NIGHT_MAX_BRIGHTNESS_RATIO, f"night/day brightness {ratio:.3f}, want < {NIGHT_MAX_BRIGHTNESS_RATIO}"


def test_snow_whiter(domain_stats):
    day, snow = domain_stats["day"], domain_stats["snow"]
    gain = snow.white_fraction - day.white_fraction
    assert gain > SNOW_MIN_WHITE_GAIN, f"snow white fraction gain {gain:.3f}, want > {SNOW_MIN_WHITE_GAIN}"
    assert snow.brightness > day.brightness
    ratio = snow.saturation / day.saturation
    assert ratio < SNOW_MAX_SATURATION_RATIO, f"snow/day saturation {ratio:.3f}, want < {SNOW_MAX_SATURATION_RATIO}"


def test_fog_lower_contrast(domain_stats):
    day, fog = domain_stats["day"], domain_stats["fog"]
    ratio = fog.contrast / day.contrast
    assert ratio < FOG_MAX_CONTRAST_RATIO, f"fog/day contrast {ratio:.3f}, want < {FOG_MAX_CONTRAST_RATIO}"
    assert fog.saturation < day.saturation


def test_domain_changes_only_the_rendering():
    scene = make_scene(32, seed=0, index=1)
    day = render_scene(scene, "day", sample_rng(0, 1, 1))
    again = render_scene(scene, "day", sample_rng(0, 1, 1))
    night = render_scene(scene, "night", sample_rng(0, 1, 1))
    np.testing.assert_array_equal(day, again)
    assert not np.array_equal(day, night)


def test_image_stats_definition():
    white = np.full((4, 4, 3), 255, np.uint8)
    black = np.zeros((4, 4, 3), np.uint8)
    red = np.zeros((4, 4, 3), np.float32)
    red[..., 0] = 1.0
    assert image_stats(white).brightness == pytest.approx(1.0) and image_stats(white).white_fraction == 1.0
    assert image_stats(black).brightness == 0.0 and image_stats(black).saturation == 0.0
    assert image_stats(red).saturation == pytest.approx(1.0)
    half = np.concatenate([white, black], axis=0)
    assert image_stats(half).contrast == pytest.approx(0.5, abs=1e-3)
    assert image_stats(np.stack([white, black])).brightness == pytest.approx(0.5)
    with pytest.raises(ValueError, match="images must be"):
        image_stats(np.zeros((4, 4)))


def test_render_bare_label_map():
    labels = make_label_map(32, seed=0, index=2)
    image = render_scene(labels, "fog")
    assert image.shape == (32, 32, 3)
    with pytest.raises(ValueError, match="toy ids"):
        scene_from_labels(np.full((32, 32), 9))
    with pytest.raises(ValueError, match="domain must be one of"):
        render_scene(labels, "rain")


@pytest.mark.parametrize("domain", DOMAINS)
def test_caption_names_domain(domain):
    for index in range(8):
        sample = make_sample(index, seed=0, size=32, domain=domain)
        assert re.search(rf"\b{domain}\b", sample.caption), sample.caption
        assert sample.domain == domain


def test_caption_names_objects():
    scene = make_scene(64, seed=0, index=0)
    caption = make_caption(scene, "day", np.random.default_rng(0))
    for kind, word in (("car", "car"), ("tree", "tree"), ("person", "person"), ("pole", "street lamp")):
        if scene.objects[kind] == 1:
            assert re.search(rf"\ba {word}\b", caption), caption
        elif scene.objects[kind] == 0:
            assert not re.search(rf"\b{word}s?\b", caption), caption
    assert make_caption(scene, "day", np.random.default_rng(0)) == caption


def test_domains_cycle():
    assert [make_sample(i, size=32).domain for i in range(5)] == [*DOMAINS, DOMAINS[0]]
    assert make_sample(1, size=32, domains=("fog", "snow")).domain == "snow"


def test_write_dataset(tmp_path):
    root = tmp_path / "ds"
    summary = write_dataset(root, 5, seed=2, size=32, preview_rows=3)
    lines = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    assert [r["file"] for r in lines] == [f"toy_{i:06d}.png" for i in range(5)]
    assert [r["domain"] for r in lines] == [DOMAINS[i % 4] for i in range(5)]
    label_set = get_label_set("toy")
    for i, record in enumerate(lines):
        sample = make_sample(i, seed=2, size=32)
        assert record["caption"] == sample.caption
        image = Image.open(root / "images" / record["file"])
        assert image.mode == "RGB" and image.size == (32, 32)
        label_png = Image.open(root / "labels" / record["file"])
        assert label_png.mode == "P"
        np.testing.assert_array_equal(read_label_map(root / "labels" / record["file"], label_set).ids, sample.labels)
    assert (root / "labelset.yaml").is_file()
    assert summary.preview.is_file() and summary.domain_preview.is_file()
    assert sum(summary.class_frequencies.values()) == pytest.approx(1.0)
    assert set(summary.domain_stats) == set(DOMAINS)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_dataset(root, 2, size=32)
    write_dataset(root, 2, size=32, preview_rows=0, overwrite=True)
    assert len(list((root / "images").glob("*.png"))) == 2


def test_write_dataset_from_a_start_index(tmp_path):
    root = tmp_path / "held_out"
    write_dataset(root, 2, seed=2, size=32, preview_rows=0, start=HELDOUT_START)
    lines = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    assert [r["file"] for r in lines] == [f"toy_{HELDOUT_START + i:06d}.png" for i in range(2)]
    assert [r["caption"] for r in lines] == [make_sample(HELDOUT_START + i, seed=2, size=32).caption for i in range(2)]
    with pytest.raises(ValueError, match="start must be non-negative, got -1"):
        write_dataset(tmp_path / "bad", 1, size=32, start=-1)


def test_cli_runs(tmp_path, capsys):
    out = tmp_path / "toy"
    assert toy_main(["--out", str(out), "--num", "4", "--size", "32", "--seed", "1", "--domains", "night,fog"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "brightness" in printed and "night" in printed
    assert len(list((out / "labels").glob("toy_*.png"))) == 4
    assert (out / "preview.png").is_file()


@pytest.mark.parametrize(
    "args",
    [
        ["--num", "3"],  # no --out
        ["--out", "X", "--num", "0"],
        ["--out", "X", "--num", "many"],
        ["--out", "X", "--size", "8"],
        ["--out", "X", "--seed", "-1"],
        ["--out", "X", "--start", "-1"],
        ["--out", "X", "--domains", "day,rain"],
        ["--out", "X", "--domains", "day,day"],
    ],
)
def test_cli_bad_arguments(tmp_path, args, capsys):
    args = [str(tmp_path / "x") if a == "X" else a for a in args]
    with pytest.raises(SystemExit) as exc:
        toy_main(args)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_refuses_existing_dataset(tmp_path, capsys):
    out = str(tmp_path / "toy")
    assert toy_main(["--out", out, "--num", "1", "--size", "16", "--quiet", "--preview-rows", "0"]) == 0
    with pytest.raises(SystemExit) as exc:
        toy_main(["--out", out, "--num", "1", "--size", "16"])
    assert exc.value.code == 2
    assert "--overwrite" in capsys.readouterr().err


def _interrupt_after(monkeypatch, calls: int) -> None:
    """Make the dataset writer's label-map save raise KeyboardInterrupt (Ctrl-C) on its ``calls + 1``-th call."""
    from layout2image.core.toy import dataset

    real, seen = dataset.save_label_map, []

    def save(*args, **kwargs):
        if len(seen) == calls:
            raise KeyboardInterrupt
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset, "save_label_map", save)


def test_an_interrupted_write_is_completed_by_the_same_call(tmp_path, monkeypatch):
    """Ctrl-C after 3 of 8 samples: the folder says it is unfinished; the same call keeps the 3 samples (not rendered
    again) and writes the rest; the result equals an uninterrupted write, file by file."""
    from layout2image.core.toy import dataset

    whole = write_dataset(tmp_path / "whole", 8, seed=1, size=32, preview_rows=2)
    root = tmp_path / "toy"
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            write_dataset(root, 8, seed=1, size=32, preview_rows=2)
    assert (root / dataset.WRITING_MARKER).is_file() and not (root / "captions.jsonl").exists()
    assert len(list((root / "labels").glob("toy_*.png"))) == 3
    with pytest.raises(FileExistsError, match=r"interrupted .*\(--num 8 --seed 1 .*: 3 of 8 samples written"):
        write_dataset(root, 9, seed=1, size=32)
    rendered = []
    real_render = dataset.render_scene
    monkeypatch.setattr(dataset, "render_scene", lambda *a, **k: rendered.append(1) or real_render(*a, **k))
    summary = write_dataset(root, 8, seed=1, size=32, preview_rows=2)
    assert summary.resumed == 3 and not (root / dataset.WRITING_MARKER).exists()
    assert len(rendered) == 5 + 4 * 2  # the 5 new samples, then the domain preview's 2 rows x 4 domains
    assert summary.class_frequencies == whole.class_frequencies and summary.domain_stats == whole.domain_stats
    for name in ("captions.jsonl", "labelset.yaml"):
        assert (root / name).read_text() == (tmp_path / "whole" / name).read_text()
    for path in sorted((tmp_path / "whole").rglob("toy_*.png")):
        mine = root / path.relative_to(tmp_path / "whole")
        np.testing.assert_array_equal(np.asarray(Image.open(mine)), np.asarray(Image.open(path)))
    with pytest.raises(FileExistsError, match="already holds a toy dataset"):  # finished now
        write_dataset(root, 8, seed=1, size=32)


def test_an_unfinished_folder_without_the_marker_says_it_is_incomplete(tmp_path, capsys):
    """A folder an older l2i-toy left half-written (toy files, no captions.jsonl): the refusal says so."""
    root = tmp_path / "toy"
    write_dataset(root, 3, size=16, preview_rows=0)
    (root / "captions.jsonl").unlink()
    (root / "labelset.yaml").unlink()
    with pytest.raises(SystemExit):
        toy_main(["--out", str(root), "--num", "10", "--size", "16"])
    err = capsys.readouterr().err
    assert "incomplete toy dataset (3 samples" in err and "captions.jsonl and labelset.yaml missing" in err
    assert "--overwrite" in err


def test_cli_ctrl_c_says_what_is_kept(tmp_path, monkeypatch, capsys):
    _interrupt_after(monkeypatch, 2)
    out = tmp_path / "toy"
    assert toy_main(["--out", str(out), "--num", "5", "--size", "16", "--preview-rows", "0"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("l2i-toy: interrupted; the samples written so far are kept in") and "Traceback" not in err
    monkeypatch.undo()
    assert toy_main(["--out", str(out), "--num", "5", "--size", "16", "--preview-rows", "0"]) == 0
    assert "2 samples were already there" in capsys.readouterr().out
