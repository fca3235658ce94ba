"""The whole toy base run (`train_toy_base`): data, every part in order, the saved folder and ``acceptance.json``."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...core.logging import get_logger
from ...core.toy import HELDOUT_START
from ..models import SD15_CONFIG_DIR
from .acceptance import _machine, acceptance_markdown
from .autoencoder import autoencode, train_autoencoder
from .config import _DISC_HELDOUT_START, _DISC_TRAIN_START, ToyBaseConfig, ToyBaseReport, make_toy_data
from .segmenters import load_segmenter, save_segmenter, segmenter_miou, train_evaluation_segmenter, train_segmenter
from .text_to_image import evaluate_text_to_image, train_text_to_image
from .tokenizer import build_toy_tokenizer, caption_vocabulary

__all__ = ["train_toy_base"]

logger = get_logger(__name__)


def _write_model_index(out_dir: Path) -> None:
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _save_grid(path: Path, rows: np.ndarray, pad: int = 2) -> None:
    from PIL import Image

    n_rows, n_cols, h, w, _ = rows.shape
    grid = np.full((n_rows * (h + pad) + pad, n_cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r in range(n_rows):
        for c in range(n_cols):
            grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = rows[
                r, c
            ]
    Image.fromarray(grid).save(path, format="PNG", optimize=True)


def train_toy_base(
    out_dir: str | os.PathLike,
    config: ToyBaseConfig | None = None,
    *,
    minutes: float | None = None,
    seed: int | None = None,
    threads: int | None = 2,
    samples_png: bool = True,
    command: str | None = None,
) -> ToyBaseReport:
    """Train and save every toy base part into `out_dir` (layout in the module docstring).

    Args:
        out_dir (`str` or `os.PathLike`): the folder to write (created; existing files of the same names are
            replaced).
        config (`ToyBaseConfig`, *optional*): sizes and budgets; defaults to the shipped recipe.
        minutes (`float`, *optional*): overrides ``config.minutes``.
        seed (`int`, *optional*): overrides ``config.seed``.
        threads (`int`, *optional*, defaults to 2): torch CPU threads during the run (restored afterwards); None
            keeps the current setting.
        samples_png (`bool`, defaults to True): also write ``samples.png``.
        command (`str`, *optional*): the command line that ran this, recorded in acceptance.json and README.md.

    Returns:
        `ToyBaseReport`; the same figures are in ``out_dir/acceptance.json`` and ``out_dir/README.md``.
    """
    config = config or ToyBaseConfig()
    overrides = {k: v for k, v in (("minutes", minutes), ("seed", seed)) if v is not None}
    if overrides:
        config = ToyBaseConfig(**{**asdict(config), **overrides})
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _train_toy_base(Path(out_dir), config, samples_png, command)
    finally:
        torch.set_num_threads(previous)


def _train_toy_base(out_dir: Path, config: ToyBaseConfig, samples_png: bool, command: str | None) -> ToyBaseReport:
    from diffusers import PNDMScheduler

    from ..models import load_base_models

    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    total_s = config.minutes * 60.0
    timings: dict[str, float] = {}

    loads: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        if hasattr(os, "getloadavg"):  # how busy the machine was: other processes slow every part down
            loads[name] = round(os.getloadavg()[0], 2)
        return now

    t = time.perf_counter()
    train = make_toy_data(config.num_train, config.seed, config.size)
    heldout = make_toy_data(config.num_heldout, config.seed, config.size, start=HELDOUT_START)
    disc_train = make_toy_data(config.num_disc_train, config.seed, config.size, start=_DISC_TRAIN_START)
    disc_heldout = make_toy_data(config.num_heldout, config.seed, config.size, start=_DISC_HELDOUT_START)
    t = lap("data", t)
    logger.info("generated %d + %d + %d + %d toy samples in %.0f s", len(train), len(heldout), len(disc_train),
                len(disc_heldout), timings["data"])  # fmt: skip
    figures: dict[str, Any] = {}
    steps: dict[str, Any] = {}

    # 1. autoencoder
    result = train_autoencoder(config, train, heldout, config.vae_share * total_s)
    vae = result.models["vae"]
    vae.save_pretrained(str(out_dir / "vae"), safe_serialization=True)
    figures["autoencoder"], steps["autoencoder"] = result.figures, asdict(result.report)
    t = lap("autoencoder", t)

    # 4. evaluation segmenter (before the UNet so that the samples can be scored with it), on real images and, for
    # a share of the batches, on their autoencoded versions (what decoded samples look like)
    result = train_evaluation_segmenter(
        config,
        train,
        autoencode(vae, train, config.num_autoencoded) if config.num_autoencoded else None,
        fixed_steps=config.segmenter_steps,
        budget_s=config.segmenter_share * total_s,
    )
    save_segmenter(result.models["model"], out_dir / "segmenter", config.size)
    segmenter = load_segmenter(out_dir / "segmenter")
    result.figures["heldout_miou"] = round(segmenter_miou(segmenter, heldout), 4)
    result.figures["heldout_miou_autoencoded"] = round(segmenter_miou(segmenter, autoencode(vae, heldout)), 4)
    logger.info(
        "evaluation segmenter: held-out mIoU %.4f (on autoencoded images %.4f)",
        result.figures["heldout_miou"],
        result.figures["heldout_miou_autoencoded"],
    )
    figures["segmenter"], steps["segmenter"] = result.figures, asdict(result.report)
    t = lap("segmenter", t)

    # 5. discriminator initialisation: another data split, another seed, the tiny config
    from ...core.discriminator import tiny_segmenter_config

    tiny = tiny_segmenter_config("segformer")
    result = train_segmenter(
        config,
        disc_train,
        hidden=tiny.hidden_sizes,
        decoder=tiny.decoder_hidden_size,
        seed=config.seed * 7 + 6,
        fixed_steps=config.discriminator_steps,
        max_steps=config.discriminator_max_steps,
        budget_s=config.discriminator_share * total_s,
        name="discriminator-init",
        autoencoded=autoencode(vae, disc_train, config.num_autoencoded) if config.num_autoencoded else None,
    )
    save_segmenter(result.models["model"], out_dir / "discriminator_init", config.size)
    result.figures["own_heldout_miou"] = round(
        segmenter_miou(load_segmenter(out_dir / "discriminator_init"), disc_heldout), 4
    )
    result.figures["data"] = (
        f"samples {_DISC_TRAIN_START}..{_DISC_TRAIN_START + config.num_disc_train - 1} of seed {config.seed} "
        f"(the evaluation segmenter: 0..{config.num_train - 1})"
    )
    figures["discriminator_init"], steps["discriminator_init"] = result.figures, asdict(result.report)
    t = lap("discriminator_init", t)

    # 2./3. tokenizer, text encoder, UNet: whatever time is left, less the reserve for saving and evaluation
    tokenizer = build_toy_tokenizer(out_dir / "tokenizer", caption_vocabulary(train.captions), config.max_tokens)
    lengths = [len(ids) for ids in tokenizer(train.captions).input_ids]
    budget = total_s * (1 - config.eval_reserve) - (time.perf_counter() - start)
    result = train_text_to_image(config, vae, tokenizer, train, max(budget, 10.0))
    result.models["unet"].save_pretrained(str(out_dir / "unet"), safe_serialization=True)
    result.models["text_encoder"].save_pretrained(str(out_dir / "text_encoder"), safe_serialization=True)
    PNDMScheduler.from_pretrained(str(SD15_CONFIG_DIR), subfolder="scheduler").save_pretrained(
        str(out_dir / "scheduler")
    )
    _write_model_index(out_dir)
    result.figures["longest_caption_tokens"] = max(lengths)
    figures["text_to_image"], steps["text_to_image"] = result.figures, asdict(result.report)
    t = lap("text_to_image", t)

    # evaluation through the saved folder, as the rest of the system loads it
    bundle = load_base_models(out_dir)
    sample_figures, rows = evaluate_text_to_image(bundle, config, segmenter, heldout)
    figures["text_to_image"].update(sample_figures)
    if samples_png:
        _save_grid(out_dir / "samples.png", rows[:, : min(8, rows.shape[1])])
    t = lap("evaluation", t)

    seconds = round(time.perf_counter() - start, 1)
    acceptance = {
        "format": 1,
        "seed": config.seed,
        "wall_seconds": seconds,
        "budget_minutes": config.minutes,
        "timings_seconds": timings,
        "load_average_1min_after": loads,
        "steps": steps,
        "figures": figures,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "machine": _machine(),
        "command": command,
    }
    (out_dir / "acceptance.json").write_text(json.dumps(acceptance, indent=2) + "\n")
    (out_dir / "README.md").write_text(acceptance_markdown(acceptance, title=True))
    logger.info("toy base models written to %s in %.0f s", out_dir, seconds)
    return ToyBaseReport(out_dir=out_dir, figures=figures, seconds=seconds)
