"""``l2i-labels``: inspect label sets and check, convert and preview label maps.

Examples: `EPILOG` below (what ``l2i-labels --help`` prints).

Exit codes: 0 success, 1 the map or label set is invalid (the message says what and where), 2 bad arguments or
another unreadable input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from ..core.errors import LabelMapError, LabelSetError
from ..core.files import atomic_path
from ..core.image_files import check_pixel_count, open_image
from ..core.labels import (
    BUILTIN_LABEL_SETS,
    colorize,
    get_label_set,
    legend_image,
    load_label_set,
    preview_grid,
    read_label_map,
    resize_nearest,
    save_label_map,
)
from ._args import run_reporting_errors

PROG = "l2i-labels"
# What --help shows above the commands, and below them (the module docstring is written for Sphinx).
DESCRIPTION = "Inspect label sets; check, convert, preview and resize label maps."
EPILOG = """examples:
  l2i-labels list
  l2i-labels show cityscapes --legend legend.png
  l2i-labels check berlin_000000_000019_gtFine_labelIds.png --labels cityscapes --remap
  l2i-labels convert painted.png ids.png --labels ade20k --tolerance 20
  l2i-labels convert ids.png colours.png --labels ade20k --to colors
  l2i-labels preview ids.png preview.png --labels ade20k --image photo.jpg
  l2i-labels resize ids.png small.png --labels ade20k --size 64x128   (HxW: 64 rows high, 128 columns wide)

