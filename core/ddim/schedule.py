"""A batched, differentiable DDIM update with one timestep per sample.

diffusers' ``DDIMScheduler.step`` indexes ``alphas_cumprod`` with a Python scalar, so a whole batch shares one
timestep. ALDM draws a DDIM index per sample, so this module re-states the same update (DDIM paper, Song et al.
2021, Eq. 12) with ``ᾱ`` gathered per sample on the sample's device in float32. For a scalar timestep it equals
``DDIMScheduler.step`` (tests/test_ddim.py checks 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["PREDICTION_TYPES", "DDIMStepOutput", "DiffusionSchedule", "ddim_step"]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclass
class DiffusionSchedule:
    """The parts of a diffusers noise schedule that a DDIM update needs, read once from a scheduler.

    Build it with [`DiffusionSchedule.from_scheduler`]; the functions of this package also accept a diffusers
    scheduler directly and convert it.

    Args:
        alphas_cumprod (`torch.Tensor`): ``(T,)`` float32 on CPU, ``ᾱ_t`` in (0, 1] for ``t = 0 .. T - 1``.
        final_alpha_cumprod (`float`): ``ᾱ`` used when the previous timestep is negative (end of the chain): 1.0 when
            the config's ``set_alpha_to_one`` is true, else ``ᾱ_0`` (SD 1.5), as in ``DDIMScheduler``.
        prediction_type (`str`): ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        clip_sample (`bool`, *optional*, defaults to `False`): clamp x̂0 to ``±clip_sample_range`` (kills gradients
            outside the range; SD configs turn it off).
        clip_sample_range (`float`, *optional*, defaults to 1.0): see ``clip_sample``.
    """

    alphas_cumprod: torch.Tensor = field(repr=False)
    final_alpha_cumprod: float
    prediction_type: str
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"`prediction_type`={self.prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}."
            )
        acp = torch.as_tensor(self.alphas_cumprod).detach()
        if acp.ndim != 1 or acp.numel() == 0:
            raise ValueError(f"`alphas_cumprod` must be a non-empty 1-D tensor, got shape {tuple(acp.shape)}.")
        self.alphas_cumprod = acp.to(device="cpu", dtype=torch.float32)
        self.final_alpha_cumprod = float(self.final_alpha_cumprod)

    @property
    def num_train_timesteps(self) -> int:
        """``T``, the number of training timesteps."""
        return self.alphas_cumprod.numel()

    @classmethod
    def from_scheduler(cls, scheduler) -> DiffusionSchedule:
        """Read the schedule from a diffusers scheduler (``DDIMScheduler``, ``PNDMScheduler``, ``DDPMScheduler``, ...).

        Args:
            scheduler (`SchedulerMixin` or `DiffusionSchedule`): any scheduler with ``alphas_cumprod`` and a
                ``config``. ``final_alpha_cumprod`` is taken from the scheduler when it has one, else from the
                config's ``set_alpha_to_one`` (default true, as ``DDIMScheduler.from_config`` would do).
                ``clip_sample`` defaults to false when the config does not name it (latent models never clip).

        Returns:
            [`DiffusionSchedule`]; a `DiffusionSchedule` passed in is returned unchanged.
        """
        if isinstance(scheduler, DiffusionSchedule):
            return scheduler
        acp = getattr(scheduler, "alphas_cumprod", None)
        config = getattr(scheduler, "config", None)
        if acp is None or config is None:
            raise ValueError(
                f"`scheduler` ({type(scheduler).__name__}) has no `alphas_cumprod`/`config`; DDIM needs a "
                f"DDPM-family diffusers scheduler such as DDIMScheduler (flow-matching schedulers do not fit)."
            )
        if config.get("thresholding", False):
            raise ValueError(
                "`scheduler.config.thresholding` is true; dynamic thresholding is not supported by the batched DDIM "
                "update. Use a config with thresholding=False (all Stable Diffusion configs)."
            )
        final = getattr(scheduler, "final_alpha_cumprod", None)
        if final is None:
            final = 1.0 if config.get("set_alpha_to_one", True) else float(acp[0])
        return cls(
            alphas_cumprod=acp,
            final_alpha_cumprod=float(final),
            prediction_type=config.get("prediction_type", "epsilon"),
            clip_sample=bool(config.get("clip_sample", False)),
            clip_sample_range=float(config.get("clip_sample_range", 1.0)),
        )

    def alpha_at(self, timesteps: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """Gather ``ᾱ`` per sample; negative timesteps give ``final_alpha_cumprod``.

        Args:
            timesteps (`torch.Tensor`): ``(B,)`` int64 timesteps in ``[-inf, T - 1]``.
            device (`torch.device`): where the result lives.

        Returns:
            `torch.Tensor`: ``(B,)`` float32 on ``device``.
        """
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = self.alphas_cumprod.to(device)
        acp = self._on_device[device]
        timesteps = timesteps.to(device=device, dtype=torch.long)
        if bool((timesteps >= self.num_train_timesteps).any()):
            raise ValueError(
                f"timesteps {timesteps.tolist()} must be < num_train_timesteps={self.num_train_timesteps}."
            )
        gathered = acp[timesteps.clamp(min=0)]
        return torch.where(timesteps >= 0, gathered, torch.full_like(gathered, self.final_alpha_cumprod))


@dataclass
class DDIMStepOutput:
    """Output of [`ddim_step`].

    Args:
        prev_sample (`torch.Tensor`): ``(B, C, h, w)`` ``x_{t_prev}``, dtype promoted from sample and model output.
        pred_original_sample (`torch.Tensor`): ``(B, C, h, w)`` ``x̂0``, same dtype (latent space for SD, ~[-4, 4]).
        pred_epsilon (`torch.Tensor`): ``(B, C, h, w)`` ``ε̂`` (equal to the model output for epsilon prediction).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor
    pred_epsilon: torch.Tensor


