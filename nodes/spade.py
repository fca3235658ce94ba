"""Apply SPADE: modulate the decoder GroupNorms of a ComfyUI MODEL with a label map (SDM-LoRA's SPADE part).

How it hooks into ComfyUI (comfyui.md §4; all on a ``model.clone()``, the given MODEL is never touched):

1. **Sites.** The SPADE file names its sites by diffusers path (``mid_block.resnets.0.norm1``,
   ``up_blocks.1.resnets.2.norm2``). `comfy_site_paths` maps them onto ComfyUI's ldm UNet: ``norm1`` is a
   ``ResBlock``'s ``in_layers.0`` and ``norm2`` its ``out_layers.0``; mid-block resnets are the ResBlocks of
   ``middle_block`` in order (0 and 2 for SD); up-block ``i`` resnet ``j`` is ``output_blocks[k].0`` with ``k``
   counted through ``num_res_blocks + 1`` blocks per level. E.g. ``up_blocks.1.resnets.2.norm2`` ->
   ``diffusion_model.output_blocks.5.0.out_layers.0``.
2. **Weights.** The SPADE modules live in their own ``ModelPatcher`` registered with
   ``set_additional_models("l2i_spade", ...)``, so ComfyUI loads and offloads them with the UNet.
3. **Injection.** ``set_injections("l2i_spade", ...)``: when ComfyUI patches the model for sampling, ``inject``
   rebinds the *instance* ``forward`` of each target GroupNorm to a closure; ``eject`` removes it. The modules'
   state dict, weight patches (LoRA) and class stay as they are.
4. **Per call.** A ``DIFFUSION_MODEL`` wrapper keyed ``"l2i_spade"`` reads ``transformer_options``
   (``cond_or_uncond``, ``sigmas``, and `NULL_LAYOUT_CONDS` from the layout guider), publishes the call's layout
   state in a context variable for the closures, and clears it afterwards. A closure with no state for its site
   (another model, a step outside start/end) runs the plain GroupNorm.

The maths is core's: each closure returns ``core.spade.spade_group_norm(x, layout, spade, ...)`` with the GroupNorm's
own (possibly LoRA-patched, cast) weight and bias, and the layout batch follows ``core.spade.expand_layout_batch``
with one chunk per ``cond_or_uncond`` entry. The layout is encoded lazily per feature size from the ids with
``resize_layout``'s nearest rule (``core.spade.SPADELayoutEncoder``), which equals resizing the full-resolution
encoding (no full-size one-hot is built). Area conditioning (cropped latents) is not supported: the layout would not
be cropped with it.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import torch
from comfy_api.latest import io
from torch import nn

from ..core.labels import LabelSet
from ..core.logging import get_logger
from ..core.spade import (
    SPADE,
    LdmSiteError,
    SPADEAdapter,
    SPADELayoutEncoder,
    expand_layout_batch,
    ldm_site_paths,
    site_key,
    spade_group_norm,
)
from .model_files import clean_path_input
from .types import LabelMap, LabelMapType

try:  # the SDM-LoRA companion-file reader of weights/ (validates sites, shapes and metadata)
    from ..weights.spade_file import SPADE_ENCODINGS
    from ..weights.spade_file import load_spade_file as _load_spade_file
except ImportError:  # pragma: no cover - older checkouts without it: the reader below handles every file
    _load_spade_file = None
    SPADE_ENCODINGS = ("embedding", "onehot", "onehot_edges")

__all__ = [
    "NODES",
    "NULL_LAYOUT_CONDS",
    "SPADE_KEY",
    "SPADE_TYPE",
    "L2IApplySPADE",
    "SPADEFileError",
    "SpadeType",
    "SpadeWeights",
    "apply_spade",
    "comfy_site_paths",
    "load_spade_weights",
]

logger = get_logger(__name__)

CATEGORY = "layout2image/sdm"
#: Key of the wrapper, injections and additional model this node registers on a MODEL.
SPADE_KEY = "l2i_spade"
#: Socket type of a loaded SPADE file (`SpadeWeights`), e.g. from the SDM-LoRA loader.
SPADE_TYPE = "L2I_SPADE"
SpadeType = io.Custom(SPADE_TYPE)
UNCOND_LAYOUT = ("layout", "null layout")
#: ``transformer_options`` key: the cond-list indices (``cond_or_uncond`` values) whose chunks get the null layout.
#: Set by the Layout CFG guider; when present it replaces the node's own ``uncond_layout`` rule.
NULL_LAYOUT_CONDS = "l2i_null_layout_conds"

_KEY_RE = re.compile(r"^(mid_block|up_blocks_(\d+))_resnets_(\d+)_(norm1|norm2)$")
_ADAPTER_ARGS = ("site_names", "feature_channels", "layout_channels", "hidden_channels", "kernel_size")
_ADAPTER_ARGS += ("shared_kernel_size",)


class SPADEFileError(ValueError):
    """A SPADE file cannot be read, or does not fit the MODEL or the label map."""


# ---------------------------------------------------------------------------------------------- the SPADE file
@dataclass
class SpadeWeights:
    """A SPADE companion file, loaded.

    Args:
        adapter (`SPADEAdapter`): one SPADE module per site, in eval mode, frozen.
        encoding (`str`): the layout encoding the modules read, one of `SPADE_ENCODINGS`.
        label_set (`LabelSet`, *optional*): the label set the file was trained on (None when it records none).
        table (`torch.Tensor`, *optional*): `(N + 1, D)` class-embedding table for the ``embedding`` encoding.
        source (`str`): the file, for messages.
    """

    adapter: SPADEAdapter
    encoding: str
    label_set: LabelSet | None = None
    table: torch.Tensor | None = None
    source: str = "<memory>"


def _site_name_from_key(key: str, source: str) -> str:
    m = _KEY_RE.match(key)
    if m is None:
        raise SPADEFileError(
            f"{source}: site key {key!r} is not a decoder ResNet norm (mid_block_resnets_K_normN or "
            "up_blocks_I_resnets_J_normN) and the file has no l2i.spade_config to name it"
        )
    prefix = "mid_block" if m.group(2) is None else f"up_blocks.{m.group(2)}"
    return f"{prefix}.resnets.{m.group(3)}.{m.group(4)}"


def _infer_adapter_config(state: Mapping[str, torch.Tensor], source: str) -> dict:
    """Rebuild the adapter config from ``sites.<key>.sem_*`` shapes (files without ``l2i.spade_config``)."""
    keys = sorted({k.split(".")[1] for k in state if k.startswith("sites.") and k.count(".") >= 3})
    if not keys:
        raise SPADEFileError(f"{source}: no 'sites.<site>.sem_*' tensors; this is not a SPADE file")
    names, channels = [], []
    shared = state.get(f"sites.{keys[0]}.sem_shared.weight")
    gamma = state.get(f"sites.{keys[0]}.sem_gamma.weight")
    if shared is None or gamma is None or shared.ndim != 4 or gamma.ndim != 4:
        raise SPADEFileError(f"{source}: site {keys[0]!r} lacks 4-D sem_shared/sem_gamma conv weights")
    for key in keys:
        names.append(_site_name_from_key(key, source))
        g = state.get(f"sites.{key}.sem_gamma.weight")
        if g is None:
            raise SPADEFileError(f"{source}: site {key!r} has no sem_gamma.weight")
        channels.append(int(g.shape[0]))
    return {
        "site_names": names,
        "feature_channels": channels,
        "layout_channels": int(shared.shape[1]),
        "hidden_channels": int(shared.shape[0]),
        "kernel_size": int(gamma.shape[-1]),
        "shared_kernel_size": int(shared.shape[-1]),
    }


def load_spade_weights(path: str | Path) -> SpadeWeights:
    """Read a SPADE companion safetensors file (``sites.<site key>.sem_*`` tensors, ``l2i.*`` metadata).

    Files written by ``weights.save_spade_file`` (``l2i.sites`` metadata) are read and validated by
    ``weights.load_spade_file``. Others, e.g. a trainer export's ``spade.safetensors``, are read here: the adapter
    config from ``l2i.spade_config`` or, failing that, from the tensor shapes. The layout encoding is
    ``l2i.hint_encoding``; the ``embedding`` encoding also loads its class-embedding table (``l2i.table_file``).

    Raises:
        SPADEFileError: the file is missing or not a SPADE file, its tensors do not fit its config, or its
            encoding is unknown (``weights`` errors, also ``ValueError``s, pass through).
    """
    from safetensors import safe_open

    path = Path(path)
    source = repr(str(path))
    if not path.is_file():
        raise SPADEFileError(f"SPADE file {source} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise SPADEFileError(f"SPADE file {source} is not a readable safetensors file: {e}") from None
    if "l2i.sites" in raw_metadata and _load_spade_file is not None:
        spade_file = _load_spade_file(path)
        adapter = spade_file.build_adapter()
        label_set, encoding = spade_file.metadata.label_set, spade_file.metadata.hint_encoding
    else:
        adapter, label_set, encoding = _read_spade_file(path, raw_metadata, source)
    adapter.eval().requires_grad_(False)
    if encoding not in SPADE_ENCODINGS:
        encoding = _guess_encoding(adapter, label_set, source)
    table = None
    if encoding == "embedding":
        from ..weights import load_companion_table

        table = load_companion_table(path, label_set).table.float()
    return SpadeWeights(adapter=adapter, encoding=encoding, label_set=label_set, table=table, source=source)


def _read_spade_file(path: Path, raw_metadata: Mapping[str, str], source: str):
    from safetensors.torch import load_file

    from ..weights.metadata import WeightsMetadata, has_l2i_metadata

    metadata = None
    if has_l2i_metadata(raw_metadata):
        metadata = WeightsMetadata.from_safetensors(raw_metadata, source=str(path))
    if metadata is not None and metadata.kind != "spade":
        raise SPADEFileError(f"{source} holds a {metadata.kind!r} file, not a SPADE file (l2i.kind = 'spade')")
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    if metadata is not None and "spade_config" in metadata.extra:
        config = json.loads(metadata.extra["spade_config"])
        config = {k: config[k] for k in _ADAPTER_ARGS if k in config}
    else:
        config = _infer_adapter_config(state, source)
    try:
        adapter = SPADEAdapter(**config)
    except (TypeError, ValueError) as e:
        raise SPADEFileError(f"{source}: cannot build the SPADE modules from its config {config}: {e}") from None
    result = adapter.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise SPADEFileError(
            f"{source}: tensors do not match its SPADE config; missing {sorted(result.missing_keys)[:6]}, "
            f"unexpected {sorted(result.unexpected_keys)[:6]}"
        )
    label_set = metadata.label_set if metadata is not None else None
    encoding = metadata.hint_encoding if metadata is not None else "none"
    return adapter, label_set, encoding


def _guess_encoding(adapter: SPADEAdapter, label_set: LabelSet | None, source: str) -> str:
    channels = int(adapter.config.layout_channels)
    if label_set is not None and channels == label_set.num_classes:
        return "onehot"
    if label_set is not None and channels == label_set.num_classes + 1:
        return "onehot_edges"
    raise SPADEFileError(
        f"{source} records no layout encoding (l2i.hint_encoding) and its {channels} layout channels do not tell "
        f"one ({'no label set recorded' if label_set is None else f'{label_set.num_classes} classes'}); export it "
        "again with layout2image's trainer"
    )


def _resolve_spade_path(name: str) -> Path:
    text = clean_path_input(name)
    if not text:
        raise SPADEFileError("`spade_file` is empty; give the path of a *.spade.safetensors / spade.safetensors file")
    path = Path(text).expanduser()
    if path.is_file() or path.is_absolute():
        return path
    try:
        import folder_paths  # ComfyUI's; absent outside ComfyUI
    except ImportError:
        return path
    full = folder_paths.get_full_path("loras", text)
    return Path(full) if full else path


# ---------------------------------------------------------------------------------------------- site mapping
def comfy_site_paths(diffusion_model: nn.Module, site_names: Sequence[str], prefix: str = "diffusion_model") -> dict:
    """Map diffusers SPADE site names onto module paths of ComfyUI's ldm ``UNetModel`` (``core.spade.ldm_site_paths``).

    Args:
        diffusion_model (`nn.Module`): ``model.get_model_object("diffusion_model")``.
        site_names (`Sequence[str]`): ``mid_block.resnets.K.normN`` / ``up_blocks.I.resnets.J.normN``.
        prefix (`str`): prepended to every path (paths are relative to the BaseModel, like object patches).

    Returns:
        `dict[str, str]`: site name -> path, e.g. ``"up_blocks.0.resnets.0.norm1"`` ->
        ``"diffusion_model.output_blocks.0.0.in_layers.0"``.

    Raises:
        SPADEFileError: the model is not an SD-style ldm UNet, or a site does not exist in it.
    """
    try:
        return ldm_site_paths(diffusion_model, site_names, prefix=prefix)
    except LdmSiteError as e:
        raise SPADEFileError(str(e).replace("the model", "the MODEL")) from None


# ---------------------------------------------------------------------------------------------- per-call state
def _group_norm_params(gn: nn.Module, x: torch.Tensor):
    """The GroupNorm's weight and bias as its own forward would use them, and a function to call afterwards.

    ``comfy.ops`` GroupNorms cast (and lowvram-patch) their weights per call; plain ones are used as they are.
    """
    cast = bool(getattr(gn, "comfy_cast_weights", False))
    cast = (
        cast
        or len(getattr(gn, "weight_function", None) or ()) > 0
        or len(getattr(gn, "bias_function", None) or ()) > 0
    )
    if cast and gn.weight is not None:
        import comfy.ops

        try:
            out = comfy.ops.cast_bias_weight(gn, x, offloadable=True)
        except TypeError:  # ComfyUI before the offloadable cast (two return values)
            out = comfy.ops.cast_bias_weight(gn, x)
        if len(out) == 3:
            weight, bias, stream = out
            uncast = getattr(comfy.ops, "uncast_bias_weight", None)
            return weight, bias, (lambda: uncast(gn, weight, bias, stream)) if uncast else None
        return out[0], out[1], None
    weight, bias = gn.weight, gn.bias
    if weight is not None and weight.device != x.device:
        weight = weight.to(x.device)
    if bias is not None and bias.device != x.device:
        bias = bias.to(x.device)
    return weight, bias, None


class _SpadeModules(nn.Module):
    """The SPADE modules of one Apply SPADE node, as the module an additional ``ModelPatcher`` loads."""

    def __init__(self, adapter: SPADEAdapter):
        super().__init__()
        self.sites = adapter.sites  # shared, not copied: the weights are read-only


@dataclass
class _SpadeState:
    """What one Apply SPADE clone needs at sampling time (shared by its wrapper and closures)."""

    weights: SpadeWeights
    modules: _SpadeModules
    paths: dict[str, str]  # ldm path -> site name
    label_map: LabelMap
    strength: float
    sigma_range: tuple[float, float]  # (start sigma, end sigma); active when end <= sigma <= start
    null_uncond: bool
    cache: dict = field(default_factory=dict)

    def spade_for(self, path: str, device: torch.device) -> SPADE | None:
        name = self.paths.get(path)
        if name is None:
            return None
        spade = self.modules.sites[site_key(name)]
        weight = spade.sem_shared.weight
        if weight.device == device:
            return spade
        # lowvram may leave the SPADE modules on the CPU: use a copy on the feature map's device.
        key = ("spade", path, device)
        if key not in self.cache:
            self.cache[key] = copy.deepcopy(spade).to(device)
        return self.cache[key]

    def active(self, transformer_options: Mapping) -> bool:
        sigmas = transformer_options.get("sigmas")
        if sigmas is None:
            return True
        sigma = float(torch.as_tensor(sigmas).max())
        start, end = self.sigma_range
        return end <= sigma <= start

    def encode(self, size: tuple[int, int], device: torch.device) -> torch.Tensor:
        """`(L, C_m, h, w)` float32: the layout encoding of the ids at ``size`` (``core.spade.SPADELayoutEncoder``)."""
        encoder = self.cache.get("encoder")
        if encoder is None:
            encoder = self.cache["encoder"] = SPADELayoutEncoder(
                self.label_map.ids, self.label_map.label_set, self.weights.encoding, self.weights.table
            )
        return encoder.at(size, device)


class _SpadeCall:
    """The layout of one diffusion-model call: the batch laid out over the ``cond_or_uncond`` chunks."""

    def __init__(
        self, state: _SpadeState, batch: int, cond_or_uncond: Sequence[int], null_conds: Sequence[int] | None = None
    ):
        self.state = state
        self.batch = batch
        self.strength = state.strength
        if null_conds is None:  # the node's rule: the uncond list (1) gets the null layout if asked to
            null_conds = (1,) if state.null_uncond else ()
        self.chunks = tuple("null" if c in null_conds else "layout" for c in cond_or_uncond) or ("layout",)
        n = len(self.chunks)
        per_chunk = batch // n if batch % n == 0 else 0
        labels = state.label_map.batch_size
        if per_chunk == 0 or per_chunk % labels != 0:
            raise SPADEFileError(
                f"Apply SPADE: the model batch {batch} in {n} cond/uncond chunk(s) gives {batch / n:g} latents per "
                f"chunk, which is not a multiple of the label map batch {labels}; use a label map batch of 1 or of "
                "the latent batch size"
            )
        self._layouts: dict = {}

    def layout_for(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape[-2:]), x.device)
        layout = self._layouts.get(key)
        if layout is None:
            layout = expand_layout_batch(self.state.encode(key[0], x.device), x.shape[0], self.chunks)
            self._layouts[key] = layout
        return layout


_ACTIVE: ContextVar[_SpadeCall | None] = ContextVar("l2i_spade_call", default=None)


def _transformer_options(args: tuple, kwargs: dict) -> Mapping:
    options = kwargs.get("transformer_options")
    if options is None and len(args) > 5:  # (x, timesteps, context, y, control, transformer_options, ...)
        options = args[5]
    return options if isinstance(options, Mapping) else {}


def _make_wrapper(state: _SpadeState) -> Callable:
    def l2i_spade_diffusion_model(executor, *args, **kwargs):
        x = args[0] if args else kwargs["x"]
        options = _transformer_options(args, kwargs)
        call = None
        if state.active(options):
            call = _SpadeCall(
                state, int(x.shape[0]), list(options.get("cond_or_uncond") or [0]), options.get(NULL_LAYOUT_CONDS)
            )
        token = _ACTIVE.set(call)
        try:
            return executor(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    return l2i_spade_diffusion_model


def _make_forward(gn: nn.Module, path: str, previous: Callable | None) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        call = _ACTIVE.get()
        spade = call.state.spade_for(path, x.device) if call is not None else None
        if spade is None:
            return previous(x) if previous is not None else type(gn).forward(gn, x)
        weight, bias, finish = _group_norm_params(gn, x)
        try:
            return spade_group_norm(
                x, call.layout_for(x), spade, gn.num_groups, weight, bias, gn.eps, strength=call.strength
            )
        finally:
            if finish is not None:
                finish()

    forward.l2i_spade_path = path
    forward.l2i_previous = previous
    return forward


def _make_injection(paths: Sequence[str]):
    from comfy.patcher_extension import PatcherInjection

    def inject(patcher) -> None:
        for path in paths:
            gn = patcher.get_model_object(path)
            current = gn.__dict__.get("forward")
            if getattr(current, "l2i_spade_path", None) == path:
                continue  # already injected (by this or another Apply SPADE clone of the same model)
            gn.forward = _make_forward(gn, path, current)

    def eject(patcher) -> None:
        for path in paths:
            gn = patcher.get_model_object(path)
            current = gn.__dict__.get("forward")
            if getattr(current, "l2i_spade_path", None) != path:
                continue
            if current.l2i_previous is None:
                del gn.forward
            else:
                gn.forward = current.l2i_previous

    return PatcherInjection(inject=inject, eject=eject)


# ---------------------------------------------------------------------------------------------- the node
def _check_label_set(weights: SpadeWeights, label_map: LabelMap) -> None:
    from ..weights.metadata import describe_label_set

    given = label_map.label_set
    if weights.label_set is not None and not weights.label_set.same_classes(given):
        raise SPADEFileError(
            f"label set mismatch: {weights.source} was trained on {describe_label_set(weights.label_set)}, but the "
            f"label map uses {describe_label_set(given)}; build the label map with the file's label set"
        )
    channels = int(weights.adapter.config.layout_channels)
    expected = {
        "onehot": given.num_classes,
        "onehot_edges": given.num_classes + 1,
        "embedding": None if weights.table is None else int(weights.table.shape[1]),
    }[weights.encoding]
    if expected != channels:
        raise SPADEFileError(
            f"{weights.source} reads {channels} layout channels, but a {weights.encoding!r} layout of label set "
            f"{given.name!r} has {expected}; use the label set the file was trained with"
        )


def apply_spade(
    model,
    weights: SpadeWeights,
    label_map: LabelMap,
    strength: float = 1.0,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    null_uncond: bool = False,
):
    """Return a clone of ComfyUI ``model`` (a ``ModelPatcher``) whose decoder GroupNorms SPADE modulates.

    Args:
        model (`ModelPatcher`): not modified.
        weights (`SpadeWeights`): the SPADE modules (`load_spade_weights`).
        label_map (`LabelMap`): `(L, H, W)` ids; any size (nearest-resized per feature map); L = 1 or a divisor of
            the latent batch.
        strength (`float`): scales γ and β (0: the plain model).
        start_percent, end_percent (`float`): the part of the schedule (0 = first step) where SPADE is on.
        null_uncond (`bool`): give the uncond half of a CFG batch the null layout (layout guidance through CFG).
    """
    from comfy.model_patcher import ModelPatcher
    from comfy.patcher_extension import WrappersMP

    if not math.isfinite(strength):
        raise SPADEFileError(f"`strength` must be finite, got {strength!r}")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise SPADEFileError(
            f"need 0 <= start_percent <= end_percent <= 1, got start {start_percent} and end {end_percent}"
        )
    if model.get_injections(SPADE_KEY) is not None:
        raise SPADEFileError(
            "this MODEL already has SPADE applied (an Apply SPADE node upstream); apply SPADE once per model"
        )
    _check_label_set(weights, label_map)
    m = model.clone()
    if strength == 0.0:
        return m
    site_paths = comfy_site_paths(m.get_model_object("diffusion_model"), weights.adapter.site_names)
    for name, path in site_paths.items():
        gn = m.get_model_object(path)
        spade = weights.adapter.spade_for(name)
        if getattr(gn, "num_channels", None) != spade.feature_channels or not hasattr(gn, "num_groups"):
            raise SPADEFileError(
                f"SPADE site {name!r} -> {path}: the MODEL has {type(gn).__name__} with "
                f"{getattr(gn, 'num_channels', '?')} channels there, the SPADE file expects a GroupNorm with "
                f"{spade.feature_channels}; the file belongs to another base model"
            )
    sampling = m.get_model_object("model_sampling")
    sigma_range = (float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent)))
    modules = _SpadeModules(weights.adapter)
    state = _SpadeState(
        weights=weights,
        modules=modules,
        paths={path: name for name, path in site_paths.items()},
        label_map=label_map,
        strength=float(strength),
        sigma_range=sigma_range,
        null_uncond=null_uncond,
    )
    m.set_additional_models(SPADE_KEY, [ModelPatcher(modules, m.load_device, m.offload_device)])
    m.set_injections(SPADE_KEY, [_make_injection(list(site_paths.values()))])
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, SPADE_KEY, _make_wrapper(state))
    logger.info(
        "Apply SPADE: %d GroupNorm sites from %s, strength %g, steps %g-%g",
        len(site_paths),
        weights.source,
        strength,
        start_percent,
        end_percent,
    )
    return m


class L2IApplySPADE(io.ComfyNode):
    """Modulate the MODEL's decoder GroupNorms with a label map through a SPADE file (SDM-LoRA)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="L2IApplySPADE",
            display_name="Apply SPADE (SDM-LoRA)",
            category=CATEGORY,
            description=(
                "SDM-LoRA's layout branch: every decoder ResNet GroupNorm of the UNet becomes "
                "GN(x) * (1 + gamma) + beta, with gamma/beta predicted from the label map by the SPADE file's "
                "modules. Load the LoRA part with a LoRA loader as usual. Works at any resolution and with CFG "
                "batches; the input MODEL is left unchanged."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SD 1.x model (with the SDM-LoRA already loaded)."),
                io.String.Input(
                    "spade_file",
                    default="",
                    tooltip=(
                        "The SPADE companion file (*.spade.safetensors or an export's spade.safetensors): a path, or "
                        "a file name in ComfyUI's loras folder. Leave empty when the spade input is connected."
                    ),
                ),
                LabelMapType.Input(
                    "label_map",
                    tooltip="The layout; its label set must be the file's. Batch 1, or one map per latent.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=0.0,
                    max=4.0,
                    step=0.05,
                    tooltip="Scales the predicted gamma and beta: 0 = no modulation, 1 = as trained.",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Fraction of the schedule (0 = first step) where the modulation starts.",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Fraction of the schedule (1 = last step) where the modulation ends.",
                ),
                io.Combo.Input(
                    "uncond_layout",
                    options=list(UNCOND_LAYOUT),
                    default="layout",
                    tooltip=(
                        "What the negative (uncond) half of a CFG batch sees: 'layout' (text CFG only, the usual "
                        "choice) or 'null layout' (zeros: the CFG scale then also guides towards the layout, as "
                        "SDM's classifier-free guidance)."
                    ),
                ),
                SpadeType.Input(
                    "spade",
                    optional=True,
                    tooltip="The SPADE part loaded by 'Load SDM-LoRA'; when connected, spade_file is not read.",
                ),
            ],
            outputs=[io.Model.Output("model", tooltip="A patched copy of the model.")],
        )

    @classmethod
    def fingerprint_inputs(cls, spade_file: str = "", **kwargs):
        """Re-run when the SPADE file changes on disk (ComfyUI caches by input values otherwise); a connected
        ``spade`` input is covered by its own node's caching."""
        try:
            stat = _resolve_spade_path(spade_file).stat()
        except (OSError, SPADEFileError):
            return spade_file
        return (spade_file, stat.st_mtime_ns, stat.st_size)

    @classmethod
    def execute(
        cls,
        model,
        spade_file: str,
        label_map: LabelMap,
        strength: float = 1.0,
        start_percent: float = 0.0,
        end_percent: float = 1.0,
        uncond_layout: str = "layout",
        spade: SpadeWeights | None = None,
    ) -> io.NodeOutput:
        if uncond_layout not in UNCOND_LAYOUT:
            raise SPADEFileError(f"`uncond_layout` {uncond_layout!r} is not known; use one of {list(UNCOND_LAYOUT)}")
        if spade is not None:
            if not isinstance(spade, SpadeWeights):
                raise SPADEFileError(f"the spade input must come from 'Load SDM-LoRA', got {type(spade).__name__}")
            if spade_file.strip():
                logger.info("Apply SPADE: the spade input is connected; spade_file %r is not read", spade_file)
            weights = spade
        else:
            weights = load_spade_weights(_resolve_spade_path(spade_file))
        patched = apply_spade(
            model,
            weights,
            label_map,
            strength=float(strength),
            start_percent=float(start_percent),
            end_percent=float(end_percent),
            null_uncond=uncond_layout == "null layout",
        )
        return io.NodeOutput(patched)


NODES = [L2IApplySPADE]
