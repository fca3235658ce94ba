"""How the layout reaches the SPADE wrappers during one UNet forward.

Diffusers' ``ResnetBlock2D.forward(x, temb)`` has no slot for a layout, so every wrapper of one patched UNet
reads it from one shared ``SPADELayoutContext`` that the caller fills before the call (``spade_layout`` in
``patch.py``) and empties after it.

Batch rule (``expand_layout_batch``; the same rule a ComfyUI wrapper applies with ``cond_or_uncond``):

1. The UNet batch `B` is split into ``len(chunks)`` equal, consecutive chunks. ``chunks`` names what each
   chunk receives: ``"layout"`` (the real layout) or ``"null"`` (the null layout: zeros of the same shape).
   Default ``("layout",)``: one chunk, the whole batch gets the layout.
2. Within a chunk of `P = B / len(chunks)` samples, a layout batch `L` is used as is when `L == P`, and
   otherwise each layout is repeated `P / L` times in place (``repeat_interleave``): several samples per
   layout, in diffusers' ``num_images_per_prompt`` order `[l0, l0, l1, l1]`. `P` must be a multiple of `L`.
3. Classifier-free guidance is explicit: with a `[uncond, cond]` batch pass ``chunks=CFG_UNCOND_COND`` (the
   uncond half gets the null layout, "layout guidance"); with `[cond, uncond]` pass ``CFG_COND_UNCOND``; a
   text-CFG batch where both halves keep the layout is ``chunks=("layout", "layout")``. Without an explicit
   ``chunks``, `B = 2L` means two samples per layout, never CFG.

A forward of a patched UNet without a layout raises ``SPADELayoutError`` (no silent fall-back to the null
layout: a forgotten context would otherwise train or sample an unconditional model without a word). Ask for
the null layout explicitly with ``chunks=("null",)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..logging import get_logger
from .module import resize_layout

logger = get_logger(__name__)

__all__ = [
    "CFG_COND_UNCOND",
    "CFG_UNCOND_COND",
    "CHUNK_KINDS",
    "SPADELayoutContext",
    "SPADELayoutError",
    "expand_layout_batch",
]

CHUNK_KINDS = ("layout", "null")
CFG_UNCOND_COND = ("null", "layout")
CFG_COND_UNCOND = ("layout", "null")


class SPADELayoutError(ValueError):
    """No layout is set for a patched UNet's forward, or the layout does not fit the batch."""


