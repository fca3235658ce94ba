"""One training iteration of ALDM / SDM-LoRA (design/aldm.md §8), independent of the loop around it.

Per iteration ``s`` (symbols as in aldm.md: τ_i the DDIM grid, K unrolled steps, λ_adv, r(s) the warm-up):

1. The loop encodes images to latents ``z0`` and prompts to embeddings, and asks `is_adversarial_step(s)`.
2. On adversarial steps, first the discriminator update (`discriminator_step`): a one-step fake ``x̂0`` at a
   random grid index ``i ∈ [0, n)`` (no grad), the VAE reconstruction of ``z0`` as the real image, and
   ``L_D = wCE(D(real), y) + w_fake · CE(D(fake), fake)`` (`core.losses.discriminator_loss`).
3. Then the generator (`generator_step`): ``t = τ_i`` with ``i ∈ [K, n)`` (or ``t ~ U[0, T)`` on non-adversarial
   steps when ``timesteps="uniform"``), ``x_t = √ᾱ_t z0 + √(1−ᾱ_t) ε``, ``L_noise = ‖ε̂ − ε‖²``; on adversarial steps
   also the unrolled ``L_adv`` (`core.ddim.unroll_ddim`), and ``L_G = L_noise + λ_adv · r(s) · L_adv``.

Both steps run ``backward`` themselves (through the ``backward`` callable, e.g. ``accelerator.backward``) because
SPADE's layout must stay set until the checkpointed resnets are recomputed. A non-finite loss is not
back-propagated; the step reports ``skipped`` and the loop counts it. All randomness comes from the ``generator``
argument, so a loop that seeds it from (seed, step) resumes exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.ddim import DiffusionSchedule, ddim_grid, ddim_step, sample_grid_index, unroll_ddim
from ..core.ddim.unroll import UNROLL_MODES
from ..core.decode import CropBox, decode_latents, latent_scale_factor, random_latent_crop
from ..core.losses import class_balance_weights, discriminator_loss, num_valid_pixels, weighted_cross_entropy_map
from .conditioning import LayoutState

__all__ = ["AdversarialConfig", "LayoutDiffusionStep", "StepResult", "encode_images"]

Backward = Callable[[torch.Tensor], None]


@dataclass
class AdversarialConfig:
    """ALDM's adversarial supervision and unrolling (aldm.md §5–§8; defaults are the Cityscapes recipe)."""

    enabled: bool = field(
        default=True, metadata={"help": "train with the segmenter discriminator (ALDM); False = plain diffusion loss"}
    )
    lazy_every: int = field(
        default=8, metadata={"help": "D update and adversarial G term every N steps ('lazy guidance')"}
    )
    num_unroll_steps: int = field(
        default=9, metadata={"help": "K: DDIM steps unrolled after the first (0 = no unrolling)"}
    )
    unroll_mode: str = field(
        default="aldm", metadata={"help": "aldm (ratio trick), truncated (grad through last step) or full"}
    )
    grid_steps: int = field(default=25, metadata={"help": "size of the DDIM grid the timesteps are drawn from"})
    timesteps: str = field(
        default="grid", metadata={"help": "noise-loss timesteps: 'grid' (τ_i, i >= K, as ALDM) or 'uniform'"}
    )
    lambda_adv: float = field(default=0.1, metadata={"help": "λ_adv (0.1 Cityscapes, 0.5 ADE20K)"})
    warmup_start: int = field(default=5000, metadata={"help": "step where the λ_adv ramp starts (s0)"})
    warmup_end: int = field(default=10000, metadata={"help": "step where λ_adv reaches its full value (s1)"})
    fake_weight: float = field(
        default=0.01, metadata={"help": "w_fake of the discriminator's fake term (0.01 CS, 0.001 ADE)"}
    )
    d_start_step: int = field(default=0, metadata={"help": "first step with discriminator updates"})
    decode_crop: int | None = field(
        default=None, metadata={"help": "decode only a random latent crop of this size for D (memory)"}
    )
    decode_checkpointing: bool = field(
        default=True, metadata={"help": "gradient checkpointing in the VAE decoder for x̂0"}
    )

    def __post_init__(self) -> None:
        if self.lazy_every < 1:
            raise ValueError(f"lazy_every={self.lazy_every} must be >= 1")
        if not 0 <= self.num_unroll_steps < self.grid_steps:
            raise ValueError(f"num_unroll_steps={self.num_unroll_steps} must be in [0, grid_steps={self.grid_steps})")
        if self.unroll_mode not in UNROLL_MODES:
            raise ValueError(f"unroll_mode={self.unroll_mode!r} is not valid; use one of {UNROLL_MODES}")
        if self.timesteps not in ("grid", "uniform"):
            raise ValueError(f"timesteps={self.timesteps!r} is not valid; use 'grid' or 'uniform'")
        if self.lambda_adv < 0 or self.fake_weight < 0:
            raise ValueError(f"lambda_adv={self.lambda_adv} and fake_weight={self.fake_weight} must be >= 0")
        if self.decode_crop is not None and self.decode_crop < 1:
            raise ValueError(f"decode_crop={self.decode_crop} must be a positive latent size or None")

    def warmup(self, step: int) -> float:
        """r(s): linear ramp from 0 at ``warmup_start`` to 1 at ``warmup_end``."""
        if self.warmup_end <= self.warmup_start:
            return 1.0 if step >= self.warmup_start else 0.0
        return min(max((step - self.warmup_start) / (self.warmup_end - self.warmup_start), 0.0), 1.0)


