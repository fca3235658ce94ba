"""Label-map nodes: label sets, loading and decoding label maps, composing them from masks, preview, resize.

Every node here is a thin adapter over ``core.labels``: decoding colours (palette snapping with a tolerance and a
report of unknown colours), reading id/colour files, colourising, legends and nearest resizing all live there.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..core.errors import LabelMapError, LabelSetError
from ..core.labels import (
    BUILTIN_LABEL_SETS,
    LabelSet,
    colorize,
    decode_colors,
    get_label_set,
    legend_image,
    load_label_set,
    read_label_map,
    resize_nearest,
)
from .model_files import clean_path_input
from .types import (
    LabelMap,
    LabelMapType,
    LabelSetType,
    image_from_uint8,
    image_to_uint8,
    latent_image_size,
    mask_to_bool,
)

__all__ = [
    "NODES",
    "L2ILabelMapFromImage",
    "L2ILabelMapFromMasks",
    "L2ILabelSet",
    "L2ILoadLabelMap",
    "L2IPreviewLabelMap",
    "L2IResizeLabelMap",
]

CATEGORY = "layout2image/label maps"
CUSTOM_FILE = "custom file"
CLASS_NAMES = "class names"
MAX_MASKS = 6
IGNORE_WORD = "ignore"
_MAX_SIZE = 16384
_MAX_RGB_DISTANCE = 442.0  # sqrt(3) * 255: farther than any two RGB colours


def _resolve_path(path: str, what: str) -> Path:
    """A user-given path: absolute, or relative to the working folder, or to ComfyUI's input folder."""
    text = clean_path_input(path)
    if not text:
        raise LabelMapError(f"`{what}` is empty; give the path of a file")
    candidate = Path(text).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    looked = [str(candidate.resolve())]
    try:
        import folder_paths  # ComfyUI's; absent outside ComfyUI
    except ImportError:
        folder_paths = None
    if folder_paths is not None:
        in_input = Path(folder_paths.get_input_directory()) / text
        if in_input.exists():
            return in_input
        looked.append(str(in_input))
    raise LabelMapError(f"`{what}` {text!r} does not exist; looked at {', '.join(looked)}")


def _distinct_palette(n: int) -> np.ndarray:
    """`n` distinct, clearly non-black colours (golden-angle hues, alternating brightness)."""
    colors: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    k = 0
    while len(colors) < n:
        hue = (k * 0.618033988749895) % 1.0
        value = (0.95, 0.7, 0.5)[(k // 2) % 3] if k % 2 else 0.95
        rgb = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.75, value)]
        k += 1
        if tuple(rgb) not in seen:  # a label set may not give one colour to two classes
            seen.add(tuple(rgb))
            colors.append(rgb)
    return np.array(colors, dtype=np.int64)


def _label_set_from_names(text: str) -> LabelSet:
    """One class per line (or comma-separated): ``name`` or ``name #rrggbb``; ids follow the order given."""
    entries = [e.strip() for line in text.splitlines() for e in line.split(",")]
    entries = [e for e in entries if e]
    if not entries:
        raise LabelSetError("`class_names` is empty; give one class name per line (optionally 'name #rrggbb')")
    names, colors = [], []
    for entry in entries:
        parts = entry.rsplit(maxsplit=1)
        if len(parts) == 2 and parts[1].startswith("#"):
            names.append(parts[0].strip())
            colors.append(parts[1])
        else:
            names.append(entry)
            colors.append(None)
    auto = _distinct_palette(len(names)).tolist()
    classes = [{"name": n, "color": c if c is not None else auto[i]} for i, (n, c) in enumerate(zip(names, colors))]
    return LabelSet.from_dict({"name": "custom", "classes": classes}, source="class_names")


def _class_id(label_set: LabelSet, name: str, what: str) -> int:
    text = name.strip()
    if text.lower() == IGNORE_WORD:
        return label_set.ignore_index
    if text.isdigit():
        value = int(text)
        if 0 <= value < label_set.num_classes:
            return value
        raise LabelSetError(
            f"`{what}` is id {value}, but label set {label_set.name!r} has ids 0..{label_set.num_classes - 1}"
        )
    try:
        return label_set.index(text)
    except LabelSetError as e:
        raise LabelSetError(f"`{what}`: {e}") from None