--labels takes a built-in name (see "list"; a folder of that name does not hide it) or a YAML/JSON file.
Exit codes: 0 success, 1 the map or label set is invalid, 2 bad arguments or another unreadable input."""


def _save_rgb(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    image_format = Image.registered_extensions().get(path.suffix.lower())  # the temporary name has no extension
    if image_format is None:
        raise ValueError(f"cannot write {str(path)!r}: unknown image extension {path.suffix!r}; use .png")
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format=image_format)


def size_hw(text: str) -> tuple[int, int]:
    """argparse type of ``--size``: ``HxW`` (rows x columns, e.g. ``64x128`` is 64 high and 128 wide)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        h, w = (int(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HxW (height x width in pixels), e.g. 64x128 for 64 rows and 128 columns"
        ) from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: height and width must be at least 1 pixel (HxW, e.g. 64x128)")
    try:
        check_pixel_count(h, w, "the output size")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return h, w


def _read(args) -> tuple:
    label_set = load_label_set(args.labels)
    result = read_label_map(
        args.input,
        label_set,
        mode=args.mode,
        apply_remap=args.remap,
        tolerance=args.tolerance,
        unknown="ignore" if args.unknown_to_ignore else "error",
    )
    return label_set, result


def _histogram(ids: np.ndarray, label_set) -> list[str]:
    values, counts = np.unique(ids, return_counts=True)
    total = ids.size
    lines = []
    for v, c in sorted(zip(values.tolist(), counts.tolist()), key=lambda vc: -vc[1]):
        name = "ignore" if v == label_set.ignore_index else label_set.names[v]
        lines.append(f"  {v:>5}  {name:<24} {c:>9} px  {100 * c / total:6.2f}%")
    return lines


def cmd_list(args) -> int:
    for name in BUILTIN_LABEL_SETS:
        ls = get_label_set(name)
        extra = []
        if ls.remap is not None:
            extra.append(f"remap from {len(ls.remap)} raw ids")
        if ls.color_aliases:
            extra.append(f"{len(ls.color_aliases)} colour alias(es)")
        print(
            f"{name:<14} {ls.num_classes:>4} classes, ignore {ls.ignore_index}"
            + (f"; {', '.join(extra)}" if extra else "")
        )
    return 0


def cmd_show(args) -> int:
    ls = load_label_set(args.labels)
    print(f"{ls.name}: {ls.num_classes} classes, ignore id {ls.ignore_index}, fingerprint {ls.fingerprint()}")
    for i, (n, c) in enumerate(zip(ls.names, ls.palette.tolist())):
        print(f"  {i:>4}  {n:<28} {c}")
    for color, target in ls.color_aliases.items():
        name = "ignore" if target == ls.ignore_index else ls.names[target]
        print(f"  alias {list(color)} -> {name}")
    if args.legend:
        _save_rgb(Path(args.legend), legend_image(ls, columns=max(1, ls.num_classes // 40)))
        print(f"legend written to {args.legend}")
    return 0


def cmd_check(args) -> int:
    label_set, result = _read(args)
    print(f"{args.input}: {result.ids.shape[0]}x{result.ids.shape[1]} {result.kind} map, label set {label_set.name!r}")
    if result.report is not None:
        print(result.report.summary())
    print("\n".join(_histogram(result.ids, label_set)))
    return 0


def cmd_convert(args) -> int:
    label_set, result = _read(args)
    out = Path(args.output)
    if args.to == "ids":
        save_label_map(out, result.ids, label_set)
    else:
        _save_rgb(out, colorize(result.ids, label_set))
    if result.report is not None:
        print(result.report.summary())
    print(f"wrote {args.to} map {out} ({result.ids.shape[0]}x{result.ids.shape[1]})")
    return 0


def cmd_preview(args) -> int:
    label_set, result = _read(args)
    images = None
    if args.image:
        from PIL import Image

        with open_image(args.image, f"--image {args.image!r}") as opened:  # the pixel limit, before decoding
            img = opened.convert("RGB")
        h, w = result.ids.shape
        if img.size != (w, h):
            img = img.resize((w, h), Image.BICUBIC)
        images = [np.asarray(img)]
    _save_rgb(Path(args.output), preview_grid([result.ids], label_set, images))
    print(f"preview written to {args.output}")
    return 0


def cmd_resize(args) -> int:
    label_set, result = _read(args)
    h, w = args.size
    save_label_map(Path(args.output), resize_nearest(result.ids, (h, w)), label_set)
    print(f"wrote {args.output} ({h}x{w} HxW: {h} rows high, {w} columns wide; nearest)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the built-in label sets").set_defaults(func=cmd_list)
    show = sub.add_parser("show", help="print a label set's classes and colours")
    show.add_argument("labels", help="built-in name or a YAML/JSON label set file")
    show.add_argument("--legend", help="also write a legend PNG here")
    show.set_defaults(func=cmd_show)

    def map_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--labels", required=True, help="built-in name or a YAML/JSON label set file")
        p.add_argument("--mode", choices=("auto", "ids", "colors"), default="auto", help="how to read the input")
        p.add_argument("--remap", action="store_true", help="the input holds raw dataset ids; apply the set's remap")
        p.add_argument("--tolerance", type=float, default=0.0, help="colour snapping distance (RGB), default 0")
        p.add_argument("--unknown-to-ignore", action="store_true", help="map unknown colours to ignore, not an error")

    for name, func, help_text in (
        ("check", cmd_check, "read a map, report colours and class pixel counts"),
        ("convert", cmd_convert, "convert a map to an id PNG (palette mode) or a colour PNG"),
        ("preview", cmd_preview, "colourised map (beside an image) with a legend"),
        ("resize", cmd_resize, "nearest resize (never invents a class)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("input", help="label map: PNG (ids or colours) or .npy")
        if name != "check":
            p.add_argument("output", help="output PNG (or .npy for ids)")
        map_args(p)
        if name == "convert":
            p.add_argument("--to", choices=("ids", "colors"), default="ids", help="output kind (default ids)")
        if name == "preview":
            p.add_argument("--image", help="an image to show beside the map")
        if name == "resize":
            p.add_argument(
                "--size",
                required=True,
                type=size_hw,
                metavar="HxW",
                help="output size as HEIGHTxWIDTH in pixels (rows x columns): 64x128 is 64 high and 128 wide",
            )
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``l2i-labels``; returns the exit code (argparse exits with 2 on bad arguments)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")

    def command() -> int:
        try:
            return args.func(args)
        except (LabelMapError, LabelSetError) as e:  # the map or label set is invalid: exit 1, as documented
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1

    return run_reporting_errors(PROG, command)


if __name__ == "__main__":
    sys.exit(main())
