"""The metadata every file layout2image writes carries, and the checks our loaders make against it.

It lives in the safetensors ``__metadata__`` table (string -> string), under ``l2i.*`` keys, beside
``"format": "pt"`` (which transformers/diffusers loaders look for). Stock loaders ignore it.

=============================  =====================================================================
key                            value
=============================  =====================================================================
``l2i.format_version``         integer as text; this module reads versions up to `FORMAT_VERSION`
``l2i.kind``                   one of `KINDS`: what the file holds
``l2i.hint_encoding``          one of `HINT_ENCODINGS`: the layout hint the weights read
``l2i.label_set``              the label set as JSON (``LabelSet.to_dict``: name, classes with names and
                               palette, ignore index, aliases, remap); absent when unknown
``l2i.label_set_fingerprint``  ``LabelSet.fingerprint()`` of that set (names + palette + ignore id)
``l2i.base_model``             what the weights were trained on, e.g. ``"runwayml/stable-diffusion-v1-5"``;
                               empty when unknown
``l2i.training_config_hash``   `training_config_hash` of the trainer config; empty for imported files
``l2i.<other>``                kind-specific fields (`WeightsMetadata.extra`), e.g. ``l2i.config`` (the
                               model config as JSON) and ``l2i.class_name`` for ControlNets
=============================  =====================================================================
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import LabelSetError
from ..core.labels import LabelSet
from ..core.logging import get_logger
from .safe_load import WeightsError

__all__ = [
    "FORMAT_VERSION",
    "HINT_ENCODINGS",
    "KINDS",
    "MetadataError",
    "WeightsMetadata",
    "describe_label_set",
    "has_l2i_metadata",
    "training_config_hash",
]

logger = get_logger(__name__)

#: Version of this schema written by this release.
FORMAT_VERSION = 1

#: What a file can hold.
KINDS = ("class_embedding_table", "controlnet", "lora", "sdm", "spade")

#: The hint the weights read (``"none"`` for weights without a layout hint).
HINT_ENCODINGS = ("embedding", "none", "onehot", "onehot_edges", "rgb")

_PREFIX = "l2i."
_CORE_FIELDS = (
    "base_model",
    "format_version",
    "hint_encoding",
    "kind",
    "label_set",
    "label_set_fingerprint",
    "training_config_hash",
)


class MetadataError(WeightsError):
    """A file's metadata is missing, malformed, or does not match what the caller expects."""


def has_l2i_metadata(metadata: Mapping[str, str] | None) -> bool:
    """Whether a safetensors ``__metadata__`` table was written by layout2image (it has ``l2i.kind``)."""
    return bool(metadata) and f"{_PREFIX}kind" in metadata


def describe_label_set(label_set: LabelSet) -> str:
    """``'cityscapes' (19 classes, fingerprint 0123abcd...)``: how error messages name a label set."""
    return f"{label_set.name!r} ({label_set.num_classes} classes, fingerprint {label_set.fingerprint()})"


def _label_set_difference(stored: LabelSet, given: LabelSet) -> str:
    if stored.names != given.names:
        if len(stored.names) != len(given.names):
            return f"they have {stored.num_classes} and {given.num_classes} classes"
        i = next(i for i, (a, b) in enumerate(zip(stored.names, given.names)) if a != b)
        return f"class {i} is {stored.names[i]!r} in the file's set and {given.names[i]!r} in the given one"
    if stored.ignore_index != given.ignore_index:
        return f"their ignore ids differ ({stored.ignore_index} vs {given.ignore_index})"
    diff = [i for i, (a, b) in enumerate(zip(stored.palette.tolist(), given.palette.tolist())) if a != b]
    if diff:
        i = diff[0]
        return (
            f"the class names match but {len(diff)} palette colour(s) differ, first class {i} {stored.names[i]!r}: "
            f"{stored.palette[i].tolist()} vs {given.palette[i].tolist()}"
        )
    return "they differ"


