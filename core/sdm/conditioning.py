"""SDM's conditioning tensor ``y``: one-hot classes (+ an "unknown" channel) (+ a 4-neighbour edge channel).

The official datasets lay their channels out differently (sdm.md §2), and our built-in label sets do not always
index the same way, so an `SDMConditionSpec` says how a label map in our class ids becomes ``y``:

===================  ==========  =========  =======  =====  =============================================
label set            ids         one-hot    unknown  edges  ``C_y``
===================  ==========  =========  =======  =====  =============================================
``ade20k``           class       150        yes      no     151 (official: raw id − 1, raw 0 → 150)
``celebamask_hq``    class       19         no       yes    20 (edges of the label map)
``coco_stuff``       raw         182        yes      yes    184 (official: raw ids, 255 → 182)
``cityscapes``       raw         35         no       yes    36 (label ids; our ignore pixels get zeros)
===================  ==========  =========  =======  =====  =============================================

``ids="raw"`` one-hot-encodes the dataset's raw ids, recovered from our class ids through the label set's remap
(each class maps back to its raw id). The *unknown* channel takes the ignore pixels (ADE20K's "other", COCO's
255); without it they are all-zero. The edge channel is 1 where a 4-neighbour has another instance id (both
pixels of the pair; ``edge_map``), from the instance map when given, else from the label map (CelebAMask-HQ).
The null label ∅ of classifier-free guidance is the all-zero tensor, edge channel included
(``null_layout_like``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..hints.encoders import null_layout_like, one_hot, validate_label_tensor
from ..labels.labelset import LabelSet
from ..labels.ops import edge_map

__all__ = ["SDM_CONDITIONS", "SDM_ID_SPACES", "SDMConditionSpec", "null_layout_like", "sdm_condition"]

#: What the one-hot channels index: our label set's class ids, or the dataset's raw ids (via the remap).
SDM_ID_SPACES = ("class", "raw")


@dataclass(frozen=True)
class SDMConditionSpec:
    """How label maps become SDM's conditioning tensor (see the module docstring).

    Args:
        num_classes (`int`): one-hot channels for the ids (before the unknown and edge channels).
        unknown_channel (`bool`, defaults to False): ignore pixels are one-hot on an extra channel
            ``num_classes`` (else all-zero).
        edges (`bool`, defaults to False): append the 4-neighbour edge channel last.
        ids (`str`, defaults to `"class"`): one of `SDM_ID_SPACES`.
    """

    num_classes: int
    unknown_channel: bool = False
    edges: bool = False
    ids: str = "class"

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"SDMConditionSpec.num_classes={self.num_classes!r} must be a positive int")
        if self.ids not in SDM_ID_SPACES:
            raise ValueError(f"SDMConditionSpec.ids={self.ids!r} must be one of {SDM_ID_SPACES}")

    @property
    def channels(self) -> int:
        """``C_y``: one-hot channels + unknown + edge."""
        return self.num_classes + int(self.unknown_channel) + int(self.edges)

    @property
    def hint_encoding(self) -> str:
        """The ``l2i.hint_encoding`` this spec is recorded under (``"onehot_edges"`` or ``"onehot"``)."""
        return "onehot_edges" if self.edges else "onehot"

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "unknown_channel": self.unknown_channel,
            "edges": self.edges,
            "ids": self.ids,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<condition>") -> SDMConditionSpec:
        try:
            return cls(
                num_classes=int(data["num_classes"]),
                unknown_channel=bool(data.get("unknown_channel", False)),
                edges=bool(data.get("edges", False)),
                ids=str(data.get("ids", "class")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: not a valid SDM condition spec ({e}): {dict(data)!r}") from None

    @classmethod
    def for_label_set(cls, label_set: LabelSet, *, edges: bool = False, unknown_channel: bool = False):
        """The official spec when ``label_set`` is one of `SDM_CONDITIONS` and no option is given, else one-hot
        over the set's class ids with the options given."""
        if not edges and not unknown_channel and label_set.name in SDM_CONDITIONS:
            official = SDM_CONDITIONS[label_set.name]
            if official.fits(label_set) is None:
                return official
        return cls(label_set.num_classes, unknown_channel=unknown_channel, edges=edges)

    def fits(self, label_set: LabelSet) -> str | None:
        """None when label maps of ``label_set`` can be encoded with this spec, else the reason in words."""
        if self.ids == "class":
            if label_set.num_classes != self.num_classes:
                return (
                    f"label set {label_set.name!r} has {label_set.num_classes} classes, but the one-hot part has "
                    f"{self.num_classes} channels"
                )
            return None
        if label_set.remap is None:
            return f"the spec one-hot-encodes raw dataset ids, and label set {label_set.name!r} has no raw-id remap"
        raw_max = max((r for r, c in label_set.remap.items() if r >= 0 and c != label_set.ignore_index), default=-1)
        if raw_max >= self.num_classes:
            return f"label set {label_set.name!r} has raw id {raw_max}, beyond the {self.num_classes} one-hot channels"
        return None

    def raw_id_table(self, label_set: LabelSet) -> torch.Tensor:
        """`(N,)` int64: the raw dataset id of each class of ``label_set`` (for ``ids="raw"``)."""
        if label_set.remap is None:
            raise ValueError(f"label set {label_set.name!r} has no raw-id remap; use ids='class'")
        table = torch.full((label_set.num_classes,), -1, dtype=torch.long)
        for raw, cls_id in sorted(label_set.remap.items(), reverse=True):  # smallest raw id wins
            if raw >= 0 and cls_id != label_set.ignore_index:
                table[cls_id] = raw
        missing = (table < 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(
                f"label set {label_set.name!r}: classes {missing[:5]} have no raw id in the remap; use ids='class'"
            )
        return table

    def encode(
        self,
        labels: torch.Tensor,
        label_set: LabelSet,
        instances: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Label maps -> ``y``.

        Args:
            labels (`torch.Tensor`): `(B, H, W)` int64 class ids of ``label_set`` (its ignore id allowed).
            label_set (`LabelSet`): the ids' label set (must fit: `fits`).
            instances (`torch.Tensor`, *optional*): `(B, H, W)` integer instance ids for the edge channel;
                without it the edges are those of ``labels``.
            dtype (`torch.dtype`, defaults to float32): output dtype.

        Returns:
            `torch.Tensor`: `(B, C_y, H, W)` in {0, 1}, on ``labels.device``.

        Raises:
            ValueError: the label set does not fit, ids out of range, or ``instances`` of another shape.
        """
        reason = self.fits(label_set)
        if reason is not None:
            raise ValueError(f"cannot build SDM's conditioning tensor: {reason}")
        ignore = label_set.ignore_index
        validate_label_tensor(labels, label_set.num_classes, ignore, name="label map")
        labels = labels.long()
        valid = labels != ignore
        ids = labels
        if self.ids == "raw":
            table = self.raw_id_table(label_set).to(labels.device)
            ids = torch.where(valid, table[torch.where(valid, labels, torch.zeros_like(labels))], labels)
        if self.unknown_channel:
            # ignore pixels become the extra class `num_classes`, so one_hot over N + 1 gives the unknown channel
            ids = torch.where(valid, ids, torch.full_like(ids, self.num_classes))
            y = one_hot(ids, self.num_classes + 1, ignore_index=-1, dtype=dtype)  # no ignore pixels left
        else:
            y = one_hot(ids, self.num_classes, ignore_index=ignore, dtype=dtype)
        if self.edges:
            source = labels
            if instances is not None:
                if tuple(instances.shape) != tuple(labels.shape):
                    raise ValueError(
                        f"`instances` {tuple(instances.shape)} must have the label map's shape {tuple(labels.shape)}"
                    )
                source = instances.to(labels.device)
            y = torch.cat([y, edge_map(source).unsqueeze(1).to(dtype)], dim=1)
        return y


#: The official SDM conditioning of each dataset, keyed by the name of our built-in label set for it.
SDM_CONDITIONS: dict[str, SDMConditionSpec] = {
    "ade20k": SDMConditionSpec(150, unknown_channel=True),
    "celebamask_hq": SDMConditionSpec(19, edges=True),
    "coco_stuff": SDMConditionSpec(182, unknown_channel=True, edges=True, ids="raw"),
    "cityscapes": SDMConditionSpec(35, edges=True, ids="raw"),
}


def sdm_condition(
    labels: torch.Tensor,
    label_set: LabelSet,
    *,
    instances: torch.Tensor | None = None,
    spec: SDMConditionSpec | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SDM's conditioning tensor for a label batch: ``spec.encode`` with the official spec of ``label_set`` by
    default (`SDMConditionSpec.for_label_set`: one-hot over its classes for other sets).

    Args:
        labels (`torch.Tensor`): `(B, H, W)` int64 class ids (the set's ignore id allowed).
        label_set (`LabelSet`): their label set.
        instances (`torch.Tensor`, *optional*): `(B, H, W)` instance ids for the edge channel.
        spec (`SDMConditionSpec`, *optional*): how to encode; see above for the default.
        dtype (`torch.dtype`, defaults to float32): output dtype.

    Returns:
        `torch.Tensor`: `(B, C_y, H, W)` in {0, 1}. Its null counterpart is ``null_layout_like(y)`` (zeros).
    """
    spec = spec if spec is not None else SDMConditionSpec.for_label_set(label_set)
    return spec.encode(labels, label_set, instances=instances, dtype=dtype)
