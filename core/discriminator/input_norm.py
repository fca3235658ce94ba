"""How the discriminator turns images in [-1, 1] into what its backbone was trained on.

Our images (decoded latents, dataset images) are ``(B, 3, H, W)`` float in [-1, 1]. The discriminator maps them to
[0, 1] and then applies the backbone's own normalisation ``(x01 - mean) / std``. ALDM fed [-1, 1] straight into
an ImageNet-normalised segmenter on Cityscapes (aldm.md §12 pitfall 8); here the mode is explicit:

- ``"imagenet"``: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225); what SegFormer, UperNet-ConvNeXt and
  UperNet-Swin checkpoints in transformers were trained with.
- ``"half"``: mean 0.5, std 0.5, i.e. the [-1, 1] image unchanged (for a discriminator trained from scratch on it).
- ``"auto"``: a saved discriminator's own setting, else the folder's ``preprocessor_config.json``
  (``image_mean``/``image_std``, honouring ``do_normalize``/``do_rescale``/``rescale_factor``), else ImageNet.
- an [`InputNorm`] or a ``(mean, std)`` pair of 3-tuples for anything else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DiscriminatorError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INPUT_NORMS", "InputNorm", "InputNormSpec", "resolve_input_norm"]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_NORMS = ("auto", "half", "imagenet")
PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class InputNorm:
    """Per-channel normalisation applied to an image in [0, 1]: ``(x01 - mean) / std``.

    Args:
        mean (`tuple[float, float, float]`): RGB mean in [0, 1] units.
        std (`tuple[float, float, float]`): RGB std in [0, 1] units, all > 0.
        source (`str`): where it came from (``"imagenet"``, ``"half"``, a file path, ``"user"``), for logs.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str = "user"

    def __post_init__(self) -> None:
        for field_name in ("mean", "std"):
            value = getattr(self, field_name)
            ok = isinstance(value, Sequence) and len(value) == 3
            ok = ok and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
            if not ok:
                raise DiscriminatorError(
                    f"InputNorm `{field_name}` must be three finite numbers (R, G, B), got {value!r}."
                )
            object.__setattr__(self, field_name, tuple(float(v) for v in value))
        if any(s <= 0 for s in self.std):
            raise DiscriminatorError(f"InputNorm `std` must be > 0 per channel, got {self.std!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"input_mean": list(self.mean), "input_std": list(self.std)}


InputNormSpec = str | InputNorm | tuple[Sequence[float], Sequence[float]]


def _from_preprocessor(path: Path) -> InputNorm:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DiscriminatorError(f"Cannot read the image processor config {path}: {err}") from err
    # The processor computes ((pixel255 * scale) - mean) / std with scale = rescale_factor (default 1/255) when
    # do_rescale, else 1. In [0, 1] units that is (x01 - mean / (255 scale)) / (std / (255 scale)).
    scale = 255.0 * float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 255.0
    if cfg.get("do_normalize", True):
        mean = cfg.get("image_mean", IMAGENET_MEAN)
        std = cfg.get("image_std", IMAGENET_STD)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if isinstance(mean, (int, float)):
        mean = (mean,) * 3
    if isinstance(std, (int, float)):
        std = (std,) * 3
    return InputNorm(tuple(m / scale for m in mean), tuple(s / scale for s in std), source=str(path))


def resolve_input_norm(
    spec: InputNormSpec, folder: str | Path | None = None, saved: dict[str, Any] | None = None
) -> InputNorm:
    """Turn an ``input_norm`` argument into an [`InputNorm`].

    Args:
        spec (`str`, `InputNorm` or `(mean, std)`): ``"auto"``, ``"imagenet"``, ``"half"`` or explicit values.
        folder (`str` or `Path`, *optional*): the pretrained folder, searched for ``preprocessor_config.json``
            under ``"auto"``.
        saved (`dict`, *optional*): a saved discriminator's ``input_mean``/``input_std``, preferred under
            ``"auto"``.
    """
    if isinstance(spec, InputNorm):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2 and not isinstance(spec[0], str):
        return InputNorm(tuple(spec[0]), tuple(spec[1]), source="user")
    if spec == "imagenet":
        return InputNorm(IMAGENET_MEAN, IMAGENET_STD, source="imagenet")
    if spec == "half":
        return InputNorm((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), source="half")
    if spec == "auto":
        if saved is not None:
            return InputNorm(tuple(saved["input_mean"]), tuple(saved["input_std"]), source="saved discriminator")
        if folder is not None and (Path(folder) / PREPROCESSOR_FILE).is_file():
            return _from_preprocessor(Path(folder) / PREPROCESSOR_FILE)
        return InputNorm(IMAGENET_MEAN, IMAGENET_STD, source="imagenet")
    raise DiscriminatorError(
        f"`input_norm` must be one of {list(INPUT_NORMS)}, an InputNorm or a (mean, std) pair, got {spec!r}."
    )
