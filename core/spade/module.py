"""SPADE: spatially-adaptive modulation of a pretrained GroupNorm.

The formula (architecture.md, "Decisions"; sdm.md §10.5) is the same on every path (training, diffusers
inference, ComfyUI, A1111)::

    m      = nearest_resize(layout, (H, W))                       # layout at the feature map's size
    a      = ReLU(Conv3x3_{C_m -> hidden}(m))                      # sem_shared
    γ, β   = Conv3x3_{hidden -> C}(a), Conv3x3_{hidden -> C}(a)     # sem_gamma, sem_beta (zero-initialised)
    out    = GN(x; w0, b0) · (1 + γ) + β                           # GN in fp32, cast back to x.dtype

``spade_group_norm`` is that formula as a pure function of (x, group-norm parameters, SPADE module, layout):
the diffusers wrapper below and a ComfyUI injection that rebinds a GroupNorm's ``forward`` both call it, so
the two paths cannot drift apart. The SPADE submodules are named ``sem_*`` so that no LoRA target name
(``to_q``, ``conv1``, ``proj_in``, ...) can suffix-match them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .context import SPADELayoutContext

__all__ = [
    "SPADE",
    "SPADEGroupNorm",
    "SPADEModulation",
    "dispatch_spade_wrapper",
    "resize_layout",
    "spade_group_norm",
]


@dataclass
class SPADEModulation:
    """The per-pixel scale and shift one SPADE module predicts.

    Args:
        gamma (`torch.Tensor`): `(B, C, H, W)` float, in the SPADE weights' dtype; the scale is ``1 + gamma``.
        beta (`torch.Tensor`): `(B, C, H, W)` float, in the SPADE weights' dtype; the additive shift.
    """

    gamma: torch.Tensor
    beta: torch.Tensor


class SPADE(nn.Module):
    """The layout branch of one modulated GroupNorm site: layout -> (γ, β).

    Args:
        layout_channels (`int`): ``C_m``, channels of the layout encoding (N for one-hot, 768 for a CLIP class
            embedding, 3 for a palette image, +1 with an edge channel).
        feature_channels (`int`): ``C``, channels of the feature map the GroupNorm normalises.
        hidden_channels (`int`, *optional*, defaults to 128): width of the shared conv.
        kernel_size (`int`, *optional*, defaults to 3): odd kernel size of the γ and β convs (1 gives the budget
            variant of sdm.md §10.5).
        shared_kernel_size (`int`, *optional*, defaults to 3): odd kernel size of the shared conv.
    """

    def __init__(
        self,
        layout_channels: int,
        feature_channels: int,
        hidden_channels: int = 128,
        kernel_size: int = 3,
        shared_kernel_size: int = 3,
    ):
        super().__init__()
        for param, value in (
            ("layout_channels", layout_channels),
            ("feature_channels", feature_channels),
            ("hidden_channels", hidden_channels),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{param}` must be a positive int, got {value!r}.")
        for param, value in (("kernel_size", kernel_size), ("shared_kernel_size", shared_kernel_size)):
            if not isinstance(value, int) or value < 1 or value % 2 == 0:
                raise ValueError(f"`{param}` must be a positive odd int (1, 3, 5, ...), got {value!r}.")
        self.layout_channels = layout_channels
        self.feature_channels = feature_channels
        padding = kernel_size // 2
        self.sem_shared = nn.Conv2d(
            layout_channels, hidden_channels, shared_kernel_size, padding=shared_kernel_size // 2
        )
        self.sem_gamma = nn.Conv2d(hidden_channels, feature_channels, kernel_size, padding=padding)
        self.sem_beta = nn.Conv2d(hidden_channels, feature_channels, kernel_size, padding=padding)
        self.reset_modulation()

    def reset_modulation(self) -> None:
        """Zero the γ and β convs (weights and biases), so that the patched model equals the original one."""
        with torch.no_grad():
            for conv in (self.sem_gamma, self.sem_beta):
                conv.weight.zero_()
                conv.bias.zero_()

    def forward(self, layout: torch.Tensor) -> SPADEModulation:
        """Predict γ and β.

        Args:
            layout (`torch.Tensor`): `(B, C_m, H, W)` float, already at the feature map's size (see
                ``resize_layout``); cast to the weights' dtype here (autocast, if on, decides the conv dtype).

        Returns:
            `SPADEModulation`: γ and β, each `(B, C, H, W)`.
        """
        layout = layout.to(dtype=self.sem_shared.weight.dtype)
        hidden = F.relu(self.sem_shared(layout))
        return SPADEModulation(gamma=self.sem_gamma(hidden), beta=self.sem_beta(hidden))


def resize_layout(layout: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Resize a layout encoding to a feature map's spatial size with ``nearest`` (no-op when it already fits).

    Args:
        layout (`torch.Tensor`): `(B, C_m, h, w)` float.
        size (`tuple[int, int]`): the target `(H, W)`.

    Returns:
        `torch.Tensor`: `(B, C_m, H, W)`, same dtype and device.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(layout.shape[-2:]) == size:
        return layout
    return F.interpolate(layout, size=size, mode="nearest")


def spade_group_norm(
    x: torch.Tensor,
    layout: torch.Tensor,
    spade: SPADE,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    strength: float = 1.0,
) -> torch.Tensor:
    """``GN(x; w0, b0) · (1 + s·γ(m)) + s·β(m)``: the SPADE-modulated GroupNorm as a pure function.

    This is the single implementation of the formula; ``SPADEGroupNorm`` (diffusers) and the ComfyUI
    injection both call it with their own GroupNorm's parameters.

    Args:
        x (`torch.Tensor`): `(B, C, H, W)` feature map, any float dtype.
        layout (`torch.Tensor`): `(B, C_m, h, w)` float layout encoding with the same batch as ``x`` (see
            ``expand_layout_batch``); any resolution, nearest-resized to `(H, W)` here.
        spade (`SPADE`): the site's SPADE module (``feature_channels == C``, ``layout_channels == C_m``).
        num_groups (`int`): the GroupNorm's group count.
        weight (`torch.Tensor`, *optional*): `(C,)` the pretrained affine scale ``w0``; None for an affine-free GN.
        bias (`torch.Tensor`, *optional*): `(C,)` the pretrained affine shift ``b0``; None for an affine-free GN.
        eps (`float`, *optional*, defaults to 1e-5): the GroupNorm's epsilon.
        strength (`float`, *optional*, defaults to 1.0): ``s``, scales γ and β (0 gives the plain GroupNorm).

    Returns:
        `torch.Tensor`: `(B, C, H, W)` in ``x.dtype``. GroupNorm statistics, the affine and the modulation are
        computed in fp32 (SDM's ``GroupNorm32``) and cast back once at the end.
    """
    if x.ndim != 4 or layout.ndim != 4:
        raise ValueError(
            f"`x` and `layout` must be (B, C, H, W) tensors, got x {tuple(x.shape)} and layout {tuple(layout.shape)}."
        )
    if layout.shape[0] != x.shape[0]:
        raise ValueError(
            f"`layout` batch {layout.shape[0]} does not match the feature batch {x.shape[0]}; expand it first "
            "with `expand_layout_batch`."
        )
    if layout.shape[1] != spade.layout_channels or x.shape[1] != spade.feature_channels:
        raise ValueError(
            f"SPADE expects layout channels {spade.layout_channels} and feature channels {spade.feature_channels}, "
            f"got layout {tuple(layout.shape)} and x {tuple(x.shape)}."
        )
    # Keep x's memory format throughout (a channels-last layout would otherwise make γ/β, and so the output,
    # channels-last, and the next conv would sum in another order than in the unpatched UNet).
    memory_format = _memory_format(x)
    layout = resize_layout(layout.to(device=x.device), x.shape[-2:]).contiguous(memory_format=memory_format)
    modulation = spade(layout)
    # fp32 on purpose: GroupNorm statistics of fp16/bf16 activations are unstable (SDM's GroupNorm32).
    normed = F.group_norm(
        x.float(),
        num_groups,
        None if weight is None else weight.float(),
        None if bias is None else bias.float(),
        eps,
    )
    gamma = modulation.gamma.float()
    beta = modulation.beta.float()
    if strength != 1.0:
        gamma = gamma * strength
        beta = beta * strength
    out = torch.addcmul(beta, normed, 1.0 + gamma).to(x.dtype)
    return out.contiguous(memory_format=memory_format)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class SPADEGroupNorm(nn.Module):
    """A pretrained ``nn.GroupNorm`` modulated by SPADE; the diffusers-side wrapper.

    Like PEFT's LoRA layers, it keeps the wrapped module as ``base_layer`` (untouched: same object, same
    parameters, still frozen or not as it was) so that unpatching puts the very same object back. The layout
    arrives out of band through ``context`` (shared by all sites of one UNet, set per call by
    ``spade_layout``). ``weight``, ``bias``, ``num_groups``, ``num_channels``, ``eps`` and ``affine`` read
    through to ``base_layer`` for code that inspects norms.

    Args:
        base_layer (`nn.GroupNorm`): the pretrained GroupNorm.
        spade (`SPADE`): this site's SPADE module (owned by a ``SPADEAdapter``; registered here as well so that
            ``unet.to(...)``, ``unet.parameters()`` and gradient checkpointing see it).
        context (`SPADELayoutContext`): where the per-call layout is read from.
        site_name (`str`): the module path of the site in the UNet, for messages.
    """

    def __init__(self, base_layer: nn.GroupNorm, spade: SPADE, context: SPADELayoutContext, site_name: str):
        super().__init__()
        if base_layer.num_channels != spade.feature_channels:
            raise ValueError(
                f"site {site_name!r}: the GroupNorm has {base_layer.num_channels} channels but its SPADE module "
                f"predicts {spade.feature_channels}; build the SPADEAdapter from this UNet."
            )
        self.base_layer = base_layer
        self.spade = spade
        self.context = context
        self.site_name = site_name

    @property
    def weight(self) -> torch.Tensor | None:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def num_groups(self) -> int:
        return self.base_layer.num_groups

    @property
    def num_channels(self) -> int:
        return self.base_layer.num_channels

    @property
    def eps(self) -> float:
        return self.base_layer.eps

    @property
    def affine(self) -> bool:
        return self.base_layer.affine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Modulated GroupNorm of `x` `(B, C, H, W)`; raises ``SPADELayoutError`` when no layout is set."""
        layout = self.context.layout_for(x, site_name=self.site_name)
        return spade_group_norm(
            x,
            layout,
            self.spade,
            self.base_layer.num_groups,
            self.base_layer.weight,
            self.base_layer.bias,
            self.base_layer.eps,
            strength=self.context.strength,
        )

    def extra_repr(self) -> str:
        return f"site={self.site_name!r}"


def _dispatch_group_norm(
    target: nn.Module, spade: SPADE, context: SPADELayoutContext, site_name: str
) -> nn.Module | None:
    # Exact type check on purpose: a GroupNorm subclass (AdaGroupNorm-like, or an already wrapped norm of
    # another tool) may compute something else, and wrapping it would silently change its maths.
    if type(target) is nn.GroupNorm:
        return SPADEGroupNorm(target, spade, context, site_name)
    return None


_DISPATCHERS: tuple[Callable[..., nn.Module | None], ...] = (_dispatch_group_norm,)


def dispatch_spade_wrapper(
    target: nn.Module, spade: SPADE, context: SPADELayoutContext, site_name: str
) -> nn.Module | None:
    """Pick the SPADE wrapper for ``target`` by its type (PEFT's ``dispatch_default`` pattern).

    Returns:
        `nn.Module | None`: the wrapper, or None when no wrapper supports this module type.
    """
    for dispatcher in _DISPATCHERS:
        wrapper = dispatcher(target, spade, context, site_name)
        if wrapper is not None:
            return wrapper
    return None
