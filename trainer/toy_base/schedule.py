"""The step loop every toy base part trains with: warm-up, constant, cosine schedule sized by a time budget."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from ...core.logging import get_logger
from .config import StepReport

logger = get_logger(__name__)


def _lr_factor(step: int, planned: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, constant up to `_DECAY_START` of `planned`, then cosine decay to 5 %."""
    if step < warmup:
        return (step + 1) / warmup
    decay_from = max(warmup, int(_DECAY_START * planned))
    progress = min(1.0, max(0, step - decay_from) / max(1, planned - decay_from))
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))


#: Where the cosine decay starts, as a share of the planned steps. The plan is revised once, at `_REPLAN_AT` of the
#: first plan, and never below ``step / _DECAY_START``: both plans are still in the constant phase then, so the
#: learning rates used equal those of a run with the final count fixed from the start (``*_steps``).
_DECAY_START = 0.3
_REPLAN_AT = 0.2


def _run_steps(
    name: str,
    step_fn: Callable[[int], float],
    optimizer: torch.optim.Optimizer,
    *,
    budget_s: float | None,
    fixed_steps: int | None,
    max_steps: int,
    warmup: int,
    log_every: int,
    calibrate: int = 6,
) -> StepReport:
    """Run `step_fn(step)` (one optimisation step, returns the loss) with a warm-up, constant, cosine schedule.

    With `fixed_steps`, exactly that many steps. Otherwise the first `calibrate` steps (the first one not timed)
    measure the time per step and plan ``min(max_steps, steps that fit in budget_s)``; the plan is revised once with
    the rate measured up to `_REPLAN_AT` of it (other processes may have started or stopped). Warm-up covers the
    calibration, and the revision happens before the decay starts, so the schedule depends on the final count
    only. A hard limit of 1.3 x `budget_s` stops a loop that slows down badly; the report says so.
    """
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    planned = fixed_steps if fixed_steps is not None else max_steps
    if fixed_steps is not None:
        warmup = max(1, min(warmup, planned // 5))
    else:
        warmup = max(warmup, calibrate + 1)
    replan_at: int | None = None
    losses: list[float] = []
    start = time.perf_counter()
    timed_from, cut, step = start, False, 0
    while step < planned:
        factor = _lr_factor(step, planned, warmup)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        losses.append(float(step_fn(step)))
        step += 1
        now = time.perf_counter()
        if fixed_steps is None:
            if step == 1:
                timed_from = now
            elif step == calibrate or step == replan_at:
                per_step = (now - timed_from) / (step - 1)
                fit = int((budget_s - (now - start)) / max(per_step, 1e-6)) + step
                floor = step + 1 if step == calibrate else math.ceil(step / _DECAY_START) + 1
                planned = max(floor, min(max_steps, fit))
                if step == calibrate:
                    replan_at = max(calibrate + 1, int(_REPLAN_AT * planned))
                logger.info("%s: %.3f s/step, planning %d steps in %.0f s", name, per_step, planned, budget_s)
            if now - start > 1.3 * budget_s and step < planned:
                cut = True
                logger.warning(
                    "%s: over 1.3x its %.0f s budget after %d/%d steps; stopping", name, budget_s, step, planned
                )
                break
        if log_every and (step % log_every == 0 or step == planned):
            recent = losses[-log_every:]
            logger.info(
                "%s step %d/%d: loss %.4f (%.0f s)", name, step, planned, sum(recent) / len(recent), now - start
            )
    tail = losses[-max(1, len(losses) // 10) :]
    return StepReport(
        steps=step,
        planned=planned,
        seconds=round(time.perf_counter() - start, 1),
        budget_seconds=None if fixed_steps is not None else round(budget_s, 1),
        final_loss=round(sum(tail) / len(tail), 5),
        cut=cut,
    )


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + stream)
