"""The joint image/label pipeline: resize (image LANCZOS or bicubic, label nearest), crop, horizontal flip.

Every random choice comes from a numpy `Generator` seeded with ``(seed, epoch, index)``, so sample `index` of
epoch `epoch` gets the same crop and flip in every run, in every DataLoader worker and after a resume. The
choices are made first, from the sizes alone (`TransformConfig.plan`), and then applied to the pixels
(`TransformConfig.apply`); the plan is what the latent cache keys on and what a sample reports (``crop``,
``flipped``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...core.labels import joint_crop, joint_hflip, resize_nearest

__all__ = ["CROP_MODES", "INTERPOLATIONS", "RESIZE_MODES", "TransformConfig", "TransformPlan", "default_transform"]

RESIZE_MODES = ("shorter", "exact", "none")
CROP_MODES = ("random", "center", "none")
INTERPOLATIONS = ("lanczos", "bicubic", "bilinear", "box")
# The VAE of Stable Diffusion downsamples by 8; a crop that is not a multiple of 8 gives latents that do not
# line up with the label map.
SIZE_MULTIPLE = 8


def _as_size(value: Any, name: str, multiple: int = 1) -> tuple[int, int]:
    """``512`` -> ``(512, 512)``; ``[h, w]`` -> ``(h, w)``; raises `ValueError` naming ``name`` otherwise."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        size = (int(value), int(value))
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        size = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name}={value!r} must be one positive integer or two, [height, width]")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"{name}={value!r} must be positive")
    if size[0] % multiple or size[1] % multiple:
        raise ValueError(
            f"{name}={value!r} must be a multiple of {multiple} in both dimensions (the VAE downsamples by "
            f"{multiple}); e.g. {[max(multiple, s // multiple * multiple) for s in size]}"
        )
    return size


