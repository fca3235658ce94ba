"""Re-initialise a pretrained segmenter's classifier for our label set plus the fake class, row by row by name.

The new classifier has ``N + 1`` rows: our ``N`` classes in id order, then the fake class at row ``N``. Each row
comes from one of:

1. a **name table** entry (``name_map``; the built-in Cityscapes <- ADE20K table under ``"auto"``): the named
   source row, or a small random row where the table says ``None``;
2. an **exact** match of the normalised class name (aliases after ``;`` count) against the source names;
3. otherwise a **small random** row: normal with ``std = init_std_scale x std(pretrained weight)``, bias 0.
   The fake row is always drawn this way. (ALDM re-drew new rows with unit variance, far larger than the trained
   rows, so the new classes dominated the first updates; aldm.md §12 pitfall 6.)

Copied rows take the source weight *and* bias. The model config's ``id2label``/``label2id`` (and hence
``num_labels``) are rewritten to the ``N + 1`` names. The model is changed in place, so callers that must keep
a pretrained model intact pass a copy (the discriminator builder always loads its own).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..labels import LabelSet
from ..logging import get_logger
from .errors import DiscriminatorError
from .tables import builtin_name_map, check_name_map, name_map_dict, normalize_class_name, source_aliases

__all__ = [
    "FAKE_CLASS_NAME",
    "HeadRemapReport",
    "HeadRowSource",
    "get_classifier",
    "remap_classifier_head",
    "source_class_names",
]

logger = get_logger(__name__)

FAKE_CLASS_NAME = "fake"
_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")

RowOrigin = Literal["table", "exact", "table_none", "random", "fake"]


@dataclass(frozen=True)
class HeadRowSource:
    """Where one row of the new classifier came from.

    Args:
        target_index (`int`): row in the new head (``N`` for the fake class).
        target_name (`str`): our class name (``"fake"`` for row ``N``).
        origin (`str`): ``"table"`` (copied via the name table), ``"exact"`` (copied via a name match),
            ``"table_none"`` (the table says no source: random), ``"random"`` (no match: random), ``"fake"``.
        source_index (`int`, *optional*): the pretrained row copied, ``None`` for random rows.
        source_name (`str`, *optional*): its pretrained name.
    """

    target_index: int
    target_name: str
    origin: RowOrigin
    source_index: int | None = None
    source_name: str | None = None


@dataclass(frozen=True)
class HeadRemapReport:
    """What [`remap_classifier_head`] did.

    Args:
        rows (`tuple[HeadRowSource, ...]`): one entry per new row, ``N + 1`` in all.
        table (`str`, *optional*): ``"ade20k->cityscapes"`` for a built-in table, ``"user"`` for ``name_map``.
        random_std (`float`): std of the normal draw used for random rows.
        num_source_rows (`int`): ``M``, rows of the pretrained head.
    """

    rows: tuple[HeadRowSource, ...]
    table: str | None
    random_std: float
    num_source_rows: int

    @property
    def copied(self) -> dict[int, int]:
        """``{new row: pretrained row}`` for every copied row."""
        return {r.target_index: r.source_index for r in self.rows if r.source_index is not None}

    @property
    def random_rows(self) -> tuple[int, ...]:
        """New rows drawn at random (unmatched classes and the fake row)."""
        return tuple(r.target_index for r in self.rows if r.source_index is None)

    def summary(self) -> str:
        """One line per row, e.g. ``"7 traffic sign <- 43 signboard (table)"``."""
        lines = []
        for r in self.rows:
            src = (
                f"{r.source_index} {r.source_name}"
                if r.source_index is not None
                else f"random std {self.random_std:.3g}"
            )
            lines.append(f"{r.target_index} {r.target_name} <- {src} ({r.origin})")
        return "\n".join(lines)


def get_classifier(model: nn.Module) -> nn.Conv2d:
    """The final 1x1 classifier conv of a transformers segmenter (``decode_head.classifier``).

    SegFormer's ``SegformerDecodeHead`` and UperNet's ``UperNetHead`` both name it ``classifier``; UperNet's
    auxiliary FCN head has its own, which the discriminator drops.
    """
    head = getattr(model, "decode_head", None)
    classifier = getattr(head, "classifier", None)
    if not isinstance(classifier, nn.Conv2d) or classifier.kernel_size != (1, 1):
        raise DiscriminatorError(
            f"`model` ({type(model).__name__}) has no 1x1 `decode_head.classifier` conv; expected a transformers "
            "SegformerForSemanticSegmentation or UperNetForSemanticSegmentation."
        )
    return classifier


def _names_of(labels: LabelSet | Sequence[str], param: str) -> tuple[str, ...]:
    names = labels.names if isinstance(labels, LabelSet) else labels
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise DiscriminatorError(f"`{param}` must be a LabelSet or a sequence of class names, got {labels!r}.")
    return tuple(names)


def source_class_names(
    model: nn.Module, source_labels: LabelSet | Sequence[str] | None = None, where: str = "the model"
) -> tuple[str, ...]:
    """The class names of the pretrained head's rows: ``source_labels`` if given, else ``config.id2label``.

    Raises:
        DiscriminatorError: the count does not match the head, or ``id2label`` is missing or generic
            (``LABEL_0``, ``LABEL_1``, ...) and no ``source_labels`` was given.
    """
    rows = get_classifier(model).out_channels
    if source_labels is not None:
        names = _names_of(source_labels, "source_labels")
        if len(names) != rows:
            raise DiscriminatorError(
                f"`source_labels` has {len(names)} names but the pretrained head of {where} has {rows} rows; pass "
                "the label set the segmenter was trained on."
            )
        return names
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    hint = (
        "pass `source_labels=` with the label set the segmenter was trained on, e.g. "
        "`source_labels=get_label_set('ade20k')` for an ADE20K checkpoint."
    )
    if not id2label:
        raise DiscriminatorError(
            f"The pretrained head of {where} has {rows} rows but config.id2label is missing; {hint}"
        )
    try:
        names = tuple(str(id2label[i]) for i in range(rows))
    except KeyError:
        raise DiscriminatorError(
            f"config.id2label of {where} has {len(id2label)} entries (keys {sorted(id2label)[:5]}...) but the "
            f"pretrained head has {rows} rows; {hint}"
        ) from None
    if all(_GENERIC_LABEL.match(n) for n in names):
        raise DiscriminatorError(
            f"config.id2label of {where} holds only generic names ({names[0]!r}, ...), so the {rows} pretrained rows "
            f"cannot be matched to class names; {hint}"
        )
    return names


def _plan_rows(
    source_names: Sequence[str],
    target_names: Sequence[str],
    name_map: Mapping[str, str | None] | Literal["auto"] | None,
) -> tuple[list[HeadRowSource], str | None]:
    alias_to_row: dict[str, int] = {}
    for i, name in enumerate(source_names):
        for alias in source_aliases(name):
            if alias in alias_to_row and alias_to_row[alias] != i:
                logger.warning(
                    "Pretrained class name %r appears at rows %d and %d; matching uses row %d.",
                    alias,
                    alias_to_row[alias],
                    i,
                    alias_to_row[alias],
                )
                continue
            alias_to_row[alias] = i

    table_name: str | None = None
    table: dict[str, str | None] = {}
    if name_map == "auto":
        found = builtin_name_map(source_names, target_names)
        if found is not None:
            (src_set, tgt_set), entries = found
            table, table_name = check_name_map(name_map_dict(entries)), f"{src_set}->{tgt_set}"
    elif name_map is not None:
        if not isinstance(name_map, Mapping):
            raise DiscriminatorError(
                f"`name_map` must be 'auto', None or a mapping {{our class: pretrained class or None}}, got "
                f"{name_map!r}."
            )
        table, table_name = check_name_map(name_map), "user"

    normalized_targets = [normalize_class_name(n) for n in target_names]
    unknown_targets = sorted(set(table) - set(normalized_targets))
    if unknown_targets:
        raise DiscriminatorError(
            f"`name_map` names classes {unknown_targets} that are not in our label set {list(target_names)}."
        )
    missing_sources = sorted({s for s in table.values() if s is not None and s not in alias_to_row})
    if missing_sources:
        raise DiscriminatorError(
            f"`name_map` maps to pretrained classes {missing_sources} that the pretrained head does not have; its "
            f"classes are {list(source_names)}."
        )

    rows: list[HeadRowSource] = []
    for i, (name, key) in enumerate(zip(target_names, normalized_targets)):
        if key in table:
            source = table[key]
            if source is None:
                rows.append(HeadRowSource(i, name, "table_none"))
            else:
                j = alias_to_row[source]
                rows.append(HeadRowSource(i, name, "table", j, source_names[j]))
        elif key in alias_to_row:
            j = alias_to_row[key]
            rows.append(HeadRowSource(i, name, "exact", j, source_names[j]))
        else:
            rows.append(HeadRowSource(i, name, "random"))
    rows.append(HeadRowSource(len(target_names), FAKE_CLASS_NAME, "fake"))
    return rows, table_name


def remap_classifier_head(
    model: nn.Module,
    labels: LabelSet | Sequence[str],
    source_labels: LabelSet | Sequence[str] | None = None,
    name_map: Mapping[str, str | None] | Literal["auto"] | None = "auto",
    init_std_scale: float = 0.1,
    generator: torch.Generator | None = None,
    where: str = "the model",
) -> HeadRemapReport:
    """Replace ``model.decode_head.classifier`` (``M`` rows) with an ``N + 1``-row classifier for ``labels``.

    Modifies ``model`` in place: a new ``nn.Conv2d`` on the old one's device and dtype, and its config gets ``id2label = {0: labels[0], ..., N-1: labels[N-1], N: "fake"}`` and the matching ``label2id``.

    Args:
        model (`nn.Module`): a transformers SegFormer or UperNet semantic-segmentation model.
        labels (`LabelSet` or `Sequence[str]`): our ``N`` classes, in id order.
        source_labels (`LabelSet` or `Sequence[str]`, *optional*): names of the ``M`` pretrained rows; defaults to
            ``model.config.id2label``, which must then hold real names.
        name_map (`Mapping[str, str | None]`, `"auto"` or `None`, defaults to `"auto"`): overrides of the exact
            name match, ``{our class: pretrained class or None}``. ``"auto"`` picks a built-in table when the two
            label sets are recognised by their names (Cityscapes <- ADE20K); ``None`` uses exact matches only.
        init_std_scale (`float`, defaults to 0.1): random rows are ``N(0, (init_std_scale * s)^2)`` where ``s``
            is the std of the pretrained weight; biases 0.
        generator (`torch.Generator`, *optional*): CPU generator for the random rows (reproducible init).
        where (`str`): how to name the model in errors (e.g. its folder).

    Returns:
        [`HeadRemapReport`]: which row came from where.
    """
    if not (isinstance(init_std_scale, (int, float)) and init_std_scale >= 0):
        raise DiscriminatorError(f"`init_std_scale` must be a number >= 0, got {init_std_scale!r}.")
    target_names = _names_of(labels, "labels")
    if not target_names:
        raise DiscriminatorError("`labels` has no classes; the discriminator needs at least one layout class.")
    old = get_classifier(model)
    source_names = source_class_names(model, source_labels, where=where)
    rows, table_name = _plan_rows(source_names, target_names, name_map)

    old_weight = old.weight.detach().float().cpu()
    old_bias = old.bias.detach().float().cpu() if old.bias is not None else torch.zeros(old.out_channels)
    random_std = float(init_std_scale * old_weight.std()) if old_weight.numel() > 1 else 0.0
    num_rows = len(rows)
    weight = torch.empty(num_rows, *old_weight.shape[1:])
    bias = torch.zeros(num_rows)
    for row in rows:
        if row.source_index is None:
            weight[row.target_index] = torch.randn(old_weight.shape[1:], generator=generator) * random_std
        else:
            weight[row.target_index] = old_weight[row.source_index]
            bias[row.target_index] = old_bias[row.source_index]

    new = nn.Conv2d(old.in_channels, num_rows, kernel_size=1, bias=True)
    with torch.no_grad():
        new.weight.copy_(weight)
        new.bias.copy_(bias)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    new.weight.requires_grad_(old.weight.requires_grad)
    new.bias.requires_grad_(old.weight.requires_grad)
    model.decode_head.classifier = new

    # The config is edited in place, like the model: its submodules hold the same config object.
    names = (*target_names, FAKE_CLASS_NAME)
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in reversed(list(enumerate(names)))}

    report = HeadRemapReport(tuple(rows), table_name, random_std, len(source_names))
    logger.info(
        "Discriminator head: %d of %d rows copied from the %d pretrained rows (table: %s).\n%s",
        len(report.copied),
        num_rows,
        len(source_names),
        table_name,
        report.summary(),
    )
    return report
