"""Bad label sets, label maps and images at the library level (issue 15: A2, A6, C17, C18).

- A2: a built-in label set name is never shadowed by a folder; a path is a path only when it names a file.
- A6: label maps and label sets are written with the umask's mode.
- C17: images and label maps are refused over a pixel limit before any pixel is decoded.
- C18: ``.npy`` label maps of floats, booleans, NaN or infinity are refused (whole-number floats are accepted);
  ``inspect`` says why no loader takes a ControlNet with wrong shapes.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from layout2image.core import image_files
from layout2image.core.errors import LabelMapError, LabelSetError
from layout2image.core.labels import get_label_set, load_label_map, load_label_set, save_label_map
from layout2image.core.logging import reset_warn_once
from layout2image.testing import declared_size_png
from layout2image.trainer.data.base import image_size, label_size
from layout2image.trainer.data.errors import DatasetError

TOY = get_label_set("toy")
OTHER_SET = "name: mine\nclasses:\n  - {name: a, color: [1, 2, 3]}\n  - {name: b, color: [4, 5, 6]}\n"


@pytest.fixture
def default_limit(monkeypatch):
    """The default limit, whatever the environment running the tests says."""
    monkeypatch.delenv(image_files.ENV_MAX_IMAGE_PIXELS, raising=False)
    monkeypatch.setattr(image_files, "MAX_IMAGE_PIXELS", None)


# ---------------------------------------------------------------------------------------------------- A2 lookup
def test_a_folder_named_like_a_builtin_set_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy").mkdir()  # what `l2i-toy --out toy` leaves
    (tmp_path / "toy" / "labelset.yaml").write_text(OTHER_SET)
    assert load_label_set("toy") == TOY
    assert load_label_set("Cityscapes").name == "cityscapes"  # aliases and case still work


def test_a_file_named_like_a_builtin_set_is_reported_and_dot_slash_picks_it(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy").write_text(OTHER_SET)
    (tmp_path / "toy.yaml").write_text(OTHER_SET)
    reset_warn_once()
    with caplog.at_level(logging.WARNING, logger="layout2image"):
        assert load_label_set("toy") == TOY
    assert "using the built-in set 'toy'" in caplog.text and "'./toy'" in caplog.text
    assert load_label_set("./toy").name == "mine"
    assert load_label_set(str(tmp_path / "toy")).name == "mine"
    assert load_label_set("toy.yaml").name == "mine"  # a name with an extension is a file name


def test_a_folder_is_not_a_label_set_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labelset.yaml").write_text(OTHER_SET)
    with pytest.raises(LabelSetError, match=r"is a folder; give a label set file such as '.*labelset\.yaml'"):
        load_label_set(str(tmp_path / "data"))
    with pytest.raises(LabelSetError, match="unknown built-in label set 'nope', and no label set file"):
        load_label_set("nope")
    with pytest.raises(LabelSetError, match="does not exist"):
        load_label_set(str(tmp_path / "missing.yaml"))


# ---------------------------------------------------------------------------------------------------- A6 modes
@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
def test_label_maps_and_sets_get_the_umask_mode(tmp_path):
    previous = os.umask(0o027)
    try:
        ids = np.zeros((4, 5), dtype=np.int64)
        written = [save_label_map(tmp_path / "a.png", ids, TOY), save_label_map(tmp_path / "a.npy", ids, TOY)]
        written.append(TOY.save(tmp_path / "set.yaml"))
    finally:
        os.umask(previous)
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o666 & ~0o027)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "a.png", "set.yaml"]  # no temporary left


# ---------------------------------------------------------------------------------------------------- C17 pixels
@pytest.mark.parametrize("size", [(12000, 12000), (20000, 20000)], ids=["over-ours", "over-PIL-guard-too"])
def test_a_small_png_declaring_a_huge_size_is_refused_before_decoding(tmp_path, default_limit, size):
    path = declared_size_png(tmp_path / "bomb.png", *size)
    assert path.stat().st_size < 200
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not leak out
        with pytest.raises(LabelMapError) as info:
            load_label_map(path, TOY)
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert "bomb.png" in message and f"{size[0] * size[1]:,} pixels" in message
    assert "over the limit of 67,108,864 pixels" in message and "L2I_MAX_IMAGE_PIXELS=" in message


def test_the_pixel_limit_is_a_setting(tmp_path, monkeypatch, default_limit):
    path = save_label_map(tmp_path / "m.png", np.ones((40, 50), dtype=np.int64), TOY)
    monkeypatch.setenv("L2I_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(LabelMapError, match=r"m\.png' is 40x50 \(HxW\) = 2,000 pixels, over the limit of 1,000"):
        load_label_map(path, TOY)
    monkeypatch.setenv("L2I_MAX_IMAGE_PIXELS", "0")  # no limit
    assert load_label_map(path, TOY).shape == (40, 50)
    monkeypatch.setattr(image_files, "MAX_IMAGE_PIXELS", 100)  # a program's setting wins over the environment
    with pytest.raises(LabelMapError, match="over the limit of 100 pixels"):
        load_label_map(path, TOY)
    monkeypatch.setattr(image_files, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setenv("L2I_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="L2I_MAX_IMAGE_PIXELS='lots' is not a pixel count"):
        load_label_map(path, TOY)


def test_the_limit_applies_to_npy_maps_and_dataset_images(tmp_path, monkeypatch, default_limit):
    np.save(tmp_path / "m.npy", np.zeros((40, 50), dtype=np.uint8))
    Image.new("RGB", (50, 40)).save(tmp_path / "img.png")
    monkeypatch.setattr(image_files, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(LabelMapError, match=r"m\.npy' is 40x50 \(HxW\) = 2,000 pixels"):
        load_label_map(tmp_path / "m.npy", TOY)
    with pytest.raises(DatasetError, match=r"m\.npy' is 40x50"):
        label_size(tmp_path / "m.npy")
    with pytest.raises(DatasetError, match=r"image '.*img\.png' is 40x50 \(HxW\) = 2,000 pixels, over the limit"):
        image_size(tmp_path / "img.png")
    monkeypatch.setattr(image_files, "MAX_IMAGE_PIXELS", 0)
    assert image_size(tmp_path / "img.png") == (40, 50) and label_size(tmp_path / "m.npy") == (40, 50)


def test_a_dataset_sample_over_the_limit_names_the_image(tmp_path, monkeypatch, default_limit):
    from layout2image.trainer.data import FolderDataset

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    Image.new("RGB", (16, 16), (70, 130, 180)).save(root / "images" / "a.png")
    save_label_map(root / "labels" / "a.png", np.zeros((16, 16), dtype=np.int64), TOY)
    (root / "labelset.yaml").write_text("")
    TOY.save(root / "labelset.yaml")
    ds = FolderDataset(root)
    monkeypatch.setattr(image_files, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DatasetError, match=r"image '.*a\.png' is 16x16 \(HxW\) = 256 pixels, over the limit of 100"):
        ds.get(0)


# ---------------------------------------------------------------------------------------------------- C18 dtypes
@pytest.mark.parametrize(
    "values, match",
    [
        (np.array([[0.0, 6.7], [1.0, 2.0]]), r"holds 6\.7 at pixel \(y=0, x=1\) \(1 pixels are not whole numbers\)"),
        (np.array([[0.0, np.nan], [np.nan, 2.0]], dtype=np.float32), r"holds NaN at pixel \(y=0, x=1\) \(2 pixels\)"),
        (np.array([[0.0, 1.0], [np.inf, 2.0]]), r"holds infinity at pixel \(y=1, x=0\)"),
        (np.array([[True, False], [False, True]]), r"holds booleans \(dtype bool\), not class ids"),
        (np.array([[1e20, 0.0], [0.0, 0.0]]), r"holds 1e\+20 at pixel \(y=0, x=0\), far beyond any class id"),
        (np.array([[1 + 2j, 0], [0, 0]]), r"has dtype complex128, not integer class ids"),
        (np.array([[2**63, 0], [0, 0]], dtype=np.uint64), r"holds id 9223372036854775808, far beyond"),
    ],
    ids=["fraction", "nan", "inf", "bool", "huge", "complex", "uint64"],
)
def test_npy_maps_that_are_not_integer_ids_are_refused(tmp_path, values, match):
    np.save(tmp_path / "m.npy", values)
    with pytest.raises(LabelMapError, match=match):
        load_label_map(tmp_path / "m.npy", TOY)
    with pytest.raises(LabelMapError, match=match):  # without a label set too: the dtype check is the reader's
        load_label_map(tmp_path / "m.npy")


def test_whole_number_float_maps_are_accepted(tmp_path):
    ids = np.array([[0, 1], [7, 255]])
    np.save(tmp_path / "m.npy", ids.astype(np.float32))  # a float tensor saved as it is
    got = load_label_map(tmp_path / "m.npy", TOY)
    assert got.dtype == np.int64 and np.array_equal(got, ids)
