"""Label sets: ordered class names, a palette, an ignore index, colour aliases and a raw-id remap.

A label set is the contract shared by every part of the pack: the ids in a label map index ``names``; the
palette turns ids into the colours that ControlNets and people see; ``remap`` turns a dataset's raw ids (e.g.
Cityscapes' 35 label ids) into class ids; ``color_aliases`` settle colours that a published palette gives to
more than one class (ADE20K gives [140, 140, 140] to both road and skyscraper).

Built-in sets live as JSON in ``builtin/``; custom sets are YAML or JSON files with the same fields::

    name: my_set
    ignore_index: 255                 # optional, default 255
    classes:                          # list index == class id
      - {name: sky, color: [70, 130, 180]}
      - {name: road, color: [128, 64, 128]}
    color_aliases:                    # optional: a colour -> the class it decodes to (or "ignore")
      - {color: [0, 0, 0], decodes_to: ignore}
    remap:                            # optional: raw dataset id -> class name, class id or "ignore";
      7: road                         # raw ids not listed become ignore
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LabelSetError

__all__ = ["BUILTIN_LABEL_SETS", "LabelSet", "get_label_set", "load_label_set"]

_BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
BUILTIN_LABEL_SETS = ("ade20k", "celebamask_hq", "cityscapes", "coco_stuff", "toy")

IGNORE_WORD = "ignore"
Color = tuple[int, int, int]


def _as_color(value: Any, where: str) -> Color:
    if isinstance(value, str):
        text = value.strip().lstrip("#")
        if len(text) == 6:
            try:
                return (int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16))
            except ValueError:
                pass
        raise LabelSetError(f"{where}: colour {value!r} is not '#rrggbb' or a list of three integers 0..255")
    if not isinstance(value, Sequence) or len(value) != 3:
        raise LabelSetError(f"{where}: colour {value!r} must be three integers 0..255 (R, G, B)")
    rgb = []
    for c in value:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= int(c) <= 255:
            raise LabelSetError(f"{where}: colour {list(value)!r} must be three integers 0..255 (R, G, B)")
        rgb.append(int(c))
    return (rgb[0], rgb[1], rgb[2])


@dataclass(frozen=True, eq=False)
class LabelSet:
    """An ordered set of classes with a palette.

    Args:
        name (`str`): short identifier, stored in file metadata (e.g. ``"cityscapes"``).
        names (`tuple[str, ...]`): class names; the position is the class id.
        palette (`np.ndarray`): `(N, 3)` uint8 RGB colour per class.
        ignore_index (`int`, defaults to 255): id of unlabelled pixels; never a class id.
        remap (`dict[int, int]`, *optional*): raw dataset id -> class id or ``ignore_index``; raw ids not listed
            map to ``ignore_index``.
        color_aliases (`dict[tuple[int, int, int], int]`): colour -> class id (or ``ignore_index``) for colours
            shared by several classes or extra colours that should decode to a class.
        description (`str`): one line for people.
    """

    name: str
    names: tuple[str, ...]
    palette: np.ndarray
    ignore_index: int = 255
    remap: Mapping[int, int] | None = None
    color_aliases: Mapping[Color, int] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        where = f"label set {self.name!r}"
        names = tuple(str(n) for n in self.names)
        if not names:
            raise LabelSetError(f"{where}: has no classes; give at least one entry under 'classes'")
        seen: dict[str, int] = {}
        for i, n in enumerate(names):
            if not n.strip():
                raise LabelSetError(f"{where}: class {i} has an empty name")
            if n == IGNORE_WORD:
                raise LabelSetError(
                    f"{where}: class {i} is named {IGNORE_WORD!r}, which is reserved for the ignore id"
                )
            if n in seen:
                raise LabelSetError(f"{where}: class {i} {n!r} duplicates the name of class {seen[n]}")
            seen[n] = i
        palette = np.asarray(self.palette)
        if palette.shape != (len(names), 3):
            raise LabelSetError(
                f"{where}: palette has shape {tuple(palette.shape)}, expected ({len(names)}, 3): one RGB colour per class"
            )
        if palette.size and (palette.min() < 0 or palette.max() > 255):
            raise LabelSetError(f"{where}: palette values must lie in 0..255")
        palette = palette.astype(np.uint8)
        palette.setflags(write=False)
        ignore = int(self.ignore_index)
        if 0 <= ignore < len(names):
            raise LabelSetError(
                f"{where}: ignore_index {ignore} is a class id (classes are 0..{len(names) - 1}); "
                f"use an id outside that range, e.g. 255"
            )
        if not 0 <= ignore <= 65535:
            raise LabelSetError(f"{where}: ignore_index {ignore} must be in 0..65535 so id maps fit 16-bit PNGs")
        aliases = {_as_color(c, f"{where}, color_aliases"): int(t) for c, t in dict(self.color_aliases).items()}
        for color, target in aliases.items():
            if target != ignore and not 0 <= target < len(names):
                raise LabelSetError(
                    f"{where}: color alias {list(color)} decodes to {target}, which is neither a class id "
                    f"(0..{len(names) - 1}) nor the ignore id {ignore}"
                )
        # Every colour that the palette gives to several classes must say which class it decodes to.
        by_color: dict[Color, list[int]] = {}
        for i, rgb in enumerate(palette.tolist()):
            by_color.setdefault(tuple(rgb), []).append(i)
        for color, ids in by_color.items():
            if len(ids) < 2:
                continue
            shared = ", ".join(f"{i} {names[i]!r}" for i in ids)
            if color not in aliases:
                raise LabelSetError(
                    f"{where}: colour {list(color)} is used by classes {shared} but has no color_aliases entry; add "
                    f"{{color: {list(color)}, decodes_to: {names[ids[0]]}}} to say which class it decodes to"
                )
            if aliases[color] not in ids:
                raise LabelSetError(
                    f"{where}: colour {list(color)} is shared by classes {shared}, but its alias decodes to "
                    f"{aliases[color]}, which is not one of them"
                )
        remap = None
        if self.remap is not None:
            remap = {}
            for raw, target in dict(self.remap).items():
                raw_i, target_i = int(raw), int(target)
                if raw_i < -1 or raw_i > 65535:
                    raise LabelSetError(f"{where}: remap key {raw_i} must be a raw id in -1..65535")
                if target_i != ignore and not 0 <= target_i < len(names):
                    raise LabelSetError(
                        f"{where}: remap entry {raw_i} -> {target_i} is out of range: targets are class ids "
                        f"0..{len(names) - 1} or 'ignore' ({ignore})"
                    )
                remap[raw_i] = target_i
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "palette", palette)
        object.__setattr__(self, "ignore_index", ignore)
        object.__setattr__(self, "color_aliases", aliases)
        object.__setattr__(self, "remap", remap)

    # ------------------------------------------------------------------ basic facts
    @property
    def num_classes(self) -> int:
        """Number of real classes N (the discriminator has N + 1 outputs)."""
        return len(self.names)

    def index(self, name: str) -> int:
        """Class id of ``name``; raises `LabelSetError` listing close names when it is unknown."""
        try:
            return self.names.index(name)
        except ValueError:
            close = [n for n in self.names if name.lower() in n.lower() or n.lower() in name.lower()][:5]
            hint = f"; did you mean {close}?" if close else ""
            raise LabelSetError(f"label set {self.name!r} has no class {name!r}{hint}") from None

    def color_table(self) -> dict[Color, int]:
        """Colour -> class id used for decoding colour maps (aliases applied to shared colours)."""
        table: dict[Color, int] = {}
        for i, rgb in enumerate(self.palette.tolist()):
            table.setdefault(tuple(rgb), i)
        table.update(self.color_aliases)
        return table

    def shared_colors(self) -> dict[Color, tuple[int, ...]]:
        """Colours that the palette gives to more than one class, with those classes."""
        by_color: dict[Color, list[int]] = {}
        for i, rgb in enumerate(self.palette.tolist()):
            by_color.setdefault(tuple(rgb), []).append(i)
        return {c: tuple(ids) for c, ids in by_color.items() if len(ids) > 1}

    def remap_lut(self) -> np.ndarray:
        """Lookup table (int64, length max raw id + 2) from raw id to class id; index -1 holds raw id -1's target.

        Raises:
            LabelSetError: if the set has no remap.
        """
        if self.remap is None:
            raise LabelSetError(f"label set {self.name!r} has no remap from raw dataset ids")
        size = max([k for k in self.remap if k >= 0], default=0) + 2
        lut = np.full(size, self.ignore_index, dtype=np.int64)
        for raw, target in self.remap.items():
            lut[raw] = target  # raw -1 lands in the last slot, which no non-negative raw id uses
        return lut

    def fingerprint(self) -> str:
        """Short stable hash of names, palette and ignore id: what a model trained on this set depends on."""
        payload = json.dumps([list(self.names), self.palette.tolist(), self.ignore_index]).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def same_classes(self, other: LabelSet) -> bool:
        """Whether ``other`` has the same class names, order and ignore id (palettes may differ)."""
        return self.names == other.names and self.ignore_index == other.ignore_index

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelSet):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.name, self.fingerprint()))

    def __repr__(self) -> str:
        return f"LabelSet(name={self.name!r}, num_classes={self.num_classes}, ignore_index={self.ignore_index})"

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (the YAML/JSON file schema); class names are used for alias and remap targets."""

        def target_name(t: int) -> str:
            return IGNORE_WORD if t == self.ignore_index else self.names[t]

        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["ignore_index"] = self.ignore_index
        out["classes"] = [{"name": n, "color": c} for n, c in zip(self.names, self.palette.tolist())]
        if self.color_aliases:
            out["color_aliases"] = [
                {"color": list(c), "decodes_to": target_name(t)} for c, t in self.color_aliases.items()
            ]
        if self.remap is not None:
            out["remap"] = {int(k): target_name(v) for k, v in sorted(self.remap.items())}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> LabelSet:
        """Build and validate a label set from the file schema; errors name ``source`` and the bad entry."""
        if not isinstance(data, Mapping):
            raise LabelSetError(
                f"{source}: a label set must be a mapping with 'name' and 'classes', got {type(data).__name__}"
            )
        known = {"name", "description", "ignore_index", "classes", "color_aliases", "remap"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LabelSetError(f"{source}: unknown field(s) {unknown}; known fields are {sorted(known)}")
        name = str(data.get("name") or Path(source).stem)
        classes = data.get("classes")
        if not isinstance(classes, Sequence) or isinstance(classes, (str, bytes)) or not classes:
            raise LabelSetError(f"{source}: 'classes' must be a non-empty list of {{name, color}} entries")
        names, colors = [], []
        for i, entry in enumerate(classes):
            if not isinstance(entry, Mapping) or "name" not in entry or "color" not in entry:
                raise LabelSetError(f"{source}: classes[{i}] must be a mapping with 'name' and 'color', got {entry!r}")
            names.append(str(entry["name"]))
            colors.append(_as_color(entry["color"], f"{source}: classes[{i}] {entry['name']!r}"))
        ignore = data.get("ignore_index", 255)
        if isinstance(ignore, bool) or not isinstance(ignore, int):
            raise LabelSetError(f"{source}: ignore_index must be an integer, got {ignore!r}")
        by_name = {n: i for i, n in enumerate(names)}

        def resolve(target: Any, where: str) -> int:
            if isinstance(target, str):
                if target == IGNORE_WORD:
                    return ignore
                if target not in by_name:
                    raise LabelSetError(f"{source}: {where} names class {target!r}, which is not in 'classes'")
                return by_name[target]
            if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
                raise LabelSetError(f"{source}: {where} must be a class name, a class id or 'ignore', got {target!r}")
            return int(target)

        aliases: dict[Color, int] = {}
        for i, entry in enumerate(data.get("color_aliases") or []):
            if not isinstance(entry, Mapping) or "color" not in entry or "decodes_to" not in entry:
                raise LabelSetError(f"{source}: color_aliases[{i}] must be a mapping with 'color' and 'decodes_to'")
            color = _as_color(entry["color"], f"{source}: color_aliases[{i}]")
            if color in aliases:
                raise LabelSetError(f"{source}: color_aliases[{i}] repeats colour {list(color)}")
            aliases[color] = resolve(entry["decodes_to"], f"color_aliases[{i}]")
        remap = None
        if data.get("remap") is not None:
            raw_remap = data["remap"]
            if not isinstance(raw_remap, Mapping):
                raise LabelSetError(f"{source}: 'remap' must be a mapping from raw id to class name/id or 'ignore'")
            remap = {}
            for raw, target in raw_remap.items():
                try:
                    raw_i = int(raw)
                except (TypeError, ValueError):
                    raise LabelSetError(f"{source}: remap key {raw!r} is not an integer raw id") from None
                remap[raw_i] = resolve(target, f"remap entry {raw_i}")
        try:
            return cls(
                name=name,
                names=tuple(names),
                palette=np.array(colors, dtype=np.int64),
                ignore_index=ignore,
                remap=remap,
                color_aliases=aliases,
                description=str(data.get("description", "")),
            )
        except LabelSetError as e:
            raise LabelSetError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> Path:
        """Write the set as YAML (``.yaml``/``.yml``) or JSON (``.json``)."""
        path = Path(path)
        data = self.to_dict()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=119)
        elif path.suffix.lower() == ".json":
            text = json.dumps(data, indent=1)
        else:
            raise LabelSetError(f"cannot save label set to {str(path)!r}: use a .yaml, .yml or .json file name")
        from ..files import atomic_write_text

        atomic_write_text(path, text)
        return path


