"""``l2i-toy``: generate a toy-world dataset folder (images, label maps, captions, label set, previews).

Example::

    l2i-toy --out data/toy --num 2000 --size 128 --seed 0 --domains day,night,snow,fog
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from ..core.toy import DOMAINS, check_domains, write_dataset
from ._args import non_negative_int, positive_int, run_reporting_errors


def _size(text: str) -> int:
    value = positive_int(text)
    if not 16 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"expected an image size between 16 and 1024 pixels, got {value}")
    return value


def _domains(text: str) -> tuple[str, ...]:
    try:
        return check_domains(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2i-toy",
        description="Generate a toy-world dataset: street label maps, images rendered in the domains day, night, "
        "snow and fog, and captions naming the domain. Writes images/, labels/, captions.jsonl, labelset.yaml, "
        "preview.png and preview_domains.png.",
    )
    parser.add_argument("--out", required=True, help="dataset folder to write (created if missing)")
    parser.add_argument("--num", type=positive_int, default=100, help="number of samples (default: 100)")
    parser.add_argument("--size", type=_size, default=128, help="image size in pixels, 16..1024 (default: 128)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="dataset seed, >= 0 (default: 0)")
    parser.add_argument(
        "--start",
        type=non_negative_int,
        default=0,
        help="index of the first sample (default: 0); disjoint index ranges of one seed are disjoint splits",
    )
    parser.add_argument(
        "--domains",
        type=_domains,
        default=DOMAINS,
        help=f"comma-separated domains, cycled over the samples (default: {','.join(DOMAINS)})",
    )
    parser.add_argument(
        "--preview-rows", type=non_negative_int, default=8, help="rows in preview.png; 0 writes no previews"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a toy dataset already in --out")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``l2i-toy``; returns the exit code (argparse exits with 2 on bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_reporting_errors("l2i-toy", lambda: _run(parser, args))


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        summary = write_dataset(
            args.out,
            args.num,
            seed=args.seed,
            size=args.size,
            domains=args.domains,
            preview_rows=args.preview_rows,
            overwrite=args.overwrite,
            start=args.start,
        )
    except FileExistsError as err:
        parser.error(str(err))
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"the samples written so far are kept in {args.out}; the same command completes the dataset"
        ) from None
    elapsed = time.perf_counter() - start
    if args.quiet:
        return 0
    h, w = summary.size
    print(f"wrote {summary.num} samples ({h}x{w}, seed {summary.seed}) to {summary.root} in {elapsed:.1f} s")
    if summary.resumed:
        print(f"  completed an interrupted write: {summary.resumed} samples were already there and were kept")
    print("  images/  labels/  captions.jsonl  labelset.yaml")
    if summary.preview is not None:
        print(f"  preview: {summary.preview}  {summary.domain_preview}")
    print("class pixel frequencies:")
    for name, share in summary.class_frequencies.items():
        print(f"  {name:<10} {100 * share:5.1f} %")
    print("per-domain image statistics (mean brightness, saturation, contrast, white fraction):")
    for domain, stats in summary.domain_stats.items():
        n = summary.domain_counts[domain]
        print(
            f"  {domain:<6} n={n:<5d} brightness {stats.brightness:.3f}  saturation {stats.saturation:.3f}  "
            f"contrast {stats.contrast:.3f}  white {stats.white_fraction:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
