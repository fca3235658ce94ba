"""Pixel-space SDM files: the official ``.pt`` state dict <-> `SDMUNet` (strict) <-> safetensors with metadata.

Formats (told apart by content, never by file name):

* **official** ``.pt``: the ``UNetModel`` state dict the released checkpoints hold (WeilunWang/semantic-diffusion-
  model: ADE20K, CelebAMask-HQ, COCO-Stuff), keys ``time_embed.*``, ``input_blocks.*``, ``middle_block.*``,
  ``output_blocks.*``, ``out.*``. Read only with ``torch.load(weights_only=True)``, memory-mapped
  (`load_torch_file`); a pickle that needs anything else is refused. A ``{"state_dict": ...}`` wrapper is accepted.
  `save_sdm_pt` writes the same plain state dict back, in the official key order, for the official code.
* **ours**: the same keys and tensors in a ``.safetensors`` file, with the ``l2i.*`` metadata of `WeightsMetadata`
  (kind ``sdm``, ``hint_encoding`` ``onehot``/``onehot_edges``, the label set with its fingerprint, base model,
  format version) and these kind-specific fields:

  =========================  ==================================================================================
  ``l2i.config``             the `SDMConfig` as JSON (also the fields the shapes cannot give: image size, heads)
  ``l2i.label_channels``     ``C_y``
  ``l2i.condition``          the `SDMConditionSpec` as JSON (how label maps become ``y``); absent when unknown
  ``l2i.source``             where the weights came from (e.g. the official release), informative
  =========================  ==================================================================================

The config of a file without metadata is inferred from its shapes (`infer_sdm_config`). The attention head width
and the training image size change no shape, so they default to the official 64 and 256.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.files import save_safetensors_atomic
from ..core.labels import LabelSet, load_label_set
from ..core.logging import get_logger
from ..core.sdm import SDM_CONDITIONS, SDMConditionSpec, SDMConfig, SDMUNet
from .metadata import MetadataError, WeightsMetadata
from .safe_load import WeightsError, load_safetensors, load_torch_file, sniff_file_format

__all__ = [
    "SDM_OFFICIAL_SOURCE",
    "SDM_TARGETS",
    "SDMConversion",
    "SDMFile",
    "SDMFormatError",
    "SDMKeyMismatchError",
    "check_sdm_state_dict",
    "convert_sdm_file",
    "expected_sdm_shapes",
    "infer_sdm_config",
    "is_sdm_state_dict",
    "load_sdm_file",
    "save_sdm_file",
    "save_sdm_pt",
    "sdm_from_file",
]

logger = get_logger(__name__)

#: Output containers of `convert_sdm_file`.
SDM_TARGETS = ("pt", "safetensors")

#: ``l2i.source`` of files converted from the official release.
SDM_OFFICIAL_SOURCE = "official SDM release (WeilunWang/semantic-diffusion-model), converted by layout2image"

# Keys every SDM UNet has: the signature (a key + shape check, never a file name; style.md rule 14).
_SIGNATURE = (
    "time_embed.0.weight",
    "input_blocks.0.0.weight",
    "middle_block.0.in_norm.mlp_shared.0.weight",
    "middle_block.1.qkv.weight",
    "out.2.weight",
)
_STAGE = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.")


class SDMFormatError(WeightsError):
    """The tensors are no SDM UNet, or its config cannot be read from their shapes."""


class SDMKeyMismatchError(WeightsError):
    """An SDM state dict does not fit the UNet it is loaded into (missing, unexpected or misshapen keys)."""


def _shape(value: Any) -> tuple[int, ...]:
    shape = getattr(value, "shape", value)
    return tuple(int(s) for s in shape)


def is_sdm_state_dict(tensors: Mapping[str, Any]) -> bool:
    """Whether ``tensors`` (key -> tensor, shape or `TensorInfo`) look like an SDM UNet (the signature keys, a
    4-D image conv in and a SPADE conv in the middle block)."""
    if not all(k in tensors for k in _SIGNATURE):
        return False
    return len(_shape(tensors["input_blocks.0.0.weight"])) == 4 and (
        len(_shape(tensors["middle_block.0.in_norm.mlp_shared.0.weight"])) == 4
    )


def infer_sdm_config(
    tensors: Mapping[str, Any], *, image_size: int = 256, num_head_channels: int = 64, dropout: float = 0.0
) -> SDMConfig:
    """Read an `SDMConfig` from the key names and shapes of an SDM state dict.

    Args:
        tensors (`Mapping`): key -> tensor, shape tuple or `TensorInfo`.
        image_size (`int`, defaults to 256): training size, to express the attention levels as resolutions.
        num_head_channels (`int`, defaults to 64): attention head width (not visible in the shapes).
        dropout (`float`, defaults to 0.0): not visible in the shapes either.

    Raises:
        SDMFormatError: the keys are no SDM UNet or their structure is inconsistent (the message says where).
    """
    if not is_sdm_state_dict(tensors):
        missing = [k for k in _SIGNATURE if k not in tensors]
        raise SDMFormatError(
            f"not an SDM UNet state dict: missing signature key(s) {missing or '(none; wrong shapes)'}; an SDM UNet "
            "has time_embed.*, input_blocks.*, middle_block.0.in_norm.mlp_shared.0.*, middle_block.1.qkv.*, out.2.*"
        )
    shape = {k: _shape(v) for k, v in tensors.items()}
    model_channels = shape["time_embed.0.weight"][1]
    first = shape["input_blocks.0.0.weight"]
    in_channels = first[1]
    out_channels = shape["out.2.weight"][0]
    if out_channels not in (in_channels, 2 * in_channels):
        raise SDMFormatError(
            f"out.2 has {out_channels} channels; an SDM UNet gives {in_channels} or {2 * in_channels}"
        )
    spade = shape["middle_block.0.in_norm.mlp_shared.0.weight"]
    label_channels, spade_hidden = spade[1], spade[0]
    mid_width = shape["middle_block.0.in_layers.1.weight"][0]
    emb_width = shape["middle_block.0.emb_layers.1.weight"][0]
    # per stage index: the highest layer index and whether it holds an (up/down) resblock, attention or a conv
    stages: dict[tuple[str, int], set[int]] = {}
    for key in shape:
        m = _STAGE.match(key)
        if m:
            stages.setdefault((m[1], int(m[2])), set()).add(int(m[3]))
    n_in = 1 + max(i for (kind, i) in stages if kind == "input_blocks")
    n_out = 1 + max(i for (kind, i) in stages if kind == "output_blocks")
    resblock_updown = not any(k.endswith(".op.weight") for k in shape if k.startswith("input_blocks."))
    up_stages = [
        i
        for (kind, i), layers in stages.items()
        if kind == "output_blocks"
        and any(
            f"output_blocks.{i}.{j}.in_norm.mlp_shared.0.weight" in shape
            or f"output_blocks.{i}.{j}.conv.weight" in shape
            for j in layers
            if j > 0
        )
    ]
    levels = len(up_stages) + 1
    res_blocks, rest = divmod(n_out, levels)
    if rest or res_blocks < 2 or n_in != 1 + levels * (res_blocks - 1) + levels - 1:
        raise SDMFormatError(
            f"inconsistent SDM layout: {n_in} input blocks, {n_out} output blocks and {len(up_stages)} upsampling "
            "stages fit no (levels, num_res_blocks)"
        )
    num_res_blocks = res_blocks - 1
    widths, attention_ds = [], []
    for level in range(levels):
        i = 1 + level * (num_res_blocks + 1)  # first resblock of the level
        widths.append(shape[f"input_blocks.{i}.0.in_layers.2.weight"][0])
        if f"input_blocks.{i}.1.qkv.weight" in shape:
            attention_ds.append(2**level)
    if any(w % model_channels for w in widths):
        raise SDMFormatError(f"level widths {widths} are not multiples of model_channels {model_channels}")
    if widths[-1] != mid_width:
        raise SDMFormatError(f"middle block width {mid_width} differs from the deepest level's {widths[-1]}")
    try:
        return SDMConfig(
            label_channels=label_channels,
            image_size=image_size,
            in_channels=in_channels,
            model_channels=model_channels,
            channel_mult=tuple(w // model_channels for w in widths),
            num_res_blocks=num_res_blocks,
            attention_resolutions=tuple(image_size // ds for ds in attention_ds),
            num_head_channels=num_head_channels,
            learn_sigma=out_channels == 2 * in_channels,
            dropout=dropout,
            resblock_updown=resblock_updown,
            use_scale_shift_norm=emb_width == 2 * mid_width,
            spade_hidden_channels=spade_hidden,
        )
    except ValueError as e:
        raise SDMFormatError(f"the shapes give an invalid SDM config: {e}") from None


def expected_sdm_shapes(config: SDMConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an `SDMUNet` for ``config``, in the official order (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = SDMUNet.from_sdm_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_sdm_state_dict(
    tensors: Mapping[str, Any], config: SDMConfig, source: str = "the state dict"
) -> dict[str, tuple[int, ...]]:
    """Raise `SDMKeyMismatchError` unless ``tensors`` has exactly the keys and shapes of ``config``'s UNet.

    Returns:
        `dict[str, tuple[int, ...]]`: the expected key -> shape table, in the official key order.
    """
    expected = expected_sdm_shapes(config)
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in expected)
    misshapen = [(k, _shape(tensors[k]), s) for k, s in expected.items() if k in tensors and _shape(tensors[k]) != s]
    if missing or unexpected or misshapen:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
        if misshapen:
            shown = ", ".join(f"{k}: {list(a)} in the file, {list(b)} in the model" for k, a, b in misshapen[:5])
            parts.append(f"{len(misshapen)} key(s) of another shape: {shown}")
        raise SDMKeyMismatchError(
            f"{source} does not fit the SDM UNet (C_y {config.label_channels}, {config.model_channels} channels, "
            f"channel_mult {list(config.channel_mult)}): " + "; ".join(parts)
        )
    return expected


def _resolve_condition(
    config: SDMConfig, label_set: LabelSet | None, condition: SDMConditionSpec | None, source: str
) -> tuple[LabelSet | None, SDMConditionSpec | None]:
    """The label set and condition spec of a file, checked against its ``C_y``; official ones found by C_y."""
    c_y = config.label_channels
    if label_set is None and condition is None:
        official = [name for name, spec in SDM_CONDITIONS.items() if spec.channels == c_y]
        if len(official) != 1:
            logger.warning(
                "%s reads %d label channels, which fits none of the official SDM datasets; the label set stays "
                "unknown (pass label_set= to record it)",
                source,
                c_y,
            )
            return None, None
        label_set = load_label_set(official[0])
        logger.info("%s: %d label channels, the official %s layout", source, c_y, official[0])
    if condition is None:
        condition = SDMConditionSpec.for_label_set(label_set)
    if label_set is not None:
        reason = condition.fits(label_set)
        if reason is not None:
            raise MetadataError(f"{source}: the condition spec does not fit the label set: {reason}")
    if condition.channels != c_y:
        what = f"label set {label_set.name!r} encoded as " if label_set is not None else ""
        known = ", ".join(f"{s.channels} {n}" for n, s in SDM_CONDITIONS.items())
        raise MetadataError(
            f"{source} reads C_y = {c_y} label channels, but {what}{condition.num_classes} one-hot channels"
            f"{' + unknown' if condition.unknown_channel else ''}{' + edge' if condition.edges else ''} gives "
            f"C_y = {condition.channels}. Use the label set (and edge/unknown channels) the weights were trained "
            f"with (official SDM: C_y {known})"
        )
    return label_set, condition


# ---------------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class SDMFile:
    """An SDM UNet file read by `load_sdm_file`.

    Args:
        state_dict (`dict[str, torch.Tensor]`): the UNet state dict (official names; CPU; fp32 or fp16 as stored,
            memory-mapped for zip ``.pt`` files).
        config (`SDMConfig`): the UNet config (from ``l2i.config``, else inferred from the shapes).
        metadata (`WeightsMetadata`): the file's metadata, or what converting it records (kind ``sdm``).
        condition (`SDMConditionSpec`, *optional*): how label maps become ``y``; None when unknown.
        container (`str`): ``"safetensors"``, ``"torch-zip"`` or ``"torch-legacy"``.
        path (`Path`): the file read.
    """

    state_dict: dict[str, torch.Tensor]
    config: SDMConfig
    metadata: WeightsMetadata
    condition: SDMConditionSpec | None
    container: str
    path: Path

    @property
    def label_set(self) -> LabelSet | None:
        """The label set the weights read (None when unknown)."""
        return self.metadata.label_set

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(t.shape) for t in self.state_dict.values())

    def build_unet(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> SDMUNet:
        """An `SDMUNet` with these weights, loaded with ``strict=True`` (fp32 unless ``dtype``).

        The UNet is built on the meta device and takes the tensors as they are (``assign=True``): no random init
        and no second copy; where no cast is needed its parameters share memory with ``state_dict`` (for a
        memory-mapped ``.pt``, copy-on-write pages of the file).
        """
        check_sdm_state_dict(self.state_dict, self.config, str(self.path))
        with torch.device("meta"):
            unet = SDMUNet.from_sdm_config(self.config)
        # assign=True takes the tensors as they are (no random init, no second copy of 2.6 GB); cast after
        state = {k: v.to(dtype or torch.float32) if v.is_floating_point() else v for k, v in self.state_dict.items()}
        unet.load_state_dict(state, strict=True, assign=True)
        return unet.to(device)


def _read_tensors(path: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    container = sniff_file_format(path)
    if container == "safetensors":
        loaded = load_safetensors(path)
        return container, loaded.state_dict, loaded.metadata
    obj = load_torch_file(path, mmap=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SDMFormatError(
            f"{str(path)!r} holds a {type(obj).__name__} that is not a state dict of tensors; an SDM checkpoint is "
            "the UNet state dict (model*.pt / ema_0.9999_*.pt), not an optimizer file (opt*.pt)"
        )
    return container, {str(k): v for k, v in obj.items()}, {}


def load_sdm_file(
    path: str | os.PathLike,
    *,
    label_set: LabelSet | str | None = None,
    condition: SDMConditionSpec | None = None,
    image_size: int | None = None,
    num_head_channels: int | None = None,
) -> SDMFile:
    """Read an SDM UNet file (official ``.pt`` or our ``.safetensors``) and check it.

    Args:
        path (`str` or `os.PathLike`): the file.
        label_set (`LabelSet` or `str`, *optional*): the label set you will feed. For our files it is checked
            against the stored one (fingerprint); for official ones it names the set (default: the official set
            whose ``C_y`` matches) and its encoding is checked against the file's ``C_y``.
        condition (`SDMConditionSpec`, *optional*): how label maps become ``y`` (default: the stored one, else the
            official spec of the label set).
        image_size (`int`, *optional*), num_head_channels (`int`, *optional*): for files without ``l2i.config``
            (defaults 256 and 64, the official values); they change no weight shape.

    Raises:
        WeightsFileError: missing, empty, truncated, corrupt file. UnsafeCheckpointError: a pickle that needs more
        than tensors (nothing from it runs). SDMFormatError: no SDM UNet. SDMKeyMismatchError: keys do not fit
        the stored config. MetadataError: label-set or ``C_y`` mismatch.
    """
    path = Path(path)
    if isinstance(label_set, str):
        label_set = load_label_set(label_set)
    container, state, raw = _read_tensors(path)
    source = str(path)
    metadata = WeightsMetadata.from_safetensors(raw, source=source) if raw and "l2i.kind" in raw else None
    if metadata is not None:
        metadata.check(kind="sdm", source=source)
        try:
            config = SDMConfig.from_kwargs(json.loads(metadata.extra["config"]), source=f"{source} (l2i.config)")
        except KeyError:
            config = None
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            raise MetadataError(f"{source}: l2i.config is not a valid SDM config: {e}") from None
        stored_condition = None
        if metadata.extra.get("condition"):
            try:
                stored_condition = SDMConditionSpec.from_dict(json.loads(metadata.extra["condition"]), source)
            except (json.JSONDecodeError, ValueError) as e:
                raise MetadataError(f"{source}: l2i.condition is not valid: {e}") from None
        if label_set is not None:
            metadata.check(label_set=label_set, source=source)
        if config is None:
            config = infer_sdm_config(state, image_size=image_size or 256, num_head_channels=num_head_channels or 64)
        check_sdm_state_dict(state, config, source)
        label_set, condition = _resolve_condition(
            config, label_set or metadata.label_set, condition or stored_condition, source
        )
        return SDMFile(state, config, metadata, condition, container, path)
    config = infer_sdm_config(state, image_size=image_size or 256, num_head_channels=num_head_channels or 64)
    check_sdm_state_dict(state, config, source)
    label_set, condition = _resolve_condition(config, label_set, condition, source)
    metadata = _metadata_for(config, label_set, condition, base_model="", source=SDM_OFFICIAL_SOURCE)
    return SDMFile(state, config, metadata, condition, container, path)


def sdm_from_file(
    path: str | os.PathLike,
    *,
    label_set: LabelSet | str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> SDMUNet:
    """`load_sdm_file` then `SDMFile.build_unet`: a ready `SDMUNet` (strict load)."""
    return load_sdm_file(path, label_set=label_set, **kwargs).build_unet(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------- writing
def _metadata_for(
    config: SDMConfig,
    label_set: LabelSet | None,
    condition: SDMConditionSpec | None,
    *,
    base_model: str,
    source: str,
    training_config_hash: str = "",
) -> WeightsMetadata:
    extra = {
        "config": json.dumps(config.to_kwargs(), separators=(",", ":")),
        "label_channels": str(config.label_channels),
        "source": source,
    }
    if condition is not None:
        extra["condition"] = json.dumps(condition.to_dict(), separators=(",", ":"))
    return WeightsMetadata(
        kind="sdm",
        hint_encoding=condition.hint_encoding if condition is not None else "onehot",
        label_set=label_set,
        base_model=base_model,
        training_config_hash=training_config_hash,
        extra=extra,
    )


def _tensors_of(model_or_state: SDMUNet | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state


def _cast(tensors: Mapping[str, torch.Tensor], order, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for k in order:
        v = tensors[k].detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    return out


def save_sdm_file(
    path: str | os.PathLike,
    model_or_state: SDMUNet | Mapping[str, torch.Tensor],
    *,
    config: SDMConfig | None = None,
    label_set: LabelSet | str | None = None,
    condition: SDMConditionSpec | None = None,
    base_model: str = "",
    source: str = "",
    training_config_hash: str = "",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write an SDM UNet as safetensors with our metadata (the inputs are not modified).

    Args:
        path (`str` or `os.PathLike`): the output ``.safetensors``.
        model_or_state (`SDMUNet` or `Mapping`): the UNet or its (official-named) state dict.
        config (`SDMConfig`, *optional*): required for a bare state dict unless it can be inferred from it.
        label_set (`LabelSet` or `str`, *optional*): the label set the weights read (default: the official set
            whose ``C_y`` matches, else none recorded).
        condition (`SDMConditionSpec`, *optional*): how label maps become ``y`` (default: the label set's
            official spec, else one-hot over its classes).
        base_model (`str`): recorded as ``l2i.base_model`` (SDM trains from scratch: usually empty).
        source (`str`): recorded as ``l2i.source``.
        training_config_hash (`str`): `training_config_hash` of a trainer config, or empty.
        dtype (`torch.dtype`, *optional*): cast floating tensors (``torch.float16`` halves the file); None keeps.

    Raises:
        SDMKeyMismatchError: the tensors do not fit ``config``. MetadataError: ``C_y`` does not fit the label set.
    """
    tensors = _tensors_of(model_or_state)
    if config is None:
        config = model_or_state.sdm_config if isinstance(model_or_state, SDMUNet) else infer_sdm_config(tensors)
    if isinstance(label_set, str):
        label_set = load_label_set(label_set)
    expected = check_sdm_state_dict(tensors, config, "the SDM weights to save")
    label_set, condition = _resolve_condition(config, label_set, condition, str(path))
    metadata = _metadata_for(
        config, label_set, condition, base_model=base_model, source=source, training_config_hash=training_config_hash
    )
    return save_safetensors_atomic(_cast(tensors, expected, dtype), path, metadata=metadata.to_safetensors())


