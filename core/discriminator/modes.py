"""Train/eval rules for the discriminator's layers (architecture.md, Decisions).

- **Generator pass** ([`generator_mode`]): every layer in eval mode (BatchNorm uses running statistics,
  dropout and drop-path are off) and every parameter frozen, so the generator's loss neither updates BN
  statistics with generated images nor builds gradients for D's weights; gradients still reach the input image.
- **Discriminator update** ([`update_mode`]): train mode, except that the normalisation layers with running
  statistics stay in eval when the batch has fewer than 2 samples. BatchNorm on one sample is meaningless and on
  a 1x1 map fails outright (UperNet's pyramid pooling: "Expected more than 1 value per channel when training").
  Train D on the real and fake images concatenated so the batch is at least 2.

Both are context managers that restore every module's ``training`` flag and every parameter's ``requires_grad``
on exit, also when the body raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["generator_mode", "running_stat_norms", "update_mode"]


def running_stat_norms(module: nn.Module) -> list[nn.Module]:
    """The layers whose train mode changes their statistics: BatchNorm (any dim, SyncBatchNorm) and InstanceNorm
    with ``track_running_stats``. LayerNorm and GroupNorm have none and behave the same in both modes."""
    return [m for m in module.modules() if isinstance(m, _NormBase)]


def _snapshot(module: nn.Module) -> tuple[list[tuple[nn.Module, bool]], list[tuple[nn.Parameter, bool]]]:
    return (
        [(m, m.training) for m in module.modules()],
        [(p, p.requires_grad) for p in module.parameters()],
    )


def _restore(modes: list[tuple[nn.Module, bool]], grads: list[tuple[nn.Parameter, bool]]) -> None:
    for m, training in modes:
        m.training = training
    for p, requires_grad in grads:
        p.requires_grad_(requires_grad)


@contextmanager
def generator_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters for the generator's pass through D; restored on exit."""
    modes, grads = _snapshot(module)
    try:
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        yield module
    finally:
        _restore(modes, grads)


@contextmanager
def update_mode(module: nn.Module, batch_size: int) -> Iterator[nn.Module]:
    """Train mode for D's own update; normalisation layers stay in eval when ``batch_size < 2``.

    Args:
        module (`nn.Module`): the discriminator.
        batch_size (`int`): the number of images in the D forward (real and fake together when concatenated).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1 (images in the D forward), got {batch_size!r}.")
    modes, grads = _snapshot(module)
    try:
        module.train()
        if batch_size < 2:
            for norm in running_stat_norms(module):
                norm.eval()
        yield module
    finally:
        _restore(modes, grads)
