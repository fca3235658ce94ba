"""Building layout ControlNets for ComfyUI (model code, no nodes): loading the stock formats and the ALDM-native
one into a ComfyUI ControlNet, and applying one with a label map encoded as the hint the file was trained with.
The nodes that call this are in `nodes.controlnet` (as ComfyUI-Advanced-ControlNet keeps ``control_*.py`` apart
from ``nodes_*.py``); this module registers none (`nodes.NODE_MODULES` does not list it).

**Formats** (recognised by key signature, `weights.detect_controlnet_format`, never by file name):

- *standard hint block* (eight convs 16/16/32/32/96/96/256/C0, as SD ControlNets): a 3-channel palette-RGB hint
  or an N (+1 edge) channel one-hot hint. Loaded by ComfyUI's own ``comfy.controlnet.load_controlnet_state_dict``,
  given the ldm layout (our converters turn diffusers files into it, so toy configs load too). When our metadata
  records attention heads that ComfyUI's shape-based detection would get wrong (tiny configs), the model is built
  as for ALDM below with the stock hint block kept.
- *ALDM-native* (five convs reading `(B, D, H/4, W/4)` class embeddings): ComfyUI cannot build it, so
  `load_layout_controlnet` builds ComfyUI's ``cldm.ControlNet`` with ``hint_channels=D`` from ComfyUI's own config
  detection (``comfy.controlnet.controlnet_config``: dtype, operations, devices), replaces its ``input_hint_block``
  with `ComfyALDMHintBlock` (our `ALDMConditioningEmbedding`, its convs made from ComfyUI's operations so weight
  casting and offloading work), loads the ldm state dict strictly, and wraps it in a stock
  ``comfy.controlnet.ControlNet`` with ``compression_ratio=2``. The result is an ordinary CONTROL_NET: ComfyUI's
  sampling, CFG batching, strength and start/end handling run unchanged.

**The hint is the label map's ids**, never an IMAGE. `apply_layout_controlnet` hands ``(B, 1, H, W)`` float ids to
``set_cond_hint`` on a copy of the ControlNet whose ``upscale_algorithm`` is ``"nearest"`` and whose
``preprocess_image`` is `LayoutHint.encode_hint`. At every new latent size ComfyUI's ``get_control`` resizes the
ids to latent size x ``compression_ratio`` (x2 for ALDM, so H/4; x8 for the standard block) with
``common_upscale(..., "nearest", "center")``, which picks ``ids[::4, ::4]`` of an image-sized map as the trainer's
``class_embedding_hint(stride=4)`` does, and only then encodes them (embedding lookup, palette colours or one-hot).
So no full-resolution embedding tensor is ever built, any resolution works, and ComfyUI repeats the hint for the
cond and uncond chunks of a CFG batch.

How a ControlNet's hint is encoded (`LayoutHint`) travels with its ``control_model`` (shared by every ``copy()``),
under ``l2i_layout_hint``. A ControlNet from ComfyUI's stock loader has none; the apply node then reads its hint
channels (3: palette RGB of the map's label set; N or N + 1: one-hot).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.controlnet import ALDM_HINT_CONV_INDICES, ALDM_HINT_DOWNSAMPLE, ALDMConditioningEmbedding
from ..core.hints import DEFAULT_TEMPLATE, build_class_embedding_table, class_embedding_hint, one_hot, palette_rgb
from ..core.labels import LabelSet
from ..core.logging import get_logger
from ..weights import (
    ControlNetFile,
    convert_controlnet_state_dict,
    load_companion_table,
    load_controlnet_file,
    table_path_for,
)
from ..weights.metadata import describe_label_set
from .types import LabelMap

__all__ = [
    "APPLY_NAME",
    "COMFY_HINT_WIDTHS",
    "LAYOUT_HINT_ATTR",
    "LOADER_NAME",
    "TABLE_SOURCES",
    "ComfyALDMHintBlock",
    "ControlNetLoadError",
    "LayoutHint",
    "apply_layout_controlnet",
    "clip_encode_fn",
    "layout_hint_of",
    "load_layout_controlnet",
]

logger = get_logger(__name__)

#: Display names of the two nodes (`nodes.controlnet`), which the errors below point users to.
LOADER_NAME = "Load Layout ControlNet (ALDM)"
APPLY_NAME = "Apply Layout ControlNet (ALDM)"
#: Attribute of a ControlNet's ``control_model`` holding its `LayoutHint`.
LAYOUT_HINT_ATTR = "l2i_layout_hint"
#: Where an ALDM-native ControlNet's class-embedding table comes from.
TABLE_SOURCES = ("auto", "companion file", "CLIP")
#: Output widths of ComfyUI's fixed standard hint block (ldm ``input_hint_block.0, 2, ..., 12``), then C0.
COMFY_HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)
_ENCODINGS = ("rgb", "onehot", "onehot_edges", "embedding")


class ControlNetLoadError(ValueError):
    """A ControlNet file cannot be loaded into ComfyUI, or does not fit the label map it is applied with."""


# ---------------------------------------------------------------------------------------------- the hint
@dataclass(frozen=True, eq=False)
class LayoutHint:
    """How a ControlNet reads a label map.

    Args:
        encoding (`str`): ``"rgb"`` (palette colours, 3 channels), ``"onehot"`` (N), ``"onehot_edges"`` (N + 1) or
            ``"embedding"`` (ALDM: D-channel class embeddings).
        channels (`int`): input channels of the hint block.
        label_set (`LabelSet`, *optional*): the classes the ids must index; None for a palette ControlNet that
            records none (the label map's own palette is used then).
        table (`torch.Tensor`, *optional*): `(N + 1, D)` float32 class embeddings, null row last (``embedding``).
        source (`str`): the file, for messages.
        table_source (`str`): where the table came from (``"companion file"``, ``"CLIP"``), empty otherwise.
    """

    encoding: str
    channels: int
    label_set: LabelSet | None = None
    table: torch.Tensor | None = None
    source: str = "<memory>"
    table_source: str = ""

    def __post_init__(self) -> None:
        if self.encoding not in _ENCODINGS:
            raise ControlNetLoadError(f"hint encoding {self.encoding!r} is not known; expected one of {_ENCODINGS}")
        if self.encoding == "embedding" and (self.table is None or self.table.shape[-1] != self.channels):
            got = None if self.table is None else tuple(self.table.shape)
            raise ControlNetLoadError(
                f"{self.source}: the hint block reads {self.channels}-wide class embeddings, but the table has shape "
                f"{got}; use the table (or CLIP) the ControlNet was trained with"
            )

    def check_label_set(self, label_set: LabelSet) -> None:
        """Raise unless a label map of ``label_set`` can be encoded (same class names, order and ignore id)."""
        if self.label_set is not None:
            if not self.label_set.same_classes(label_set):
                raise ControlNetLoadError(
                    f"label set mismatch: the ControlNet {self.source} reads label set "
                    f"{describe_label_set(self.label_set)}, but the label map uses {describe_label_set(label_set)}; "
                    "build the label map with the loader's label_set output"
                )
            return
        expected = {"onehot": label_set.num_classes, "onehot_edges": label_set.num_classes + 1}.get(self.encoding)
        if expected is not None and expected != self.channels:
            raise ControlNetLoadError(
                f"the ControlNet {self.source} reads {self.channels} one-hot channels, but label set "
                f"{describe_label_set(label_set)} gives {expected} ({self.encoding}); use the label set it was "
                "trained with"
            )

    def encode(self, ids: torch.Tensor, label_set: LabelSet) -> torch.Tensor:
        """`(B, H, W)` int64 ids -> `(B, channels, H, W)` float32 hint (the core encoders)."""
        label_set = self.label_set or label_set
        if self.encoding == "embedding":
            return class_embedding_hint(ids, self.table.float(), label_set.ignore_index, stride=1)
        if self.encoding == "rgb":
            return palette_rgb(ids, label_set)
        with_edges = self.encoding == "onehot_edges"
        return one_hot(ids, label_set.num_classes, label_set.ignore_index, with_edges=with_edges)

    def encode_hint(self, label_set: LabelSet, hint: torch.Tensor) -> torch.Tensor:
        """``preprocess_image`` for ComfyUI: the resized `(B, 1, h, w)` float ids -> `(B, channels, h, w)`."""
        if hint.ndim != 4 or hint.shape[1] != 1:
            raise ControlNetLoadError(
                f"the layout hint must be (B, 1, h, w) class ids, got shape {tuple(hint.shape)}; apply this "
                f"ControlNet with '{APPLY_NAME}' (layout2image) and a label map"
            )
        return self.encode(hint[:, 0].round().long(), label_set)

    def describe(self) -> str:
        labels = "the label map's palette" if self.label_set is None else describe_label_set(self.label_set)
        text = f"{self.encoding} hint, {self.channels} channels, label set {labels}"
        return text + (f", class embeddings from the {self.table_source}" if self.table_source else "")


def _refuse_image_hint(hint: torch.Tensor) -> torch.Tensor:
    raise ControlNetLoadError(
        "this ALDM-native ControlNet reads class ids from a label map, not an IMAGE: apply it with "
        f"'{APPLY_NAME}' (layout2image) instead of ComfyUI's Apply ControlNet"
    )


def layout_hint_of(control_net, label_set: LabelSet | None = None) -> LayoutHint:
    """The `LayoutHint` our loader attached to ``control_net``; for other ControlNets (ComfyUI's stock loader) one
    inferred from the hint block's input channels and ``label_set``.

    Raises:
        ControlNetLoadError: not a ControlNet with a standard hint block, or channels that fit no encoding.
    """
    control_model = getattr(control_net, "control_model", None)
    hint = getattr(control_model, LAYOUT_HINT_ATTR, None)
    if hint is not None:
        return hint
    first = getattr(getattr(control_model, "input_hint_block", None), "0", None)
    weight = getattr(first, "weight", None)
    if weight is None or weight.ndim != 4:
        raise ControlNetLoadError(
            f"the control_net input is a {type(control_net).__name__} without a ControlNet hint block (a T2I-Adapter, "
            f"Control-LoRA or another architecture); load a layout ControlNet with '{LOADER_NAME}'"
        )
    channels = int(weight.shape[1])
    n = None if label_set is None else label_set.num_classes
    if channels == 3:
        return LayoutHint("rgb", 3, None, source="(stock loader)")
    if n is not None and channels in (n, n + 1):
        return LayoutHint("onehot" if channels == n else "onehot_edges", channels, None, source="(stock loader)")
    raise ControlNetLoadError(
        f"the ControlNet (loaded by ComfyUI's loader) reads {channels} hint channels, which fit neither palette RGB "
        f"(3) nor one-hot for {'no label set' if n is None else f'{n} classes'}; load it with '{LOADER_NAME}', "
        "which reads its metadata"
    )


# ---------------------------------------------------------------------------------------------- ALDM hint block
class ComfyALDMHintBlock(ALDMConditioningEmbedding):
    """`ALDMConditioningEmbedding` as ComfyUI's ``cldm.ControlNet`` calls its hint block.

    Same convs, strides and state-dict keys (``0, 2, 4, 6, 8``), built from ComfyUI ``operations`` (e.g.
    ``comfy.ops.manual_cast``) in ``dtype`` on ``device`` without initialisation (the weights come from a file), and
    ``forward(hint, emb, context)`` ignoring the time embedding and context as the stock block does.
    """

    def __init__(
        self,
        conditioning_embedding_channels: int,
        conditioning_channels: int,
        block_out_channels: Sequence[int],
        operations,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        with torch.device("meta"):  # the geometry only; the convs are rebuilt below
            super().__init__(conditioning_embedding_channels, conditioning_channels, block_out_channels)
        for index in ALDM_HINT_CONV_INDICES:
            conv = self[index]
            self[index] = operations.Conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
                dtype=dtype,
                device=device,
            )

    def forward(self, hint: torch.Tensor, emb: torch.Tensor | None = None, context=None, *args, **kwargs):
        """`(B, D, h, w)` -> `(B, C0, ceil(h / 2), ceil(w / 2))`; ``emb`` and ``context`` are not read."""
        return super().forward(hint)


# ---------------------------------------------------------------------------------------------- building
def _attention_levels(config: Mapping[str, Any]) -> list[tuple[int, int]]:
    """``(width, heads)`` of every cross-attention level of a diffusers ControlNet config (mid block included)."""
    widths = [int(w) for w in config["block_out_channels"]]
    heads = config.get("num_attention_heads") or config.get("attention_head_dim") or 8
    heads = [int(h) for h in heads] if isinstance(heads, (list, tuple)) else [int(heads)] * len(widths)
    levels = [(w, h) for w, h, t in zip(widths, heads, config.get("down_block_types", ())) if "CrossAttn" in t]
    if "CrossAttn" in str(config.get("mid_block_type", "UNetMidBlock2DCrossAttn")):
        levels.append((widths[-1], heads[-1]))
    return levels


def _comfy_heads(levels: Sequence[tuple[int, int]], source: str) -> dict[str, int]:
    """``num_heads``/``num_head_channels`` for ComfyUI's cldm giving these per-level head counts."""
    if not levels:
        return {}
    if len({h for _, h in levels}) == 1:
        return {"num_heads": levels[0][1], "num_head_channels": -1}
    dims = {w // h for w, h in levels if w % h == 0}
    if len(dims) == 1 and all(w % h == 0 for w, h in levels):
        return {"num_heads": -1, "num_head_channels": dims.pop()}
    raise ControlNetLoadError(
        f"{source}: attention heads {[h for _, h in levels]} at widths {[w for w, _ in levels]} are neither one head "
        "count nor one head width, which ComfyUI's ControlNet cannot represent"
    )


def _effective_heads(unet_config: Mapping[str, Any], width: int) -> int:
    if unet_config.get("num_head_channels", -1) == -1:
        return int(unet_config.get("num_heads", -1))
    return width // int(unet_config["num_head_channels"])


def _standard_hint_fits_comfy(ldm: Mapping[str, torch.Tensor], out_channels: int) -> bool:
    widths = []
    index = 0
    while f"input_hint_block.{index}.weight" in ldm:
        widths.append(int(ldm[f"input_hint_block.{index}.weight"].shape[0]))
        index += 2
    return tuple(widths) == (*COMFY_HINT_WIDTHS, out_channels)


def _build_comfy_controlnet(ldm: dict, file: ControlNetFile, aldm: bool):
    """ComfyUI's ``cldm.ControlNet`` for an unprefixed ldm state dict, ALDM's hint block swapped in if ``aldm``."""
    import comfy.cldm.cldm
    import comfy.controlnet

    source = str(file.path)
    model_config, operations, load_device, unet_dtype, manual_cast_dtype, offload_device = (
        comfy.controlnet.controlnet_config(ldm)
    )
    config = dict(model_config.unet_config)
    config.pop("out_channels", None)
    if file.metadata is not None:  # our files record the true config; ComfyUI only sees shapes
        config.update(_comfy_heads(_attention_levels(file.config), source))
    hint_channels = int(ldm["input_hint_block.0.weight"].shape[1])
    config.update(operations=operations, dtype=unet_dtype, device=offload_device, hint_channels=hint_channels)
    control_model = comfy.cldm.cldm.ControlNet(**config)
    if aldm:
        # the widths as stored (input_hint_block.0/2/4/6 -> hidden widths, .8 -> C0), whatever the config says
        widths = [int(ldm[f"input_hint_block.{i}.weight"].shape[0]) for i in ALDM_HINT_CONV_INDICES]
        control_model.input_hint_block = ComfyALDMHintBlock(
            conditioning_embedding_channels=widths[-1],
            conditioning_channels=hint_channels,
            block_out_channels=widths[:-1],
            operations=operations,
            dtype=unet_dtype,
            device=offload_device,
        )
    try:
        missing, unexpected = control_model.load_state_dict(ldm, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ControlNetLoadError(f"{source}: the weights do not fit ComfyUI's ControlNet: {e}") from None
    if missing:
        raise ControlNetLoadError(
            f"{source}: ComfyUI's ControlNet has {len(missing)} weight(s) the file lacks, e.g. {list(missing)[:4]}; "
            "the file is incomplete or of an unsupported architecture"
        )
    if unexpected:
        logger.warning("%s: %d tensor(s) not used by ComfyUI's ControlNet, e.g. %s", source, len(unexpected),
                       list(unexpected)[:4])  # fmt: skip
    return comfy.controlnet.ControlNet(
        control_model,
        compression_ratio=ALDM_HINT_DOWNSAMPLE if aldm else 8,
        load_device=load_device,
        manual_cast_dtype=manual_cast_dtype,
        preprocess_image=_refuse_image_hint if aldm else (lambda a: a),
    )


def _heads_agree(file: ControlNetFile, ldm: dict) -> bool:
    """Whether ComfyUI's shape-based config detection gives the attention heads our metadata records."""
    if file.metadata is None:
        return True  # third-party file: ComfyUI's detection is all anyone has
    import comfy.controlnet

    detected = comfy.controlnet.controlnet_config(ldm)[0].unet_config
    return all(_effective_heads(detected, w) == h for w, h in _attention_levels(file.config))


def clip_encode_fn(clip) -> Callable[[list[str]], torch.Tensor]:
    """An encode function for `build_class_embedding_table` over a ComfyUI CLIP: the unprojected pooled output
    (final-layer-normed EOS state, as core's default ``pooling="eos"``), `(len(texts), D)` float32."""

    def encode(texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            _, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled="unprojected")
            if pooled is None:
                raise ControlNetLoadError(
                    "the CLIP input returns no pooled output, so it cannot build class embeddings; use SD 1.x's CLIP"
                )
            rows.append(pooled.reshape(1, -1).float().cpu())
        return torch.cat(rows, dim=0)

    return encode


def _resolve_table(file: ControlNetFile, table_source: str, clip, label_set: LabelSet | None, template: str):
    """``(table, label set, where from)`` for an ALDM-native file."""
    source = str(file.path)
    companion = table_path_for(file.path)
    recorded = file.metadata.extra.get("table_file") if file.metadata is not None else None
    if recorded:
        companion = file.path.with_name(recorded)
    file_labels = file.metadata.label_set if file.metadata is not None else None
    if table_source not in TABLE_SOURCES:
        raise ControlNetLoadError(f"`table_source` {table_source!r} is not known; use one of {list(TABLE_SOURCES)}")
    use_clip = table_source == "CLIP" or (table_source == "auto" and not companion.is_file())
    if not use_clip:
        table = load_companion_table(file.path)
        if label_set is not None and not label_set.same_classes(table.metadata.label_set or label_set):
            raise ControlNetLoadError(
                f"label set mismatch: the companion table of {source} holds "
                f"{describe_label_set(table.metadata.label_set)}, but the label_set input is "
                f"{describe_label_set(label_set)}; disconnect it, or build a table for it with table_source 'CLIP'"
            )
        return table.table.float(), table.metadata.label_set or file_labels, "companion file"
    if clip is None:
        raise ControlNetLoadError(
            f"{source} is an ALDM-native ControlNet: it needs its class-embedding table, either the companion file "
            f"{str(companion)!r} (not found) or one built by CLIP: connect a CLIP (SD 1.x's, from the checkpoint "
            "loader) and a label set"
        )
    labels = label_set or file_labels
    if labels is None:
        raise ControlNetLoadError(
            f"{source} records no label set; connect the label_set input so CLIP can encode its class names"
        )
    table = build_class_embedding_table(labels, clip_encode_fn(clip), template=template or DEFAULT_TEMPLATE)
    return table, labels, "CLIP"


def load_layout_controlnet(
    path: str | Path,
    *,
    table_source: str = "auto",
    clip=None,
    label_set: LabelSet | None = None,
    template: str = DEFAULT_TEMPLATE,
):
    """Load a layout ControlNet file or diffusers folder into a ComfyUI ControlNet.

    Args:
        path (`str` or `Path`): the file (safetensors, or a torch file read with ``weights_only``) or folder.
        table_source (`str`): ALDM-native only, one of `TABLE_SOURCES`: ``"companion file"``
            (``<name>.table.safetensors``), ``"CLIP"`` (class names encoded by ``clip``) or ``"auto"`` (the
            companion when it exists, else CLIP).
        clip (ComfyUI ``CLIP``, *optional*): encodes class names for a ``"CLIP"`` table.
        label_set (`LabelSet`, *optional*): the classes for a CLIP-built table (any label set: ALDM reads class
            embeddings, so new names work), or for a third-party file that records none.
        template (`str`): the prompt per class for a CLIP-built table.

    Returns:
        `tuple`: ``(control_net, layout_hint)``; the hint is also attached to ``control_net.control_model``.

    Raises:
        ControlNetLoadError, WeightsError (including ``UnknownFormatError`` listing the known formats).
    """
    import comfy.controlnet

    file = load_controlnet_file(path)
    source = str(file.path)
    md = file.metadata
    fmt = file.format
    file_labels = md.label_set if md is not None else None
    if label_set is not None and file_labels is not None and fmt.hint_block != "aldm":
        if not file_labels.same_classes(label_set):
            raise ControlNetLoadError(
                f"label set mismatch: {source} was trained on {describe_label_set(file_labels)}, but the label_set "
                f"input is {describe_label_set(label_set)}; disconnect it to use the file's"
            )
    ldm = convert_controlnet_state_dict(file.state_dict, "ldm", config=file.config, prefix="").state_dict
    if fmt.hint_block == "aldm":
        table, labels, where = _resolve_table(file, table_source, clip, label_set, template)
        hint = LayoutHint("embedding", fmt.hint_channels, labels, table, source, where)
        control = _build_comfy_controlnet(ldm, file, aldm=True)
    else:
        out_channels = int(ldm["input_blocks.0.0.weight"].shape[0])
        if not _standard_hint_fits_comfy(ldm, out_channels):
            raise ControlNetLoadError(
                f"{source}: its standard hint block has widths other than SD's 16/32/96/256 with three stride-2 "
                "convs, which ComfyUI's ControlNet hard-codes; train with the default "
                "conditioning_embedding_out_channels"
            )
        labels = file_labels or label_set
        if fmt.hint_encoding == "rgb":
            encoding = "rgb"
        elif md is not None and md.hint_encoding in ("onehot", "onehot_edges"):
            encoding = md.hint_encoding
        elif labels is not None and fmt.hint_channels in (labels.num_classes, labels.num_classes + 1):
            encoding = "onehot" if fmt.hint_channels == labels.num_classes else "onehot_edges"
        else:
            raise ControlNetLoadError(
                f"{source} reads a {fmt.hint_channels}-channel one-hot hint but records no label set; connect the "
                "label_set input with the classes it was trained on"
            )
        hint = LayoutHint(encoding, fmt.hint_channels, labels, None, source)
        if _heads_agree(file, ldm):
            control = comfy.controlnet.load_controlnet_state_dict(dict(ldm))
            if control is None:
                raise ControlNetLoadError(f"ComfyUI's ControlNet loader could not read {source}")
        else:
            control = _build_comfy_controlnet(ldm, file, aldm=False)
    setattr(control.control_model, LAYOUT_HINT_ATTR, hint)
    control.upscale_algorithm = "nearest"
    logger.info("Loaded layout ControlNet %s (%s): %s", source, fmt.description, hint.describe())
    return control, hint


# ---------------------------------------------------------------------------------------------- applying
def apply_layout_controlnet(
    positive: list,
    negative: list,
    control_net,
    label_map: LabelMap,
    strength: float = 1.0,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    vae=None,
) -> tuple[list, list]:
    """ComfyUI's advanced apply with a label map as the hint: new conditioning lists whose entries carry a copy of
    ``control_net`` (chained after any ControlNet already there), shared by positive and negative so CFG batches
    them. Nothing given is modified.

    Args:
        positive, negative (CONDITIONING): lists of ``[cond, options]``.
        control_net (CONTROL_NET): from `load_layout_controlnet` or ComfyUI's loader.
        label_map (`LabelMap`): `(B, H, W)` ids; B = 1 or the latent batch; any size (resized by nearest).
        strength (`float`): residual scale; 0 returns the inputs.
        start_percent, end_percent (`float`): the part of the schedule where the ControlNet is on.
        vae (VAE, *optional*): passed on for ControlNets that need one (none of the SD layout ones).
    """
    if not math.isfinite(strength):
        raise ControlNetLoadError(f"`strength` must be finite, got {strength!r}")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ControlNetLoadError(
            f"need 0 <= start_percent <= end_percent <= 1, got start {start_percent} and end {end_percent}"
        )
    if strength == 0:
        return positive, negative
    hint = layout_hint_of(control_net, label_map.label_set)
    hint.check_label_set(label_map.label_set)
    ids = label_map.ids[:, None].float()  # (B, 1, H, W); exact for ids < 2**24
    preprocess = functools.partial(hint.encode_hint, label_map.label_set)
    copies: dict = {}
    out = []
    for conditioning in (positive, negative):
        entries = []
        for cond, options in conditioning:
            options = options.copy()
            previous = options.get("control", None)
            if previous not in copies:
                c = control_net.copy()
                c.upscale_algorithm = "nearest"
                c.preprocess_image = preprocess
                c.set_cond_hint(ids, strength, (start_percent, end_percent), vae=vae)
                c.set_previous_controlnet(previous)
                copies[previous] = c
            options["control"] = copies[previous]
            options["control_apply_to_uncond"] = False
            entries.append([cond, options])
        out.append(entries)
    return out[0], out[1]
