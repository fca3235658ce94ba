"""SDM's Gaussian diffusion for sampling: linear β schedule, learned-range variance, one ancestral DDPM step.

Symbols (sdm.md §4, §6; Improved DDPM, Nichol & Dhariwal 2021):

==============  =========================  =====================================================
symbol          here                       meaning
==============  =========================  =====================================================
β_t             ``betas``                  linear from 1e-4 to 0.02 over T = 1000 steps
ᾱ_t             ``alphas_cumprod``         ∏_{s<=t} (1 − β_s)
β̃_t             ``posterior_variance``     β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)
v               channels 3: of the output  variance interpolation in about [−1, 1]
==============  =========================  =====================================================

One reverse step (`p_mean_variance`, then `p_sample_step`):

1. split the model output into ε̂ and v;
2. log σ² = frac·log β_t + (1 − frac)·log β̃_t, frac = (v + 1)/2, with β̃_0 replaced by β̃_1 before the log
   (Improved DDPM eq. 15, ``learned_range``);
3. x̂0 = (x_t − √(1 − ᾱ_t)·ε̂) / √ᾱ_t = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε̂ (coefficients in float64), clipped to
   [−1, 1] (``clip_denoised``);
4. μ = coef1·x̂0 + coef2·x_t, coef1 = β_t √ᾱ_{t−1} / (1 − ᾱ_t), coef2 = (1 − ᾱ_{t−1}) √α_t / (1 − ᾱ_t) (DDPM eq. 7);
5. x_{t−1} = μ + exp(½ log σ²)·z, z ~ N(0, I), no noise at t = 0.

The schedule is kept in float64 (as the official numpy code) and gathered per sample as float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .guidance import guided_sdm_output

__all__ = ["SDMPrediction", "SDMSchedule", "p_mean_variance", "p_sample_step", "sample_sdm"]


@dataclass
class SDMSchedule:
    """The noise schedule and the posterior coefficients derived from it.

    Build it with `SDMSchedule.linear`. Every tensor is `(T,)` float64 on CPU.

    Args:
        betas (`torch.Tensor`): β_t, t = 0 .. T−1.
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)
    alphas_cumprod_prev: torch.Tensor = field(init=False, repr=False)
    posterior_variance: torch.Tensor = field(init=False, repr=False)
    posterior_log_variance_clipped: torch.Tensor = field(init=False, repr=False)
    posterior_mean_coef1: torch.Tensor = field(init=False, repr=False)
    posterior_mean_coef2: torch.Tensor = field(init=False, repr=False)
    sqrt_recip_alphas_cumprod: torch.Tensor = field(init=False, repr=False)
    sqrt_recipm1_alphas_cumprod: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or betas.numel() < 2 or bool(((betas <= 0) | (betas > 1)).any()):
            raise ValueError(
                f"`betas` must be a 1-D tensor of at least 2 values in (0, 1], got shape {tuple(betas.shape)} with "
                f"values {betas.min().item() if betas.numel() else None}..{betas.max().item() if betas.numel() else None}"
            )
        self.betas = betas
        alphas = 1.0 - betas
        acp = torch.cumprod(alphas, 0)
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        self.alphas_cumprod = acp
        self.alphas_cumprod_prev = acp_prev
        self.posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        # β̃_0 = 0: its log is replaced by that of β̃_1 (the official "clipped" log variance)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * acp_prev.sqrt() / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * alphas.sqrt() / (1.0 - acp)
        # x̂0 = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε̂ with both coefficients in float64, as the official code: forming
        # 1 − ᾱ_t from a float32 ᾱ_t would lose ~4 digits at small t (ᾱ_0 = 0.9999)
        self.sqrt_recip_alphas_cumprod = (1.0 / acp).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / acp - 1.0).sqrt()

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> SDMSchedule:
        """guided-diffusion's ``"linear"`` schedule: the 1000-step endpoints scaled by ``1000 / T``.

        With the default endpoints T must be at least 20 (β_end·1000/T <= 1); build a short test schedule from
        explicit ``betas`` instead.
        """
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps={num_timesteps} must be at least 2")
        scale = 1000 / num_timesteps
        return cls(torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64))

    @property
    def num_timesteps(self) -> int:
        """T."""
        return self.betas.numel()

    def gather(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``values[t]`` as float32 `(B, 1, 1, 1)` on ``like``'s device, for `(B,)` timesteps ``t``."""
        return values.to(like.device)[t.long()].float().reshape(-1, *([1] * (like.ndim - 1)))


@dataclass
class SDMPrediction:
    """What the model predicts about ``x_{t−1}`` (all `(B, 3, H, W)` float32).

    Args:
        mean (`torch.Tensor`): μ.
        variance (`torch.Tensor`): σ².
        log_variance (`torch.Tensor`): log σ².
        pred_xstart (`torch.Tensor`): x̂0 (clipped to [−1, 1] with ``clip_denoised``).
        eps (`torch.Tensor`): ε̂.
    """

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_xstart: torch.Tensor
    eps: torch.Tensor


def p_mean_variance(
    schedule: SDMSchedule,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    clip_denoised: bool = True,
) -> SDMPrediction:
    """Steps 1–4 of the module docstring.

    Args:
        schedule (`SDMSchedule`): the noise schedule.
        model_output (`torch.Tensor`): `(B, 2·C, H, W)` ε̂ then v (``learn_sigma`` output, possibly guided).
        x_t (`torch.Tensor`): `(B, C, H, W)` current sample.
        t (`torch.Tensor`): `(B,)` int timesteps in [0, T).
        clip_denoised (`bool`, defaults to True): clip x̂0 to [−1, 1] (the official sampler does).

    Returns:
        `SDMPrediction`.
    """
    c = x_t.shape[1]
    if model_output.shape[1] != 2 * c:
        raise ValueError(
            f"model_output has {model_output.shape[1]} channels; a learn_sigma SDM gives 2 × {c} (ε, then v)"
        )
    t = torch.as_tensor(t, device=x_t.device).long().reshape(-1).expand(x_t.shape[0])
    out = model_output.float()
    x = x_t.float()
    eps, v = out[:, :c], out[:, c:]  # 1.
    min_log = schedule.gather(schedule.posterior_log_variance_clipped, t, x)
    max_log = schedule.gather(torch.log(schedule.betas), t, x)
    frac = (v + 1) / 2
    log_variance = frac * max_log + (1 - frac) * min_log  # 2.
    pred_xstart = (
        schedule.gather(schedule.sqrt_recip_alphas_cumprod, t, x) * x
        - schedule.gather(schedule.sqrt_recipm1_alphas_cumprod, t, x) * eps
    )  # 3.
    if clip_denoised:
        pred_xstart = pred_xstart.clamp(-1, 1)
    mean = (
        schedule.gather(schedule.posterior_mean_coef1, t, x) * pred_xstart
        + schedule.gather(schedule.posterior_mean_coef2, t, x) * x
    )  # 4.
    return SDMPrediction(
        mean=mean, variance=log_variance.exp(), log_variance=log_variance, pred_xstart=pred_xstart, eps=eps
    )


def p_sample_step(
    schedule: SDMSchedule,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
) -> torch.Tensor:
    """One ancestral step x_t -> x_{t−1} (step 5; no noise where t = 0).

    Args:
        noise (`torch.Tensor`, *optional*): z, `(B, C, H, W)`; drawn with ``generator`` when None.
        (the others as in `p_mean_variance`)

    Returns:
        `torch.Tensor`: `(B, C, H, W)` float32 x_{t−1}.
    """
    pred = p_mean_variance(schedule, model_output, x_t, t, clip_denoised)
    if noise is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=torch.float32)
    t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
    nonzero = (t != 0).float().reshape(-1, *([1] * (x_t.ndim - 1)))
    return pred.mean + nonzero * (0.5 * pred.log_variance).exp() * noise.float()


