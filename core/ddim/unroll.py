"""Multistep unrolling of the DDIM chain for the adversarial generator loss (ALDM, aldm.md §7).

Symbols: ``τ_i`` the DDIM grid ([`ddim_grid`]); ``i`` the per-sample start index (``i >= K``); ``ᾱ`` the cumulative
alpha product; ``x_{τ_i}`` the noisy latent; ``ε̂`` the model output; ``x̂0^(k)`` the clean-latent prediction at
unrolled step ``k = 0 .. K`` (taken at ``τ_{i-k}``); ``ℓ_k(p)`` the caller's per-pixel loss on ``x̂0^(k)``;
``N_valid`` the normaliser; ``L_k = (1 / N_valid) · Σ_p ℓ_k(p)`` the per-step loss; ``sg`` stop-gradient.

Modes (``mode=``):

- ``"aldm"`` (the official code): step 0 with grad, steps ``1..K`` under ``torch.no_grad``.
  ``m(p) = (1 / (K+1)) · Σ_k ℓ_k(p)`` and ``loss = (1 / N_valid) · Σ_{p: ℓ_0(p) ≠ 0} ℓ_0(p) · m(p) / sg(ℓ_0(p))``.
  Value: ``mean_k L_k`` (exactly, as long as ``ℓ_0(p) = 0`` only where every ``ℓ_k(p) = 0``, e.g. ignore pixels).
  Gradient: ``(1 / N_valid) · Σ_p (m(p) / ℓ_0(p)) · ∇ℓ_0(p)``, step 0 only, rescaled per pixel.
- ``"truncated"`` (DRaFT-1 style truncated backprop): steps ``0..K-1`` under ``torch.no_grad``; the input of step
  ``K`` is detached and step ``K`` (model call, DDIM update, loss map) runs with grad.
  ``loss = L_K + sg(mean_k L_k - L_K)``. Value: ``mean_k L_k`` (same as the other modes, so logs compare).
  Gradient: ``∇L_K`` at unit scale, not ``∇L_K / (K+1)``: the gradient size then matches ``aldm`` (ratio ≈ 1) and
  ``full`` (a mean of K+1 per-step gradients), so ``λ_adv`` need not be re-tuned when switching modes.
- ``"full"``: gradient through every step and through the chain itself; ``loss = mean_k L_k``. Each step (model
  call, DDIM update and loss map) is one ``torch.utils.checkpoint`` region (``use_reentrant=False``), so saved
  activations stay at about one step plus one latent per step; the price is one extra forward per step. Modules
  that change state on forward (BatchNorm running stats in train mode) see each step twice.

When ``eta > 0`` the noise of every step is drawn before the step runs (in step order from ``generator``), so a
checkpoint recomputation reuses the same noise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch.utils.checkpoint import checkpoint

from .grid import DDIMGrid, GridStep
from .schedule import DiffusionSchedule, ddim_step

__all__ = ["UNROLL_MODES", "UnrollOutput", "unroll_ddim"]

UNROLL_MODES = ("aldm", "full", "truncated")


@dataclass
class UnrollOutput:
    """Output of [`unroll_ddim`].

    Args:
        loss (`torch.Tensor`): ``()`` float32 loss to backpropagate; its value is ``mean_k L_k`` in every mode.
        step_losses (`torch.Tensor`): ``(K+1,)`` float32, detached, ``L_k`` for ``k = 0 .. K`` (for logging).
        pred_original_sample (`torch.Tensor`): ``(B, C, h, w)`` ``x̂0^(0)`` at ``τ_i``; carries grad in ``aldm`` and
            ``full``, detached in ``truncated``.
        model_output (`torch.Tensor`): ``(B, C, h, w)`` the step-0 model output (``ε̂`` at ``τ_i``), with the same
            grad status; reuse it for the noise loss instead of a second model call.
    """

    loss: torch.Tensor
    step_losses: torch.Tensor
    pred_original_sample: torch.Tensor
    model_output: torch.Tensor


def _step(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    loss_map: Callable[[torch.Tensor], torch.Tensor],
    schedule: DiffusionSchedule,
    step: GridStep,
    eta: float,
    sample: torch.Tensor,
    noise: torch.Tensor | None,
    model_output: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One unrolled step; returns ``(x_{t_prev}, x̂0, ℓ map, model output)``.

    Kept a tuple (private) because ``torch.utils.checkpoint`` needs a function returning tensors.
    """
    if model_output is None:
        model_output = predict(sample, step.timestep)
    out = ddim_step(schedule, model_output, step.timestep, sample, step.prev_timestep, eta=eta, variance_noise=noise)
    pixel_loss = loss_map(out.pred_original_sample)
    if not isinstance(pixel_loss, torch.Tensor) or pixel_loss.ndim != 3 or pixel_loss.shape[0] != sample.shape[0]:
        shape = tuple(pixel_loss.shape) if isinstance(pixel_loss, torch.Tensor) else type(pixel_loss).__name__
        raise ValueError(
            f"`loss_map` must return a (B, H, W) per-pixel loss with B={sample.shape[0]}, got {shape}. Return the "
            f"unreduced map (e.g. weighted_cross_entropy_map)."
        )
    return out.prev_sample, out.pred_original_sample, pixel_loss.float(), model_output