@dataclass(frozen=True)
class TransformPlan:
    """The geometric choices for one sample, decided from sizes alone.

    Args:
        original_size (`tuple[int, int]`): `(H, W)` of the files.
        resized_size (`tuple[int, int]`): `(H, W)` after resizing.
        crop (`tuple[int, int, int, int]`): `(top, left, height, width)` in resized pixels; the whole image when
            there is no crop.
        flipped (`bool`): whether the crop is mirrored left-right.
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop: tuple[int, int, int, int]
    flipped: bool

    @property
    def output_size(self) -> tuple[int, int]:
        """`(H, W)` of the transformed sample."""
        return (self.crop[2], self.crop[3])


@dataclass
class TransformConfig:
    """How a sample's image and label map are resized, cropped and flipped, jointly.

    Order: resize, then crop to ``resolution``, then flip. Labels are always resized by nearest sampling
    (`resize_nearest`), so no class is invented at boundaries.
    """

    resolution: int | tuple[int, int] | None = field(
        default=512,
        metadata={
            "help": "Output size in pixels: one integer for a square or [height, width]; a multiple of 8. "
            "None keeps the resized size (then crop must be 'none')."
        },
    )
    resize: str = field(
        default="shorter",
        metadata={
            "help": "'shorter': scale keeping the aspect ratio so the shorter side is resize_to (by default the "
            "smallest scale whose result covers resolution); 'exact': resize to resize_to (default: resolution), "
            "ignoring the aspect ratio (ALDM's ADE20K recipe); 'none': keep the file size."
        },
    )
    resize_to: int | tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "Target of the resize: the shorter side for 'shorter' (an integer), [height, width] for "
            "'exact' (e.g. [512, 1024] for ALDM's Cityscapes). None: derived from resolution."
        },
    )
    crop: str = field(
        default="random",
        metadata={
            "help": "'random': a crop of resolution at a uniformly drawn offset (training); 'center': the "
            "centred crop (validation); 'none': no crop."
        },
    )
    flip_prob: float = field(
        default=0.5, metadata={"help": "Probability of a joint left-right flip, in [0, 1]; 0 for validation."}
    )
    interpolation: str = field(
        default="lanczos",
        metadata={"help": "Image resampling filter: 'lanczos', 'bicubic', 'bilinear' or 'box'. Labels use nearest."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Augmentation seed: sample i of epoch e is transformed with rng(seed, e, i)."},
    )

    def __post_init__(self) -> None:
        if self.resolution is not None:
            self.resolution = _as_size(self.resolution, "resolution", SIZE_MULTIPLE)
        if self.resize == "shorter":
            if self.resize_to is not None and (
                isinstance(self.resize_to, bool) or not isinstance(self.resize_to, (int, np.integer))
            ):
                raise ValueError(
                    f"resize_to={self.resize_to!r} must be one integer (the shorter side) with resize='shorter'; "
                    "use resize='exact' for [height, width]"
                )
            if self.resize_to is not None:
                if int(self.resize_to) <= 0:
                    raise ValueError(f"resize_to={self.resize_to!r} must be positive")
                self.resize_to = int(self.resize_to)
            elif self.resolution is None:
                raise ValueError("resize='shorter' needs resize_to (the shorter side) or a resolution to cover")
        elif self.resize == "exact":
            if self.resize_to is not None:
                self.resize_to = _as_size(self.resize_to, "resize_to")
            elif self.resolution is None:
                raise ValueError("resize='exact' needs resize_to=[height, width] or a resolution")
        elif self.resize == "none":
            if self.resize_to is not None:
                raise ValueError(f"resize_to={self.resize_to!r} has no effect with resize='none'; remove it")
        else:
            raise ValueError(f"resize={self.resize!r} is not valid; use one of {list(RESIZE_MODES)}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop={self.crop!r} is not valid; use one of {list(CROP_MODES)}")
        if self.crop != "none" and self.resolution is None:
            raise ValueError(f"crop={self.crop!r} needs a resolution to crop to; set resolution or crop='none'")
        if isinstance(self.flip_prob, bool) or not isinstance(self.flip_prob, (int, float)):
            raise ValueError(f"flip_prob={self.flip_prob!r} must be a number in [0, 1]")
        if not 0.0 <= float(self.flip_prob) <= 1.0:
            raise ValueError(f"flip_prob={self.flip_prob!r} must lie in [0, 1]")
        self.flip_prob = float(self.flip_prob)
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={self.interpolation!r} is not valid; use one of {list(INTERPOLATIONS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be a non-negative integer")
        self.seed = int(self.seed)

    # ------------------------------------------------------------------ variants
    def for_validation(self) -> TransformConfig:
        """A copy for validation: a random crop becomes the centre crop and nothing is flipped."""
        return dataclasses.replace(self, crop="center" if self.crop == "random" else self.crop, flip_prob=0.0)

    @property
    def is_random(self) -> bool:
        """Whether samples differ between epochs (random crop or flip)."""
        return self.crop == "random" or self.flip_prob > 0

    def describe(self) -> str:
        """A short stable text of every setting that shapes the pixels (part of the latent cache key)."""
        return (
            f"resolution={self.resolution};resize={self.resize};resize_to={self.resize_to};crop={self.crop};"
            f"interpolation={self.interpolation}"
        )

    # ------------------------------------------------------------------ planning
    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """`(H, W)` after the resize step for a file of size ``size``."""
        h, w = int(size[0]), int(size[1])
        if self.resize == "none":
            return (h, w)
        if self.resize == "exact":
            return tuple(self.resize_to if self.resize_to is not None else self.resolution)  # type: ignore[return-value]
        if self.resize_to is not None:
            scale = self.resize_to / min(h, w)
            out = (max(1, round(h * scale)), max(1, round(w * scale)))
            # Pin the shorter side exactly (rounding could miss it by one).
            return (self.resize_to, out[1]) if h <= w else (out[0], self.resize_to)
        rh, rw = self.resolution  # type: ignore[misc]
        scale = max(rh / h, rw / w)
        return (max(rh, round(h * scale)), max(rw, round(w * scale)))

    def check_fits(self, size: tuple[int, int], source: str = "sample") -> tuple[int, int]:
        """The resized size of a file of size ``size``; raises `ValueError` when the crop does not fit in it."""
        resized = self.resized_size(size)
        if self.crop != "none":
            (ch, cw), (h, w) = self.resolution, resized  # type: ignore[misc]
            if ch > h or cw > w:
                raise ValueError(
                    f"{source}: the crop {ch}x{cw} (resolution) is larger than the image after resizing, {h}x{w} "
                    f"(file size {size[0]}x{size[1]}, resize={self.resize!r}, resize_to={self.resize_to}); resize "
                    "to a larger size or lower the resolution"
                )
        return resized

    def plan(self, size: tuple[int, int], index: int, epoch: int = 0, source: str = "sample") -> TransformPlan:
        """Decide the resize, crop and flip of sample ``index`` in epoch ``epoch``.

        The generator is ``np.random.default_rng([seed, epoch, index])``; draws are made in the order of
        `random_joint_crop_flip` (crop top, crop left, then the flip), so both give the same result.

        Args:
            size (`tuple[int, int]`): `(H, W)` of the image file.
            index (`int`): sample index in its dataset (non-negative).
            epoch (`int`, defaults to 0): epoch number (non-negative).
            source (`str`): what the sample is (a file name), for error messages.

        Raises:
            ValueError: the crop does not fit inside the resized image.
        """
        if index < 0 or epoch < 0:
            raise ValueError(f"index={index} and epoch={epoch} must be non-negative")
        resized = self.check_fits(size, source)
        h, w = resized
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        if self.crop == "none":
            box = (0, 0, h, w)
        else:
            ch, cw = self.resolution  # type: ignore[misc]
            if self.crop == "random":
                top = int(rng.integers(0, h - ch + 1))
                left = int(rng.integers(0, w - cw + 1))
            else:
                top, left = (h - ch) // 2, (w - cw) // 2
            box = (top, left, ch, cw)
        flipped = bool(self.flip_prob > 0 and rng.random() < self.flip_prob)
        return TransformPlan(
            original_size=(int(size[0]), int(size[1])), resized_size=resized, crop=box, flipped=flipped
        )

    # ------------------------------------------------------------------ applying
    def apply(self, image: Any, labels: np.ndarray, plan: TransformPlan) -> tuple[np.ndarray, np.ndarray]:
        """Resize, crop and flip an image and its label map as ``plan`` says.

        Args:
            image (`PIL.Image.Image` or `np.ndarray`): RGB, `(H, W, 3)` uint8 for arrays.
            labels (`np.ndarray`): `(H, W)` int64 class ids with the ignore id.
            plan (`TransformPlan`): from `plan`, for this image's size.

        Returns:
            `(image, labels)`: `(h, w, 3)` uint8 and `(h, w)` int64, both C-contiguous.
        """
        from PIL import Image

        if isinstance(image, np.ndarray):
            image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
        if (image.height, image.width) != plan.original_size or tuple(labels.shape) != plan.original_size:
            raise ValueError(
                f"image {image.height}x{image.width} and labels {labels.shape[0]}x{labels.shape[1]} do not match "
                f"the planned size {plan.original_size[0]}x{plan.original_size[1]}"
            )
        h, w = plan.resized_size
        if (image.height, image.width) != (h, w):
            resample = {
                "lanczos": Image.Resampling.LANCZOS,
                "bicubic": Image.Resampling.BICUBIC,
                "bilinear": Image.Resampling.BILINEAR,
                "box": Image.Resampling.BOX,
            }[self.interpolation]
            image = image.resize((w, h), resample=resample)
        img = np.array(image, dtype=np.uint8)  # a writable copy (np.asarray of a PIL image is read-only)
        lab = resize_nearest(labels, (h, w))
        top, left, ch, cw = plan.crop
        if (top, left, ch, cw) != (0, 0, h, w):
            img, lab = joint_crop(img, lab, top, left, ch, cw)
        if plan.flipped:
            img, lab = joint_hflip(img, lab)
        return np.ascontiguousarray(img), np.ascontiguousarray(lab, dtype=np.int64)


def default_transform(fmt: str, resolution: int = 512) -> TransformConfig:
    """The ALDM recipe for a dataset format, at ``resolution`` (512 in the paper).

    - ``cityscapes``: resize to ``resolution x 2*resolution`` (512x1024), random ``resolution`` square crop, flip 0.5.
    - ``ade20k`` and ``coco_stuff``: resize to ``resolution`` square ignoring the aspect ratio, no crop, flip 0.5.
    - ``folder``: shorter side to ``resolution``, random square crop, flip 0.5.
    """
    if fmt == "cityscapes":
        return TransformConfig(resolution=resolution, resize="exact", resize_to=(resolution, 2 * resolution))
    if fmt in ("ade20k", "coco_stuff"):
        return TransformConfig(resolution=resolution, resize="exact", crop="none")
    if fmt == "folder":
        return TransformConfig(resolution=resolution)
    else:
        raise ValueError(
            f"format={fmt!r} has no default transform; formats are folder, cityscapes, ade20k, coco_stuff"
        )
