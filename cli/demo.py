"""``l2i-demo``: the toy world end to end on a CPU in minutes (the README's main job).

Trains an ALDM ControlNet on the shipped toy base models (``weights/toy``), then prints where the sample grid,
the mIoU before and after training, the domain-word figures and the exported adapter are. ``--compare`` trains
plain and ALDM ControlNets over several seeds and prints the comparison table. Logic: `layout2image.trainer.demo`.

An ``--out`` that holds an earlier demo run is refused unless ``--overwrite``; one that holds files l2i-demo did
not write is always refused (`layout2image.trainer.demo.check_demo_folder`).

Progress goes to stderr (a line before each phase, bars for loops), the summary to stdout; bad input is one line
``l2i-demo: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ._args import add_set_option, positive_int, run_reporting_errors

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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier demo run (with --compare: comparison) in --out: its files are moved to "
        "replaced-<time>/ there and deleted once the new run finishes; files l2i-demo did not write are never "
        "touched (such a folder is refused)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of --compare (0 1 2)")
    parser.add_argument("--num-train", type=positive_int, default=512, help="training scenes (default: 512)")
    parser.add_argument("--num-val", type=positive_int, default=16, help="validation scenes (default: 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2; 0 keeps torch's)")
    add_set_option(parser, "extra trainer settings, e.g. --set optim.lr=2e-4")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the trainer's progress")
    return parser


def _reference_note(demo, documented: dict | None) -> str | None:
    """Where this run's mIoU stands beside the documented 3-seed comparison (the README's figure), when the run is
    comparable (same kind and steps)."""
    if not documented:
        return None
    kind = "ALDM" if demo.adversarial else "plain"
    runs = documented.get("runs", {}).get(kind) or []
    if not runs or documented.get("steps") != demo.steps:
        return None
    values = [r["miou_after"] for r in runs]
    mean = sum(values) / len(values)
    spread = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    seeds = ", ".join(str(s) for s in documented.get("seeds", []))
    same = [r["miou_after"] for r in runs if r.get("seed") == demo.seed]
    here = f"the documented seed-{demo.seed} run gave {same[0]:.3f}; " if same else ""
    return (
        f"  this is one seed's figure ({here}the README's {mean:.3f} ± {spread:.3f} is the mean ± standard deviation "
        f"over seeds {seeds}: l2i-demo --compare)"
    )


def _summary(demo, documented: dict | None = None) -> list[str]:
    kind = "ALDM" if demo.adversarial else "plain"
    stats = demo.domain_stats
    words = ", ".join(f"{d} {stats[d]['brightness']:.2f}" for d in stats)
    base = demo.base_night_minus_day_brightness
    # The figures, not a verdict: a 2-step run and a 300-step run both print them, and the user compares them with
    # the base model's own figure (a ControlNet that kept the words' effect stays near it).
    effect = f"night - day {demo.night_minus_day_brightness:+.3f}" + (
        f"; the base model alone: {base:+.3f}" if base is not None else ""
    )
    lines = [
        f"{kind} ControlNet, seed {demo.seed}: {demo.steps} steps in {demo.train_seconds:.0f} s "
        f"({demo.seconds_per_step:.2f} s/step); demo {demo.seconds:.0f} s",
        f"  layout mIoU (evaluation segmenter on samples of the validation layouts): before {demo.miou_before:.3f} "
        f"-> after {demo.miou_after:.3f}; over all domain words {demo.miou_domains:.3f}",
    ]
    note = _reference_note(demo, documented)
    if note:
        lines.append(note)
    return lines + [
        "  mIoU during training: " + ", ".join(f"step {int(s)} {m:.3f}" for s, m in demo.miou_curve),
        f"  domain words, mean sample brightness (0 black .. 1 white): {words} ({effect})",
        f"  sample grid (layout | sample | segmentation of the sample): {demo.files['grid']}",
        f"  before training: {demo.files['grid_before']};  per domain word: {demo.files['domains']}",
        f"  exported adapter: {demo.files['export']}",
        f"  all figures: {demo.files['summary']}",
    ]


def _show_progress() -> logging.Handler:
    """Show the demo's phase lines (INFO on `layout2image.trainer.demo`) on stderr even without ``--verbose``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s l2i-demo: %(message)s", datefmt="%H:%M:%S"))
    demo_logger = logging.getLogger("layout2image.trainer.demo")
    demo_logger.setLevel(logging.INFO)
    demo_logger.addHandler(handler)
    demo_logger.propagate = False  # with --verbose the root handler would print each line twice
    return handler


def _run(args) -> int:
    logger = logging.getLogger("layout2image.trainer.demo")
    what = "plain and ALDM ControlNets" if args.compare else ("a plain" if args.plain else "an ALDM") + " ControlNet"
    # The first line comes before torch and the trainer are imported (seconds on a busy CPU).
    logger.info("training %s on the toy world into %s; loading torch", what, args.out)
    from ..trainer.demo import documented_comparison, run_comparison, run_demo

    common = dict(
        steps=args.steps,
        num_train=args.num_train,
        num_val=args.num_val,
        threads=args.threads or None,
        overrides=tuple(args.overrides),
        overwrite=args.overwrite,
    )
    if args.compare:
        from ..trainer.demo import comparison_markdown

        comparison = run_comparison(args.out, seeds=tuple(args.seeds), **common)
        print(comparison_markdown(comparison), end="")
        print(f"all figures: {json.dumps(os.path.join(args.out, 'comparison.json'))}")
    else:
        demo = run_demo(args.out, seed=args.seed, adversarial=not args.plain, **common)
        print("\n".join(_summary(demo, documented_comparison())))
    return 0


def _interruptible(args) -> int:
    """`_run`; Ctrl-C says what is kept and how to go on (run_reporting_errors prints it on one line)."""
    try:
        return _run(args)
    except KeyboardInterrupt as e:
        kept = [str(e)] if str(e) else []
        kept.append(f"the dataset written so far in {os.path.join(args.out, 'data')} is kept and reused")
        started = os.path.exists(os.path.join(args.out, "run")) or any(
            n.endswith(tuple(f"_seed{s}" for s in args.seeds)) for n in _names(args.out)
        )
        again = "l2i-demo again with --overwrite" if started else "the same command again"
        raise KeyboardInterrupt("; ".join(kept) + f"; to start over, run {again}") from None


def _names(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # See cli/toy_base.py: spinning OpenMP waiters make a busy 2-core machine many times slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handler = _show_progress()
    try:
        return run_reporting_errors("l2i-demo", lambda: _interruptible(args))
    finally:
        demo_logger = logging.getLogger("layout2image.trainer.demo")
        demo_logger.removeHandler(handler)
        demo_logger.propagate = True


if __name__ == "__main__":
    sys.exit(main())