@torch.no_grad()
def sample_sdm(
    unet,
    y: torch.Tensor,
    *,
    guidance_scale: float = 1.0,
    schedule: SDMSchedule | None = None,
    generator: torch.Generator | None = None,
    x_T: torch.Tensor | None = None,
    image_size: tuple[int, int] | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Ancestral DDPM sampling over every step of ``schedule`` (the official protocol: T = 1000, no respacing).

    Each step costs one UNet pass on a batch of B (2B with guidance). 1000 steps at 256² take minutes per image
    on a GPU; this function is the reference, not a fast sampler.

    Args:
        unet (`SDMUNet`): a ``learn_sigma`` model.
        y (`torch.Tensor`): `(B, C_y, H, W)` conditioning tensor.
        guidance_scale (`float`, defaults to 1.0): ``s`` (`core.sdm.guidance`).
        schedule (`SDMSchedule`, *optional*): defaults to `SDMSchedule.linear()` (T = 1000).
        generator (`torch.Generator`, *optional*): for x_T and the step noise (on the UNet's device).
        x_T (`torch.Tensor`, *optional*): the start noise `(B, C, H, W)`; drawn when None.
        image_size (`tuple[int, int]`, *optional*): `(H, W)` of the samples; defaults to y's size.
        callback (`Callable`, *optional*): called as ``callback(t, x_{t−1})`` after every step.

    Returns:
        `torch.Tensor`: `(B, C, H, W)` float32 samples in [−1, 1] (x̂0 is clipped at each step).
    """
    schedule = schedule or SDMSchedule.linear()
    device = unet.device
    y = y.to(device)
    h, w = image_size or tuple(y.shape[-2:])
    shape = (y.shape[0], unet.config.in_channels, h, w)
    x = x_T.to(device).float() if x_T is not None else torch.randn(shape, generator=generator, device=device)
    for step in reversed(range(schedule.num_timesteps)):
        t = torch.full((shape[0],), step, device=device, dtype=torch.long)
        out = guided_sdm_output(unet, x, t, y, guidance_scale)
        x = p_sample_step(schedule, out, x, t, generator=generator)
        if callback is not None:
            callback(step, x)
    return x
