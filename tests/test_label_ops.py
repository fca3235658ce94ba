"""Nearest resize, joint crop/flip, edge maps, preview pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from layout2image.core.labels import (
    edge_map,
    get_label_set,
    joint_crop,
    joint_hflip,
    legend_image,
    preview_grid,
    random_joint_crop_flip,
    resize_nearest,
)


@settings(max_examples=60, deadline=None)
@given(
    ids=arrays(np.int64, st.tuples(st.integers(1, 20), st.integers(1, 20)), elements=st.sampled_from([0, 3, 7, 255])),
    size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
)
def test_property_resize_never_invents_a_class(ids, size):
    out = resize_nearest(ids, size)
    assert out.shape == size and out.dtype == ids.dtype
    assert set(np.unique(out)) <= set(np.unique(ids))
    t = resize_nearest(torch.from_numpy(ids)[None], size)
    assert np.array_equal(t[0].numpy(), out)


def test_resize_integer_factors_are_exact():
    ids = np.arange(16).reshape(4, 4)
    up = resize_nearest(ids, (8, 8))
    assert np.array_equal(up, np.kron(ids, np.ones((2, 2), dtype=ids.dtype)))
    assert np.array_equal(resize_nearest(up, (4, 4)), ids)
    with pytest.raises(ValueError, match="size=.*positive"):
        resize_nearest(ids, (0, 4))


def test_joint_crop_and_flip_keep_image_and_label_aligned():
    label = np.arange(30).reshape(5, 6)
    image = np.stack([label * 2, label * 3, label * 5], axis=-1).astype(np.int64)
    img, lab = joint_crop(image, label, 1, 2, 3, 4)
    assert np.array_equal(img[..., 0], lab * 2)
    img2, lab2 = joint_hflip(img, lab)
    assert np.array_equal(lab2, lab[:, ::-1]) and np.array_equal(img2[..., 1], lab2 * 3)
    timg, tlab = joint_hflip(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(label))
    assert torch.equal(timg[2], tlab * 5)
    with pytest.raises(ValueError, match="does not fit"):
        joint_crop(image, label, 3, 3, 3, 4)
    with pytest.raises(ValueError, match="image size 5x7 differs from label size 5x6"):
        joint_crop(np.zeros((5, 7, 3)), label, 0, 0, 1, 1)


def test_random_crop_covers_every_offset_and_flips():
    label = np.arange(10)[None].repeat(2, 0)
    image = np.repeat(label[..., None], 3, axis=-1)
    rng = np.random.default_rng(0)
    lefts, flips = set(), 0
    for _ in range(300):
        img, lab = random_joint_crop_flip(image, label, (2, 4), rng, flip_prob=0.5)
        assert np.array_equal(img[..., 0], lab)
        flipped = lab[0, 0] > lab[0, -1]
        flips += flipped
        lefts.add(int(lab[0].min()))
    assert lefts == set(range(7))  # offsets 0..W-w all reached (ALDM's loader only reached the left 3/4)
    assert 100 < flips < 200
    with pytest.raises(ValueError, match="crop 3x4 is larger than the sample 2x10"):
        random_joint_crop_flip(image, label, (3, 4), rng)


def test_edge_map_marks_both_sides_of_class_and_instance_boundaries():
    ids = np.array([[0, 0, 1], [0, 0, 1], [2, 2, 2]])
    expected = np.array([[0, 1, 1], [1, 1, 1], [1, 1, 1]], dtype=bool)
    assert np.array_equal(edge_map(ids), expected)
    same = np.zeros((3, 3), dtype=np.int64)
    inst = np.array([[0, 0, 0], [0, 1, 1], [0, 1, 1]])
    assert edge_map(same).sum() == 0
    assert np.array_equal(edge_map(same, inst), np.array([[0, 1, 1], [1, 1, 1], [1, 1, 0]], dtype=bool))
    t = edge_map(torch.from_numpy(ids)[None])
    assert t.dtype == torch.bool and np.array_equal(t[0].numpy(), expected)


def test_preview_pictures_have_expected_layout():
    ls = get_label_set("cityscapes")
    ids = np.zeros((16, 20), dtype=np.int64)
    ids[8:] = 13
    img = np.full((16, 20, 3), 77, dtype=np.uint8)
    grid = preview_grid([ids, ids], ls, [img, img], legend=False)
    assert grid.shape == (2 * 18 + 2, 2 * 22 + 2, 3)
    assert grid[2, 2].tolist() == [128, 64, 128] and grid[12, 2].tolist() == [0, 0, 142]
    assert grid[2, 24].tolist() == [77, 77, 77]
    with_legend = preview_grid([ids], ls, [img])
    assert with_legend.shape[1] > grid.shape[1]
    leg = legend_image(ls, [0, 13])
    assert leg.dtype == np.uint8 and leg.shape[0] >= 2 * 14
    assert (leg == np.array([0, 0, 142], dtype=np.uint8)).all(-1).any()  # car's swatch is drawn
    with pytest.raises(ValueError, match="got 1 images for 2 label maps"):
        preview_grid([ids, ids], ls, [img])
