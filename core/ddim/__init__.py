"""Batched, differentiable DDIM for training: per-sample steps, the DDIM grid, and multistep unrolling.

- [`schedule`]: [`DiffusionSchedule`] (ᾱ and prediction type read from a diffusers scheduler) and [`ddim_step`].
- [`grid`]: [`ddim_grid`] (the grid DDIMScheduler would use), [`DDIMGrid.at`], [`sample_grid_index`].
- [`unroll`]: [`unroll_ddim`] with the ``aldm``, ``truncated`` and ``full`` modes.
"""

from .grid import DDIMGrid, GridStep, ddim_grid, sample_grid_index
from .schedule import PREDICTION_TYPES, DDIMStepOutput, DiffusionSchedule, ddim_step
from .unroll import UNROLL_MODES, UnrollOutput, unroll_ddim

__all__ = [
    "PREDICTION_TYPES",
    "UNROLL_MODES",
    "DDIMGrid",
    "DDIMStepOutput",
    "DiffusionSchedule",
    "GridStep",
    "UnrollOutput",
    "ddim_grid",
    "ddim_step",
    "sample_grid_index",
    "unroll_ddim",
]
