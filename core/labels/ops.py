"""Geometric operations on label maps that never invent a class: nearest resize, joint crop/flip, edges.

Everything here works on numpy arrays and torch tensors alike, on the last two dimensions `(..., H, W)`, so
one function serves the data pipeline (numpy, one sample) and the models (torch, batches).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

__all__ = ["edge_map", "joint_crop", "joint_hflip", "random_joint_crop_flip", "resize_nearest"]

Array = TypeVar("Array")


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    # Centre-aligned nearest sampling ("nearest-exact"): output pixel i reads input floor((i + 0.5) * n_in / n_out).
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def resize_nearest(ids: Array, size: tuple[int, int]) -> Array:
    """Resize class ids by nearest sampling; every output value is copied from an input pixel.

    Args:
        ids (`np.ndarray` or `torch.Tensor`): `(..., H, W)` ids (any dtype; also fine for images `(..., H, W)`).
        size (`tuple[int, int]`): output `(height, width)`.

    Returns:
        Same type and dtype, shape `(..., height, width)`.
    """
    height, width = int(size[0]), int(size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"size={size} must be two positive integers (height, width)")
    h_in, w_in = ids.shape[-2], ids.shape[-1]
    if (h_in, w_in) == (height, width):
        return ids
    rows = _nearest_indices(h_in, height)
    cols = _nearest_indices(w_in, width)
    if isinstance(ids, np.ndarray):
        return ids[..., rows[:, None], cols[None, :]]
    import torch

    r = torch.as_tensor(rows, device=ids.device)
    c = torch.as_tensor(cols, device=ids.device)
    return ids.index_select(-2, r).index_select(-1, c)


def joint_crop(image: Array, label: Array, top: int, left: int, height: int, width: int) -> tuple[Array, Array]:
    """Crop an image `(H, W, C)` (channels last, numpy) or `(..., C, H, W)` (torch) and its label `(..., H, W)`.

    The image and label must have the same spatial size; the crop must lie inside it.
    """
    lh, lw = label.shape[-2], label.shape[-1]
    ih, iw = _image_hw(image)
    if (ih, iw) != (lh, lw):
        raise ValueError(f"image size {ih}x{iw} differs from label size {lh}x{lw}; they must match to crop jointly")
    if top < 0 or left < 0 or top + height > lh or left + width > lw:
        raise ValueError(f"crop (top={top}, left={left}, {height}x{width}) does not fit inside {lh}x{lw}")
    lab = label[..., top : top + height, left : left + width]
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        img = image[top : top + height, left : left + width]
    else:
        img = image[..., top : top + height, left : left + width]
    return img, lab


def joint_hflip(image: Array, label: Array) -> tuple[Array, Array]:
    """Flip an image and its label left-right (layouts as in `joint_crop`)."""
    if isinstance(label, np.ndarray):
        lab = label[..., ::-1].copy()
    else:
        lab = label.flip(-1)
    if isinstance(image, np.ndarray):
        img = (image[:, ::-1] if image.ndim == 3 and image.shape[-1] in (1, 3, 4) else image[..., ::-1]).copy()
    else:
        img = image.flip(-1)
    return img, lab


def _image_hw(image) -> tuple[int, int]:
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        return image.shape[0], image.shape[1]
    return image.shape[-2], image.shape[-1]


def random_joint_crop_flip(
    image: Array,
    label: Array,
    crop: tuple[int, int] | None,
    rng: np.random.Generator,
    flip_prob: float = 0.5,
) -> tuple[Array, Array]:
    """Random crop of size ``crop`` (or none) then a left-right flip with probability ``flip_prob``.

    The crop offset is drawn uniformly over every valid position (the whole width, unlike ALDM's Cityscapes
    loader, which only reached the left three quarters).
    """
    if crop is not None:
        h, w = _image_hw(image)
        ch, cw = int(crop[0]), int(crop[1])
        if ch > h or cw > w:
            raise ValueError(f"crop {ch}x{cw} is larger than the sample {h}x{w}; resize first or crop smaller")
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        image, label = joint_crop(image, label, top, left, ch, cw)
    if flip_prob > 0 and rng.random() < flip_prob:
        image, label = joint_hflip(image, label)
    return image, label


def edge_map(ids: Array, instances: Array | None = None) -> Array:
    """4-neighbour boundary map: a pixel is an edge if a 4-neighbour has another class (or instance) id.

    Args:
        ids (`np.ndarray` or `torch.Tensor`): `(..., H, W)` class ids.
        instances (*optional*): `(..., H, W)` instance ids; boundaries between instances of one class count too.

    Returns:
        `(..., H, W)` bool (numpy) or bool tensor (torch).
    """
    maps = [ids] if instances is None else [ids, instances]
    if isinstance(ids, np.ndarray):
        edge = np.zeros(ids.shape, dtype=bool)
    else:
        import torch

        edge = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    for m in maps:
        dv = m[..., 1:, :] != m[..., :-1, :]
        dh = m[..., :, 1:] != m[..., :, :-1]
        edge[..., 1:, :] |= dv
        edge[..., :-1, :] |= dv
        edge[..., :, 1:] |= dh
        edge[..., :, :-1] |= dh
    return edge
