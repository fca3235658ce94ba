"""Generating images with the toy world's models: the shipped tiny base model, optionally with a toy ControlNet.

The toy UNet is not SD 1.5-shaped, so no UI's own checkpoint loader can run it; the ComfyUI toy nodes (and anyone
else) hand the loaded diffusers modules to `generate_toy_images`, which runs `layout2image.core.sampling` (DDIM,
text CFG, ControlNet residuals) exactly as the trainer's validation does. Nothing here reads files: loading is the
caller's (``layout2image.trainer.models.load_base_models`` for the base folder, ``layout2image.weights`` for a
ControlNet).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..controlnet import HintSpec, hint_spec_for
from ..labels import LabelSet
from ..sampling import ControlInput, decode_to_images, encode_prompts, sample_latents
from .dataset import toy_label_set

__all__ = [
    "ToyModels",
    "ToyWorldError",
    "check_toy_controlnet",
    "check_toy_labels",
    "generate_toy_images",
    "toy_hint_spec",
]


class ToyWorldError(ValueError):
    """The toy models, a toy ControlNet or a label map do not fit together (the message names the fix)."""


@dataclass(frozen=True, eq=False)
class ToyModels:
    """The loaded toy world: frozen base modules, plus a ControlNet and its hint when one is loaded.

    Args:
        unet (`UNet2DConditionModel`): the toy denoiser (ε-prediction on `(B, 4, H/8, W/8)` latents).
        vae (`AutoencoderKL`): the toy autoencoder (x8); its ``config.scaling_factor`` scales the latents.
        text_encoder (`CLIPTextModel`): the toy text encoder (width D).
        tokenizer (`CLIPTokenizer`): the toy tokenizer.
        scheduler_config (`dict`): the noise schedule's config; every call builds its own DDIM scheduler from it
            (schedulers keep per-call state, so one is never shared).
        source (`str`): the folder the base models came from.
        controlnet (`ControlNetModel` or `ALDMControlNetModel`, *optional*): a ControlNet trained on the toy world.
        hint (`HintSpec`, *optional*): the hint the ControlNet reads (required with ``controlnet``).
        table (`torch.Tensor`, *optional*): `(N + 1, D)` class-embedding table of an ALDM-native ControlNet.
        controlnet_source (`str`): where the ControlNet came from ("" when none).
    """

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    source: str
    controlnet: torch.nn.Module | None = None
    hint: HintSpec | None = None
    table: torch.Tensor | None = None
    controlnet_source: str = ""

    def __post_init__(self) -> None:
        if (self.controlnet is None) != (self.hint is None):
            raise ToyWorldError("a toy ControlNet needs its HintSpec and a HintSpec needs a ControlNet; give both")
        if self.hint is not None and self.hint.kind == "embedding" and self.table is None:
            raise ToyWorldError("an ALDM-native toy ControlNet needs its (N + 1, D) class-embedding table")

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for the toy autoencoder, as for SD 1.5)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def label_set(self) -> LabelSet:
        """The toy label set every toy label map must use."""
        return toy_label_set()

    def describe(self) -> str:
        """One line: the base folder, and the ControlNet with its hint when one is loaded."""
        text = f"toy base models from {self.source}"
        if self.controlnet is None:
            return text + "; no ControlNet (the layout is not used)"
        edges = " + edges" if self.hint.with_edges else ""
        return f"{text}; ControlNet {self.controlnet_source} ({self.hint.kind}{edges} hint, {self.hint.channels} ch)"


def check_toy_controlnet(controlnet: torch.nn.Module, unet: torch.nn.Module, source: str = "the ControlNet") -> None:
    """Check that a ControlNet was built for the toy UNet (text width, block widths, latent channels).

    Raises:
        ToyWorldError: naming the first setting that differs and both values.
    """
    for key in ("cross_attention_dim", "block_out_channels", "in_channels"):
        mine, theirs = controlnet.config.get(key), unet.config.get(key)
        if isinstance(mine, (list, tuple)) or isinstance(theirs, (list, tuple)):
            mine, theirs = list(mine or ()), list(theirs or ())
        if mine != theirs:
            raise ToyWorldError(
                f"{source} has {key}={mine}, but the toy UNet has {key}={theirs}: it was not trained on these toy "
                "base models; use a ControlNet exported by `l2i-demo` (or `l2i-train --preset toy`) on them"
            )


def check_toy_labels(labels: torch.Tensor, label_set: LabelSet, vae_scale_factor: int = 8) -> None:
    """Check a label batch for the toy world: the toy label set and a size the autoencoder can decode.

    Args:
        labels (`torch.Tensor`): `(B, H, W)` int64 class ids.
        label_set (`LabelSet`): the label set the ids index.
        vae_scale_factor (`int`, defaults to 8): H and W must be multiples of it.

    Raises:
        ToyWorldError: another label set, or a size that is not a multiple of ``vae_scale_factor``.
    """
    toy = toy_label_set()
    if not label_set.same_classes(toy):
        raise ToyWorldError(
            f"the label map uses label set {label_set.name!r} ({label_set.num_classes} classes: "
            f"{', '.join(label_set.names[:8])}{', ...' if label_set.num_classes > 8 else ''}), but the toy world "
            f"knows only the toy label set ({', '.join(toy.names)}; ignore {toy.ignore_index}); make the map with "
            "the Toy Scene Label Map node or with label set 'toy'"
        )
    if labels.ndim != 3:
        raise ToyWorldError(f"labels must be a (B, H, W) batch, got shape {tuple(labels.shape)}")
    h, w = int(labels.shape[-2]), int(labels.shape[-1])
    if h % vae_scale_factor or w % vae_scale_factor:
        raise ToyWorldError(
            f"the label map is {h}x{w} pixels; the toy autoencoder needs a height and width that are multiples of "
            f"{vae_scale_factor} (e.g. {max(vae_scale_factor, h - h % vae_scale_factor)}x"
            f"{max(vae_scale_factor, w - w % vae_scale_factor)}); resize it with the Resize Label Map node"
        )


@contextlib.contextmanager
def _on_device(modules: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Move ``modules`` to ``device`` for the block and back to where each was afterwards."""
    homes = [next(m.parameters()).device for m in modules]
    try:
        for m in modules:
            m.to(device)
        yield
    finally:
        for m, home in zip(modules, homes):
            m.to(home)


