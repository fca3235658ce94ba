"""Bad input at the console scripts l2i-labels, l2i-convert, l2i-toy and the toy-base trainer (issue 15: A2, A7,
C16, C17, C18): one line ``<prog>: error: <what and where>`` on stderr, no traceback, the documented exit code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from layout2image.cli import convert as convert_cli
from layout2image.cli import labels as labels_cli
from layout2image.cli import toy as toy_cli
from layout2image.cli import toy_base as toy_base_cli
from layout2image.cli._args import run_reporting_errors
from layout2image.core import image_files
from layout2image.core.controlnet import build_controlnet
from layout2image.core.errors import LabelMapError
from layout2image.core.labels import get_label_set, save_label_map
from layout2image.testing import declared_size_png, tiny_unet_config
from layout2image.trainer.data.errors import DatasetError
from layout2image.weights import WeightsMetadata, inspect_weights, save_controlnet

TOY = get_label_set("toy")
REPO = Path(__file__).resolve().parents[1]


def one_error_line(err: str, prog: str) -> str:
    """The single stderr line of a reported error (no traceback, nothing else)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def default_limit(monkeypatch):
    monkeypatch.delenv(image_files.ENV_MAX_IMAGE_PIXELS, raising=False)
    monkeypatch.setattr(image_files, "MAX_IMAGE_PIXELS", None)


@pytest.fixture
def ids_png(tmp_path) -> Path:
    ids = np.zeros((8, 12), dtype=np.int64)
    ids[:, 6:] = 1
    return save_label_map(tmp_path / "ids.png", ids, TOY)