def _check_num_unroll_steps(num_unroll_steps: int, grid: DDIMGrid, start_index: torch.Tensor) -> None:
    """Raise unless ``0 <= K <= n - 1`` and every start index lies in ``[K, n - 1]``."""
    n = grid.num_steps
    if not isinstance(num_unroll_steps, int) or isinstance(num_unroll_steps, bool) or not 0 <= num_unroll_steps < n:
        raise ValueError(
            f"`num_unroll_steps` (K) must be an int in [0, {n - 1}] for a {n}-step grid, got {num_unroll_steps!r}."
        )
    if bool(((start_index < num_unroll_steps) | (start_index >= n)).any()):
        raise ValueError(
            f"`start_index` values {start_index.tolist()} must lie in [K={num_unroll_steps}, {n - 1}] so that K "
            f"more steps fit below each start; draw them with sample_grid_index(..., min_index=K)."
        )


def unroll_ddim(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    loss_map: Callable[[torch.Tensor], torch.Tensor],
    sample: torch.Tensor,
    start_index: torch.Tensor,
    num_unroll_steps: int,
    grid: DDIMGrid,
    schedule,
    mode: str = "aldm",
    num_valid: int | torch.Tensor | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    model_output: torch.Tensor | None = None,
) -> UnrollOutput:
    """Run ``K + 1`` DDIM steps from ``x_{τ_i}`` and build the multistep loss (see the module docstring).

    Args:
        predict (`Callable`): ``predict(x_t, t) -> model_output``; ``x_t`` ``(B, C, h, w)`` float, ``t`` ``(B,)``
            int64 on ``x_t``'s device; returns ``(B, C, h, w)`` (``ε̂``, ``v̂`` or ``x̂0`` per the schedule's
            ``prediction_type``). Closes over text and control conditioning.
        loss_map (`Callable`): ``loss_map(x0_latent) -> (B, H, W)`` float per-pixel loss ``ℓ(p) >= 0``, 0 on ignore
            pixels. Closes over decoding, the discriminator, labels and the batch's class weights.
        sample (`torch.Tensor`): ``(B, C, h, w)`` float, ``x_{τ_i}`` (noised latent).
        start_index (`torch.Tensor`): ``(B,)`` int64 grid index ``i`` per sample, in ``[K, n - 1]``.
        num_unroll_steps (`int`): ``K >= 0``, steps after the first (ALDM: 9).
        grid (`DDIMGrid`): the timestep grid from [`ddim_grid`].
        schedule (`DiffusionSchedule` or diffusers scheduler): the noise schedule.
        mode (`str`, *optional*, defaults to ``"aldm"``): one of ``"aldm"``, ``"full"``, ``"truncated"``.
        num_valid (`int` or `torch.Tensor`, *optional*): ``N_valid``, the normaliser of ``Σ_p ℓ(p)`` (the number
            of non-ignore pixels for a weighted CE); defaults to ``B·H·W``. Clamped to >= 1.
        eta (`float`, *optional*, defaults to 0.0): DDIM ``η`` (ALDM: 0).
        generator (`torch.Generator`, *optional*): draws the ``η > 0`` noise.
        model_output (`torch.Tensor`, *optional*): ``(B, C, h, w)`` a step-0 model output already computed (for
            the noise loss); used instead of calling ``predict`` at step 0 (detached in ``truncated``).

    Returns:
        [`UnrollOutput`]: the loss, the ``K + 1`` per-step losses, and the step-0 ``x̂0`` and model output.
    """
    if mode == "aldm":
        run = _unroll_aldm
    elif mode == "truncated":
        run = _unroll_truncated
    elif mode == "full":
        run = _unroll_full
    else:
        raise ValueError(f"`mode`={mode!r} is not an unrolling mode; expected one of {UNROLL_MODES}.")
    schedule = DiffusionSchedule.from_scheduler(schedule)
    start_index = torch.as_tensor(start_index)
    if start_index.dtype.is_floating_point or start_index.shape != (sample.shape[0],):
        raise ValueError(
            f"`start_index` must be a ({sample.shape[0]},) integer tensor, got shape {tuple(start_index.shape)} "
            f"and dtype {start_index.dtype}."
        )
    start_index = start_index.to(device=sample.device, dtype=torch.long)
    _check_num_unroll_steps(num_unroll_steps, grid, start_index)
    if model_output is not None and model_output.shape != sample.shape:
        raise ValueError(
            f"`model_output` {tuple(model_output.shape)} must have the sample's shape {tuple(sample.shape)}."
        )

    # 1. τ_{i-k} and τ_{i-k-1} per sample for k = 0 .. K.
    steps = [grid.at(start_index - k) for k in range(num_unroll_steps + 1)]
    # 2. η > 0 noise for every step, drawn up front in step order (checkpoint recomputation must see the same z).
    noises = [
        randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype) if eta > 0 else None
        for _ in steps
    ]
    step_fn = functools.partial(_step, predict, loss_map, schedule)
    pixel_losses, loss, x0_first, out_first = run(step_fn, steps, noises, eta, sample, model_output)

    # 3. L_k = (1 / N_valid) · Σ_p ℓ_k(p).
    if num_valid is None:
        num_valid = pixel_losses[0].numel()
    denom = torch.as_tensor(num_valid, dtype=torch.float32, device=loss.device).clamp(min=1)
    step_losses = torch.stack([ell.detach().sum() for ell in pixel_losses]) / denom
    return UnrollOutput(
        loss=loss / denom, step_losses=step_losses, pred_original_sample=x0_first, model_output=out_first
    )