def _present_summary(label_map: LabelMap, limit: int = 12) -> str:
    ids = label_map.ids
    total = ids.numel()
    counts = torch.bincount(ids.reshape(-1), minlength=label_map.label_set.num_classes)
    names = label_map.label_set.names
    rows = [(int(c), int(counts[c])) for c in label_map.present_classes()]
    rows.sort(key=lambda r: -r[1])
    ignore = int((ids == label_map.ignore_index).sum())
    b, h, w = ids.shape
    lines = [f"{b} map(s) of {h}x{w}, label set {label_map.label_set.name!r}: {len(rows)} class(es) present"]
    lines += [f"  {c:>3} {names[c]}: {100 * n / total:.1f}%" for c, n in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"  ... and {len(rows) - limit} more")
    if ignore:
        lines.append(f"  ignore ({label_map.ignore_index}): {100 * ignore / total:.1f}%")
    return "\n".join(lines)


class L2ILabelSet(io.ComfyNode):
    """Pick the label set (class names, palette, ignore id) that label maps and models share."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="L2ILabelSet",
            display_name="Label Set",
            category=CATEGORY,
            description=(
                "A label set: the ordered class names, their palette colours and the ignore id. Built-in sets "
                "(ADE20K-150, COCO-Stuff, Cityscapes-19, CelebAMask-HQ, toy), a YAML/JSON file, or your own list "
                "of class names."
            ),
            inputs=[
                io.Combo.Input(
                    "source",
                    options=[*BUILTIN_LABEL_SETS, CUSTOM_FILE, CLASS_NAMES],
                    default="ade20k",
                    tooltip=(
                        "A built-in set; 'custom file' reads `custom_file`; 'class names' builds a set from "
                        "`class_names` (colours generated unless given)."
                    ),
                ),
                io.String.Input(
                    "custom_file",
                    default="",
                    tooltip=(
                        "Path of a label-set YAML or JSON file (name, ignore_index, classes with name and colour); "
                        "used when source is 'custom file'."
                    ),
                ),
                io.String.Input(
                    "class_names",
                    default="",
                    multiline=True,
                    tooltip=(
                        "One class per line (or comma-separated), in id order, optionally with a colour: "
                        "'sky #4682b4'. Used when source is 'class names'; the ignore id is 255."
                    ),
                ),
            ],
            outputs=[LabelSetType.Output("label_set", tooltip="The label set, for the label-map nodes.")],
        )

    @classmethod
    def execute(cls, source: str, custom_file: str = "", class_names: str = "") -> io.NodeOutput:
        if source == CUSTOM_FILE:
            label_set = load_label_set(_resolve_path(custom_file, "custom_file"))
        elif source == CLASS_NAMES:
            label_set = _label_set_from_names(class_names)
        elif source in BUILTIN_LABEL_SETS:
            label_set = get_label_set(source)
        else:
            raise LabelSetError(
                f"`source` {source!r} is not known; use one of {[*BUILTIN_LABEL_SETS, CUSTOM_FILE, CLASS_NAMES]}"
            )
        return io.NodeOutput(label_set)


class L2ILoadLabelMap(io.ComfyNode):
    """Read a label map file: an id map (PNG L/P/16-bit, .npy) or a colour PNG decoded through the palette."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="L2ILoadLabelMap",
            display_name="Load Label Map",
            category=CATEGORY,
            description=(
                "Load a label map: class ids from a greyscale/palette/16-bit PNG or a .npy array, or a colour PNG "
                "decoded through the label set's palette, snapping near colours within a tolerance. Reports the "
                "colours it could not place."
            ),
            inputs=[
                io.String.Input(
                    "path",
                    default="",
                    tooltip="File path (absolute, or relative to ComfyUI's input folder): .png or .npy.",
                ),
                LabelSetType.Input("label_set", tooltip="The classes the map's ids or colours refer to."),
                io.Combo.Input(
                    "mode",
                    options=["auto", "ids", "colors"],
                    default="auto",
                    tooltip=(
                        "'auto': 1-channel and palette PNGs and .npy are ids, RGB PNGs are colours; 'ids' or "
                        "'colors' forces one reading."
                    ),
                ),
                io.Float.Input(
                    "tolerance",
                    default=0.0,
                    min=0.0,
                    max=_MAX_RGB_DISTANCE,
                    step=1.0,
                    tooltip=(
                        "Colour maps: colours within this RGB distance (0-442) of a palette colour snap to it. 0 = "
                        "exact colours only; 10-30 absorbs anti-aliasing and light compression."
                    ),
                ),
                io.Boolean.Input(
                    "unknown_to_ignore",
                    default=False,
                    tooltip=(
                        "Colour maps: map colours beyond the tolerance to the ignore id (listed in the report) "
                        "instead of stopping with an error."
                    ),
                ),
                io.Boolean.Input(
                    "apply_remap",
                    default=False,
                    tooltip=(
                        "Id maps: the file holds raw dataset ids (e.g. Cityscapes labelIds); map them through the "
                        "label set's remap."
                    ),
                ),
            ],
            outputs=[
                LabelMapType.Output("label_map", tooltip="The label map (batch of 1)."),
                io.String.Output("report", tooltip="What was read: classes present, snapped and unknown colours."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, path: str, **kwargs):
        try:
            p = _resolve_path(path, "path")
            return (str(p), p.stat().st_mtime_ns, p.stat().st_size)
        except (LabelMapError, OSError):
            return path

    @classmethod
    def execute(
        cls,
        path: str,
        label_set: LabelSet,
        mode: str = "auto",
        tolerance: float = 0.0,
        unknown_to_ignore: bool = False,
        apply_remap: bool = False,
    ) -> io.NodeOutput:
        file = _resolve_path(path, "path")
        read = read_label_map(
            file,
            label_set,
            mode=mode,
            apply_remap=apply_remap,
            tolerance=float(tolerance),
            unknown="ignore" if unknown_to_ignore else "error",
        )
        label_map = LabelMap.from_numpy(read.ids, label_set)
        report = f"{file.name}: {read.kind}\n{_present_summary(label_map)}"
        if read.report is not None:
            report += "\ncolours: " + read.report.summary()
        return io.NodeOutput(label_map, report)


class L2ILabelMapFromImage(io.ComfyNode):
    """Decode a colour IMAGE (e.g. a segmentation preprocessor's ADE-palette output) into a label map."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="L2ILabelMapFromImage",
            display_name="Label Map from Image",
            category=CATEGORY,
            description=(
                "Turn a colour-coded IMAGE into class ids by palette lookup with snapping, e.g. the ADE20K-palette "
                "output of comfyui_controlnet_aux's OneFormer/UniFormer segmentation preprocessors (use the ade20k "
                "label set). Every image of the batch is decoded."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Colour-coded label image(s), (B, H, W, 3) in [0, 1]."),
                LabelSetType.Input("label_set", tooltip="The palette the colours come from."),
                io.Float.Input(
                    "tolerance",
                    default=0.0,
                    min=0.0,
                    max=_MAX_RGB_DISTANCE,
                    step=1.0,
                    tooltip=(
                        "Colours within this RGB distance (0-442) of a palette colour snap to it; 0 = exact only. "
                        "Raise it for resized or compressed maps."
                    ),
                ),
                io.Boolean.Input(
                    "unknown_to_ignore",
                    default=False,
                    tooltip="Map colours beyond the tolerance to the ignore id instead of stopping with an error.",
                ),
            ],
            outputs=[
                LabelMapType.Output("label_map", tooltip="One label map per input image."),
                io.String.Output("report", tooltip="Snapped and unknown colours per image."),
            ],
        )

    @classmethod
    def execute(
        cls, image: torch.Tensor, label_set: LabelSet, tolerance: float = 0.0, unknown_to_ignore: bool = False
    ) -> io.NodeOutput:
        rgb = image_to_uint8(image, "image")
        maps, lines = [], []
        for i, frame in enumerate(rgb):
            ids, report = decode_colors(
                frame,
                label_set,
                tolerance=float(tolerance),
                unknown="ignore" if unknown_to_ignore else "error",
                source=f"image {i}",
            )
            maps.append(ids)
            lines.append(f"image {i}: {report.summary()}")
        label_map = LabelMap.from_numpy(np.stack(maps), label_set)
        return io.NodeOutput(label_map, "\n".join(lines + [_present_summary(label_map)]))


def _mask_inputs() -> list:
    inputs = []
    for k in range(1, MAX_MASKS + 1):
        inputs.append(
            io.Mask.Input(
                f"mask_{k}",
                optional=True,
                tooltip=f"Region {k}: pixels above 0.5 get `class_{k}`; later regions are painted over earlier ones.",
            )
        )
        inputs.append(
            io.String.Input(
                f"class_{k}",
                default="",
                tooltip=f"Class of region {k}: a class name of the label set, its id, or 'ignore'.",
            )
        )
    return inputs


class L2ILabelMapFromMasks(io.ComfyNode):
    """Compose a label map from a base class and up to six (mask, class) regions."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="L2ILabelMapFromMasks",
            display_name="Label Map from Masks",
            category=CATEGORY,
            description=(
                f"Paint a label map: start from `base_class` everywhere, then paint up to {MAX_MASKS} MASK regions "
                "with their classes in order (region 2 over region 1, and so on). Masks are resized (nearest) to "
                "the map size."
            ),
            inputs=[
                LabelSetType.Input("label_set", tooltip="The classes the names refer to."),
                io.String.Input(
                    "base_class",
                    default=IGNORE_WORD,
                    tooltip="Class of every pixel no region covers: a class name, its id, or 'ignore'.",
                ),
                io.Int.Input(
                    "width",
                    default=0,
                    min=0,
                    max=_MAX_SIZE,
                    step=8,
                    tooltip="Map width in pixels; 0 = the width of the first connected mask.",
                ),
                io.Int.Input(
                    "height",
                    default=0,
                    min=0,
                    max=_MAX_SIZE,
                    step=8,
                    tooltip="Map height in pixels; 0 = the height of the first connected mask.",
                ),
                *_mask_inputs(),
            ],
            outputs=[LabelMapType.Output("label_map", tooltip="The composed label map (batch = the masks' batch).")],
        )

    @classmethod
    def execute(cls, label_set: LabelSet, base_class: str = IGNORE_WORD, width: int = 0, height: int = 0, **regions):
        pairs = []
        for k in range(1, MAX_MASKS + 1):
            mask = regions.get(f"mask_{k}")
            name = (regions.get(f"class_{k}") or "").strip()
            if mask is None:
                continue
            if not name:
                raise LabelSetError(f"`mask_{k}` is connected but `class_{k}` is empty; name its class")
            pairs.append((k, mask_to_bool(mask, f"mask_{k}"), _class_id(label_set, name, f"class_{k}")))
        if width and height:
            size = (int(height), int(width))
        elif width or height:
            raise LabelMapError(
                f"give both `width` and `height` or neither (0 = from the masks), got {width}x{height}"
            )
        elif pairs:
            size = tuple(pairs[0][1].shape[-2:])
        else:
            raise LabelMapError("no mask is connected and `width`/`height` are 0: nothing gives the map's size")
        batch = max([m.shape[0] for _, m, _ in pairs], default=1)
        for k, m, _ in pairs:
            if m.shape[0] not in (1, batch):
                raise LabelMapError(
                    f"`mask_{k}` has batch {m.shape[0]} but another mask has {batch}; use batch 1 or {batch}"
                )
        ids = torch.full((batch, *size), _class_id(label_set, base_class, "base_class"), dtype=torch.int64)
        for _, m, class_id in pairs:
            m = resize_nearest(m, size).expand(batch, -1, -1)
            ids = torch.where(m, torch.full_like(ids, class_id), ids)
        return io.NodeOutput(LabelMap(ids, label_set))