# ---------------------------------------------------------------------------------------------------- l2i-labels
@pytest.mark.parametrize(
    "size, match",
    [
        ("0x0", "height and width must be at least 1 pixel"),
        ("-4x8", "height and width must be at least 1 pixel"),
        ("64", "is not HxW"),
        ("axb", "is not HxW"),
        ("100000x100000", r"100000x100000 \(HxW\) = 10,000,000,000 pixels, over the limit of 67,108,864 pixels"),
    ],
)
def test_resize_size_is_checked_before_anything_runs(ids_png, tmp_path, capsys, default_limit, size, match):
    with pytest.raises(SystemExit) as info:
        labels_cli.main(["resize", str(ids_png), str(tmp_path / "o.png"), "--labels", "toy", f"--size={size}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "l2i-labels resize: error: argument --size: " in err and "Traceback" not in err
    assert re.search(match, err), err
    assert not (tmp_path / "o.png").exists()


def test_resize_size_is_height_by_width(ids_png, tmp_path, capsys):
    assert labels_cli.main(["resize", str(ids_png), str(tmp_path / "o.png"), "--labels", "toy", "--size", "4x6"]) == 0
    assert "4 rows high, 6 columns wide" in capsys.readouterr().out
    assert Image.open(tmp_path / "o.png").size == (6, 4)  # PIL gives (W, H)


def test_help_is_plain_text_and_says_hxw(capsys):
    for argv in (["--help"], ["resize", "--help"]):
        with pytest.raises(SystemExit):
            labels_cli.main(argv)
        text = capsys.readouterr().out
        assert "``" not in text and "`" not in text, text
        assert "HxW" in text and "64x128" in text
    assert "HxW: 64 high, 128 wide" in (REPO / "README.md").read_text()


def test_a_toy_dataset_folder_does_not_hide_the_builtin_set(ids_png, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy" / "images").mkdir(parents=True)  # `l2i-toy --out toy`
    assert labels_cli.main(["list"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5
    assert labels_cli.main(["show", "toy"]) == 0
    assert capsys.readouterr().out.startswith("toy: 8 classes")
    assert labels_cli.main(["check", str(ids_png), "--labels", "toy"]) == 0
    assert labels_cli.main(["check", str(ids_png), "--labels", "./toy"]) == 1
    assert "'./toy' is a folder" in one_error_line(capsys.readouterr().err, "l2i-labels")


def test_a_huge_declared_png_is_one_line_exit_1(tmp_path, capsys, default_limit):
    bomb = declared_size_png(tmp_path / "bomb.png", 12000, 12000)
    assert labels_cli.main(["check", str(bomb), "--labels", "toy"]) == 1
    line = one_error_line(capsys.readouterr().err, "l2i-labels")
    assert "bomb.png" in line and "over the limit of 67,108,864 pixels" in line and "L2I_MAX_IMAGE_PIXELS" in line


def test_a_float_npy_map_is_one_line_exit_1(tmp_path, capsys):
    np.save(tmp_path / "m.npy", np.array([[0.0, 6.7], [1.0, 2.0]]))
    assert labels_cli.main(["check", str(tmp_path / "m.npy"), "--labels", "toy"]) == 1
    assert "holds 6.7 at pixel (y=0, x=1)" in one_error_line(capsys.readouterr().err, "l2i-labels")


def test_preview_image_problems_are_one_line_exit_2(ids_png, tmp_path, capsys, monkeypatch, default_limit):
    out = str(tmp_path / "p.png")
    argv = ["preview", str(ids_png), out, "--labels", "toy", "--image"]
    assert labels_cli.main([*argv, str(tmp_path / "missing.jpg")]) == 2
    assert "missing.jpg" in one_error_line(capsys.readouterr().err, "l2i-labels")
    (tmp_path / "not_an_image.jpg").write_bytes(b"hello")
    assert labels_cli.main([*argv, str(tmp_path / "not_an_image.jpg")]) == 2
    assert "not_an_image.jpg" in one_error_line(capsys.readouterr().err, "l2i-labels")
    Image.new("RGB", (12, 10)).save(tmp_path / "photo.png")  # 120 pixels, the map 96
    monkeypatch.setattr(image_files, "MAX_IMAGE_PIXELS", 100)
    assert labels_cli.main([*argv, str(tmp_path / "photo.png")]) == 2
    line = one_error_line(capsys.readouterr().err, "l2i-labels")
    assert "--image" in line and "photo.png" in line and "over the limit of 100 pixels" in line
    assert not Path(out).exists()


def test_l2i_labels_subprocess_has_no_traceback(tmp_path, default_limit):
    """The console script end to end: the exit status and stderr a user sees."""
    bomb = declared_size_png(tmp_path / "bomb.png", 20000, 20000)
    env = {k: v for k, v in os.environ.items() if k != image_files.ENV_MAX_IMAGE_PIXELS}
    for argv, code in (
        (["check", str(bomb), "--labels", "toy"], 1),
        (["resize", str(bomb), str(tmp_path / "o.png"), "--labels", "toy", "--size", "0x0"], 2),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "layout2image.cli.labels", *argv], capture_output=True, text=True, env=env
        )
        assert done.returncode == code, done.stderr
        lines = done.stderr.strip().splitlines()
        assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr
        assert lines[-1].startswith("l2i-labels") and "error:" in lines[-1], done.stderr


# ---------------------------------------------------------------------------------------------------- other CLIs
@pytest.mark.parametrize(
    "error",
    [
        DatasetError("image 'a.png' is not a readable image"),
        LabelMapError("label map 'a.png' holds NaN"),
        Image.DecompressionBombError("Image size (400000000 pixels) exceeds limit"),
        NotADirectoryError(20, "Not a directory", "out/x"),
    ],
    ids=["DatasetError", "LabelMapError", "DecompressionBombError", "OSError"],
)
def test_run_reporting_errors_turns_user_errors_into_one_line(error, capsys):
    def fail():
        raise error

    assert run_reporting_errors("l2i-x", fail) == 2
    one_error_line(capsys.readouterr().err, "l2i-x")


@pytest.mark.parametrize("kept", ["", "checkpoint saved to run/checkpoints/step_3"])
def test_ctrl_c_is_one_line_exit_130(kept, capsys):
    def interrupted():
        raise KeyboardInterrupt(kept) if kept else KeyboardInterrupt

    assert run_reporting_errors("l2i-x", interrupted) == 130
    err = capsys.readouterr().err
    assert err == ("l2i-x: interrupted" + (f"; {kept}" if kept else "") + "\n")


def test_a_closed_pipe_ends_quietly(tmp_path):
    """``l2i-convert inspect x | head -1``: no "Broken pipe" error, no "Exception ignored" at exit."""
    code = (
        "import sys\n"
        "from layout2image.cli._args import run_reporting_errors\n"
        "def spam():\n"
        "    for i in range(200000):\n"
        "        print('line', i)\n"
        "sys.exit(run_reporting_errors('l2i-x', spam))\n"
    )
    done = subprocess.run(
        f'{sys.executable} -c "{code}" | head -1', shell=True, capture_output=True, text=True, timeout=120
    )
    assert done.stdout == "line 0\n" and done.stderr == "", done.stderr


def test_an_output_under_a_file_says_the_parent_is_a_file(ids_png, tmp_path, capsys):
    (tmp_path / "labelset.yaml").write_text("x")
    out = tmp_path / "labelset.yaml" / "out.png"
    assert labels_cli.main(["convert", str(ids_png), str(out), "--labels", "toy"]) in (1, 2)
    line = one_error_line(capsys.readouterr().err, "l2i-labels")
    assert f"{str(tmp_path / 'labelset.yaml')!r} is a file, not a folder" in line and "Errno" not in line


def test_a_folder_given_as_label_map_is_named_a_folder(tmp_path, capsys):
    assert labels_cli.main(["check", str(tmp_path), "--labels", "toy"]) in (1, 2)
    line = one_error_line(capsys.readouterr().err, "l2i-labels")
    assert "is a folder, not an image file" in line and "Is a directory" not in line


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_jpeg_label_map_error_says_jpeg_is_lossy(ids_png, tmp_path, capsys, mode):
    ids = np.zeros((32, 32), dtype=np.uint8)
    ids[:, 16:] = 7
    ids[8:20, 4:12] = 255  # the ringing at the edges of 0 / 7 / 255 gives ids no class has
    png = save_label_map(tmp_path / "m.png", ids.astype(np.int64), TOY)
    jpeg = tmp_path / "m.jpg"
    image = Image.open(png)
    (image.convert("RGB") if mode == "RGB" else Image.fromarray(ids)).save(jpeg, quality=40)
    assert labels_cli.main(["check", str(jpeg), "--labels", "toy"]) in (1, 2)
    assert "The file is a JPEG: its lossy compression" in capsys.readouterr().err
    assert labels_cli.main(["check", str(png), "--labels", "toy"]) == 0


def test_l2i_toy_unwritable_out_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert toy_cli.main(["--out", str(tmp_path / "file" / "toy"), "--num", "2", "--preview-rows", "0"]) == 2
    assert "file/toy" in one_error_line(capsys.readouterr().err, "l2i-toy")


def test_toy_base_unwritable_out_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert toy_base_cli.main(["--out", str(tmp_path / "file" / "w"), "--minutes", "0.01", "--quiet"]) == 2
    assert "file/w" in one_error_line(capsys.readouterr().err, "l2i-train --preset toy-base")


# ---------------------------------------------------------------------------------------------------- l2i-convert
@pytest.fixture(scope="module")
def controlnet_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config(norm_num_groups=32))
    rgb = build_controlnet(unet, hint="rgb", conditioning_embedding_out_channels=(4, 8, 8, 16))
    md = WeightsMetadata(kind="controlnet", hint_encoding="rgb", label_set=TOY)
    return save_controlnet(rgb, tmp_path_factory.mktemp("cn") / "rgb.safetensors", metadata=md)


def _edited(source: Path, out: Path, key: str, shape=None, drop: bool = False, metadata: bool = True) -> Path:
    state = load_file(source)
    with safe_open(str(source), "pt") as f:
        meta = f.metadata()
    if drop:
        del state[key]
    else:
        state[key] = torch.zeros(shape)
    save_file(state, str(out), metadata=meta if metadata else None)
    return out


def test_inspect_names_the_tensor_that_no_loader_takes(controlnet_file, tmp_path, capsys):
    key = "down_blocks.0.resnets.0.conv1.weight"
    assert inspect_weights(controlnet_file).loaders  # the intact file loads
    for metadata in (True, False):
        bad = _edited(
            controlnet_file, tmp_path / f"bad_{metadata}.safetensors", key, (32, 33, 3, 3), metadata=metadata
        )
        report = inspect_weights(bad)
        assert report.kind == "controlnet" and report.loaders == ()
        assert "no loader takes it" in report.summary
        assert any(f"{key}: [32, 33, 3, 3] (config expects [32, 32, 3, 3])" in n for n in report.notes), report.notes
        assert convert_cli.main(["inspect", str(bad)]) == 0  # a report, not a failure
        out = capsys.readouterr().out
        assert "(no known tool; the notes say why)" in out and f"{key}: [32, 33, 3, 3]" in out
        assert "ComfyUI" in out and "KeyMismatchError" in out


def test_inspect_says_why_a_controlnet_file_matches_no_signature(controlnet_file, tmp_path, capsys):
    bad = _edited(
        controlnet_file, tmp_path / "nohint.safetensors", "controlnet_cond_embedding.conv_in.weight", drop=True
    )
    assert convert_cli.main(["inspect", str(bad)]) == 0
    out = capsys.readouterr().out
    assert "(no known tool; the notes say why)" in out
    assert "l2i.kind says 'controlnet', but no loader takes these tensors" in out
    assert "not a ControlNet state dict this pack knows" in out


def test_inspect_reports_metadata_that_contradicts_the_weights(controlnet_file, tmp_path):
    key = "controlnet_cond_embedding.conv_in.weight"
    bad = _edited(controlnet_file, tmp_path / "onehot.safetensors", key, (4, 4, 3, 3))
    report = inspect_weights(bad)
    assert report.loaders == ()
    assert any("metadata says hint_encoding='rgb'" in n for n in report.notes), report.notes


def test_convert_unwritable_output_is_one_line_exit_2(controlnet_file, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    argv = ["controlnet", "--to", "ldm", str(controlnet_file), str(tmp_path / "file" / "out.safetensors")]
    assert convert_cli.main(argv) == 2
    assert "file" in one_error_line(capsys.readouterr().err, "l2i-convert")
