"""The toy evaluation segmenter with other recipes: strides, share of autoencoded batches, steps or time budget.

Trains the segmenter as `train_toy_base` does (same data, seed, autoencoded images from the given base's
autoencoder) once per ``--runs`` entry and prints held-out mIoU on real and on autoencoded toy images, with the
steps each run got. An entry is ``key=value`` pairs joined by commas; keys: ``strides`` (four numbers joined by
``-``), ``share`` (`ToyBaseConfig.autoencoded_batch_share`), ``steps`` (a fixed step count: the result does not
depend on machine load) or ``budget`` (seconds; the step count then follows the machine's speed, as in the toy base
run). Unset keys take the shipped recipe's values (steps from the budget ``segmenter_share`` x 30 minutes).

    # the figures in docs/TOY_WORLD.md ("Acceptance figures"; base = the previous toy base's autoencoder)
    python benchmarks/toy_segmenter_recipe.py --runs share=0.5,steps=2400 share=0.35,steps=2400 \\
        share=0.25,steps=2400 share=0.35,steps=2900
    # the stride comparison
    python benchmarks/toy_segmenter_recipe.py --runs strides=4-2-2-2,budget=324 strides=2-2-2-2,budget=324
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from layout2image.trainer import toy_base
from layout2image.trainer.models import load_base_models

_KEYS = ("strides", "share", "steps", "budget")


def parse_run(text: str) -> dict:
    """``"share=0.35,steps=2900"`` -> ``{"share": 0.35, "steps": 2900}``; unknown keys are an error."""
    run: dict = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in _KEYS:
            raise argparse.ArgumentTypeError(f"{item!r} in {text!r}: use key=value with key one of {_KEYS}")
        if key == "strides":
            run[key] = tuple(int(s) for s in value.split("-"))
        else:
            run[key] = int(value) if key == "steps" else float(value)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(toy_base.TOY_WEIGHTS_DIR), help="toy base folder (its autoencoder)")
    parser.add_argument("--runs", nargs="+", type=parse_run, default=[{}], help="recipes, e.g. share=0.35,steps=2900")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vae = load_base_models(args.base).vae
    shipped = toy_base.ToyBaseConfig()
    train = toy_base.make_toy_data(shipped.num_train, shipped.seed, shipped.size)
    heldout = toy_base.make_toy_data(shipped.num_heldout, shipped.seed, shipped.size, start=toy_base.HELDOUT_START)
    autoencoded = toy_base.autoencode(vae, train, shipped.num_autoencoded)
    heldout_autoencoded = toy_base.autoencode(vae, heldout)
    print("strides | autoencoded share | steps | seconds | mIoU real | mIoU autoencoded")
    for run in args.runs:
        config = replace(
            shipped,
            segmenter_strides=run.get("strides", shipped.segmenter_strides),
            autoencoded_batch_share=run.get("share", shipped.autoencoded_batch_share),
        )
        budget = run.get("budget", shipped.segmenter_share * shipped.minutes * 60.0)
        start = time.perf_counter()
        result = toy_base.train_evaluation_segmenter(
            config, train, autoencoded, fixed_steps=run.get("steps"), budget_s=None if "steps" in run else budget
        )
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as folder:
            toy_base.save_segmenter(result.models["model"], Path(folder), config.size)
            segmenter = toy_base.load_segmenter(Path(folder))
            real = toy_base.segmenter_miou(segmenter, heldout)
            ae = toy_base.segmenter_miou(segmenter, heldout_autoencoded)
        strides = "-".join(map(str, config.segmenter_strides))
        print(
            f"{strides} | {config.autoencoded_batch_share} | {result.report.steps} | {seconds:.0f} | {real:.4f} | "
            f"{ae:.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
