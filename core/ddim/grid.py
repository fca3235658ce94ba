"""The DDIM timestep grid ``τ_0 < τ_1 < ... < τ_{n-1}`` and per-sample grid indices.

ALDM (aldm.md §7) draws a grid index ``i`` per sample and steps down the grid from ``τ_i``. The grid is the one
diffusers' ``DDIMScheduler.set_timesteps(n)`` builds for the given scheduler config; for SD 1.5 (scaled_linear
0.00085..0.012, steps_offset 1, leading spacing) and ``n = 25`` it is ``τ_i = 40·i + 1`` = 1, 41, ..., 961.

The previous timestep of ``τ_i`` is the next grid point down, ``τ_{i-1}``, and ``-1`` (end of chain, i.e.
``final_alpha_cumprod``) for ``i = 0``. ``DDIMScheduler.step`` uses ``t - T // n`` instead; both agree whenever
``T`` is a multiple of ``n`` with leading or trailing spacing (all SD setups). Otherwise the chain would call the
model at a timestep other than the one the sample was stepped to, so we keep the grid-consistent rule and warn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..logging import get_logger, warn_once

logger = get_logger(__name__)

__all__ = ["DDIMGrid", "GridStep", "ddim_grid", "sample_grid_index"]


@dataclass
class GridStep:
    """Timesteps of one DDIM step per sample, from [`DDIMGrid.at`].

    Args:
        timestep (`torch.Tensor`): ``(B,)`` int64, ``t = τ_i`` in ``[0, T - 1]``.
        prev_timestep (`torch.Tensor`): ``(B,)`` int64, ``t_prev = τ_{i-1}``, or ``-1`` when ``i = 0``.
    """

    timestep: torch.Tensor
    prev_timestep: torch.Tensor


@dataclass
class DDIMGrid:
    """An ``n``-step DDIM grid, ascending.

    Args:
        timesteps (`torch.Tensor`): ``(n,)`` int64 on CPU, ``τ_0 < ... < τ_{n-1}`` in ``[0, T - 1]``.
        prev_timesteps (`torch.Tensor`): ``(n,)`` int64 on CPU, ``τ_{i-1}`` and ``-1`` at ``i = 0``.
    """

    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor

    def __post_init__(self) -> None:
        if self.timesteps.ndim != 1 or self.timesteps.shape != self.prev_timesteps.shape:
            raise ValueError(
                f"`timesteps` {tuple(self.timesteps.shape)} and `prev_timesteps` {tuple(self.prev_timesteps.shape)} "
                f"must be 1-D tensors of the same length."
            )
        if self.timesteps.numel() > 1 and not bool((self.timesteps[1:] > self.timesteps[:-1]).all()):
            raise ValueError(f"`timesteps` must be strictly increasing, got {self.timesteps.tolist()}.")

    @property
    def num_steps(self) -> int:
        """``n``, the number of grid points."""
        return self.timesteps.numel()

    def at(self, index: torch.Tensor) -> GridStep:
        """Map grid indices to ``(t, t_prev)`` per sample.

        Args:
            index (`torch.Tensor`): ``(B,)`` int64 grid indices in ``[0, n - 1]``.

        Returns:
            [`GridStep`] with ``(B,)`` int64 tensors on ``index``'s device.
        """
        index = torch.as_tensor(index)
        if index.dtype.is_floating_point or index.dtype == torch.bool:
            raise ValueError(f"`index` must be an integer tensor, got dtype {index.dtype}.")
        if bool(((index < 0) | (index >= self.num_steps)).any()):
            raise ValueError(f"`index` values {index.tolist()} must lie in [0, {self.num_steps - 1}].")
        cpu_index = index.long().cpu()
        return GridStep(
            timestep=self.timesteps[cpu_index].to(index.device),
            prev_timestep=self.prev_timesteps[cpu_index].to(index.device),
        )


def ddim_grid(scheduler, num_inference_steps: int) -> DDIMGrid:
    """The ``n``-step grid that diffusers' ``DDIMScheduler`` would use for a scheduler config.

    Args:
        scheduler (diffusers scheduler or config dict): any DDPM-family scheduler (its ``config`` is read) or the
            config itself; ``timestep_spacing``, ``steps_offset`` and ``num_train_timesteps`` set the grid. The
            object is not modified.
        num_inference_steps (`int`): ``n``, in ``[1, num_train_timesteps]``.

    Returns:
        [`DDIMGrid`]; for the SD 1.5 config and ``n = 25``: 1, 41, ..., 961.
    """
    from diffusers import DDIMScheduler

    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}.")
    config = getattr(scheduler, "config", scheduler)
    if not hasattr(config, "get"):
        raise ValueError(
            f"`scheduler` must be a diffusers scheduler or its config dict, got {type(scheduler).__name__}."
        )
    # A private DDIMScheduler built from a copy of the config: the caller's scheduler keeps its own timesteps.
    # Private keys are dropped: diffusers' `_use_default_values` would swap the config's own values for DDIM's
    # defaults.
    ddim = DDIMScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    ddim.set_timesteps(num_inference_steps)
    timesteps = torch.flip(ddim.timesteps.to(device="cpu", dtype=torch.long), dims=[0])
    prev = torch.cat([torch.tensor([-1], dtype=torch.long), timesteps[:-1]])
    grid = DDIMGrid(timesteps=timesteps, prev_timesteps=prev)

    diffusers_prev = timesteps - ddim.config.num_train_timesteps // num_inference_steps
    same = torch.where(prev < 0, diffusers_prev < 0, diffusers_prev == prev)
    if not bool(same.all()):
        warn_once(
            logger,
            f"ddim_grid_prev:{ddim.config.timestep_spacing}:{ddim.config.num_train_timesteps}:{num_inference_steps}",
            f"DDIM grid ({ddim.config.timestep_spacing} spacing, {num_inference_steps} of "
            f"{ddim.config.num_train_timesteps} steps) is not evenly spaced: the unroll steps to the next grid point "
            f"while DDIMScheduler.step would step to t - {ddim.config.num_train_timesteps // num_inference_steps}.",
        )
    return grid


def sample_grid_index(
    batch_size: int,
    num_steps: int | DDIMGrid,
    min_index: int = 0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw one grid index per sample, uniform on ``{min_index, ..., n - 1}``.

    ALDM uses ``min_index = K`` for the generator (so ``K`` more steps fit below ``τ_i``) and ``0`` for the
    discriminator's fake sample.

    Args:
        batch_size (`int`): ``B >= 1``.
        num_steps (`int` or `DDIMGrid`): ``n``, the grid length.
        min_index (`int`, *optional*, defaults to 0): smallest index, in ``[0, n - 1]``.
        generator (`torch.Generator`, *optional*): seeded generator; the draw happens on its device.
        device (`torch.device`, *optional*): where the result lives (defaults to the generator's device, else CPU).

    Returns:
        `torch.Tensor`: ``(B,)`` int64 indices.
    """
    n = num_steps.num_steps if isinstance(num_steps, DDIMGrid) else num_steps
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"`num_steps` must be an int >= 1 or a DDIMGrid, got {num_steps!r}.")
    if not isinstance(min_index, int) or isinstance(min_index, bool) or not 0 <= min_index <= n - 1:
        raise ValueError(
            f"`min_index`={min_index!r} must be an int in [0, {n - 1}] for a {n}-step grid (with unrolling, "
            f"min_index = K needs K <= {n - 1})."
        )
    draw_device = generator.device if generator is not None else torch.device("cpu")
    index = torch.randint(min_index, n, (batch_size,), generator=generator, device=draw_device)
    return index.to(device if device is not None else draw_device)