def _unroll_aldm(step_fn, steps, noises, eta, sample, model_output):
    """``aldm`` mode; returns (ℓ maps, un-normalised loss, x̂0^(0), ε̂^(0))."""
    # 1. Step 0 at τ_i with grad: ε̂ -> x̂0^(0) (DDIM Eq. 12) -> ℓ_0(p).
    x, x0_first, ell_0, out_first = step_fn(steps[0], eta, sample, noises[0], model_output)
    pixel_losses = [ell_0]
    # 2. Steps k = 1..K at τ_{i-k} under no_grad, from the detached x_{τ_{i-1}}: ℓ_k(p).
    with torch.no_grad():
        x = x.detach()
        for step, noise in zip(steps[1:], noises[1:]):
            x, _, ell_k, _ = step_fn(step, eta, x, noise)
            pixel_losses.append(ell_k)
    # 3. m(p) = mean_k ℓ_k(p); loss = Σ_{p: ℓ_0 ≠ 0} ℓ_0(p) · m(p) / sg(ℓ_0(p)) (normalised by the caller).
    ell_0_sg = ell_0.detach()
    m = torch.stack([ell_0_sg, *pixel_losses[1:]]).mean(0)
    nonzero = ell_0_sg != 0
    ratio = torch.where(nonzero, m / torch.where(nonzero, ell_0_sg, torch.ones_like(ell_0_sg)), 0.0)
    loss = (ell_0 * ratio).sum()
    return pixel_losses, loss, x0_first, out_first


def _unroll_truncated(step_fn, steps, noises, eta, sample, model_output):
    """``truncated`` mode; returns (ℓ maps, un-normalised loss, x̂0^(0), ε̂^(0))."""
    num_unroll_steps = len(steps) - 1
    pixel_losses = []
    x = sample.detach()
    x0_first = out_first = None
    # 1. Steps k = 0..K-1 at τ_{i-k} under no_grad: ℓ_k(p) (values only).
    with torch.no_grad():
        for k in range(num_unroll_steps):
            given = model_output.detach() if (k == 0 and model_output is not None) else None
            x, x0, ell_k, out = step_fn(steps[k], eta, x, noises[k], given)
            pixel_losses.append(ell_k)
            if k == 0:
                x0_first, out_first = x0, out
    # 2. Step K at τ_{i-K} with grad from the detached x_{τ_{i-K}}: ℓ_K(p).
    given = model_output if (num_unroll_steps == 0 and model_output is not None) else None
    _, x0, ell_last, out = step_fn(steps[-1], eta, x.detach(), noises[-1], given)
    pixel_losses.append(ell_last)
    if num_unroll_steps == 0:
        x0_first, out_first = x0, out
    else:
        x0_first, out_first = x0_first.detach(), out_first.detach()
    # 3. loss = Σ ℓ_K + sg(mean_k Σ ℓ_k - Σ ℓ_K): value mean_k, gradient ∇Σ ℓ_K.
    last = ell_last.sum()
    mean = torch.stack([ell.detach().sum() for ell in pixel_losses]).mean()
    loss = last + (mean - last.detach())
    return pixel_losses, loss, x0_first, out_first


def _unroll_full(step_fn, steps, noises, eta, sample, model_output):
    """``full`` mode; returns (ℓ maps, un-normalised loss, x̂0^(0), ε̂^(0))."""
    pixel_losses = []
    x = sample
    x0_first = out_first = None
    use_checkpoint = torch.is_grad_enabled()
    for k, (step, noise) in enumerate(zip(steps, noises)):
        given = model_output if k == 0 else None
        # k. One checkpointed region per step: ε̂ at τ_{i-k} -> x̂0^(k), x_{τ_{i-k-1}} -> ℓ_k(p), all with grad.
        if use_checkpoint:
            x, x0, ell_k, out = checkpoint(step_fn, step, eta, x, noise, given, use_reentrant=False)
        else:
            x, x0, ell_k, out = step_fn(step, eta, x, noise, given)
        pixel_losses.append(ell_k)
        if k == 0:
            x0_first, out_first = x0, out
    loss = torch.stack([ell.sum() for ell in pixel_losses]).mean()
    return pixel_losses, loss, x0_first, out_first
