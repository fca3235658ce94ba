"""The discriminator: a transformers semantic segmenter with ``N + 1`` outputs (our ``N`` classes + fake at ``N``).

Backbones (``backbone=``):

- ``"segformer"`` (default, light): ``SegformerForSemanticSegmentation``; logits at H/4, W/4 before upsampling.
- ``"upernet"``: ``UperNetForSemanticSegmentation`` over any transformers backbone config (ConvNeXt, Swin,
  ResNet). Its auxiliary FCN head only feeds transformers' own training loss, so the discriminator drops it.

Built from a local pretrained folder (``from_pretrained(folder, local_files_only=True)``, fp32) whose head is
re-initialised for our classes by name ([`remap_classifier_head`]), from a folder written by
[`SegmenterDiscriminator.save_pretrained`] (head kept as is), or from a config (random weights; tests and the
toy world use [`tiny_segmenter_config`]).

Example::

    disc = build_discriminator(get_label_set("cityscapes"), pretrained="models/segformer-b0-ade")
    with disc.update_mode(batch_size=real.shape[0] + fake.shape[0]):
        logits = disc(torch.cat([real, fake]), size=labels.shape[-2:])   # (2B, 20, H, W)
    with disc.generator_mode():
        logits = disc(decoded_x0, size=labels.shape[-2:])                # grads reach decoded_x0 only
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    ConvNextConfig,
    PretrainedConfig,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SwinConfig,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from ..labels import LabelSet
from ..logging import get_logger
from .errors import DiscriminatorError
from .head_remap import FAKE_CLASS_NAME, HeadRemapReport, get_classifier, remap_classifier_head
from .input_norm import InputNorm, InputNormSpec, resolve_input_norm
from .modes import generator_mode, update_mode
from .tables import normalize_class_name

__all__ = [
    "BACKBONES",
    "SAVED_CONFIG_KEY",
    "SegmenterDiscriminator",
    "build_discriminator",
    "tiny_segmenter_config",
]

logger = get_logger(__name__)

BACKBONES = ("segformer", "upernet")
UPERNET_BACKBONES = ("convnext", "swin")
# Key under which a saved discriminator records itself in the transformers config.json.
SAVED_CONFIG_KEY = "l2i_discriminator"
_SAVED_FORMAT = 1

_CLASSES: dict[str, tuple[type[PretrainedConfig], type[nn.Module]]] = {
    "segformer": (SegformerConfig, SegformerForSemanticSegmentation),
    "upernet": (UperNetConfig, UperNetForSemanticSegmentation),
}


def _check_backbone(backbone: str) -> str:
    if backbone not in BACKBONES:
        raise DiscriminatorError(f"Unknown `backbone` {backbone!r}; valid backbones are {list(BACKBONES)}.")
    return backbone


def _label_names(labels: LabelSet | Sequence[str]) -> tuple[str, ...]:
    names = labels.names if isinstance(labels, LabelSet) else labels
    if isinstance(names, str) or not names or not all(isinstance(n, str) for n in names):
        raise DiscriminatorError(
            f"`labels` must be a LabelSet or a non-empty sequence of class names, got {labels!r}."
        )
    return tuple(names)


def _set_labels(config: PretrainedConfig, names: Sequence[str]) -> None:
    all_names = (*names, FAKE_CLASS_NAME)
    config.id2label = dict(enumerate(all_names))
    config.label2id = {name: i for i, name in reversed(list(enumerate(all_names)))}


def _drop_auxiliary_head(model: nn.Module) -> None:
    if getattr(model, "auxiliary_head", None) is not None:
        model.auxiliary_head = None
        logger.info("Dropped UperNet's auxiliary head: it only feeds transformers' own training loss.")
    if hasattr(model.config, "use_auxiliary_head"):
        model.config.use_auxiliary_head = False


def tiny_segmenter_config(backbone: str = "segformer", upernet_backbone: str = "convnext") -> PretrainedConfig:
    """A tiny random config (about 0.1 M parameters) for tests and the toy world.

    Args:
        backbone (`str`, defaults to `"segformer"`): one of [`BACKBONES`].
        upernet_backbone (`str`, defaults to `"convnext"`): ``"convnext"`` or ``"swin"`` (UperNet only).
    """
    _check_backbone(backbone)
    if backbone == "segformer":
        return SegformerConfig(
            hidden_sizes=[8, 16, 32, 64],
            depths=[1, 1, 1, 1],
            num_attention_heads=[1, 1, 2, 2],
            sr_ratios=[2, 2, 1, 1],
            decoder_hidden_size=32,
        )
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if upernet_backbone == "convnext":
        inner = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], out_features=stages)
    elif upernet_backbone == "swin":
        inner = SwinConfig(
            embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, out_features=stages
        )
    else:
        raise DiscriminatorError(
            f"Unknown `upernet_backbone` {upernet_backbone!r}; valid choices are {list(UPERNET_BACKBONES)}."
        )
    return UperNetConfig(backbone_config=inner, hidden_size=16, auxiliary_channels=16, use_auxiliary_head=False)


class SegmenterDiscriminator(nn.Module):
    """A semantic segmenter with ``N + 1`` outputs: our ``N`` classes, then the fake class at index ``N``.

    Build it with [`build_discriminator`]. ``state_dict`` keys are the transformers model's with a ``model.``
    prefix; the normalisation buffers are not saved there (they live in the config, see ``save_pretrained``).

    Args:
        model (`nn.Module`): a transformers SegFormer or UperNet model whose classifier has ``N + 1`` rows.
        backbone (`str`): ``"segformer"`` or ``"upernet"``.
        class_names (`Sequence[str]`): our ``N`` class names, in id order.
        input_norm (`InputNorm`): normalisation of [0, 1] images for the backbone.
        remap_report (`HeadRemapReport`, *optional*): how the head was initialised from a pretrained one.
    """

    def __init__(
        self,
        model: nn.Module,
        backbone: str,
        class_names: Sequence[str],
        input_norm: InputNorm,
        remap_report: HeadRemapReport | None = None,
    ) -> None:
        super().__init__()
        self.backbone = _check_backbone(backbone)
        self.model = model
        self.class_names = tuple(class_names)
        self.remap_report = remap_report
        rows = get_classifier(model).out_channels
        if rows != len(self.class_names) + 1:
            raise DiscriminatorError(
                f"The segmenter's classifier has {rows} rows but {len(self.class_names)} classes + 1 fake class "
                f"need {len(self.class_names) + 1}; build it with build_discriminator()."
            )
        self.register_buffer("input_mean", torch.zeros(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.ones(1, 3, 1, 1), persistent=False)
        self.input_norm = input_norm

    @property
    def input_norm(self) -> InputNorm:
        """The input normalisation; setting it also updates the ``input_mean``/``input_std`` buffers."""
        return self._input_norm

    @input_norm.setter
    def input_norm(self, value: InputNorm) -> None:
        if not isinstance(value, InputNorm):
            raise DiscriminatorError(f"`input_norm` must be an InputNorm, got {value!r}; see resolve_input_norm().")
        self._input_norm = value
        with torch.no_grad():
            self.input_mean.copy_(torch.tensor(value.mean).view(1, 3, 1, 1))
            self.input_std.copy_(torch.tensor(value.std).view(1, 3, 1, 1))

    @property
    def num_classes(self) -> int:
        """``N``, the number of layout classes (the fake class not counted)."""
        return len(self.class_names)

    @property
    def fake_index(self) -> int:
        """The output index of the fake class, ``N``."""
        return len(self.class_names)

    @property
    def num_outputs(self) -> int:
        """``N + 1``."""
        return len(self.class_names) + 1

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map ``(B, 3, H, W)`` images in [-1, 1] to the backbone's input normalisation (float32)."""
        x01 = (images.float() + 1.0) * 0.5
        return (x01 - self.input_mean.float()) / self.input_std.float()

    def forward(self, images: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """Per-pixel class logits.

        Args:
            images (`torch.Tensor`): ``(B, 3, H, W)`` float, RGB in [-1, 1] (values outside are not clamped).
            size (`Sequence[int]`, *optional*): ``(H_label, W_label)`` to upsample to; defaults to ``(H, W)``.

        Returns:
            `torch.Tensor`: ``(B, N + 1, H_label, W_label)`` float32 raw logits (no softmax), bilinearly
            upsampled (``align_corners=False``); channel ``N`` is the fake class.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"`images` must be (B, 3, H, W) RGB in [-1, 1], got shape {tuple(images.shape)}.")
        if size is None:
            size = images.shape[-2:]
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"`size` must be (H, W) of the label map, got {size!r}.")
        param = next(self.model.parameters())
        pixel_values = self.normalize(images).to(dtype=param.dtype)
        if self.backbone == "segformer":
            logits = self.model(pixel_values=pixel_values).logits
        else:
            # Backbone + decode head directly: one bilinear resize (to the label size) instead of two, and no
            # auxiliary head.
            features = self.model.backbone(pixel_values).feature_maps
            logits = self.model.decode_head(features)
        return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)

    def generator_mode(self) -> AbstractContextManager[SegmenterDiscriminator]:
        """Context: eval mode (BN running statistics) and frozen parameters; restored on exit."""
        return generator_mode(self)

    def update_mode(self, batch_size: int) -> AbstractContextManager[SegmenterDiscriminator]:
        """Context: train mode, BN layers in eval if ``batch_size < 2``; restored on exit."""
        return update_mode(self, batch_size)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a transformers folder (config.json + safetensors) that [`build_discriminator`] reloads as is.

        The config records the input normalisation and class count under ``l2i_discriminator``; ``id2label``
        holds the ``N + 1`` names.
        """
        setattr(
            self.model.config,
            SAVED_CONFIG_KEY,
            {
                "format": _SAVED_FORMAT,
                "num_classes": self.num_classes,
                **self.input_norm.to_dict(),
            },
        )
        self.model.save_pretrained(str(folder))


def _read_model_type(folder: Path) -> str:
    config_file = folder / "config.json"
    if not folder.is_dir() or not config_file.is_file():
        raise DiscriminatorError(
            f"`pretrained` must be a local transformers folder with a config.json, got {str(folder)!r}"
            f"{' (not a folder)' if not folder.is_dir() else ' (no config.json)'}."
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as err:
        raise DiscriminatorError(f"Cannot read {config_file}: {err}") from err
    if model_type not in BACKBONES:
        raise DiscriminatorError(
            f"{config_file} has model_type {model_type!r}; the discriminator supports {list(BACKBONES)}."
        )
    return model_type


def _from_saved(model: nn.Module, names: Sequence[str], folder: Path, saved: Mapping[str, Any]) -> None:
    saved_names = [model.config.id2label.get(i) for i in range(get_classifier(model).out_channels)]
    expected = [normalize_class_name(n) for n in (*names, FAKE_CLASS_NAME)]
    if saved.get("num_classes") != len(names) or [normalize_class_name(str(n)) for n in saved_names] != expected:
        raise DiscriminatorError(
            f"The discriminator saved in {folder} was trained for classes {saved_names[:-1]}, not {list(names)}; "
            "use the label set it was trained with, or start from a pretrained segmenter instead."
        )


def build_discriminator(
    labels: LabelSet | Sequence[str],
    backbone: str | None = None,
    pretrained: str | Path | None = None,
    config: PretrainedConfig | Mapping[str, Any] | None = None,
    source_labels: LabelSet | Sequence[str] | None = None,
    name_map: Mapping[str, str | None] | Literal["auto"] | None = "auto",
    input_norm: InputNormSpec = "auto",
    init_std_scale: float = 0.1,
    generator: torch.Generator | None = None,
) -> SegmenterDiscriminator:
    """Build the ``N + 1``-output discriminator for ``labels``.

    Args:
        labels (`LabelSet` or `Sequence[str]`): our ``N`` classes, in id order.
        backbone (`str`, *optional*): ``"segformer"`` or ``"upernet"``; read from the folder's config.json when
            ``pretrained`` is given (an explicit value must agree), else defaults to ``"segformer"``.
        pretrained (`str` or `Path`, *optional*): a local transformers folder (a segmenter fine-tuned on e.g.
            ADE20K, or a saved discriminator). Loaded in fp32 with ``local_files_only=True``.
        config (`PretrainedConfig` or `dict`, *optional*): build with random weights from this config instead
            (copied, never modified); ``num_labels``/``id2label`` are set for us. Neither ``pretrained`` nor
            ``config``: the backbone's default transformers config.
        source_labels (`LabelSet` or `Sequence[str]`, *optional*): names of the pretrained head's rows when its
            ``config.id2label`` lacks them.
        name_map (`Mapping`, `"auto"` or `None`, defaults to `"auto"`): see [`remap_classifier_head`].
        input_norm (`str`, `InputNorm` or `(mean, std)`, defaults to `"auto"`): see [`resolve_input_norm`].
        init_std_scale (`float`, defaults to 0.1): random head rows get ``init_std_scale x std(pretrained rows)``.
        generator (`torch.Generator`, *optional*): CPU generator for the random head rows.

    Returns:
        [`SegmenterDiscriminator`] in train mode, fp32, on the CPU.
    """
    names = _label_names(labels)
    if backbone is not None:
        _check_backbone(backbone)
    if pretrained is not None and config is not None:
        raise DiscriminatorError("Pass either `pretrained` (a folder) or `config` (random weights), not both.")

    if pretrained is not None:
        folder = Path(pretrained)
        model_type = _read_model_type(folder)
        if backbone is not None and backbone != model_type:
            raise DiscriminatorError(
                f"`backbone` is {backbone!r} but {folder / 'config.json'} holds a {model_type!r} model; pass "
                f"backbone={model_type!r} or leave it out."
            )
        backbone = model_type
        model = _CLASSES[backbone][1].from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
        _drop_auxiliary_head(model)
        saved = getattr(model.config, SAVED_CONFIG_KEY, None)
        if saved is not None:
            _from_saved(model, names, folder, saved)
            report = None
        else:
            report = remap_classifier_head(
                model,
                names,
                source_labels=source_labels,
                name_map=name_map,
                init_std_scale=init_std_scale,
                generator=generator,
                where=str(folder),
            )
        norm = resolve_input_norm(input_norm, folder=folder, saved=saved)
    else:
        backbone = backbone or "segformer"
        config_cls, model_cls = _CLASSES[backbone]
        if config is None:
            logger.warning("Building a %s discriminator with random weights from the default config.", backbone)
            cfg = config_cls()
        elif isinstance(config, PretrainedConfig):
            if not isinstance(config, config_cls):
                raise DiscriminatorError(
                    f"`config` is a {type(config).__name__} but backbone {backbone!r} needs a {config_cls.__name__}."
                )
            cfg = copy.deepcopy(config)
        elif isinstance(config, Mapping):
            cfg = config_cls(**{k: v for k, v in config.items() if k != "model_type"})
        else:
            raise DiscriminatorError(
                f"`config` must be a {config_cls.__name__} or a dict, got {type(config).__name__}."
            )
        _set_labels(cfg, names)
        if hasattr(cfg, "use_auxiliary_head"):
            cfg.use_auxiliary_head = False
        model = model_cls(cfg)
        report = None
        norm = resolve_input_norm(input_norm)

    disc = SegmenterDiscriminator(model.float(), backbone, names, norm, remap_report=report)
    disc.train()
    logger.info(
        "Discriminator: %s, %d classes + fake, input norm %s (mean %s, std %s).",
        backbone,
        len(names),
        norm.source,
        norm.mean,
        norm.std,
    )
    return disc
