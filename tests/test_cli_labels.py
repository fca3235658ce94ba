"""``l2i-labels``: list, show, check, convert, preview, resize; errors exit 1 with the reason, bad flags exit 2."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from layout2image.cli.labels import main
from layout2image.core.labels import colorize, get_label_set, load_label_map

CS = get_label_set("cityscapes")


def test_list_and_show(capsys, tmp_path):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "ade20k" in out and "150 classes" in out and "remap from 35 raw ids" in out
    assert main(["show", "cityscapes", "--legend", str(tmp_path / "legend.png")]) == 0
    out = capsys.readouterr().out
    assert "13  car" in out and (tmp_path / "legend.png").exists()


def test_convert_colours_to_ids_and_back(tmp_path, capsys):
    ids = np.zeros((6, 8), dtype=np.int64)
    ids[3:] = 13
    rgb = colorize(ids, CS)
    rgb[0, 0] = [130, 62, 128]  # anti-aliased road pixel
    Image.fromarray(rgb).save(tmp_path / "painted.png")
    assert (
        main(
            [
                "convert",
                str(tmp_path / "painted.png"),
                str(tmp_path / "ids.png"),
                "--labels",
                "cityscapes",
                "--tolerance",
                "5",
            ]
        )
        == 0
    )
    assert np.array_equal(load_label_map(tmp_path / "ids.png", CS), ids)
    assert (
        main(
            [
                "convert",
                str(tmp_path / "ids.png"),
                str(tmp_path / "col.png"),
                "--labels",
                "cityscapes",
                "--to",
                "colors",
            ]
        )
        == 0
    )
    assert np.array_equal(np.asarray(Image.open(tmp_path / "col.png")), colorize(ids, CS))
    assert "1 snapped" in capsys.readouterr().out


def test_check_remap_preview_resize(tmp_path, capsys):
    raw = np.full((4, 4), 26, dtype=np.uint8)  # Cityscapes label id 26 = car
    Image.fromarray(raw, mode="L").save(tmp_path / "x_labelIds.png")
    assert main(["check", str(tmp_path / "x_labelIds.png"), "--labels", "cityscapes", "--remap"]) == 0
    assert "car" in capsys.readouterr().out
    assert (
        main(
            ["preview", str(tmp_path / "x_labelIds.png"), str(tmp_path / "p.png"), "--labels", "cityscapes", "--remap"]
        )
        == 0
    )
    assert (tmp_path / "p.png").exists()
    assert (
        main(
            [
                "resize",
                str(tmp_path / "x_labelIds.png"),
                str(tmp_path / "r.png"),
                "--labels",
                "cityscapes",
                "--remap",
                "--size",
                "2x8",
            ]
        )
        == 0
    )
    assert load_label_map(tmp_path / "r.png", CS).shape == (2, 8)


def test_errors_exit_1_with_reason_and_bad_flags_exit_2(tmp_path, capsys):
    Image.fromarray(np.full((3, 3), 200, dtype=np.uint8), mode="L").save(tmp_path / "bad.png")
    assert main(["check", str(tmp_path / "bad.png"), "--labels", "cityscapes"]) == 1
    assert "id 200 at (row 0, col 0) is out of range" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "bad.png"), "--labels", "no-such-set"]) == 1
    assert "unknown built-in label set" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["convert", "a.png"])
    assert exc.value.code == 2