@torch.no_grad()
def generate_toy_images(
    models: ToyModels,
    labels: torch.Tensor,
    label_set: LabelSet,
    prompt: str,
    negative_prompt: str = "",
    *,
    steps: int = 25,
    guidance_scale: float = 3.0,
    seed: int = 0,
    control_strength: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample one image per label map with the toy models (DDIM, text CFG, the ControlNet when one is loaded).

    The settings default to the toy world's validation ones (25 DDIM steps, guidance 3, empty negative prompt).
    The initial noise is drawn on the CPU from ``seed``, so a seed gives the same image on every device.

    Args:
        models (`ToyModels`): the loaded toy world.
        labels (`torch.Tensor`): `(B, H, W)` int64 class ids of the toy label set (255 = ignore); H and W multiples
            of the autoencoder's factor (8). Read only.
        label_set (`LabelSet`): the label set of ``labels`` (must be the toy set).
        prompt (`str`): the text, e.g. a toy caption ("a city street at night with two cars").
        negative_prompt (`str`, defaults to ""): the unconditional text of classifier-free guidance.
        steps (`int`, defaults to 25): DDIM steps (>= 1).
        guidance_scale (`float`, defaults to 3.0): text CFG scale; <= 1 switches CFG off.
        seed (`int`, defaults to 0): seed of the initial noise (non-negative).
        control_strength (`float`, defaults to 1.0): scale of the ControlNet's residuals (0 = off); ignored
            without a ControlNet.
        device (`torch.device` or `str`, *optional*): where to run (default: where the UNet is). The modules go
            back to where they were afterwards.

    Returns:
        `torch.Tensor`: `(B, 3, H, W)` float32 images in [0, 1] on the CPU.

    Raises:
        ToyWorldError: wrong label set or size, or a setting out of range.
    """
    check_toy_labels(labels, label_set, models.vae_scale_factor)
    if int(steps) < 1:
        raise ToyWorldError(f"steps must be at least 1, got {steps}")
    if not (math.isfinite(float(guidance_scale)) and math.isfinite(float(control_strength))):
        raise ToyWorldError(
            f"guidance_scale and control_strength must be finite, got {guidance_scale} and {control_strength}"
        )
    if int(seed) < 0:
        raise ToyWorldError(f"seed must be non-negative, got {seed}")
    from diffusers import DDIMScheduler

    device = torch.device(device) if device is not None else next(models.unet.parameters()).device
    modules = [models.unet, models.vae, models.text_encoder]
    use_control = models.controlnet is not None and float(control_strength) != 0.0
    if use_control:
        modules.append(models.controlnet)
    batch = int(labels.shape[0])
    factor = models.vae_scale_factor
    latent_size = (int(labels.shape[-2]) // factor, int(labels.shape[-1]) // factor)
    with _on_device(modules, device):
        dtype = next(models.unet.parameters()).dtype
        text = encode_prompts(models.text_encoder, models.tokenizer, [prompt] * batch, device=device).to(dtype)
        negative = encode_prompts(models.text_encoder, models.tokenizer, [negative_prompt] * batch, device=device)
        negative = negative.to(dtype)
        scheduler = DDIMScheduler.from_config(models.scheduler_config)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        shape = (batch, int(models.unet.config.in_channels), *latent_size)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
        control = None
        if use_control:
            hint = models.hint.make(
                labels.to(torch.int64).cpu(),
                label_set,
                table=models.table,
                vae_scale_factor=factor,
                dtype=next(models.controlnet.parameters()).dtype,
            )
            control = ControlInput(models.controlnet, hint.to(device), scale=float(control_strength))
        latents = sample_latents(
            models.unet,
            scheduler,
            text,
            negative,
            latent_size=latent_size,
            control=control,
            num_steps=int(steps),
            guidance_scale=float(guidance_scale),
            latents=noise * scheduler.init_noise_sigma,
        )
        images = decode_to_images(models.vae, latents)
    return images.float().cpu()


def toy_hint_spec(controlnet: torch.nn.Module) -> HintSpec:
    """The hint a toy ControlNet reads (palette RGB, one-hot of the toy classes, or ALDM class embeddings).

    Raises:
        ToyWorldError: its hint channels fit no encoding of the toy label set.
    """
    try:
        return hint_spec_for(controlnet, toy_label_set())
    except (TypeError, ValueError) as e:
        raise ToyWorldError(f"the ControlNet's hint does not fit the toy label set: {e}") from None
