"""Reading and writing label maps: id PNGs, colour PNGs, .npy; snapping; errors that say what and where."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from layout2image.core.errors import LabelMapError
from layout2image.core.labels import (
    colorize,
    decode_colors,
    get_label_set,
    load_label_map,
    read_label_map,
    save_label_map,
)

CS = get_label_set("cityscapes")
ADE = get_label_set("ade20k")


def test_cityscapes_label_ids_png_converts_to_train_ids(tmp_path):
    raw = np.arange(34, dtype=np.uint8).reshape(2, 17)
    path = tmp_path / "berlin_000000_000019_gtFine_labelIds.png"
    Image.fromarray(raw, mode="L").save(path)
    ids = load_label_map(path, CS, apply_remap=True)
    expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
                27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
    assert ids.dtype == np.int64
    assert ids.reshape(-1).tolist() == [expected.get(r, 255) for r in range(34)]


def test_cityscapes_train_ids_and_colours_round_trip(tmp_path):
    ids = np.array([list(range(19)) + [255]] * 3, dtype=np.int64)
    rgb = colorize(ids, CS)
    assert rgb[0, 0].tolist() == [128, 64, 128] and rgb[0, -1].tolist() == [0, 0, 0]
    Image.fromarray(rgb).save(tmp_path / "c.png")
    back = load_label_map(tmp_path / "c.png", CS)
    assert np.array_equal(back, ids)  # black (ignore's colour) decodes back to ignore


def test_ade20k_colour_map_round_trips_except_the_declared_alias(tmp_path, l2i_caplog):
    ids = np.arange(150, dtype=np.int64).reshape(10, 15)
    Image.fromarray(colorize(ids, ADE)).save(tmp_path / "ade.png")
    result = read_label_map(tmp_path / "ade.png", ADE)
    assert result.kind == "colors"
    expected = ids.copy()
    expected[ids == 48] = 6  # skyscraper shares road's colour and decodes as road, as the set declares
    assert np.array_equal(result.ids, expected)
    assert result.report.aliased == {(140, 140, 140): "road"}
    assert "shared by classes (road, skyscraper)" in l2i_caplog.text
    # The warning is given once, not per read.
    l2i_caplog.clear()
    read_label_map(tmp_path / "ade.png", ADE)
    assert "shared by classes" not in l2i_caplog.text
    # ids -> colours -> ids is exact for every class but the aliased one
    assert np.array_equal(colorize(result.ids, ADE)[ids != 48], colorize(ids, ADE)[ids != 48])


def test_ids_png_round_trip_is_palette_mode(tmp_path):
    ids = np.array([[0, 1, 2], [255, 18, 3]])
    path = save_label_map(tmp_path / "ids.png", ids, CS)
    img = Image.open(path)
    assert img.mode == "P"
    assert img.getpalette()[:3] == [128, 64, 128]
    assert np.array_equal(load_label_map(path, CS), ids)


def test_large_sets_use_16_bit_png(tmp_path):
    from layout2image.core.labels import LabelSet

    big = LabelSet(name="big", names=tuple(f"c{i}" for i in range(300)),
                   palette=np.stack([np.arange(300) % 256, np.arange(300) // 256, np.zeros(300)], 1), ignore_index=300)  # fmt: skip
    ids = np.array([[0, 299, 300]])
    path = save_label_map(tmp_path / "big.png", ids, big)
    assert Image.open(path).mode.startswith("I")
    assert np.array_equal(load_label_map(path, big), ids)


def test_npy_round_trip_and_shape_error(tmp_path):
    ids = np.array([[0, 5], [255, 18]])
    save_label_map(tmp_path / "a.npy", ids, CS)
    assert np.array_equal(load_label_map(tmp_path / "a.npy", CS), ids)
    np.save(tmp_path / "b.npy", np.zeros((2, 2, 2), dtype=np.int64))
    with pytest.raises(LabelMapError, match=r"b.npy'.*must be 2-D \(H, W\).*\(2, 2, 2\)"):
        load_label_map(tmp_path / "b.npy", CS)


def test_snapping_tolerance():
    road = np.array(CS.palette[0], dtype=np.int64)
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[:] = road
    rgb[0, 1] = road + [3, -4, 0]  # distance 5
    with pytest.raises(LabelMapError, match=r"colour \[131, 60, 128\]: 1 px, first at \(row 0, col 1\)"):
        decode_colors(rgb, CS, tolerance=4.9)
    ids, report = decode_colors(rgb, CS, tolerance=5.0)
    assert (ids == 0).all() and report.snapped_pixels == 1 and report.exact_pixels == 3


def test_unknown_colours_error_reports_colour_count_and_place(tmp_path):
    rgb = colorize(np.zeros((8, 8), dtype=np.int64), CS)
    rgb[2:4, 5:7] = [1, 254, 1]
    Image.fromarray(rgb).save(tmp_path / "paint.png")
    with pytest.raises(LabelMapError) as err:
        read_label_map(tmp_path / "paint.png", CS)
    msg = str(err.value)
    assert "paint.png" in msg and "[1, 254, 1]: 4 px, first at (row 2, col 5)" in msg
    assert "box rows 2..3 cols 5..6" in msg and "unknown='ignore'" in msg
    # the caller may map them to ignore instead
    result = read_label_map(tmp_path / "paint.png", CS, unknown="ignore")
    assert (result.ids[2:4, 5:7] == 255).all() and result.report.unknown_pixels == 4
    # or allow a small share
    ok = read_label_map(tmp_path / "paint.png", CS, max_unknown_fraction=0.1)
    assert ok.report.unknown_fraction == pytest.approx(4 / 64)


def test_out_of_range_id_is_an_error_naming_place(tmp_path):
    ids = np.zeros((4, 6), dtype=np.uint8)
    ids[1, 3] = 200
    Image.fromarray(ids, mode="L").save(tmp_path / "ids.png")
    with pytest.raises(LabelMapError, match=r"ids.png'.*id 200 at \(row 1, col 3\) is out of range for label set "
                       r"'cityscapes' \(19 classes: ids 0..18, ignore 255\)"):  # fmt: skip
        load_label_map(tmp_path / "ids.png", CS)


def test_four_channel_png_is_an_error(tmp_path):
    Image.new("RGBA", (4, 4), (128, 64, 128, 255)).save(tmp_path / "rgba.png")
    with pytest.raises(LabelMapError, match=r"rgba.png' has 4 channels \(mode RGBA, with alpha\)"):
        load_label_map(tmp_path / "rgba.png", CS)


@pytest.mark.parametrize(
    "content, message", [(b"", "is empty (0 bytes)"), (b"\x89PNG garbage", "is not a readable image")]
)
def test_empty_or_corrupt_files_are_errors(tmp_path, content, message):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(LabelMapError, match=rf"broken.png' {message.replace('(', '[(]').replace(')', '[)]')}"):
        load_label_map(path, CS)


def test_missing_file_and_colour_map_without_label_set(tmp_path):
    with pytest.raises(LabelMapError, match="does not exist"):
        load_label_map(tmp_path / "nope.png", CS)
    Image.new("RGB", (2, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(LabelMapError, match="is a colour image; pass the label set"):
        load_label_map(tmp_path / "rgb.png")


def test_save_rejects_out_of_range_and_bad_suffix(tmp_path):
    with pytest.raises(LabelMapError, match="id 19 at"):
        save_label_map(tmp_path / "x.png", np.array([[19]]), CS)
    with pytest.raises(LabelMapError, match="use a .png or .npy"):
        save_label_map(tmp_path / "x.jpg", np.array([[1]]), CS)
    assert not list(tmp_path.iterdir())  # nothing half-written


label_maps = arrays(
    np.int64, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.sampled_from(list(range(19)) + [255])
)


@settings(max_examples=40, deadline=None)
@given(ids=label_maps)
def test_property_ids_png_ids_round_trip(tmp_path_factory, ids):
    path = tmp_path_factory.mktemp("rt") / "m.png"
    save_label_map(path, ids, CS)
    assert np.array_equal(load_label_map(path, CS), ids)


@settings(max_examples=40, deadline=None)
@given(ids=arrays(np.int64, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 18)))
def test_property_colours_ids_colours_round_trip(ids):
    rgb = colorize(ids, CS)
    back, report = decode_colors(rgb, CS)
    assert np.array_equal(back, ids) and report.exact_pixels == ids.size
    assert np.array_equal(colorize(back, CS), rgb)
