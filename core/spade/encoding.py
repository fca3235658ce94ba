"""The layout a SPADE adapter reads, encoded from label ids at the size of each feature map.

A patched UNet needs the layout at every GroupNorm site's own resolution (64/32/16/8 at 512², odd sizes
otherwise). ``SPADELayoutEncoder`` keeps the ids and encodes them per requested `(h, w)`: the ids are
nearest-resized first (``resize_layout``'s rule) and encoded after, which equals encoding at full resolution and
resizing the encoding (one-hot and embedding lookups are per pixel, so they commute with a nearest resize) without
ever building a full-size one-hot or embedding map. The edge channel of ``onehot_edges`` is computed on the
full-resolution ids and then resized, as in training.

Used by every ldm-UNet path (the ComfyUI Apply SPADE node and the A1111 script); the diffusers path encodes the
full-size layout itself and lets ``SPADELayoutContext`` resize it.
"""

from __future__ import annotations

import torch

from ..hints.encoders import class_embedding_hint, one_hot, validate_label_tensor
from ..labels.labelset import LabelSet
from ..labels.ops import edge_map
from .module import resize_layout

__all__ = ["SPADE_LAYOUT_ENCODINGS", "SPADELayoutEncoder"]

#: Layout encodings a SPADE adapter can read (the ``l2i.hint_encoding`` of a SPADE file).
SPADE_LAYOUT_ENCODINGS = ("embedding", "onehot", "onehot_edges")

_MAX_CACHED = 64


class SPADELayoutEncoder:
    """Label ids -> the SPADE layout at any size, cached per `(size, device)`.

    Args:
        ids (`torch.Tensor`): `(L, H, W)` int64 class ids in ``[0, N)`` or the label set's ignore id.
        label_set (`LabelSet`): the label set of the ids (N classes, ignore id).
        encoding (`str`): one of `SPADE_LAYOUT_ENCODINGS`: ``"onehot"`` (N channels, ignore pixels all zero),
            ``"onehot_edges"`` (N + 1, the last a class-boundary channel) or ``"embedding"`` (D channels looked up
            in ``table``, ignore pixels get the null row).
        table (`torch.Tensor`, *optional*): `(N + 1, D)` class-embedding table, required for ``"embedding"``.

    Raises:
        ValueError: unknown encoding, missing or misshapen table, or ids out of range (the message names the pixel).
    """

    def __init__(self, ids: torch.Tensor, label_set: LabelSet, encoding: str, table: torch.Tensor | None = None):
        if encoding not in SPADE_LAYOUT_ENCODINGS:
            raise ValueError(
                f"`encoding` {encoding!r} is not a SPADE layout encoding; use one of {SPADE_LAYOUT_ENCODINGS}"
            )
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"`ids` must be a (L, H, W) int64 tensor, got {type(ids).__name__}")
        validate_label_tensor(ids, label_set.num_classes, label_set.ignore_index, name="label map")
        if encoding == "embedding":
            if table is None:
                raise ValueError("the 'embedding' SPADE encoding needs its (N + 1, D) class-embedding table")
            if table.ndim != 2 or table.shape[0] != label_set.num_classes + 1:
                raise ValueError(
                    f"class-embedding table of shape {tuple(table.shape)} does not fit label set {label_set.name!r}: "
                    f"expected ({label_set.num_classes + 1}, D)"
                )
            table = table.detach().float()
        self.ids = ids.long()
        self.label_set = label_set
        self.encoding = encoding
        self.table = table
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def batch_size(self) -> int:
        """`L`, the number of label maps."""
        return int(self.ids.shape[0])

    @property
    def layout_channels(self) -> int:
        """``C_m`` of the encoding: N, N + 1 or the embedding width D."""
        if self.encoding == "onehot":
            return self.label_set.num_classes
        if self.encoding == "onehot_edges":
            return self.label_set.num_classes + 1
        return int(self.table.shape[1])

    def _cached(self, key: tuple, make) -> torch.Tensor:
        value = self._cache.get(key)
        if value is None:
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
            value = self._cache[key] = make()
        return value

    def at(self, size: tuple[int, int] | torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
        """The layout at ``size``.

        Args:
            size (`tuple[int, int]`): the feature map's `(h, w)`.
            device (`torch.device`): where the layout is wanted.

        Returns:
            `torch.Tensor`: `(L, C_m, h, w)` float32 on ``device``.
        """
        size = (int(size[0]), int(size[1]))
        device = torch.device(device)
        return self._cached(("layout", size, device), lambda: self._encode(size, device))

    def _encode(self, size: tuple[int, int], device: torch.device) -> torch.Tensor:
        ids = self._cached(("ids", device), lambda: self.ids.to(device))
        small = resize_layout(ids[:, None].float(), size)[:, 0].round().long()
        label_set = self.label_set
        if self.encoding == "embedding":
            table = self._cached(("table", device), lambda: self.table.to(device))
            return class_embedding_hint(small, table, label_set.ignore_index, stride=1)
        layout = one_hot(small, label_set.num_classes, label_set.ignore_index)
        if self.encoding == "onehot_edges":
            edges = self._cached(("edges", device), lambda: edge_map(ids)[:, None].float())
            layout = torch.cat([layout, resize_layout(edges, size)], dim=1)
        return layout