def _read_mapping(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LabelSetError(f"label set file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LabelSetError(f"cannot read label set file {str(path)!r}: {e}") from None
    if not text.strip():
        raise LabelSetError(f"label set file {str(path)!r} is empty")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            return json.loads(text)
        if suffix in (".yaml", ".yml", ""):  # no extension: YAML, which JSON is a subset of
            import yaml

            return yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError / yaml.YAMLError carry the line and column
        raise LabelSetError(
            f"label set file {str(path)!r} is not valid {(suffix[1:] or 'yaml').upper()}: {e}"
        ) from None
    raise LabelSetError(f"label set file {str(path)!r}: unknown extension {suffix!r}; use .yaml, .yml or .json")


_BUILTIN_ALIASES = {"ade": "ade20k", "ade20k_150": "ade20k", "cityscapes_19": "cityscapes", "coco": "coco_stuff",
                    "cocostuff": "coco_stuff", "coco_stuff_171": "coco_stuff", "celebamask": "celebamask_hq",
                    "celebamask_hq_19": "celebamask_hq"}  # fmt: skip


def _builtin_key(name: str) -> str | None:
    """The built-in set that ``name`` names (its key in `BUILTIN_LABEL_SETS`, aliases and case allowed), else None."""
    key = name.strip().lower().replace("-", "_")
    key = _BUILTIN_ALIASES.get(key, key)
    return key if key in BUILTIN_LABEL_SETS else None


def get_label_set(name: str) -> LabelSet:
    """Return a built-in label set by name (one of `BUILTIN_LABEL_SETS`)."""
    key = _builtin_key(name)
    if key is None:
        raise LabelSetError(f"unknown built-in label set {name!r}; built-in sets are {list(BUILTIN_LABEL_SETS)}")
    return _load_builtin(key)


@functools.cache
def _load_builtin(key: str) -> LabelSet:
    path = _BUILTIN_DIR / f"{key}.json"
    return LabelSet.from_dict(_read_mapping(path), source=str(path))


def load_label_set(spec: str | Path | LabelSet | Mapping[str, Any]) -> LabelSet:
    """Load a label set from a built-in name, a YAML/JSON file, a mapping, or pass a `LabelSet` through.

    A name is resolved once, here, for every caller (CLIs, trainer config, nodes):

    - a built-in name (or alias, e.g. ``"toy"``, ``"ADE20K"``) is the built-in set, whatever folder or file of that
      name the working directory holds (``l2i-toy --out toy`` makes a folder ``toy``). When a *file* of that name
      exists as well, the built-in set is used and a warning says so and how to pick the file (``./toy``);
    - anything else is a path, and a path must name a file: a folder is refused with a hint at the label set file
      inside it, a missing file is refused naming the built-in sets.

    Raises:
        LabelSetError: unknown name, missing file, a folder, or an invalid label set file.
    """
    if isinstance(spec, LabelSet):
        return spec
    if isinstance(spec, Mapping):
        return LabelSet.from_dict(spec)
    text = str(spec)
    path = Path(spec)
    key = _builtin_key(text)
    if key is not None:
        if path.is_file():
            from ..logging import get_logger, warn_once

            warn_once(
                get_logger(__name__),
                f"label-set-shadow:{path.resolve()}",
                f"label set {text!r}: using the built-in set {key!r}; a file {text!r} exists here too, "
                f"write {'./' + text!r} (or its full path) to use the file instead",
            )
        return _load_builtin(key)
    if path.is_dir():
        inside = [p.name for p in sorted(path.glob("*")) if p.suffix.lower() in (".yaml", ".yml", ".json")]
        hint = f" such as {str(path / inside[0])!r}" if inside else ""
        raise LabelSetError(
            f"label set {text!r} is a folder; give a label set file{hint} (YAML/JSON) or a built-in name "
            f"{list(BUILTIN_LABEL_SETS)}"
        )
    if path.is_file() or path.suffix.lower() in (".yaml", ".yml", ".json"):
        return LabelSet.from_dict(_read_mapping(path), source=str(path))
    raise LabelSetError(
        f"unknown built-in label set {text!r}, and no label set file of that name; built-in sets are "
        f"{list(BUILTIN_LABEL_SETS)}, a custom set is a YAML/JSON file"
    )
