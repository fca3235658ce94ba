"""Layout encoders: class-id maps -> the tensors that ControlNets, SPADE and adapters read.

Three encodings, one per kind of hint block:

* palette RGB `(B, 3, H, W)` in [0, 1]: the universal ControlNet input (stock segmentation ControlNets read the
  ADE20K palette this way);
* one-hot `(B, N (+1 edge), H, W)`: SDM's input, and an N-channel ControlNet variant;
* class embeddings `(B, D, H/4, W/4)`: ALDM's native hint, a per-pixel lookup into an `(N + 1, D)` table of text
  embeddings of the class names whose last row is the null embedding for ignore pixels.

The all-zero tensor of the same shape is the *null layout* used for classifier-free guidance over the layout.
"""

from __future__ import annotations

import torch

from ..labels.labelset import LabelSet
from ..labels.ops import edge_map

__all__ = ["class_embedding_hint", "null_layout_like", "one_hot", "palette_rgb", "validate_label_tensor"]


def validate_label_tensor(labels: torch.Tensor, num_classes: int, ignore_index: int, name: str = "labels") -> None:
    """Check a label batch: `(B, H, W)` integer ids in ``[0, num_classes)`` or ``ignore_index``.

    Raises:
        ValueError: naming the argument, the offending id and where it is.
    """
    if labels.ndim != 3:
        raise ValueError(f"{name} must have shape (B, H, W), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    bad = (labels < 0) | ((labels >= num_classes) & (labels != ignore_index))
    if bool(bad.any()):
        b, y, x = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"{name}: id {int(labels[b, y, x])} at (batch {b}, row {y}, col {x}) is out of range: ids must be "
            f"0..{num_classes - 1} or the ignore id {ignore_index} ({int(bad.sum())} bad pixel(s))"
        )


def palette_rgb(
    labels: torch.Tensor, label_set: LabelSet, ignore_color: tuple[int, int, int] = (0, 0, 0)
) -> torch.Tensor:
    """Palette colours as a ControlNet image hint.

    Args:
        labels (`torch.Tensor`): `(B, H, W)` int64 class ids with the label set's ignore id.
        label_set (`LabelSet`): the palette.
        ignore_color (`tuple[int, int, int]`, defaults to black): colour of ignore pixels.

    Returns:
        `torch.Tensor`: `(B, 3, H, W)` float32 in [0, 1] on ``labels.device``.
    """
    validate_label_tensor(labels, label_set.num_classes, label_set.ignore_index)
    lut = torch.zeros(max(label_set.num_classes, label_set.ignore_index + 1), 3, dtype=torch.float32)
    lut[: label_set.num_classes] = torch.tensor(label_set.palette.tolist(), dtype=torch.float32)
    lut[label_set.ignore_index] = torch.tensor(ignore_color, dtype=torch.float32)
    lut = (lut / 255.0).to(labels.device)
    return lut[labels].permute(0, 3, 1, 2).contiguous()


def one_hot(
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    *,
    with_edges: bool = False,
    instances: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One-hot layout, ignore pixels all zero, optionally with a boundary channel appended (SDM's input).

    Args:
        labels (`torch.Tensor`): `(B, H, W)` integer class ids.
        num_classes (`int`): N.
        ignore_index (`int`, defaults to 255): id whose pixels get an all-zero vector.
        with_edges (`bool`, defaults to False): append a channel that is 1 on 4-neighbour class (and instance)
            boundaries.
        instances (`torch.Tensor`, *optional*): `(B, H, W)` instance ids for the edge channel.
        dtype (`torch.dtype`, defaults to float32): output dtype.

    Returns:
        `torch.Tensor`: `(B, N, H, W)`, or `(B, N + 1, H, W)` with edges; values in {0, 1}.
    """
    validate_label_tensor(labels, num_classes, ignore_index)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    out = torch.nn.functional.one_hot(safe, num_classes).permute(0, 3, 1, 2).to(dtype)
    out = out * valid.unsqueeze(1).to(dtype)
    if with_edges:
        edges = edge_map(labels, instances).unsqueeze(1).to(dtype)
        out = torch.cat([out, edges], dim=1)
    return out.contiguous()


def class_embedding_hint(
    labels: torch.Tensor,
    table: torch.Tensor,
    ignore_index: int = 255,
    *,
    stride: int = 4,
) -> torch.Tensor:
    """ALDM's hint: per-pixel class embeddings at 1/``stride`` resolution.

    The label is subsampled first (``labels[:, ::stride, ::stride]``) and then looked up, which equals looking up
    at full resolution and nearest-downsampling, at a fraction of the memory (a 512x1024 map at D = 768 would
    otherwise be 1.6 GB in fp32).

    Args:
        labels (`torch.Tensor`): `(B, H, W)` integer class ids; H and W should be multiples of ``stride``
            (others are allowed and give ``ceil(H / stride)``).
        table (`torch.Tensor`): `(N + 1, D)` embeddings; row N is the null embedding used for ignore pixels.
        ignore_index (`int`, defaults to 255): id mapped to row N.
        stride (`int`, defaults to 4): subsampling factor.

    Returns:
        `torch.Tensor`: `(B, D, ceil(H / stride), ceil(W / stride))` in ``table.dtype`` on ``table.device``.
    """
    if table.ndim != 2 or table.shape[0] < 2:
        raise ValueError(f"table must have shape (N + 1, D) with a null row last, got {tuple(table.shape)}")
    if stride < 1:
        raise ValueError(f"stride={stride} must be a positive integer")
    num_classes = table.shape[0] - 1
    validate_label_tensor(labels, num_classes, ignore_index)
    sub = labels[:, ::stride, ::stride]
    idx = torch.where(sub == ignore_index, torch.full_like(sub, num_classes), sub).to(table.device)
    return table[idx].permute(0, 3, 1, 2).contiguous()


def null_layout_like(hint: torch.Tensor) -> torch.Tensor:
    """The null layout for classifier-free guidance over the layout: zeros shaped like ``hint``."""
    return torch.zeros_like(hint)
