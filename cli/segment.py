"""``l2i-segment``: turn photos into label maps with a segmenter (how most users start: from a photo, not a painting).

Each image becomes ``<out>/<stem>.png``, a palette PNG of the label set's class ids (what `l2i-train`'s folder
format, the nodes and `l2i-labels` read). The segmenter's classes are matched to the label set by name.

Examples::

    l2i-segment photo.jpg --out labels/                                     # builtin:toy, toy label set
    l2i-segment photos/ --out labels/ --segmenter models/segformer-b5-cityscapes --label-set cityscapes
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ._args import run_reporting_errors

PROG = "l2i-segment"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Segment photos into label maps (palette PNGs of class ids) with a local transformers\n"
        "SegFormer/UperNet folder or builtin:toy; the segmenter's classes are matched to the label set by name.",
        epilog=__doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", help="image files, or folders of images (.png/.jpg/.jpeg/.webp)")
    parser.add_argument("--out", required=True, help="folder for <stem>.png label maps (created if missing)")
    parser.add_argument(
        "--segmenter", default="builtin:toy", help="segmenter folder, or builtin:toy (default: builtin:toy)"
    )
    parser.add_argument(
        "--label-set", default=None, help="label set: built-in name or file (default: toy with builtin:toy)"
    )
    parser.add_argument(
        "--input-norm",
        choices=("auto", "imagenet", "half"),
        default="auto",
        help="pixel normalisation of the segmenter: auto reads its preprocessor_config.json (default)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace label maps already in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``l2i-segment``; returns the exit code (2 for bad input, with a one-line message)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_reporting_errors(PROG, lambda: _run(args))


def _inputs(items: list[str]) -> list[Path]:
    from ..core.evaluation import IMAGE_SUFFIXES, list_images

    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files += list_images(path, what="image")
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"{str(path)!r} is not an image file ({'/'.join(IMAGE_SUFFIXES)})")
            files.append(path)
        else:
            raise FileNotFoundError(f"image {str(path)!r} does not exist")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise ValueError(f"{str(stems[f.stem])!r} and {str(f)!r} would both write {f.stem}.png; rename one")
        stems[f.stem] = f
    return files


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..core.evaluation import read_image
    from ..core.labels import load_label_set, save_label_map
    from ..core.segmenters import class_rows, load_segmenter, segment

    if args.quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    # Everything checked before the first write: inputs, outputs, label set, segmenter and its classes.
    files = _inputs(args.images)
    out = Path(args.out)
    clashes = [str(out / f"{f.stem}.png") for f in files if (out / f"{f.stem}.png").exists()]
    if clashes and not args.overwrite:
        raise FileExistsError(
            f"{len(clashes)} label map(s) already exist, e.g. {clashes[0]!r}; pass --overwrite to replace them"
        )
    if args.label_set is None and args.segmenter != "builtin:toy":
        raise ValueError("--label-set is needed with a segmenter folder (the classes to predict, matched by name)")
    label_set = load_label_set(args.label_set or "toy")
    segmenter = load_segmenter(args.segmenter, args.input_norm, what="--segmenter")
    class_rows(segmenter, label_set, args.segmenter)

    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    for f in tqdm(files, desc="segmenting", unit="img", disable=args.quiet):
        image = read_image(f)
        ids = segment(segmenter.model, image[None], label_set, image.shape[-2:], segmenter.input_norm)[0]
        save_label_map(out / f"{f.stem}.png", ids.to(torch.int64).numpy(), label_set)
    if not args.quiet:
        print(f"wrote {len(files)} label map(s) of label set {label_set.name!r} to {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
