"""The toy evaluation segmenter in the toy base's time budget, with other SegFormer strides (docs/TOY_WORLD.md).

Trains the segmenter as `train_toy_base` does (same data, autoencoded batches, budget) for each stride setting and
prints held-out mIoU on real and on autoencoded toy images, with the steps the budget allowed.

    python benchmarks/toy_segmenter_strides.py --strides 4,2,2,2 2,2,2,2 --budget 324
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from layout2image.trainer import toy_base
from layout2image.trainer.models import load_base_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(toy_base.TOY_WEIGHTS_DIR), help="toy base folder (its autoencoder)")
    parser.add_argument("--strides", nargs="+", default=["4,2,2,2", "2,2,2,2"])
    parser.add_argument("--budget", type=float, default=324.0, help="seconds per segmenter (the shipped share)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vae = load_base_models(args.base).vae
    config = toy_base.ToyBaseConfig()
    train = toy_base.make_toy_data(config.num_train, config.seed, config.size)
    heldout = toy_base.make_toy_data(config.num_heldout, config.seed, config.size, start=toy_base.HELDOUT_START)
    autoencoded = toy_base.autoencode(vae, train, config.num_autoencoded)
    print("strides | steps | seconds | mIoU real | mIoU autoencoded")
    for text in args.strides:
        strides = tuple(int(s) for s in text.split(","))
        start = time.perf_counter()
        result = toy_base.train_segmenter(
            config, train, hidden=config.segmenter_hidden, decoder=config.segmenter_decoder, strides=strides,
            seed=config.seed * 7 + 5, fixed_steps=None, max_steps=config.segmenter_max_steps, budget_s=args.budget,
            name=f"segmenter {text}", autoencoded=autoencoded,
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as folder:
            toy_base._save_segmenter(result.models["model"], Path(folder), config.size)
            segmenter = toy_base._load_segmenter(Path(folder))
            real = toy_base.segmenter_miou(segmenter, heldout)
            ae = toy_base.segmenter_miou(segmenter, toy_base.autoencode(vae, heldout))
        print(f"{text} | {result.report.steps} | {time.perf_counter() - start:.0f} | {real:.4f} | {ae:.4f}")


if __name__ == "__main__":
    main()