def _check_chunks(chunks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(chunks, str) or not isinstance(chunks, Sequence) or len(chunks) == 0:
        raise SPADELayoutError(
            f"`chunks` must be a non-empty sequence of {CHUNK_KINDS}, got {chunks!r} (e.g. CFG_UNCOND_COND)."
        )
    bad = [c for c in chunks if c not in CHUNK_KINDS]
    if bad:
        raise SPADELayoutError(f"`chunks` entries must be one of {CHUNK_KINDS}, got {list(chunks)!r}.")
    return tuple(chunks)


def expand_layout_batch(layout: torch.Tensor, batch_size: int, chunks: Sequence[str] = ("layout",)) -> torch.Tensor:
    """Lay a layout batch out over a UNet batch following the module's batch rule.

    Args:
        layout (`torch.Tensor`): `(L, C_m, H, W)` float.
        batch_size (`int`): `B`, the UNet's batch.
        chunks (`Sequence[str]`, *optional*, defaults to `("layout",)`): what each of the equal consecutive
            chunks of the batch receives, ``"layout"`` or ``"null"`` (zeros).

    Returns:
        `torch.Tensor`: `(B, C_m, H, W)`, same dtype and device as ``layout``.
    """
    chunks = _check_chunks(chunks)
    if layout.ndim != 4:
        raise SPADELayoutError(f"`layout` must be (L, C_m, H, W), got shape {tuple(layout.shape)}.")
    n = len(chunks)
    if batch_size < 1 or batch_size % n != 0:
        raise SPADELayoutError(
            f"UNet batch {batch_size} cannot be split into {n} equal chunks {chunks}; check `chunks`."
        )
    per_chunk = batch_size // n
    n_layouts = layout.shape[0]
    if n_layouts < 1 or per_chunk % n_layouts != 0:
        raise SPADELayoutError(
            f"UNet batch {batch_size} in {n} chunk(s) {chunks} gives {per_chunk} samples per chunk, which is not a "
            f"multiple of the layout batch {n_layouts}. Pass one layout per sample of a chunk (or per prompt), "
            "and name the CFG halves in `chunks` (e.g. CFG_UNCOND_COND) instead of pre-concatenating them."
        )
    if per_chunk != n_layouts:
        layout = layout.repeat_interleave(per_chunk // n_layouts, dim=0)
    if n == 1:
        return layout if chunks[0] == "layout" else torch.zeros_like(layout)
    null = torch.zeros_like(layout) if "null" in chunks else None
    return torch.cat([layout if kind == "layout" else null for kind in chunks], dim=0)


class SPADELayoutContext:
    """The per-call layout shared by all SPADE wrappers of one patched UNet.

    Set it around each UNet call (``spade_layout(unet, layout)``, or ``context.use(layout)`` on the context
    from ``get_spade_context(unet)``, which keeps working once the UNet is wrapped by DDP/accelerate) and
    leave it set until ``backward`` when gradient checkpointing recomputes the resnets. The layout resized to
    each feature size and expanded to the batch is cached until the next ``set``/``clear`` (not when it
    requires grad, so a trained layout encoder gets a fresh graph per forward).
    """

    def __init__(self) -> None:
        self._layout: torch.Tensor | None = None
        self._chunks: tuple[str, ...] = ("layout",)
        self._strength = 1.0
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def is_set(self) -> bool:
        return self._layout is not None

    @property
    def layout(self) -> torch.Tensor | None:
        """The layout as given, `(L, C_m, H, W)`, or None."""
        return self._layout

    @property
    def chunks(self) -> tuple[str, ...]:
        return self._chunks

    @property
    def strength(self) -> float:
        return self._strength

    def set(self, layout: torch.Tensor, chunks: Sequence[str] = ("layout",), strength: float = 1.0) -> None:
        """Set the layout for the following UNet calls.

        Args:
            layout (`torch.Tensor`): `(L, C_m, H, W)` float layout encoding (one-hot, embedding, palette, ...)
                at any resolution; nearest-resized to each site.
            chunks (`Sequence[str]`, *optional*, defaults to `("layout",)`): see the module docstring.
            strength (`float`, *optional*, defaults to 1.0): scales γ and β (0 gives the unmodulated UNet).
        """
        if not isinstance(layout, torch.Tensor) or layout.ndim != 4 or not layout.is_floating_point():
            got = (
                f"{type(layout).__name__} {tuple(layout.shape)} {layout.dtype}"
                if isinstance(layout, torch.Tensor)
                else repr(layout)
            )
            raise SPADELayoutError(
                f"`layout` must be a float tensor (L, C_m, H, W), got {got}; encode label ids first "
                "(one-hot, embedding or palette)."
            )
        chunks = _check_chunks(chunks)
        strength = float(strength)
        if not math.isfinite(strength):
            raise SPADELayoutError(f"`strength` must be finite, got {strength!r}.")
        self._layout = layout
        self._chunks = chunks
        self._strength = strength
        self._cache.clear()

    @contextmanager
    def use(
        self, layout: torch.Tensor, chunks: Sequence[str] = ("layout",), strength: float = 1.0
    ) -> Iterator[SPADELayoutContext]:
        """``set`` for the duration of a ``with`` block; the previous setting (or none) comes back after it."""
        previous = (self._layout, self._chunks, self._strength)
        self.set(layout, chunks=chunks, strength=strength)
        try:
            yield self
        finally:
            if previous[0] is None:
                self.clear()
            else:
                self.set(previous[0], chunks=previous[1], strength=previous[2])

    def clear(self) -> None:
        """Forget the layout (a later forward raises ``SPADELayoutError``)."""
        self._layout = None
        self._chunks = ("layout",)
        self._strength = 1.0
        self._cache.clear()

    def layout_for(self, x: torch.Tensor, site_name: str = "?") -> torch.Tensor:
        """The layout for a feature map `x` `(B, C, H, W)`: `(B, C_m, H, W)` on ``x.device``.

        Raises:
            `SPADELayoutError`: when no layout is set, or it does not fit the batch.
        """
        if self._layout is None:
            raise SPADELayoutError(
                f"SPADE site {site_name!r} ran without a layout. Call the patched UNet inside "
                "`with spade_layout(unet, layout): ...` (or `set_spade_layout(unet, layout)`), or pass the null "
                "layout explicitly with `chunks=('null',)`; `unpatch_unet(unet)` restores the plain UNet."
            )
        key = (x.shape[0], tuple(x.shape[-2:]), x.device)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        layout = resize_layout(self._layout.to(device=x.device), x.shape[-2:])
        layout = expand_layout_batch(layout, x.shape[0], self._chunks)
        if not (self._layout.requires_grad and torch.is_grad_enabled()):
            self._cache[key] = layout
        return layout
