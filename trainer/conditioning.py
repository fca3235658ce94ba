"""How each adapter feeds the layout to the UNet during training: one class per adapter kind.

A conditioner turns a label batch into its layout tensor once per step (`prepare`) and then runs the model on
any noisy latents with that layout (`predict`), which is what the noise loss, the discriminator's fake sample and
every unrolled DDIM step call. The trainer never needs to know which adapter it trains.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from ..core.controlnet import HintSpec
from ..core.hints import class_embedding_hint, one_hot
from ..core.labels import LabelSet
from ..core.spade import SPADELayoutContext

__all__ = ["ControlNetConditioner", "LayoutState", "SpadeConditioner", "T2IAdapterConditioner"]


@dataclass
class LayoutState:
    """The layout of one training batch.

    Args:
        layout (`torch.Tensor`): the adapter's input, `(B, C, h, w)` (hint or SPADE layout); rows of samples whose
            layout was dropped are zeros (the null layout).
        dropped (`torch.Tensor`): `(B,)` bool, True where the null layout replaced the layout.
    """

    layout: torch.Tensor
    dropped: torch.Tensor


def _dropout_mask(batch: int, prob: float, generator: torch.Generator | None, device) -> torch.Tensor:
    if prob <= 0:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    draw = torch.rand(batch, generator=generator, device=generator.device if generator is not None else "cpu")
    return (draw < prob).to(device)


def _apply_dropout(layout: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    if not bool(dropped.any()):
        return layout
    return layout * (~dropped).to(layout.dtype).view(-1, *([1] * (layout.ndim - 1)))


class ControlNetConditioner:
    """A (stock or ALDM-native) ControlNet: residuals added to the frozen UNet's skips.

    Args:
        controlnet (`ControlNetModel`): the trained ControlNet (possibly wrapped by accelerate).
        hint_spec (`HintSpec`): which encoding the ControlNet reads (rgb, one-hot, class embeddings).
        label_set (`LabelSet`): the label set of the data.
        table (`torch.Tensor`, *optional*): `(N + 1, D)` class-embedding table for the ``embedding`` hint.
        vae_scale_factor (`int`): image size / latent size.
        null_layout_prob (`float`, defaults to 0): probability of training a sample with a zero hint.
    """

    def __init__(
        self,
        controlnet: torch.nn.Module,
        hint_spec: HintSpec,
        label_set: LabelSet,
        *,
        table: torch.Tensor | None = None,
        vae_scale_factor: int = 8,
        null_layout_prob: float = 0.0,
    ) -> None:
        self.controlnet = controlnet
        self.hint_spec = hint_spec
        self.label_set = label_set
        self.table = table
        self.vae_scale_factor = vae_scale_factor
        self.null_layout_prob = null_layout_prob

    def prepare(
        self, labels: torch.Tensor, generator: torch.Generator | None = None, dtype=torch.float32
    ) -> LayoutState:
        hint = self.hint_spec.make(
            labels, self.label_set, table=self.table, vae_scale_factor=self.vae_scale_factor, dtype=dtype
        )
        dropped = _dropout_mask(labels.shape[0], self.null_layout_prob, generator, labels.device)
        return LayoutState(_apply_dropout(hint, dropped), dropped)

    def context(self, state: LayoutState) -> AbstractContextManager:
        return nullcontext()

    def predict(self, unet, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, state: LayoutState) -> torch.Tensor:
        down, mid = self.controlnet(
            x, t, encoder_hidden_states=text, controlnet_cond=state.layout.to(x.dtype), return_dict=False
        )
        return unet(
            x, t, encoder_hidden_states=text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample


class T2IAdapterConditioner(ControlNetConditioner):
    """A T2I-Adapter: features added inside the UNet's down blocks (``down_intrablock_additional_residuals``)."""

    def __init__(self, adapter: torch.nn.Module, hint_spec: HintSpec, label_set: LabelSet, **kwargs) -> None:
        super().__init__(adapter, hint_spec, label_set, **kwargs)

    def predict(self, unet, x, t, text, state):
        features = self.controlnet(state.layout.to(x.dtype))
        return unet(x, t, encoder_hidden_states=text, down_intrablock_additional_residuals=list(features)).sample


class SpadeConditioner:
    """SDM-LoRA: the layout modulates the decoder's GroupNorms through SPADE (the UNet carries the LoRA).

    Args:
        context (`SPADELayoutContext`): the patched UNet's layout context (taken before accelerate wraps it).
        encoding (`str`): ``"onehot"`` (N channels) or ``"embedding"`` (the class-embedding table at full label
            resolution; SPADE resizes to each feature size).
        label_set (`LabelSet`): the label set of the data.
        table (`torch.Tensor`, *optional*): `(N + 1, D)` table for ``"embedding"``.
        null_layout_prob (`float`, defaults to 0.2): probability per sample of the null layout, so that layout
            guidance works at inference (SDM trains its unconditional model this way).
        layout_size (`tuple[int, int]`, *optional*): resize the labels (nearest) to this before encoding, to bound
            memory; SPADE resizes to feature sizes anyway.
    """

    def __init__(
        self,
        context: SPADELayoutContext,
        encoding: str,
        label_set: LabelSet,
        *,
        table: torch.Tensor | None = None,
        null_layout_prob: float = 0.2,
        layout_size: tuple[int, int] | None = None,
    ) -> None:
        if encoding not in ("onehot", "embedding"):
            raise ValueError(f"encoding={encoding!r} is not a SPADE layout encoding; use 'onehot' or 'embedding'")
        if encoding == "embedding" and table is None:
            raise ValueError("encoding='embedding' needs the class-embedding table (`table`)")
        self.context_ = context
        self.encoding = encoding
        self.label_set = label_set
        self.table = table
        self.null_layout_prob = null_layout_prob
        self.layout_size = layout_size

    def prepare(
        self, labels: torch.Tensor, generator: torch.Generator | None = None, dtype=torch.float32
    ) -> LayoutState:
        from ..core.labels import resize_nearest

        if self.layout_size is not None:
            labels = resize_nearest(labels, self.layout_size)
        if self.encoding == "onehot":
            layout = one_hot(labels, self.label_set.num_classes, self.label_set.ignore_index, dtype=dtype)
        else:
            layout = class_embedding_hint(
                labels, self.table.to(labels.device, dtype), self.label_set.ignore_index, stride=1
            )
        dropped = _dropout_mask(labels.shape[0], self.null_layout_prob, generator, labels.device)
        return LayoutState(_apply_dropout(layout, dropped), dropped)

    def context(self, state: LayoutState) -> AbstractContextManager:
        """Keep the layout set from the forward through ``backward`` (checkpointed resnets are recomputed then)."""
        return self.context_.use(state.layout)

    def predict(self, unet, x, t, text, state):
        return unet(x, t, encoder_hidden_states=text).sample


Conditioner = ControlNetConditioner | SpadeConditioner
PredictFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
