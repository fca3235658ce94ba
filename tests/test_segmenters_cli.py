"""l2i-segment: photos to label maps with the shipped toy segmenter; refusal and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from layout2image.cli import segment as segment_cli
from layout2image.core.labels import get_label_set, load_label_map
from layout2image.core.toy import HELDOUT_START, make_sample

TOY = get_label_set("toy")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    samples = [make_sample(HELDOUT_START + i, size=128) for i in range(2)]
    for s in samples:
        Image.fromarray(s.image).save(root / f"{s.stem}.jpg", quality=95)
    return root, samples


def test_photos_become_label_maps(photos, tmp_path):
    root, samples = photos
    out = tmp_path / "labels"
    assert segment_cli.main([str(root), "--out", str(out), "--quiet"]) == 0
    for s in samples:
        ids = load_label_map(out / f"{s.stem}.png", TOY)
        assert ids.shape == (128, 128)
        valid = s.labels != 255
        # the shipped evaluation segmenter reads held-out toy photos well (pixel accuracy ~0.97 on PNGs)
        assert (ids[valid] == s.labels[valid]).mean() > 0.9


def test_existing_maps_are_refused_without_overwrite(photos, tmp_path, capsys):
    root, samples = photos
    out = tmp_path / "labels"
    out.mkdir()
    (out / f"{samples[0].stem}.png").write_bytes(b"mine")
    assert segment_cli.main([str(root), "--out", str(out), "--quiet"]) == 2
    assert "already exist" in capsys.readouterr().err
    assert (out / f"{samples[0].stem}.png").read_bytes() == b"mine"
    assert not (out / f"{samples[1].stem}.png").exists()  # nothing written
    assert segment_cli.main([str(root), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert np.unique(load_label_map(out / f"{samples[0].stem}.png", TOY)).size > 2


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--label-set", "cityscapes"], "has no class named ['wall', 'fence'"),
        (["--segmenter", "{tmp}"], "--label-set is needed with a segmenter folder"),
        (["--segmenter", "{tmp}", "--label-set", "toy"], "has no config.json"),
    ],
)
def test_bad_input_is_one_line(photos, tmp_path, capsys, extra, expected):
    root, _ = photos
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    assert segment_cli.main([str(root), "--out", str(tmp_path / "out"), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "l2i-segment" in line]
    assert len(lines) == 1 and lines[0].startswith("l2i-segment: error: ") and expected in lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_image_is_named(tmp_path, capsys):
    assert segment_cli.main([str(tmp_path / "no.png"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"l2i-segment: error: image {str(tmp_path / 'no.png')!r} does not exist" in err
