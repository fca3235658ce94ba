"""Does offset noise let "night" darken the toy world's samples? (docs/TOY_WORLD.md, "Why offset noise")

Fine-tunes a toy base model's text encoder + UNet for the same steps with and without offset noise (same seed,
data and lr) and prints the per-domain sample brightness and the night - day margin of each, side by side.

    python benchmarks/toy_offset_noise.py --base weights/toy --steps 500 --offsets 0.1 0.0

The published figures (−0.381 with 0.1, −0.050 without) came from the first toy base, trained without offset noise.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from layout2image.trainer import toy_base
from layout2image.trainer.models import load_base_models
from layout2image.trainer.toy_base import text_to_image as t2i


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(toy_base.TOY_WEIGHTS_DIR), help="toy base folder to fine-tune")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--images", type=int, default=1000, help="training scenes")
    parser.add_argument("--offsets", type=float, nargs="+", default=[0.1, 0.0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = toy_base.make_toy_data(args.images, 0, 128)
    rows = []
    for offset in args.offsets:
        bundle = load_base_models(args.base)
        # Start every run from the same weights: the builders (looked up in the module that trains) hand out copies
        # of the loaded models.
        t2i.build_unet = lambda config, b=bundle: copy.deepcopy(b.unet).requires_grad_(True)
        t2i.build_text_encoder = lambda config, tok, b=bundle: copy.deepcopy(b.text_encoder).requires_grad_(True)
        config = toy_base.ToyBaseConfig(noise_offset=offset, unet_steps=args.steps, unet_lr=args.lr, log_every=0)
        start = time.perf_counter()
        result = toy_base.train_text_to_image(config, bundle.vae, bundle.tokenizer, train)
        seconds = time.perf_counter() - start
        bundle.unet, bundle.text_encoder = result.models["unet"], result.models["text_encoder"]
        figures, _ = toy_base.evaluate_text_to_image(bundle, config)
        rows.append((offset, {d: figures[d]["brightness"] for d in toy_base.DOMAINS}, figures, seconds))
    print(f"{args.steps} steps, lr {args.lr}, {args.images} images, {args.threads} threads; DDIM 25, guidance 3")
    print("offset | " + " | ".join(toy_base.DOMAINS) + " | night - day | train s")
    for offset, brightness, figures, seconds in rows:
        cells = " | ".join(f"{brightness[d]:.3f}" for d in toy_base.DOMAINS)
        print(f"{offset:.2f} | {cells} | {figures['night_minus_day_brightness']:+.3f} | {seconds:.0f}")


if __name__ == "__main__":
    main()