def _per_sample(timestep: torch.Tensor | int, batch_size: int, param: str) -> torch.Tensor:
    """Turn a Python int, a 0-d or a ``(B,)`` tensor into a ``(B,)`` int64 tensor on CPU or its own device."""
    t = torch.as_tensor(timestep)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"`{param}` must hold integer timesteps, got dtype {t.dtype}.")
    if t.ndim == 0:
        t = t.expand(batch_size)
    if t.shape != (batch_size,):
        raise ValueError(f"`{param}` must be an int or a ({batch_size},) tensor, got shape {tuple(t.shape)}.")
    return t.long()


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape ``(B,)`` to ``(B, 1, ..., 1)`` to broadcast against ``like``."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def ddim_step(
    schedule: DiffusionSchedule,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    prev_timestep: torch.Tensor | int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    variance_noise: torch.Tensor | None = None,
) -> DDIMStepOutput:
    """One DDIM update ``x_t -> x_{t_prev}`` with a timestep per sample; differentiable in model output and sample.

    Args:
        schedule (`DiffusionSchedule` or diffusers scheduler): the noise schedule (see
            [`DiffusionSchedule.from_scheduler`]); ``prediction_type`` is read from it.
        model_output (`torch.Tensor`): ``(B, C, h, w)`` float, the model's ``ε̂``, ``v̂`` or ``x̂0``.
        timestep (`torch.Tensor` or `int`): ``(B,)`` int64 current timesteps ``t`` in ``[0, T - 1]`` (or one int).
        sample (`torch.Tensor`): ``(B, C, h, w)`` float, ``x_t``.
        prev_timestep (`torch.Tensor` or `int`): ``(B,)`` int64 target timesteps ``t_prev < t``; negative means the
            end of the chain and uses ``final_alpha_cumprod`` exactly as ``DDIMScheduler`` does.
        eta (`float`, *optional*, defaults to 0.0): ``η``; 0 is deterministic DDIM, 1 is DDPM-like.
        generator (`torch.Generator`, *optional*): draws the ``η > 0`` noise (``randn_tensor`` rules: a CPU
            generator draws on CPU then moves).
        variance_noise (`torch.Tensor`, *optional*): ``(B, C, h, w)`` noise to use instead of drawing it.

    Returns:
        [`DDIMStepOutput`] with ``x_{t_prev}``, ``x̂0`` and ``ε̂``.
    """
    schedule = DiffusionSchedule.from_scheduler(schedule)
    if model_output.shape != sample.shape:
        raise ValueError(
            f"`model_output` {tuple(model_output.shape)} and `sample` {tuple(sample.shape)} must have the same shape."
        )
    if not eta >= 0:
        raise ValueError(f"`eta` must be >= 0, got {eta!r}.")
    if variance_noise is not None and generator is not None:
        raise ValueError("Pass either `generator` or `variance_noise`, not both.")
    batch_size = sample.shape[0]
    t = _per_sample(timestep, batch_size, "timestep")
    t_prev = _per_sample(prev_timestep, batch_size, "prev_timestep")
    if bool((t < 0).any()) or bool((t_prev >= t).any()):
        raise ValueError(
            f"need 0 <= timestep and prev_timestep < timestep per sample, got timestep={t.tolist()}, "
            f"prev_timestep={t_prev.tolist()}."
        )
    out_dtype = torch.promote_types(sample.dtype, model_output.dtype)
    # The arithmetic runs in float32: 1/sqrt(ᾱ_t) reaches ~15 at t=961 and would amplify half-precision error.
    x_t = sample.float()
    out = model_output.float()

    # 1. ᾱ_t and ᾱ_{t_prev} per sample (Eq. 12 notation: α_t is ᾱ_t here), gathered on the sample's device.
    alpha_t = _expand(schedule.alpha_at(t, x_t.device), x_t)
    alpha_prev = _expand(schedule.alpha_at(t_prev, x_t.device), x_t)
    beta_t = 1 - alpha_t

    # 2. x̂0 ("predicted x_0", Eq. 12) and ε̂ from the model output.
    if schedule.prediction_type == "epsilon":
        pred_x0 = (x_t - beta_t**0.5 * out) / alpha_t**0.5
        pred_eps = out
    elif schedule.prediction_type == "sample":
        pred_x0 = out
        pred_eps = (x_t - alpha_t**0.5 * pred_x0) / beta_t**0.5
    elif schedule.prediction_type == "v_prediction":
        pred_x0 = alpha_t**0.5 * x_t - beta_t**0.5 * out
        pred_eps = alpha_t**0.5 * out + beta_t**0.5 * x_t
    else:
        raise ValueError(f"`prediction_type`={schedule.prediction_type!r}; expected one of {PREDICTION_TYPES}.")

    # 3. Optional clipping of x̂0 (as DDIMScheduler; off for SD).
    if schedule.clip_sample:
        pred_x0 = pred_x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)

    # 4. σ_t = η · sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) · sqrt(1 - ᾱ_t / ᾱ_prev)  (Eq. 16).
    # The clamps only guard rounding at the chain's end (ᾱ_prev = ᾱ_t or 1); they are no-ops otherwise.
    variance = ((1 - alpha_prev) / beta_t * (1 - alpha_t / alpha_prev)).clamp(min=0)
    std_dev = eta * variance**0.5

    # 5. x_{t_prev} = sqrt(ᾱ_prev) · x̂0 + sqrt(1 - ᾱ_prev - σ_t²) · ε̂ (+ σ_t · z when η > 0)  (Eq. 12).
    prev_sample = alpha_prev**0.5 * pred_x0 + (1 - alpha_prev - std_dev**2).clamp(min=0) ** 0.5 * pred_eps
    if eta > 0:
        if variance_noise is None:
            variance_noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
        prev_sample = prev_sample + std_dev * variance_noise.float()
    return DDIMStepOutput(
        prev_sample=prev_sample.to(out_dtype),
        pred_original_sample=pred_x0.to(out_dtype),
        pred_epsilon=pred_eps.to(out_dtype),
    )