class L2IPreviewLabelMap(io.ComfyNode):
    """Colourise a label map and draw a legend of the classes present."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="L2IPreviewLabelMap",
            display_name="Preview Label Map",
            category=CATEGORY,
            description=(
                "Show a label map in its palette colours (ignore pixels black) with a legend of the classes it "
                "contains. The colour image is the palette-RGB hint a stock segmentation ControlNet reads."
            ),
            inputs=[LabelMapType.Input("label_map", tooltip="The label map(s) to show.")],
            outputs=[
                io.Image.Output("image", tooltip="Palette colours, (B, H, W, 3) in [0, 1]."),
                io.Image.Output("legend", tooltip="Swatch, id and name of every class present."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, label_map: LabelMap) -> io.NodeOutput:
        label_set = label_map.label_set
        ids = label_map.numpy()
        image = image_from_uint8(colorize(ids, label_set))
        present = label_map.present_classes()
        has_ignore = bool((ids == label_map.ignore_index).any())  # drawn black: the legend says what black means
        rows_fit = max(12, label_map.size[0] // 18)  # legend rows of 18 px: about as tall as the map
        columns = max(1, -(-(len(present) + has_ignore) // rows_fit))
        legend = image_from_uint8(legend_image(label_set, present, columns=columns, ignore=has_ignore))
        return io.NodeOutput(image, legend, ui=ui.PreviewImage([*image, legend[0]], cls=cls))


def _center_crop_box(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of the centred crop of an `h x w` map with the aspect ratio of `height x width`."""
    if w * height > h * width:  # too wide
        crop_w = max(1, round(h * width / height))
        return 0, (w - crop_w) // 2, h, crop_w
    if w * height < h * width:  # too tall
        crop_h = max(1, round(w * height / width))
        return (h - crop_h) // 2, 0, crop_h, w
    return 0, 0, h, w