def save_sdm_pt(
    path: str | os.PathLike,
    model_or_state: SDMUNet | Mapping[str, torch.Tensor],
    *,
    config: SDMConfig | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the plain state dict the official code loads (``model.load_state_dict(th.load(path))``), keys in the
    official order. No metadata: a ``.pt`` has nowhere to keep it (convert back to safetensors to record it)."""
    tensors = _tensors_of(model_or_state)
    if config is None:
        config = model_or_state.sdm_config if isinstance(model_or_state, SDMUNet) else infer_sdm_config(tensors)
    expected = check_sdm_state_dict(tensors, config, "the SDM weights to save")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_cast(tensors, expected, dtype), path)
    return path


@dataclass(frozen=True)
class SDMConversion:
    """What `convert_sdm_file` wrote.

    Args:
        path (`Path`): the output file.
        to (`str`): ``"safetensors"`` or ``"pt"``.
        config (`SDMConfig`): the UNet config.
        label_set (`LabelSet`, *optional*): the label set recorded (None when unknown or for ``.pt``).
        condition (`SDMConditionSpec`, *optional*): the conditioning recorded.
        num_tensors (`int`): tensors written.
        num_parameters (`int`): their element count.
    """

    path: Path
    to: str
    config: SDMConfig
    label_set: LabelSet | None
    condition: SDMConditionSpec | None
    num_tensors: int
    num_parameters: int


def convert_sdm_file(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    to: str | None = None,
    label_set: LabelSet | str | None = None,
    condition: SDMConditionSpec | None = None,
    dtype: torch.dtype | None = None,
    image_size: int | None = None,
    num_head_channels: int | None = None,
) -> SDMConversion:
    """Convert an SDM UNet between the official ``.pt`` and our ``.safetensors`` (either direction).

    Args:
        source (`str` or `os.PathLike`): the input file (the container is read from its first bytes).
        output (`str` or `os.PathLike`): the file to write.
        to (`str`, *optional*): one of `SDM_TARGETS`; default: the other container than the input's.
        label_set, condition, image_size, num_head_channels: as in `load_sdm_file`.
        dtype (`torch.dtype`, *optional*): cast floating tensors; None keeps them.

    Raises:
        ValueError: an unknown ``to``; and everything `load_sdm_file` raises.
    """
    loaded = load_sdm_file(
        source, label_set=label_set, condition=condition, image_size=image_size, num_head_channels=num_head_channels
    )
    if to is None:
        to = "pt" if loaded.container == "safetensors" else "safetensors"
    if to == "safetensors":
        md = loaded.metadata
        written = save_sdm_file(
            output,
            loaded.state_dict,
            config=loaded.config,
            label_set=md.label_set,
            condition=loaded.condition,
            base_model=md.base_model,
            source=md.extra.get("source", ""),
            training_config_hash=md.training_config_hash,
            dtype=dtype,
        )
        recorded = md.label_set
    elif to == "pt":
        written = save_sdm_pt(output, loaded.state_dict, config=loaded.config, dtype=dtype)
        recorded = None
    else:
        raise ValueError(f"to={to!r} is not an SDM target; expected one of {', '.join(SDM_TARGETS)}")
    return SDMConversion(
        path=written,
        to=to,
        config=loaded.config,
        label_set=recorded,
        condition=loaded.condition,
        num_tensors=len(loaded.state_dict),
        num_parameters=loaded.num_parameters,
    )
