"""Train the toy world's base models (autoencoder, tokenizer, text encoder, UNet, segmenters) into one folder.

Example::

    python -m layout2image.cli.toy_base --out weights/toy --minutes 30 --seed 0

The folder loads with `layout2image.trainer.models.load_base_models` like an SD 1.5 diffusers folder; the
acceptance figures are printed and written to ``<out>/acceptance.json`` (see docs/TOY_WORLD.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys

from ._args import add_set_option, non_negative_int, positive_float, run_reporting_errors

__all__ = ["build_parser", "main", "summary_lines"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2i-train --preset toy-base",
        description="Train the toy world's stand-ins for SD 1.5's frozen parts (autoencoder, tokenizer, text encoder, "
        "UNet) plus an evaluation segmenter and a discriminator initialisation, within a time budget on a CPU, and "
        "write them as a diffusers-style folder with acceptance.json.",
    )
    parser.add_argument("--out", required=True, help="folder to write (e.g. weights/toy); created if missing")
    parser.add_argument(
        "--minutes", type=positive_float, default=30.0, help="wall-clock budget of the whole run (default: 30)"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of data and weights (default: 0)")
    parser.add_argument(
        "--threads", type=non_negative_int, default=2, help="torch CPU threads (default: 2; 0 keeps torch's choice)"
    )
    add_set_option(parser, "override a ToyBaseConfig field, e.g. --set noise_offset=0.05 unet_channels=[32,64,128]")
    parser.add_argument("--quiet", action="store_true", help="log warnings only (the summary is still printed)")
    return parser


def summary_lines(figures: dict, seconds: float, out: str) -> list[str]:
    """The printed summary: one line per acceptance figure."""
    ae, seg, disc, t2i = (figures[k] for k in ("autoencoder", "segmenter", "discriminator_init", "text_to_image"))
    lines = [
        f"toy base models written to {out} in {seconds / 60:.1f} min",
        f"  autoencoder:        held-out PSNR {ae['heldout_psnr_db']:.2f} dB, scaling_factor {ae['scaling_factor']}",
        f"  segmenter:          held-out mIoU {seg['heldout_miou']:.4f} (autoencoded {seg['heldout_miou_autoencoded']:.4f})",
        f"  discriminator init: own held-out mIoU {disc['own_heldout_miou']:.4f} (never used for layout mIoU)",
    ]
    brightness = ", ".join(f"{d} {t2i[d]['brightness']:.3f}" for d in ("day", "night", "snow", "fog") if d in t2i)
    lines.append(f"  text-to-image:      sample brightness {brightness}")
    lines.append(f"                      night - day brightness {t2i['night_minus_day_brightness']:+.3f}")
    if "class_share_distance_to_real" in t2i:
        lines.append(
            f"                      class-share distance to real {t2i['class_share_distance_to_real']:.3f}, "
            f"segmenter confidence {t2i['segmenter_confidence_on_samples']:.3f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the toy base training; returns the exit code (argparse exits with 2 on bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("layout2image").setLevel(logging.WARNING if args.quiet else logging.INFO)
    # OpenMP threads that spin while waiting make a 2-thread run several times slower as soon as any other process
    # wants the CPU (measured: 0.8 s -> 6-9 s per autoencoder step); sleeping waiters cost little on a quiet
    # machine. It only takes effect if torch (and its OpenMP runtime) is not loaded yet.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from ..trainer.config_io import ConfigError, apply_overrides, build_dataclass
    from ..trainer.toy_base import ToyBaseConfig, train_toy_base

    try:
        data = apply_overrides(ToyBaseConfig, {"seed": args.seed, "minutes": args.minutes}, args.overrides)
        config = build_dataclass(ToyBaseConfig, data)
    except (ConfigError, ValueError) as e:
        parser.error(str(e))
    argv = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["l2i-train", "--preset", "toy-base", *argv]).replace(" --out ", " --output ", 1)

    def run() -> int:
        report = train_toy_base(args.out, config, threads=args.threads or None, command=command)
        for line in summary_lines(report.figures, report.seconds, args.out):
            print(line)
        print(f"  all figures: {json.dumps(str(report.out_dir / 'acceptance.json'))}")
        return 0

    # an unwritable --out, a dataset or label map error: one line naming it, exit 2
    return run_reporting_errors("l2i-train --preset toy-base", run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