def training_config_hash(config: Any) -> str:
    """A stable 16-hex-digit hash of a training config (a dataclass or a JSON-able mapping).

    Keys are sorted and tuples become lists, so the same settings give the same hash on every run and machine.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dataclass or a mapping, got {type(config).__name__}")
    payload = json.dumps(config, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


@dataclass(frozen=True)
class WeightsMetadata:
    """The ``l2i.*`` metadata of one file.

    Args:
        kind (`str`): one of `KINDS`.
        hint_encoding (`str`, defaults to `"none"`): one of `HINT_ENCODINGS`.
        label_set (`LabelSet`, *optional*): the label set the weights were trained on; None when unknown (e.g. a
            stock ControlNet converted by ``l2i-convert``).
        base_model (`str`, defaults to `""`): the base model the weights belong to; empty when unknown.
        training_config_hash (`str`, defaults to `""`): `training_config_hash` of the trainer config; empty for
            imported or converted third-party files.
        format_version (`int`, defaults to `FORMAT_VERSION`): schema version.
        extra (`Mapping[str, str]`): kind-specific string fields, stored as ``l2i.<name>``.
    """

    kind: str
    hint_encoding: str = "none"
    label_set: LabelSet | None = None
    base_model: str = ""
    training_config_hash: str = ""
    format_version: int = FORMAT_VERSION
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MetadataError(f"kind={self.kind!r} is not a known file kind; expected one of {', '.join(KINDS)}")
        if self.hint_encoding not in HINT_ENCODINGS:
            raise MetadataError(
                f"hint_encoding={self.hint_encoding!r} is not known; expected one of {', '.join(HINT_ENCODINGS)}"
            )
        if self.label_set is not None and not isinstance(self.label_set, LabelSet):
            raise MetadataError(f"label_set must be a LabelSet or None, got {type(self.label_set).__name__}")
        h = self.training_config_hash
        if h and (len(h) != 16 or any(c not in "0123456789abcdef" for c in h)):
            raise MetadataError(
                f"training_config_hash={h!r} must be empty or 16 lowercase hex digits (use training_config_hash())"
            )
        if isinstance(self.format_version, bool) or not isinstance(self.format_version, int):
            raise MetadataError(f"format_version={self.format_version!r} must be an integer")
        extra = dict(self.extra)
        for k, v in extra.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise MetadataError(f"extra metadata must map strings to strings, got {k!r}: {type(v).__name__}")
            if k in _CORE_FIELDS or k.startswith(_PREFIX):
                raise MetadataError(f"extra metadata key {k!r} clashes with a schema field; pick another name")
        object.__setattr__(self, "extra", extra)

    def replace(self, **changes: Any) -> WeightsMetadata:
        """A copy with some fields changed (``extra`` given here replaces the whole table)."""
        return dataclasses.replace(self, **changes)

    def with_extra(self, **fields: str) -> WeightsMetadata:
        """A copy with ``fields`` added to (or replaced in) ``extra``."""
        return dataclasses.replace(self, extra={**self.extra, **fields})

    # ------------------------------------------------------------------ (de)serialisation
    def to_safetensors(self) -> dict[str, str]:
        """The ``__metadata__`` table to pass to ``safetensors.torch.save_file``."""
        out = {
            "format": "pt",
            f"{_PREFIX}format_version": str(self.format_version),
            f"{_PREFIX}kind": self.kind,
            f"{_PREFIX}hint_encoding": self.hint_encoding,
            f"{_PREFIX}base_model": self.base_model,
            f"{_PREFIX}training_config_hash": self.training_config_hash,
        }
        if self.label_set is not None:
            out[f"{_PREFIX}label_set"] = json.dumps(self.label_set.to_dict(), separators=(",", ":"))
            out[f"{_PREFIX}label_set_fingerprint"] = self.label_set.fingerprint()
        out.update({f"{_PREFIX}{k}": v for k, v in sorted(self.extra.items())})
        return out

    @classmethod
    def from_safetensors(cls, metadata: Mapping[str, str] | None, source: str = "<metadata>") -> WeightsMetadata:
        """Parse and validate a ``__metadata__`` table.

        Args:
            metadata (`Mapping[str, str]`): the table (``safe_open(...).metadata()``).
            source (`str`): the file name, for error messages.

        Raises:
            MetadataError: the table has no ``l2i.kind`` (not written by layout2image), comes from a newer schema,
                or holds a malformed or inconsistent field (e.g. a label set whose fingerprint does not match).
        """
        if not has_l2i_metadata(metadata):
            raise MetadataError(
                f"{source}: has no layout2image metadata (no 'l2i.kind' entry); it was not written by layout2image. "
                "Convert it with l2i-convert (which adds the metadata) or load it with a loader that needs none"
            )
        md = dict(metadata)
        raw_version = md.get(f"{_PREFIX}format_version", "")
        try:
            version = int(raw_version)
        except ValueError:
            raise MetadataError(f"{source}: l2i.format_version={raw_version!r} is not an integer") from None
        if version > FORMAT_VERSION:
            raise MetadataError(
                f"{source}: written with metadata format version {version}, but this layout2image reads versions up "
                f"to {FORMAT_VERSION}; update layout2image"
            )
        label_set = None
        raw_labels = md.get(f"{_PREFIX}label_set")
        if raw_labels:
            try:
                label_set = LabelSet.from_dict(json.loads(raw_labels), source=f"{source} (l2i.label_set)")
            except (json.JSONDecodeError, LabelSetError) as e:
                raise MetadataError(f"{source}: l2i.label_set is not a valid label set: {e}") from None
            stored_fp = md.get(f"{_PREFIX}label_set_fingerprint", "")
            if stored_fp and stored_fp != label_set.fingerprint():
                raise MetadataError(
                    f"{source}: l2i.label_set_fingerprint={stored_fp!r} does not match the stored label set "
                    f"({label_set.fingerprint()!r}); the metadata was edited by hand. Re-export the file"
                )
        extra = {
            k[len(_PREFIX) :]: v
            for k, v in md.items()
            if k.startswith(_PREFIX) and k[len(_PREFIX) :] not in _CORE_FIELDS
        }
        try:
            return cls(
                kind=md[f"{_PREFIX}kind"],
                hint_encoding=md.get(f"{_PREFIX}hint_encoding", "none"),
                label_set=label_set,
                base_model=md.get(f"{_PREFIX}base_model", ""),
                training_config_hash=md.get(f"{_PREFIX}training_config_hash", ""),
                format_version=version,
                extra=extra,
            )
        except MetadataError as e:
            raise MetadataError(f"{source}: {e}") from None

    # ------------------------------------------------------------------ checks
    def check(
        self,
        *,
        kind: str | None = None,
        label_set: LabelSet | None = None,
        hint_encoding: str | None = None,
        base_model: str | None = None,
        source: str = "the file",
    ) -> None:
        """Check the metadata against what a loader is about to use; every argument left None is not checked.

        A label set is compared by fingerprint (names, palette, ignore id). A file that records no label set or
        base model passes those checks with a warning (nothing to compare).

        Raises:
            MetadataError: naming the field, what the file says, what was given, and the fix.
        """
        if kind is not None and kind != self.kind:
            raise MetadataError(f"{source} holds a {self.kind!r} file, not a {kind!r} one")
        if hint_encoding is not None and hint_encoding != self.hint_encoding:
            raise MetadataError(
                f"{source} was trained for {self.hint_encoding!r} hints, but {hint_encoding!r} hints were asked for; "
                f"build the hint with encoding {self.hint_encoding!r}"
            )
        if label_set is not None:
            if self.label_set is None:
                logger.warning("%s records no label set; cannot check it against %s", source, label_set.name)
            elif self.label_set.fingerprint() != label_set.fingerprint():
                raise MetadataError(
                    f"label set mismatch: {source} was trained on label set {describe_label_set(self.label_set)}, "
                    f"but label set {describe_label_set(label_set)} was given; "
                    f"{_label_set_difference(self.label_set, label_set)}. Use the label set the file was trained "
                    "with (its full definition is stored in the file: l2i-convert inspect FILE)"
                )
        if base_model is not None:
            if not self.base_model:
                logger.warning("%s records no base model; cannot check it against %r", source, base_model)
            elif base_model != self.base_model:
                raise MetadataError(
                    f"{source} was trained on base model {self.base_model!r}, but {base_model!r} was given; use a "
                    "matching base model"
                )
