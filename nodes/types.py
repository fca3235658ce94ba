"""Socket types of the pack and conversions between ComfyUI tensors and ``core``'s arrays.

A label map travels between nodes as ``L2I_LABEL_MAP`` (never disguised as an IMAGE): a `LabelMap` holding the
class ids, the label set they index and (through it) the ignore id. A label set travels alone as
``L2I_LABEL_SET``. The toy world's loaded models (`layout2image.core.toy.generate.ToyModels`) travel as
``L2I_TOY_WORLD``. ComfyUI's own types are:

- IMAGE: `(B, H, W, C)` float32 in [0, 1] (C = 3 for RGB);
- MASK: `(B, H, W)` (or `(H, W)`) float32 in [0, 1];
- LATENT: ``{"samples": (B, 4, H / 8, W / 8), ...}``.

Nodes never modify a tensor they were given: every helper here returns new tensors or arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from comfy_api.latest import io

from ..core.labels import LabelSet, check_ids

__all__ = [
    "LABEL_MAP_TYPE",
    "LABEL_SET_TYPE",
    "TOY_WORLD_TYPE",
    "LabelMap",
    "LabelMapType",
    "LabelSetType",
    "ToyWorldType",
    "image_from_uint8",
    "image_to_uint8",
    "latent_image_size",
    "mask_to_bool",
]

LABEL_MAP_TYPE = "L2I_LABEL_MAP"
LABEL_SET_TYPE = "L2I_LABEL_SET"
TOY_WORLD_TYPE = "L2I_TOY_WORLD"

#: Socket type of a `LabelMap` (``io.LabelMapType.Input("label_map")``).
LabelMapType = io.Custom(LABEL_MAP_TYPE)
#: Socket type of a `LabelSet`.
LabelSetType = io.Custom(LABEL_SET_TYPE)
#: Socket type of the toy world's loaded models (a `ToyModels`, from the Toy World Loader).
ToyWorldType = io.Custom(TOY_WORLD_TYPE)


@dataclass(frozen=True, eq=False)
class LabelMap:
    """A batch of label maps on an ``L2I_LABEL_MAP`` socket.

    Args:
        ids (`torch.Tensor`): `(B, H, W)` int64 class ids on the CPU, each in ``0..N-1`` or the label set's
            ignore id. Nodes treat it as read-only and build new maps instead of editing it.
        label_set (`LabelSet`): the classes the ids index (names, palette, ignore id).
    """

    ids: torch.Tensor
    label_set: LabelSet

    def __post_init__(self) -> None:
        if not isinstance(self.label_set, LabelSet):
            raise TypeError(f"`label_set` must be a LabelSet, got {type(self.label_set).__name__}")
        if not isinstance(self.ids, torch.Tensor) or self.ids.ndim != 3:
            got = tuple(self.ids.shape) if isinstance(self.ids, torch.Tensor) else type(self.ids).__name__
            raise ValueError(f"a label map's `ids` must be a (B, H, W) tensor, got {got}")
        if min(self.ids.shape) < 1:
            raise ValueError(f"a label map's `ids` must not be empty, got shape {tuple(self.ids.shape)}")
        # check_ids names the first out-of-range id, its position and the valid range.
        checked = check_ids(self.ids.detach().cpu().numpy(), self.label_set, source="label map")
        # A private copy: the map never aliases a tensor some other node still holds.
        object.__setattr__(self, "ids", torch.from_numpy(np.array(checked, dtype=np.int64, copy=True)))

    @classmethod
    def from_numpy(cls, ids: np.ndarray, label_set: LabelSet) -> LabelMap:
        """Build from `(H, W)` or `(B, H, W)` integer ids (copied)."""
        arr = np.asarray(ids)
        if arr.ndim == 2:
            arr = arr[None]
        checked = check_ids(arr, label_set, source="label map")  # any integer dtype -> int64
        return cls(torch.from_numpy(np.array(checked, dtype=np.int64, copy=True)), label_set)

    @property
    def ignore_index(self) -> int:
        """The id of unlabelled pixels (the label set's)."""
        return self.label_set.ignore_index

    @property
    def batch_size(self) -> int:
        return int(self.ids.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """`(H, W)` in pixels."""
        return int(self.ids.shape[1]), int(self.ids.shape[2])

    def numpy(self) -> np.ndarray:
        """`(B, H, W)` int64 copy of the ids."""
        return self.ids.numpy().copy()

    def present_classes(self) -> list[int]:
        """Sorted class ids that occur anywhere in the batch (the ignore id excluded)."""
        values = torch.unique(self.ids).tolist()
        return [int(v) for v in values if v != self.ignore_index]

    def __repr__(self) -> str:
        b, h, w = self.ids.shape
        return f"LabelMap(batch={b}, size={h}x{w}, label_set={self.label_set.name!r})"


def image_to_uint8(image: torch.Tensor, name: str = "image") -> np.ndarray:
    """A ComfyUI IMAGE as `(B, H, W, 3)` uint8 RGB (rounded, clamped to [0, 255]).

    Args:
        image (`torch.Tensor`): `(B, H, W, C)` or `(H, W, C)` float in [0, 1]; C = 3, or 4 (alpha dropped), or 1
            (grey, repeated).
        name (`str`): the input's name, for messages.
    """
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"`{name}` must be a ComfyUI IMAGE (B, H, W, C) tensor, got {got}")
    if image.ndim == 3:
        image = image[None]
    channels = image.shape[-1]
    if channels == 4:
        image = image[..., :3]
    elif channels == 1:
        image = image.expand(-1, -1, -1, 3)
    elif channels != 3:
        raise ValueError(
            f"`{name}` has {channels} channels (shape {tuple(image.shape)}); an IMAGE must be (B, H, W, 3) RGB"
        )
    arr = image.detach().float().cpu().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return arr.numpy()


def image_from_uint8(rgb: np.ndarray) -> torch.Tensor:
    """`(H, W, 3)` or `(B, H, W, 3)` uint8 -> a ComfyUI IMAGE `(B, H, W, 3)` float32 in [0, 1]."""
    arr = np.asarray(rgb)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) uint8 RGB, got shape {arr.shape}")
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).float().div(255.0)


def mask_to_bool(mask: torch.Tensor, name: str = "mask", threshold: float = 0.5) -> torch.Tensor:
    """A ComfyUI MASK as `(B, H, W)` bool (True where the mask is above ``threshold``), on the CPU.

    Args:
        mask (`torch.Tensor`): `(B, H, W)` or `(H, W)` float in [0, 1].
        name (`str`): the input's name, for messages.
        threshold (`float`, defaults to 0.5): values strictly above it count as inside.
    """
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"`{name}` must be a ComfyUI MASK (B, H, W) tensor, got {got}")
    if mask.ndim == 2:
        mask = mask[None]
    return mask.detach().cpu().float() > threshold


def latent_image_size(latent: dict, name: str = "latent", scale: int = 8) -> tuple[int, int]:
    """The image size `(H, W)` a LATENT decodes to: its spatial size times ``scale`` (8 for SD's VAE)."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim < 4:
        raise ValueError(f"`{name}` must be a ComfyUI LATENT dict with 'samples' (B, C, h, w)")
    return int(samples.shape[-2]) * scale, int(samples.shape[-1]) * scale