@dataclass
class StepResult:
    """What a step did: detached loss terms (floats) for logging, and whether it was skipped (non-finite)."""

    terms: dict[str, float]
    skipped: bool = False


@torch.no_grad()
def encode_images(vae, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images `(B, 3, H, W)` in [-1, 1] -> scaled latents `(B, 4, H/f, W/f)` (a posterior sample × scaling factor)."""
    dist = vae.encode(pixel_values.to(vae.dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator, device="cpu" if generator is None else generator.device)
    latents = dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


class LayoutDiffusionStep:
    """The per-iteration losses for any layout adapter (see the module docstring).

    Args:
        unet (`UNet2DConditionModel`): the (frozen, or LoRA+SPADE) UNet, possibly wrapped.
        noise_scheduler: the diffusers training scheduler (DDPM/DDIM config of the base model).
        conditioner: a `ControlNetConditioner`, `T2IAdapterConditioner` or `SpadeConditioner`.
        adversarial (`AdversarialConfig`): ALDM settings.
        discriminator (`SegmenterDiscriminator`, *optional*): required when ``adversarial.enabled``.
        decoder (`AutoencoderKL` or `AutoencoderTiny`, *optional*): decodes x̂0 for D; required when adversarial.
        real_decoder (*optional*): decodes the real latents (defaults to ``decoder``; ALDM uses the VAE
            reconstruction so D never sees a real/fake difference that only the decoder makes).
        ignore_index (`int`, defaults to 255): the label set's ignore id.
    """

    def __init__(
        self,
        unet,
        noise_scheduler,
        conditioner,
        adversarial: AdversarialConfig,
        *,
        discriminator=None,
        decoder=None,
        real_decoder=None,
        ignore_index: int = 255,
    ) -> None:
        if adversarial.enabled and (discriminator is None or decoder is None):
            raise ValueError("adversarial training needs a discriminator and a decoder for x̂0")
        self.unet = unet
        self.noise_scheduler = noise_scheduler
        self.schedule = DiffusionSchedule.from_scheduler(noise_scheduler)
        self.grid = ddim_grid(noise_scheduler, adversarial.grid_steps)
        self.conditioner = conditioner
        self.adv = adversarial
        self.discriminator = discriminator
        self.decoder = decoder
        self.real_decoder = real_decoder if real_decoder is not None else decoder
        self.ignore_index = ignore_index

    # ------------------------------------------------------------------ helpers
    def is_adversarial_step(self, step: int) -> bool:
        return self.adv.enabled and step >= self.adv.d_start_step and step % self.adv.lazy_every == 0

    def _predict(self, text: torch.Tensor, state: LayoutState):
        return lambda x, t: self.conditioner.predict(self.unet, x, t, text, state)

    def _target(self, latents, noise, timesteps):
        kind = self.schedule.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if kind == "sample":
            return latents
        raise ValueError(f"prediction_type={kind!r} is not supported for training")

    def _crop(self, latents: torch.Tensor, labels: torch.Tensor, generator) -> tuple[CropBox | None, torch.Tensor]:
        """One decode crop for the whole step (the same box for every unrolled x̂0) and the matching labels."""
        if self.adv.decode_crop is None:
            return None, labels
        _, box = random_latent_crop(latents, self.adv.decode_crop, generator)
        return box, box.scaled(latent_scale_factor(self.decoder)).crop(labels)

    def _decode(self, latents: torch.Tensor, box: CropBox | None, decoder, checkpointing: bool | None) -> torch.Tensor:
        if box is not None:
            latents = box.crop(latents)
        return decode_latents(latents, decoder, gradient_checkpointing=checkpointing).images

    def _timesteps(self, batch: int, adversarial: bool, generator, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(t, grid index or None): ALDM's restricted grid, or uniform on non-adversarial steps if configured."""
        if adversarial or self.adv.timesteps == "grid":
            k = self.adv.num_unroll_steps if self.adv.enabled else 0
            index = sample_grid_index(batch, self.grid, min_index=k, generator=generator).to(device)
            return self.grid.timesteps.to(device)[index], index
        t = torch.randint(0, self.schedule.num_train_timesteps, (batch,), generator=generator)
        return t.to(device), None

    # ------------------------------------------------------------------ discriminator
    def discriminator_step(
        self,
        latents: torch.Tensor,
        labels: torch.Tensor,
        text: torch.Tensor,
        generator: torch.Generator | None,
        backward: Backward,
    ) -> StepResult:
        """One discriminator loss + backward (the caller steps D's optimizer). Shapes as in `generator_step`."""
        batch = latents.shape[0]
        device = latents.device
        with torch.no_grad():
            # 1. Fake: x̂0 from one model call at a random grid index i ∈ [0, n) (ALDM: any of the 25 steps).
            index = sample_grid_index(batch, self.grid, min_index=0, generator=generator).to(device)
            step = self.grid.at(index)
            noise = torch.randn(latents.shape, generator=generator, device=generator.device if generator else "cpu")
            noise = noise.to(device, latents.dtype)
            x_t = self.noise_scheduler.add_noise(latents, noise, step.timestep.to(device))
            state = self.conditioner.prepare(labels, generator, dtype=latents.dtype)
            with self.conditioner.context(state):
                out = self.conditioner.predict(self.unet, x_t, step.timestep.to(device), text, state)
            x0 = ddim_step(self.schedule, out, step.timestep, x_t, step.prev_timestep).pred_original_sample
            box, labels_c = self._crop(latents, labels, generator)
            # 2. Real: the VAE reconstruction of z0, fake: the decoded x̂0; one decode crop for both.
            real = self._decode(latents, box, self.real_decoder, False)
            fake = self._decode(x0, box, self.decoder, False)
        with self.discriminator.update_mode(2 * batch):
            logits = self.discriminator(torch.cat([real, fake]), size=labels_c.shape[-2:])
            loss = discriminator_loss(
                logits[:batch], logits[batch:], labels_c, self.adv.fake_weight, ignore_index=self.ignore_index
            )
        terms = {
            "d_loss": float(loss.loss.detach()),
            "d_real": float(loss.real_loss.detach()),
            "d_fake": float(loss.fake_loss.detach()),
        }
        if not math.isfinite(terms["d_loss"]):
            return StepResult(terms, skipped=True)
        backward(loss.loss)
        return StepResult(terms)

    # ------------------------------------------------------------------ generator
    def generator_step(
        self,
        latents: torch.Tensor,
        labels: torch.Tensor,
        text: torch.Tensor,
        step: int,
        generator: torch.Generator | None,
        backward: Backward,
    ) -> StepResult:
        """The generator's loss + backward (the caller steps the adapter's optimizer).

        Args:
            latents (`torch.Tensor`): `(B, 4, h, w)` scaled latents ``z0`` (`encode_images`).
            labels (`torch.Tensor`): `(B, H, W)` int64 label maps at image resolution, with the ignore id.
            text (`torch.Tensor`): `(B, T, D)` prompt embeddings.
            step (`int`): the global step ``s`` (for laziness and the warm-up).
            generator (`torch.Generator`, *optional*): all randomness of the step.
            backward (`Callable`): runs ``loss.backward()`` (e.g. ``accelerator.backward``).
        """
        batch = latents.shape[0]
        device = latents.device
        adversarial = self.is_adversarial_step(step)
        # 1. t per sample, ε, x_t.
        timesteps, index = self._timesteps(batch, adversarial, generator, device)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device if generator else "cpu")
        noise = noise.to(device, latents.dtype)
        x_t = self.noise_scheduler.add_noise(latents, noise, timesteps)
        state = self.conditioner.prepare(labels, generator, dtype=latents.dtype)
        terms: dict[str, float] = {}
        with contextlib.ExitStack() as stack:
            # The layout stays set, and D stays in generator mode, until backward has recomputed checkpointed blocks.
            stack.enter_context(self.conditioner.context(state))
            # 2. ε̂ with grad and L_noise.
            model_output = self.conditioner.predict(self.unet, x_t, timesteps, text, state)
            loss = F.mse_loss(model_output.float(), self._target(latents, noise, timesteps).float())
            terms["loss_noise"] = float(loss.detach())
            ramp = self.adv.warmup(step)
            if adversarial and ramp > 0 and self.adv.lambda_adv > 0:
                # 3. L_adv over the unrolled window, from the same x_t and ε̂ (no second model call). Samples trained
                # with the null layout have no layout to be judged against: their pixels are ignored.
                box, labels_c = self._crop(latents, labels, generator)
                labels_c = torch.where(
                    state.dropped.view(-1, 1, 1), torch.full_like(labels_c, self.ignore_index), labels_c
                )
                weights = class_balance_weights(labels_c, self.discriminator.num_outputs, self.ignore_index)

                def loss_map(x0: torch.Tensor) -> torch.Tensor:
                    images = self._decode(x0, box, self.decoder, self.adv.decode_checkpointing)
                    logits = self.discriminator(images, size=labels_c.shape[-2:])
                    return weighted_cross_entropy_map(logits, labels_c, weights, self.ignore_index)

                stack.enter_context(self.discriminator.generator_mode())
                unrolled = unroll_ddim(
                    self._predict(text, state),
                    loss_map,
                    x_t,
                    index,
                    self.adv.num_unroll_steps,
                    self.grid,
                    self.schedule,
                    mode=self.adv.unroll_mode,
                    num_valid=num_valid_pixels(labels_c, self.ignore_index),
                    model_output=model_output,
                )
                # 4. L_G = L_noise + λ_adv · r(s) · L_adv.
                loss = loss + self.adv.lambda_adv * ramp * unrolled.loss
                terms["loss_adv"] = float(unrolled.loss.detach())
                terms["loss_adv_step0"] = float(unrolled.step_losses[0])
                terms["loss_adv_last"] = float(unrolled.step_losses[-1])
                terms["adv_weight"] = self.adv.lambda_adv * ramp
            terms["loss"] = float(loss.detach())
            if not math.isfinite(terms["loss"]):
                return StepResult(terms, skipped=True)
            backward(loss)
        return StepResult(terms)
