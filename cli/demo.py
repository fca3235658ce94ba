"""``l2i-demo``: the toy world end to end on a CPU in minutes (the README's main job).

Trains an ALDM ControlNet on the shipped toy base models (``weights/toy``), then prints where the sample grid,
the mIoU before and after training, the domain-word figures and the exported adapter are. ``--compare`` trains
plain and ALDM ControlNets over several seeds and prints the comparison table. Logic: `layout2image.trainer.demo`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ._args import add_set_option, positive_int

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2i-demo",
        description="Train an ALDM ControlNet on the toy world's base models and measure layout mIoU "
        "(about 5 minutes on a 2-core CPU).",
    )
    parser.add_argument("--out", default="l2i_demo", help="output folder (default: l2i_demo)")
    parser.add_argument("--steps", type=positive_int, help="training steps (default: the toy preset's)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    parser.add_argument("--plain", action="store_true", help="plain diffusion loss instead of ALDM")
    parser.add_argument(
        "--compare", action="store_true", help="train plain and ALDM ControlNets over --seeds and print a table"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of --compare (0 1 2)")
    parser.add_argument("--num-train", type=positive_int, default=512, help="training scenes (default: 512)")
    parser.add_argument("--num-val", type=positive_int, default=16, help="validation scenes (default: 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2; 0 keeps torch's)")
    add_set_option(parser, "extra trainer settings, e.g. --set optim.lr=2e-4")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the trainer's progress")
    return parser


def _summary(demo) -> list[str]:
    kind = "ALDM" if demo.adversarial else "plain"
    stats = demo.domain_stats
    words = ", ".join(f"{d} {stats[d]['brightness']:.2f}" for d in stats)
    return [
        f"{kind} ControlNet: {demo.steps} steps in {demo.train_seconds:.0f} s ({demo.seconds_per_step:.2f} s/step); "
        f"demo {demo.seconds:.0f} s",
        f"  layout mIoU (evaluation segmenter on samples): before {demo.miou_before:.3f} -> after "
        f"{demo.miou_after:.3f}; over all domain words {demo.miou_domains:.3f}",
        "  mIoU during training: " + ", ".join(f"step {int(s)} {m:.3f}" for s, m in demo.miou_curve),
        f"  domain words still work: brightness {words} (night - day {demo.night_minus_day_brightness:+.3f})",
        f"  sample grid (layout | sample | segmentation): {demo.files['grid']}",
        f"  before training: {demo.files['grid_before']};  per domain word: {demo.files['domains']}",
        f"  exported adapter: {demo.files['export']}",
        f"  all figures: {demo.files['summary']}",
    ]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # See cli/toy_base.py: spinning OpenMP waiters make a busy 2-core machine many times slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from ..trainer.config_io import ConfigError
    from ..trainer.demo import run_comparison, run_demo

    common = dict(
        steps=args.steps,
        num_train=args.num_train,
        num_val=args.num_val,
        threads=args.threads or None,
        overrides=tuple(args.overrides),
    )
    try:
        if args.compare:
            from ..trainer.demo import comparison_markdown

            comparison = run_comparison(args.out, seeds=tuple(args.seeds), **common)
            print(comparison_markdown(comparison), end="")
            print(f"all figures: {json.dumps(os.path.join(args.out, 'comparison.json'))}")
        else:
            demo = run_demo(args.out, seed=args.seed, adversarial=not args.plain, **common)
            print("\n".join(_summary(demo)))
    except ConfigError as e:
        print(f"l2i-demo: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
