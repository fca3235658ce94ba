"""``l2i-train``: train an ALDM ControlNet, an SDM-LoRA or a T2I-Adapter on layout data.

Examples::

    l2i-train --preset toy --data data/toy --output runs/toy --set model.pretrained=models/tiny-sd
    l2i-train --preset sd15-12gb --data data/cityscapes --output runs/cs \\
        --set data.format=cityscapes model.pretrained=models/sd15 discriminator.pretrained=models/upernet-ade
    l2i-train --output runs/cs --config runs/cs/config.yaml --resume latest     # continue a run
    l2i-train --output runs/cs --config runs/cs/config.yaml --resume latest --set train.steps=20000  # longer
    l2i-train --preset sd15-24gb --print-config                                 # show the resolved settings

Settings come from the preset, then each ``--config`` file (YAML or TOML), then ``--data``/``--output``/``--resume``,
then the ``--set section.key=value`` overrides (values parsed as YAML: ``3``, ``1e-5``, ``true``, ``null``,
``[32, 32]``). A wrong key or value exits with status 2 and names the key.

An ``--output`` folder that already holds a run is refused unless ``--resume`` (continue it) or ``--overwrite``
(start afresh) is given. On resume the run's saved config is the truth: only the settings in
`layout2image.trainer.resume.RESUMABLE` may differ (they are applied and recorded); any other difference is refused
before anything is written. The dataset is checked before training (`layout2image.trainer.data.check`).
A folder holding only the ``config.yaml`` of a run stopped before its first checkpoint is not protected: nothing
trained is there, and a plain rerun starts afresh. The ``--output``, ``--data``, ``--config`` and ``--resume`` paths
are checked first, each named in a one-line error. Resuming from a checkpoint older than the newest moves the newer
ones (an abandoned branch) to ``checkpoints/abandoned-<UTC time>/``.

Ctrl-C (SIGINT) or SIGTERM stops training at the end of the step in progress: a checkpoint is saved, then one line
``interrupted at step N; checkpoint <dir> saved; continue with --resume latest`` and exit status 130.

Only ``argparse`` and the preset names are imported to build the parser: ``--help`` answers at once, and torch,
diffusers and peft load when a command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..trainer.preset_names import list_presets
from ._args import add_set_option, run_reporting_errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2i-train",
        description="Train a layout adapter (ALDM ControlNet, SDM-LoRA, T2I-Adapter) on SD 1.5.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Presets: "
        + ", ".join([*list_presets(), TOY_BASE])
        + ". Settings: l2i-train --print-config shows every key.",
    )
    parser.add_argument(
        "--preset",
        choices=[*list_presets(), TOY_BASE],
        help="starting settings (see trainer/presets/); toy-base trains the toy world's base models instead "
        "(--output DIR, --minutes, --seed, --threads, --set FIELD=VALUE; see docs/TOY_WORLD.md)",
    )
    parser.add_argument(
        "--config", action="append", default=[], metavar="FILE", help="YAML/TOML settings file (repeatable)"
    )
    parser.add_argument("--data", metavar="DIR", help="dataset root (data.root)")
    parser.add_argument("--output", metavar="DIR", help="run folder (train.output_dir)")
    parser.add_argument(
        "--resume", metavar="latest|DIR", help="resume from <output>/checkpoints/latest or a checkpoint folder"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --output folder that holds an earlier run: its config.yaml, checkpoints/, export/, "
        "validation/ and logs/ are moved to <output>/replaced-<time>/ and deleted once this run saves its first "
        "checkpoint (kept if it stops before)",
    )
    add_set_option(parser, "override settings, e.g. --set train.steps=100 adversarial.num_unroll_steps=3")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors in the log")
    return parser


#: Not a trainer preset: ``--preset toy-base`` trains the toy world's base models (`layout2image.cli.toy_base`).
TOY_BASE = "toy-base"


def _toy_base_argv(argv: list[str]) -> list[str] | None:
    """The `cli.toy_base` arguments for ``l2i-train --preset toy-base ...``, or None for any other preset."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--output")
    known, rest = pre.parse_known_args(argv)
    if known.preset != TOY_BASE:
        return None
    return (["--out", known.output] if known.output else []) + rest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    toy_base_argv = _toy_base_argv(argv)
    if toy_base_argv is not None:
        from . import toy_base

        return toy_base.main(toy_base_argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    extra: dict = {}
    if args.data:
        extra.setdefault("data", {})["root"] = args.data
    if args.output:
        extra.setdefault("train", {})["output_dir"] = args.output
    if args.resume:
        extra.setdefault("train", {})["resume"] = args.resume
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --output and --overwrite replaces it; pass only one")
    # Paths first, before any setting is read: a wrong path is named as such, not as a missing setting.
    problem = _check_paths(args)
    if problem:  # one line, like every bad input the trainer reports (no usage: the arguments parsed fine)
        print(f"l2i-train: error: {problem}", file=sys.stderr)
        return 2
    # The trainer (torch, diffusers, peft) is imported only now that a command runs.
    from ..trainer.config import ConfigError, load_config

    files = list(args.config)
    if args.resume and args.output and not args.preset and not files:
        # Resuming with no preset or config file: start from the run's saved config (the truth on resume).
        from ..trainer.resume import saved_config_file

        saved = saved_config_file(args.resume, args.output)
        if saved is not None:
            files = [saved]
    try:
        config = load_config(args.preset, files, args.overrides, extra)
    except ConfigError as e:
        parser.error(str(e))
    if args.print_config:
        print(config.to_yaml(), end="")
        print(f"# config hash: {config.hash()}")
        return 0
    try:
        config.check_ready()
    except ConfigError as e:
        parser.error(str(e))
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return run_reporting_errors("l2i-train", lambda: _train(config, overwrite=args.overwrite))


def _check_paths(args: argparse.Namespace) -> str | None:
    """The first problem with --output, --data, --config or --resume as one line, else None (reads only)."""
    from pathlib import Path

    if args.output:
        output = Path(args.output)
        if output.exists() and not output.is_dir():
            return f"--output {args.output!r} is a file, not a folder"
        parent = output
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not output.exists():
            if not parent.is_dir():
                return f"--output {args.output!r} cannot be created: {str(parent)!r} is a file, not a folder"
            if args.resume:
                return f"--output {args.output!r} does not exist: there is no run to --resume there"
        import os

        if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
            return f"--output {args.output!r} cannot be written: no write permission in {str(parent)!r}"
    if args.data and Path(args.data).exists() and not Path(args.data).is_dir():
        return f"--data {args.data!r} is a file, not a folder; give the dataset folder"
    for file in args.config:
        if Path(file).is_dir():
            return f"--config {file!r} is a folder, not a settings file"
        if not Path(file).exists():
            return f"--config {file!r} does not exist"
    if args.resume and args.output:
        from ..trainer.checkpoint import resolve_resume

        try:
            resolve_resume(args.resume, args.output)
        except OSError as e:
            return str(e)
    return None


def _train(config, *, overwrite: bool) -> int:
    """Run the trainer; bad input (ConfigError, DatasetError, a refused output folder or resume, unreadable
    files) reaches `run_reporting_errors` as one line with exit status 2."""
    from ..trainer.loop import Trainer, TrainingInterrupted

    try:
        result = Trainer(config, overwrite=overwrite).run()
    except TrainingInterrupted as e:  # Ctrl-C or SIGTERM: the trainer saved what it could; the shell's 128 + SIGINT
        print(f"l2i-train: {e.describe()}", file=sys.stderr)
        return 130
    except ImportError as e:  # an optional package a setting needs (bitsandbytes, tensorboard): the pip hint
        print(f"l2i-train: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(
        f"done: {result.steps_done} steps ({result.skipped_steps} skipped); checkpoint {result.checkpoint}; "
        f"export {result.export.folder if result.export else '-'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
