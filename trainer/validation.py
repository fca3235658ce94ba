"""Validation during training: samples on fixed label maps and seeds, a grid, and layout mIoU.

Every run validates on the same label maps (the first ``validation.num_images`` of the validation split, or
``validation.indices``), with their captions as prompts and seed ``seed + 177 · i`` for image ``i`` (ALDM's scheme),
so grids of different steps compare. Each validation writes ``<output>/validation/step_XXXXXX/``:

- ``grid.png``: one row per label map, ``layout | sample | segmentation of the sample`` (the last column only with
  an evaluation segmenter), with column headers, each row's prompt, a caption (step, sampler settings) and a legend
  of every colour drawn (the ignore id's included);
- ``metrics.json``: mIoU, pixel accuracy and per-class IoU of the evaluation segmenter on the samples, the prompts
  and seeds.

The evaluation segmenter (``validation.segmenter``) is a transformers segmenter loaded with
`layout2image.core.discriminator.build_discriminator` (its head matched to our classes by name); it is never the
discriminator, which learns the generator's artefacts.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.files import atomic_path, atomic_write_text
from ..core.labels import colorize, legend_image
from ..core.labels.preview import annotate_grid
from ..core.logging import get_logger
from ..core.metrics import MeanIoU
from ..core.sampling import ControlInput, decode_to_images, encode_prompts, sample_latents

__all__ = ["ValidationResult", "Validator"]

logger = get_logger(__name__)

_SEED_STRIDE = 177
_PAD = 2


@dataclass
class ValidationResult:
    """One validation.

    Args:
        folder (`Path`): where the grid and metrics were written.
        miou (`float`, *optional*): mIoU of the evaluation segmenter on the samples (None without one).
        pixel_accuracy (`float`, *optional*): its pixel accuracy.
        grid (`np.ndarray`): `(H, W, 3)` uint8, the grid image.
    """

    folder: Path
    miou: float | None
    pixel_accuracy: float | None
    grid: np.ndarray


class Validator:
    """Samples and scores the fixed validation label maps.

    Args:
        config (`ValidationConfig`): the ``validation`` section.
        dataset: the validation split (`SegmentationDataset`, center crop, no flip).
        models (`TrainingModels`): the run's models.
        device (`torch.device`): where sampling runs.
    """

    def __init__(self, config, dataset, models, device: torch.device) -> None:
        self.config = config
        self.models = models
        self.device = device
        indices = (
            list(config.indices) if config.indices is not None else list(range(min(config.num_images, len(dataset))))
        )
        bad = [i for i in indices if i >= len(dataset)]
        if bad:
            raise ValueError(f"validation.indices {bad} are out of range for a validation split of {len(dataset)}")
        samples = [dataset[(i, 0)] for i in indices]
        self.labels = torch.stack([s["labels"] for s in samples])
        self.prompts = [s["caption"] for s in samples]
        self.seeds = [config.seed + _SEED_STRIDE * k for k in range(len(samples))]
        self.segmenter = None
        if config.segmenter:
            from ..core.discriminator import build_discriminator

            self.segmenter = build_discriminator(models.label_set, pretrained=config.segmenter).to(device)
            self.segmenter.eval().requires_grad_(False)
        logger.info("validation: %d label maps, seeds %s", len(samples), self.seeds)

    # ------------------------------------------------------------------ sampling
    def _layout(self, labels: torch.Tensor):
        """The adapter's layout input for ``labels`` without layout dropout."""
        cond = copy.copy(self.models.conditioner)
        cond.null_layout_prob = 0.0
        return cond.prepare(labels, None, dtype=torch.float32).layout

    def _noise(self, seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, prompts: list[str], seeds: list[int], on_step=None) -> torch.Tensor:
        """Images `(B, 3, H, W)` in [0, 1] for `labels` `(B, H, W)` int64 on the device, one prompt and noise seed
        each, with the validation settings (DDIM steps, guidance, negative prompt); ``on_step()`` (optional) is called
        after each DDIM step."""
        m, cfg = self.models, self.config
        bundle = m.bundle
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(bundle.noise_scheduler.config)
        text = encode_prompts(bundle.text_encoder, bundle.tokenizer, prompts, device=self.device)
        negative = encode_prompts(
            bundle.text_encoder, bundle.tokenizer, [cfg.negative_prompt] * len(prompts), device=self.device
        )
        factor = bundle.vae_scale_factor
        latent_size = (labels.shape[-2] // factor, labels.shape[-1] // factor)
        noise = self._noise(seeds, (bundle.unet.config.in_channels, *latent_size)).to(self.device, text.dtype)
        noise = noise * scheduler.init_noise_sigma
        layout = self._layout(labels)
        common = dict(num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, latents=noise, on_step=on_step)
        if m.mode == "controlnet":
            control = ControlInput(m.adapter, layout)
            latents = sample_latents(
                bundle.unet,
                scheduler,
                text,
                negative,
                latent_size=latent_size,
                control=control,
                layout_guidance_scale=cfg.layout_guidance_scale,
                **common,
            )
        elif m.mode == "sdm_lora":
            latents = sample_latents(
                bundle.unet,
                scheduler,
                text,
                negative,
                latent_size=latent_size,
                spade_layout=layout,
                layout_guidance_scale=cfg.layout_guidance_scale,
                **common,
            )
        else:
            latents = _sample_t2i(bundle.unet, scheduler, m.adapter, layout, text, negative, **common)
        return decode_to_images(bundle.vae, latents)

    # ------------------------------------------------------------------ one validation
    def run(self, step: int, folder: str | Path, autocast=None) -> ValidationResult:
        """Sample every label map, score, and write ``grid.png`` + ``metrics.json`` into ``folder``.

        Args:
            step (`int`): optimizer steps done (recorded).
            folder (`str` or `Path`): the output folder (created).
            autocast (*optional*): a context-manager factory for mixed precision (``accelerator.autocast``).
        """
        import contextlib

        from tqdm.auto import tqdm

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        m, n = self.models, self.models.label_set.num_classes
        modules = [m.adapter] + ([m.discriminator] if m.discriminator is not None else [])
        was_training = [mod.training for mod in modules]
        for mod in modules:
            mod.eval()
        metric = MeanIoU(n, m.label_set.ignore_index)
        images, preds = [], []
        batches = range(0, len(self.prompts), self.config.batch_size)
        # Sampling takes seconds per image on a CPU: a bar over every DDIM step of every batch.
        bar = tqdm(
            total=len(batches) * self.config.num_steps,
            desc=f"validation at step {step} ({len(self.prompts)} samples)",
            unit="step",
            dynamic_ncols=True,
        )
        try:
            for start in batches:
                end = start + self.config.batch_size
                labels = self.labels[start:end].to(self.device)
                with autocast() if autocast is not None else contextlib.nullcontext():
                    batch = self.sample(
                        labels, self.prompts[start:end], self.seeds[start:end], on_step=lambda: bar.update(1)
                    ).float()
                    if self.segmenter is not None:
                        with torch.no_grad():
                            logits = self.segmenter(batch * 2 - 1, size=labels.shape[-2:])
                        pred = logits[:, :n].argmax(1)
                        metric.update(pred, labels)
                        preds.append(pred.cpu())
                images.append(batch.cpu())
        finally:
            bar.close()
            for mod, flag in zip(modules, was_training):
                mod.train(flag)
        samples = (torch.cat(images).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        pred_maps = torch.cat(preds).numpy() if preds else None
        grid = self._grid(samples, pred_maps, step)
        from PIL import Image

        with atomic_path(folder / "grid.png") as tmp:
            Image.fromarray(grid).save(tmp, format="PNG")
        miou = acc = None
        record = {"step": step, "prompts": self.prompts, "seeds": self.seeds}
        if self.segmenter is not None:
            scores = metric.compute()
            miou, acc = scores.miou, scores.pixel_accuracy
            record.update(
                miou=miou,
                pixel_accuracy=acc,
                per_class_iou={
                    name: (None if np.isnan(v) else float(v))
                    for name, v in zip(m.label_set.names, scores.per_class_iou.tolist())
                },
                segmenter=self.config.segmenter,
            )
        atomic_write_text(folder / "metrics.json", json.dumps(record, indent=2) + "\n")
        logger.info(
            "validation at step %d: %s%s", step, folder, "" if miou is None else f", mIoU {miou:.4f}, acc {acc:.4f}"
        )
        return ValidationResult(folder, miou, acc, grid)

    def _grid(self, samples: np.ndarray, preds: np.ndarray | None, step: int) -> np.ndarray:
        """The annotated grid: `(H, W, 3)` uint8 (see the module docstring)."""
        ls, cfg = self.models.label_set, self.config
        labels = self.labels.numpy()
        h, w = labels.shape[-2:]
        cols = 2 + (preds is not None)
        grid = np.full((len(labels) * (h + _PAD) + _PAD, cols * (w + _PAD) + _PAD, 3), 255, dtype=np.uint8)
        for r, ids in enumerate(labels):
            y = _PAD + r * (h + _PAD)
            row = [colorize(ids, ls), samples[r]] + ([colorize(preds[r], ls)] if preds is not None else [])
            for c, tile in enumerate(row):
                x = _PAD + c * (w + _PAD)
                grid[y : y + h, x : x + w] = tile
        # Every colour drawn gets a legend row: the classes of the layouts and of the segmentations, and the ignore
        # id (pixels no class is asked for, e.g. the toy world's street lamps) when a layout has any.
        shown = np.unique(labels) if preds is None else np.union1d(np.unique(labels), np.unique(preds))
        present = sorted(int(v) for v in shown if v != ls.ignore_index)
        legend = legend_image(ls, present, ignore=bool((labels == ls.ignore_index).any()))
        titles = ["layout", "sample"] + (["segmentation of the sample"] if preds is not None else [])
        caption = (
            f"Validation at step {step}: one validation layout per row, sampled with the prompt shown at its right "
            f"({cfg.num_steps} DDIM steps, guidance {cfg.guidance_scale:g}, noise seed {cfg.seed} + "
            f"{_SEED_STRIDE} x row)."
        )
        if preds is not None:
            caption += " Segmentation: the evaluation segmenter's reading of the sample, scored against the layout."
        return annotate_grid(
            grid, titles, tile_width=w, tile_height=h, pad=_PAD, row_texts=self.prompts, legend=legend, caption=caption
        ).image


@torch.no_grad()
def _sample_t2i(unet, scheduler, adapter, hint, text, negative, *, num_steps, guidance_scale, latents, on_step=None):
    """DDIM with a T2I-Adapter (``core.sampling`` covers ControlNet and SPADE); the layout feeds both CFG branches."""
    features = adapter(hint.to(latents.dtype))
    scheduler.set_timesteps(num_steps, device=latents.device)
    cfg = guidance_scale > 1.0
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        if cfg:
            x, emb = torch.cat([x, x]), torch.cat([negative, text])
            feats = [torch.cat([f, f]) for f in features]
        else:
            emb, feats = text, list(features)
        # The UNet pops from this list, so it gets a fresh one per call.
        eps = unet(x, t, encoder_hidden_states=emb, down_intrablock_additional_residuals=feats).sample
        if cfg:
            uncond, cond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
        if on_step is not None:
            on_step()
    return latents