class L2IResizeLabelMap(io.ComfyNode):
    """Resize a label map with nearest sampling (never invents a class), optionally centre-cropping first."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="L2IResizeLabelMap",
            display_name="Resize Label Map",
            category=CATEGORY,
            description=(
                "Resize a label map by nearest sampling to a size, to an IMAGE's size, or to a LATENT's image size "
                "(latent x 8). With crop 'center' the map is first cropped to the target aspect ratio, as ComfyUI "
                "crops ControlNet hints."
            ),
            inputs=[
                LabelMapType.Input("label_map", tooltip="The label map(s) to resize."),
                io.Combo.Input(
                    "target",
                    options=["size", "match image", "match latent"],
                    default="size",
                    tooltip="'size': width x height; 'match image': the `image` input's size; 'match latent': the "
                    "`latent` input's size x 8.",
                ),
                io.Int.Input(
                    "width", default=512, min=1, max=_MAX_SIZE, step=8, tooltip="Target width in pixels ('size')."
                ),
                io.Int.Input(
                    "height", default=512, min=1, max=_MAX_SIZE, step=8, tooltip="Target height in pixels ('size')."
                ),
                io.Combo.Input(
                    "crop",
                    options=["disabled", "center"],
                    default="disabled",
                    tooltip="'center': crop to the target aspect ratio first; 'disabled': stretch.",
                ),
                io.Image.Input("image", optional=True, tooltip="Size reference for 'match image'."),
                io.Latent.Input("latent", optional=True, tooltip="Size reference for 'match latent' (x 8)."),
            ],
            outputs=[LabelMapType.Output("label_map", tooltip="The resized label map.")],
        )

    @classmethod
    def execute(
        cls,
        label_map: LabelMap,
        target: str = "size",
        width: int = 512,
        height: int = 512,
        crop: str = "disabled",
        image: torch.Tensor | None = None,
        latent: dict | None = None,
    ) -> io.NodeOutput:
        if target == "size":
            size = (int(height), int(width))
        elif target == "match image":
            if image is None:
                raise LabelMapError("`target` is 'match image' but no `image` is connected")
            size = (int(image.shape[-3]), int(image.shape[-2]))
        elif target == "match latent":
            if latent is None:
                raise LabelMapError("`target` is 'match latent' but no `latent` is connected")
            size = latent_image_size(latent)
        else:
            raise LabelMapError(f"`target` {target!r} is not known; use 'size', 'match image' or 'match latent'")
        if crop not in ("disabled", "center"):
            raise LabelMapError(f"`crop` {crop!r} is not known; use 'disabled' or 'center'")
        ids = label_map.ids
        if crop == "center":
            top, left, ch, cw = _center_crop_box(*label_map.size, *size)
            ids = ids[:, top : top + ch, left : left + cw]
        return io.NodeOutput(LabelMap(resize_nearest(ids, size).clone(), label_map.label_set))


NODES = [
    L2ILabelSet,
    L2ILoadLabelMap,
    L2ILabelMapFromImage,
    L2ILabelMapFromMasks,
    L2IPreviewLabelMap,
    L2IResizeLabelMap,
]
