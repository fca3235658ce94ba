"""Train the toy world's stand-ins for Stable Diffusion 1.5's frozen parts, plus its two segmenters.

`train_toy_base` writes one folder that `layout2image.trainer.models.load_base_models` loads like an SD 1.5
diffusers folder, so every code path that runs on SD 1.5 runs on the toy world (docs/TOY_WORLD.md)::

    out/
      model_index.json           StableDiffusionPipeline layout (no safety checker, no feature extractor)
      vae/                       AutoencoderKL, x8: 128x128x3 images <-> 16x16x4 latents
      tokenizer/                 CLIPTokenizer over the toy caption vocabulary (vocab.json, merges.txt, ...)
      text_encoder/              CLIPTextModel of width D (`ToyBaseConfig.text_width`)
      unet/                      UNet2DConditionModel, cross_attention_dim = D, attention at 16x16 and below
      scheduler/                 SD 1.5's scheduler config (scaled_linear 0.00085-0.012, 1000 steps, epsilon)
      segmenter/                 evaluation segmenter: SegFormer, N toy classes (id2label = toy class names)
      discriminator_init/        another SegFormer, trained on another data split: ALDM's discriminator start
      acceptance.json            every acceptance figure, step counts, timings, seed, machine, versions
      samples.png                base-model samples, one row per domain word (day, night, snow, fog)

The parts and their acceptance figures (`ToyBaseReport.figures`):

1. **Autoencoder** (`train_autoencoder`): ``AutoencoderKL`` with 4 levels (3 downsamplings), trained on random
   crops of toy images with L1 + L2 + an image-gradient L1 + a small KL term. Figure: reconstruction PSNR on
   held-out 128x128 images (posterior mode). ``scaling_factor`` = 1 / std of training latents, so scaled latents
   have unit variance as SD 1.5's do with 0.18215.
2. **Tokenizer** (`build_toy_tokenizer`): a CLIP BPE tokenizer whose vocabulary holds every toy caption word as one
   token (``street</w>``) plus single characters as a fallback; merges are chosen so that CLIP's BPE rebuilds each
   word (`learn_word_merges`).
3. **Text encoder + UNet** (`train_text_to_image`): trained jointly with the ε-prediction loss on latents of the
   training images (the loss back-propagates into the text encoder), captions dropped to ``""`` 10 % of the time
   for classifier-free guidance, min-SNR weighting, EMA weights saved. Both are frozen afterwards. Figures
   (`evaluate_text_to_image`, on the saved folder reloaded through `load_base_models`): image statistics per domain
   word over the same seeds and scenes (`core.toy.image_stats`), the night - day brightness margin, and how the
   evaluation segmenter sees the samples (class shares vs real images, confidence).
4. **Evaluation segmenter** (`train_segmenter`): SegFormer trained on real toy images; figure: mIoU on held-out
   real images, measured through `core.discriminator.build_discriminator` as validation loads it (and on the
   autoencoder's reconstructions of them, the ceiling for generated images).
5. **Discriminator initialisation**: the same recipe on a disjoint data split with another seed and the tiny
   config the toy preset's discriminator uses. Layout mIoU is never measured with it.

Time and determinism: each part has a share of the time budget (``minutes``). A part runs a few steps, measures the
time per step and then fixes its step count (its learning-rate schedule depends on that count only), capped by
``*_max_steps``; ``*_steps`` fixes the count and turns the time budget off for that part. Given the seed and the
step counts (recorded in ``acceptance.json``), training is deterministic on a given machine and thread count.

The parts live in submodules (`config`, `schedule`, `autoencoder`, `tokenizer`, `text_to_image`, `segmenters`,
`acceptance`, `recipe`); every name other code uses is re-exported here, so ``from
layout2image.trainer.toy_base import X`` is the import path.
"""

from __future__ import annotations

from ...core.toy import DOMAINS, HELDOUT_START, IGNORE_INDEX, TOY_CLASSES
from ..models import SD15_CONFIG_DIR, TOY_WEIGHTS_DIR
from .acceptance import acceptance_markdown
from .autoencoder import autoencode, build_autoencoder, reconstruction_psnr, train_autoencoder
from .config import PartResult, StepReport, ToyBaseConfig, ToyBaseReport, ToyData, make_toy_data
from .recipe import train_toy_base
from .segmenters import (
    IMAGENET_NORM,
    load_segmenter,
    save_segmenter,
    segmenter_miou,
    train_evaluation_segmenter,
    train_segmenter,
)
from .text_to_image import (
    build_text_encoder,
    build_unet,
    domain_prompts,
    evaluate_text_to_image,
    train_text_to_image,
)
from .tokenizer import EXTRA_VOCABULARY, build_toy_tokenizer, caption_vocabulary, learn_word_merges

__all__ = [
    "DOMAINS",
    "EXTRA_VOCABULARY",
    "HELDOUT_START",
    "IGNORE_INDEX",
    "IMAGENET_NORM",
    "SD15_CONFIG_DIR",
    "TOY_CLASSES",
    "TOY_WEIGHTS_DIR",
    "PartResult",
    "StepReport",
    "ToyBaseConfig",
    "ToyBaseReport",
    "ToyData",
    "acceptance_markdown",
    "autoencode",
    "build_autoencoder",
    "build_text_encoder",
    "build_toy_tokenizer",
    "build_unet",
    "caption_vocabulary",
    "domain_prompts",
    "evaluate_text_to_image",
    "learn_word_merges",
    "load_segmenter",
    "make_toy_data",
    "reconstruction_psnr",
    "save_segmenter",
    "segmenter_miou",
    "train_autoencoder",
    "train_evaluation_segmenter",
    "train_segmenter",
    "train_text_to_image",
    "train_toy_base",
]
