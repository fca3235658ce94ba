"""SDM-LoRA files: the kohya LoRA ``<name>.safetensors`` plus its SPADE companion ``<name>.spade.safetensors``.

The two parts of an SDM-LoRA go in two files (comfyui.md §5):

* ``<name>.safetensors``: the LoRA part in kohya format (`layout2image.weights.lora`; diffusers module names for
  SD 1.x/2.x-shaped UNets, ldm names otherwise: `kohya_names_for`), which ComfyUI's "Load LoRA" and A1111/Forge
  ``<lora:name:1>`` read as they are, and diffusers ``load_lora_weights`` too (ldm-named files only with
  ``unet_config=pipe.unet.config``). It holds **no SPADE keys**: A1111 raises on unknown parts of known modules and ComfyUI warns about every key it
  cannot place, so SPADE weights stay out of it. A stock loader thus gives "LoRA without SPADE", a degraded mode.
* ``<name>.spade.safetensors``: the ``SPADEAdapter`` state dict (``sites.<site key>.sem_{shared,gamma,beta}.
  {weight,bias}``) with the metadata below. Only layout2image reads it (`load_spade_file`, `load_sdm_lora`, the
  L2I nodes).

Companion metadata (besides the common ``l2i.*`` fields of `WeightsMetadata`: kind ``spade``, format version,
``hint_encoding`` = the layout encoding, the label set as JSON with its fingerprint, base model, training-config
hash):

=========================  ================================================================================
``l2i.sites``              JSON list of the GroupNorm sites (diffusers module paths), in adapter order
``l2i.ldm_sites``          the same sites as ldm module paths (``output_blocks.0.0.in_layers.0``), for loaders
                           that patch an ldm UNet (ComfyUI, A1111)
``l2i.site_channels``      JSON list: channels of each site's GroupNorm
``l2i.layout_channels``    ``C_m``, channels of the layout encoding (N, N + 1 with edges, or the embedding width)
``l2i.hidden_channels``    width of each site's shared conv
``l2i.kernel_size``        kernel of the γ/β convs; ``l2i.shared_kernel_size``: of the shared conv
``l2i.lora_file``          name of the LoRA file it belongs to (informative)
=========================  ================================================================================
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.files import save_safetensors_atomic
from ..core.labels import LabelSet
from ..core.logging import get_logger
from .lora import LoraConversion, convert_lora_state_dict, load_lora_file, lora_alphas_of, save_lora_file
from .lora import unet_module_map as _unet_module_map
from .metadata import MetadataError, WeightsMetadata
from .safe_load import WeightsError, WeightsFileError, load_safetensors, sniff_file_format

__all__ = [
    "SPADE_ENCODINGS",
    "SPADE_SUFFIX",
    "SDMLoraFiles",
    "SPADEFile",
    "SPADESiteMismatchError",
    "load_sdm_lora",
    "load_spade_file",
    "save_sdm_lora",
    "save_spade_file",
    "spade_path_for",
]

logger = get_logger(__name__)

#: File-name suffix of the SPADE companion of ``<name>.safetensors``.
SPADE_SUFFIX = ".spade.safetensors"

#: Layout encodings a SPADE adapter can read (`HINT_ENCODINGS` values).
SPADE_ENCODINGS = ("embedding", "onehot", "onehot_edges")

_SPADE_PARAMS = (
    "sem_shared.weight",
    "sem_shared.bias",
    "sem_gamma.weight",
    "sem_gamma.bias",
    "sem_beta.weight",
    "sem_beta.bias",
)
_INT_FIELDS = ("layout_channels", "hidden_channels", "kernel_size", "shared_kernel_size")


class SPADESiteMismatchError(WeightsError):
    """A SPADE file's sites (or their channels) differ from those of the model it is loaded into."""


def spade_path_for(lora_path: str | os.PathLike) -> Path:
    """``<name>.safetensors`` -> ``<name>.spade.safetensors`` (the companion `save_sdm_lora` writes)."""
    path = Path(lora_path)
    if path.name.endswith(SPADE_SUFFIX):
        raise ValueError(f"{str(path)!r} is a SPADE companion itself; give the LoRA file (<name>.safetensors)")
    if not path.name.endswith(".safetensors"):
        raise ValueError(f"{str(path)!r}: an SDM-LoRA file name must end with .safetensors")
    return path.with_name(path.name[: -len(".safetensors")] + SPADE_SUFFIX)


def _layout_channels_for(label_set: LabelSet, encoding: str) -> int | None:
    if encoding == "onehot":
        return label_set.num_classes
    if encoding == "onehot_edges":
        return label_set.num_classes + 1
    return None  # embedding: any width


def _check_encoding(encoding: str, layout_channels: int, label_set: LabelSet | None, source: str) -> None:
    if encoding not in SPADE_ENCODINGS:
        raise MetadataError(
            f"{source}: hint_encoding={encoding!r}; a SPADE adapter reads one of {', '.join(SPADE_ENCODINGS)}"
        )
    expected = _layout_channels_for(label_set, encoding) if label_set is not None else None
    if expected is not None and expected != layout_channels:
        raise MetadataError(
            f"{source}: the SPADE convs read {layout_channels} layout channels, but label set {label_set.name!r} "
            f"with encoding {encoding!r} gives {expected}"
        )


def _expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    from ..core.spade import site_key

    c_m, hidden = config["layout_channels"], config["hidden_channels"]
    k, ks = config["kernel_size"], config["shared_kernel_size"]
    out = {}
    for site, channels in zip(config["site_names"], config["feature_channels"]):
        pre = f"sites.{site_key(site)}."
        out.update(
            {
                pre + "sem_shared.weight": (hidden, c_m, ks, ks),
                pre + "sem_shared.bias": (hidden,),
                pre + "sem_gamma.weight": (channels, hidden, k, k),
                pre + "sem_gamma.bias": (channels,),
                pre + "sem_beta.weight": (channels, hidden, k, k),
                pre + "sem_beta.bias": (channels,),
            }
        )
    return out


def _site_difference(file_sites: Sequence[tuple[str, int]], model_sites: Sequence[tuple[str, int]]) -> str:
    if len(file_sites) != len(model_sites):
        extra = [s for s, _ in file_sites if s not in dict(model_sites)]
        lacking = [s for s, _ in model_sites if s not in dict(file_sites)]
        return (
            f"the file has {len(file_sites)} sites and the model {len(model_sites)}"
            + (f"; only in the file: {extra[:4]}" if extra else "")
            + (f"; only in the model: {lacking[:4]}" if lacking else "")
        )
    i = next(i for i, (a, b) in enumerate(zip(file_sites, model_sites)) if a != b)
    (a, ca), (b, cb) = file_sites[i], model_sites[i]
    return f"site {i} is {a} ({ca} ch) in the file, {b} ({cb} ch) in the model"


# ---------------------------------------------------------------------------------------------------- SPADE file
@dataclass(frozen=True)
class SPADEFile:
    """A SPADE companion file read by `load_spade_file`.

    Args:
        state_dict (`dict[str, torch.Tensor]`): the ``SPADEAdapter`` state dict.
        metadata (`WeightsMetadata`): the file's metadata (kind ``spade``).
        spade_config (`dict`): ``SPADEAdapter`` constructor arguments (``site_names``, ``feature_channels``,
            ``layout_channels``, ``hidden_channels``, ``kernel_size``, ``shared_kernel_size``).
        ldm_sites (`tuple[str, ...]`): the sites as ldm module paths (empty when not recorded).
        path (`Path`, *optional*): the file read.
    """

    state_dict: dict[str, torch.Tensor]
    metadata: WeightsMetadata
    spade_config: dict[str, Any]
    ldm_sites: tuple[str, ...] = ()
    path: Path | None = None

    @property
    def sites(self) -> list[tuple[str, int]]:
        """``(site, channels)`` pairs, in adapter order."""
        return list(zip(self.spade_config["site_names"], self.spade_config["feature_channels"]))

    def check_sites(self, model_sites: Sequence[tuple[str, int]], model: str = "the model") -> None:
        """Raise `SPADESiteMismatchError` unless ``model_sites`` (``(name, channels)`` pairs) equal the file's."""
        model_sites = [(str(n), int(c)) for n, c in model_sites]
        if model_sites != self.sites:
            raise SPADESiteMismatchError(
                f"SPADE site mismatch between {self.path or 'the SPADE file'} ({len(self.sites)} sites) and "
                f"{model} ({len(model_sites)} sites): {_site_difference(self.sites, model_sites)}. The file was "
                "trained for another UNet layout; use its base model"
            )

    def build_adapter(self, device: str | torch.device = "cpu"):
        """A ``SPADEAdapter`` with these weights (fp32, on ``device``)."""
        from ..core.spade import SPADEAdapter

        adapter = SPADEAdapter(**self.spade_config)
        adapter.load_state_dict(self.state_dict, strict=True)
        return adapter.to(device)


def save_spade_file(
    path: str | os.PathLike,
    adapter,
    *,
    label_set: LabelSet,
    hint_encoding: str = "onehot",
    base_model: str = "",
    training_config_hash: str = "",
    unet_config: Any = None,
    lora_file: str = "",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a ``SPADEAdapter`` as a SPADE companion file with full metadata.

    Args:
        path (`str` or `os.PathLike`): the output, conventionally ``<name>.spade.safetensors``.
        adapter (`SPADEAdapter`): the trained adapter (read only).
        label_set (`LabelSet`): the label set it was trained on (stored with its fingerprint).
        hint_encoding (`str`, defaults to `"onehot"`): the layout encoding, one of `SPADE_ENCODINGS`; for the
            one-hot encodings the adapter's ``layout_channels`` must fit the label set.
        base_model (`str`): the base model, e.g. ``"runwayml/stable-diffusion-v1-5"``.
        training_config_hash (`str`): `training_config_hash` of the trainer config, or empty.
        unet_config (`Mapping` or UNet, *optional*): the base UNet config, for ``l2i.ldm_sites``; SD 1.5's if None.
        lora_file (`str`): name of the LoRA file it belongs to.
        dtype (`torch.dtype`, *optional*): cast the weights (e.g. ``torch.float16``); None keeps them.
    """
    config = {k: adapter.config[k] for k in ("site_names", "feature_channels", *_INT_FIELDS)}
    _check_encoding(hint_encoding, int(config["layout_channels"]), label_set, "SPADE adapter")
    module_map = _unet_module_map(unet_config)
    missing = [s for s in config["site_names"] if s not in module_map]
    if missing:
        raise WeightsError(f"SPADE sites {missing[:4]} are no modules of the given UNet config; pass unet_config")
    metadata = WeightsMetadata(
        kind="spade",
        hint_encoding=hint_encoding,
        label_set=label_set,
        base_model=base_model,
        training_config_hash=training_config_hash,
        extra={
            "sites": json.dumps(list(config["site_names"])),
            "ldm_sites": json.dumps([module_map[s] for s in config["site_names"]]),
            "site_channels": json.dumps([int(c) for c in config["feature_channels"]]),
            **{k: str(int(config[k])) for k in _INT_FIELDS},
            "lora_file": lora_file,
        },
    )
    tensors = {
        k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).contiguous()
        for k, v in adapter.state_dict().items()
    }
    return save_safetensors_atomic(tensors, path, metadata=metadata.to_safetensors())


def _parse_config(md: WeightsMetadata, source: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    def field_of(name: str) -> str:
        if name not in md.extra:
            raise MetadataError(f"{source}: SPADE file without l2i.{name}; it was not written by save_spade_file")
        return md.extra[name]

    try:
        sites = json.loads(field_of("sites"))
        channels = json.loads(field_of("site_channels"))
        ints = {k: int(field_of(k)) for k in _INT_FIELDS}
        ldm_sites = tuple(json.loads(md.extra["ldm_sites"])) if md.extra.get("ldm_sites") else ()
    except (json.JSONDecodeError, ValueError) as e:
        raise MetadataError(f"{source}: malformed SPADE metadata ({e})") from None
    if not (isinstance(sites, list) and isinstance(channels, list) and len(sites) == len(channels) and sites):
        raise MetadataError(f"{source}: l2i.sites and l2i.site_channels must be non-empty lists of equal length")
    if ldm_sites and len(ldm_sites) != len(sites):
        raise MetadataError(f"{source}: l2i.ldm_sites has {len(ldm_sites)} entries for {len(sites)} sites")
    config = {"site_names": [str(s) for s in sites], "feature_channels": [int(c) for c in channels], **ints}
    return config, ldm_sites


def load_spade_file(
    path: str | os.PathLike,
    *,
    label_set: LabelSet | None = None,
    sites: Sequence[tuple[str, int]] | None = None,
    hint_encoding: str | None = None,
    base_model: str | None = None,
) -> SPADEFile:
    """Read and validate a SPADE companion file.

    Args:
        path (`str` or `os.PathLike`): the ``<name>.spade.safetensors`` file.
        label_set (`LabelSet`, *optional*): raise unless the file was trained on this label set.
        sites (`Sequence[tuple[str, int]]`, *optional*): ``(site, channels)`` of the model it goes into (e.g.
            ``[(s.name, s.num_channels) for s in find_spade_sites(unet)]``); raise unless they match.
        hint_encoding (`str`, *optional*), base_model (`str`, *optional*): raise unless they match.

    Raises:
        WeightsFileError: missing, empty, truncated or corrupt file.
        MetadataError: not a SPADE file, malformed metadata, or a label set / encoding / base model mismatch
            (the message names both sides).
        SPADESiteMismatchError: the sites differ from ``sites`` (both are named).
        WeightsError: the tensors do not fit the metadata.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsFileError(f"SPADE companion {str(path)!r} does not exist")
    if sniff_file_format(path) != "safetensors":
        raise WeightsFileError(f"{str(path)!r} is not a safetensors file; SPADE files are safetensors")
    loaded = load_safetensors(path)
    md = WeightsMetadata.from_safetensors(loaded.metadata, source=str(path))
    if md.kind != "spade":
        raise MetadataError(f"{path}: holds a {md.kind!r} file, not a SPADE companion ('spade')")
    config, ldm_sites = _parse_config(md, str(path))
    _check_encoding(md.hint_encoding, config["layout_channels"], md.label_set, str(path))
    expected = _expected_shapes(config)
    have = {k: tuple(v.shape) for k, v in loaded.state_dict.items()}
    missing = sorted(set(expected) - set(have))
    unexpected = sorted(set(have) - set(expected))
    wrong = [f"{k}: {list(have[k])} != {list(expected[k])}" for k in expected if k in have and have[k] != expected[k]]
    if missing or unexpected or wrong:
        raise WeightsError(
            f"{path}: the tensors do not fit the SPADE metadata: missing {missing[:4]} ({len(missing)}), unexpected "
            f"{unexpected[:4]} ({len(unexpected)}), wrong shapes {wrong[:4]}; the file is corrupt or was edited"
        )
    md.check(label_set=label_set, hint_encoding=hint_encoding, base_model=base_model, source=str(path))
    result = SPADEFile(loaded.state_dict, md, config, ldm_sites, path)
    if sites is not None:
        result.check_sites(sites)
    return result


# ---------------------------------------------------------------------------------------------------- SDM-LoRA
@dataclass(frozen=True)
class SDMLoraFiles:
    """The two files of an SDM-LoRA (written by `save_sdm_lora` or read by `load_sdm_lora`).

    Args:
        lora_path (`Path`): the kohya LoRA file.
        spade_path (`Path`): its SPADE companion.
        lora (`LoraConversion`): the LoRA part (modules, ranks, alphas).
        spade (`SPADEFile`): the SPADE part.
    """

    lora_path: Path
    spade_path: Path
    lora: LoraConversion
    spade: SPADEFile


def save_sdm_lora(
    unet: torch.nn.Module,
    out_path: str | os.PathLike,
    label_set: LabelSet,
    *,
    hint_encoding: str = "onehot",
    base_model: str = "",
    training_config_hash: str = "",
    adapter_name: str = "default",
    dtype: torch.dtype | None = None,
) -> SDMLoraFiles:
    """Write an SDM-LoRA UNet as ``<name>.safetensors`` (kohya LoRA) + ``<name>.spade.safetensors`` (SPADE).

    The LoRA alphas are read from the PEFT layers (``lora_alpha``, not the rank). Both files carry the label set,
    encoding, base model and training-config hash; the LoRA file also ``l2i.unet_config`` and kohya's ``ss_*``
    fields. Nothing in ``unet`` changes.

    Args:
        unet (`nn.Module`): a UNet prepared with ``add_sdm_lora``.
        out_path (`str` or `os.PathLike`): the LoRA file, ending with ``.safetensors``.
        label_set (`LabelSet`): the label set it was trained on.
        hint_encoding (`str`, defaults to `"onehot"`): the layout encoding (`SPADE_ENCODINGS`).
        base_model, training_config_hash: recorded in both files.
        adapter_name (`str`, defaults to `"default"`): the PEFT adapter.
        dtype (`torch.dtype`, *optional*): cast both files' weights; None keeps fp32.
    """
    from ..core.sdm_lora import get_sdm_lora_state_dicts
    from ..core.spade import get_spade_adapter

    lora_path = Path(out_path)
    spade_path = spade_path_for(lora_path)
    parts = get_sdm_lora_state_dicts(unet, adapter_name=adapter_name)
    adapter = get_spade_adapter(unet)
    _check_encoding(hint_encoding, int(adapter.config["layout_channels"]), label_set, "SPADE adapter")
    metadata = WeightsMetadata(
        kind="lora",
        hint_encoding=hint_encoding,
        label_set=label_set,
        base_model=base_model,
        training_config_hash=training_config_hash,
        extra={"spade_file": spade_path.name},
    )
    conversion = save_lora_file(
        lora_path,
        parts.lora,
        "kohya",
        unet_config=unet.config,
        alpha=lora_alphas_of(unet, adapter_name),
        metadata=metadata,
        dtype=dtype,
    )
    save_spade_file(
        spade_path,
        adapter,
        label_set=label_set,
        hint_encoding=hint_encoding,
        base_model=base_model,
        training_config_hash=training_config_hash,
        unet_config=unet.config,
        lora_file=lora_path.name,
        dtype=dtype,
    )
    spade = load_spade_file(spade_path)
    logger.info(
        "wrote %s (%d LoRA modules) and %s (%d SPADE sites)",
        lora_path,
        len(conversion.modules),
        spade_path,
        len(spade.sites),
    )
    return SDMLoraFiles(lora_path, spade_path, conversion, spade)


def _uniform(values: Mapping[str, Any], what: str, source: Path) -> Any:
    distinct = sorted(set(values.values()))
    if len(distinct) != 1:
        raise WeightsError(
            f"{source}: the LoRA modules use {len(distinct)} different {what}s {distinct[:6]}; SDMLoraConfig has one. "
            "Build the UNet with add_sdm_lora yourself (matching the file) and load into it"
        )
    return distinct[0]


def load_sdm_lora(
    unet: torch.nn.Module,
    path: str | os.PathLike,
    label_set: LabelSet,
    *,
    adapter_name: str = "default",
    hint_encoding: str | None = None,
    base_model: str | None = None,
) -> SDMLoraFiles:
    """Load ``<name>.safetensors`` and ``<name>.spade.safetensors`` into a UNet (exact round trip of `save_sdm_lora`).

    A UNet already prepared with ``add_sdm_lora`` must match the files (sites, ranks, alphas, LoRA modules); a
    plain UNet is prepared here with an ``SDMLoraConfig`` read from the files (rank, alpha, the exact LoRA
    modules, the SPADE sizes).

    Args:
        unet (`nn.Module`): a diffusers ``UNet2DConditionModel`` (mutated: weights loaded, maybe patched).
        path (`str` or `os.PathLike`): the LoRA file (kohya or PEFT); the companion is found next to it.
        label_set (`LabelSet`): the label set the caller uses; must equal the one the files were trained on.
        adapter_name (`str`, defaults to `"default"`): the PEFT adapter.
        hint_encoding, base_model (*optional*): checked against the files when given.

    Raises:
        MetadataError: label set, encoding or base model mismatch (both sides named), or files of another kind.
        SPADESiteMismatchError: the SPADE sites differ from the UNet's (both named).
        WeightsError: the LoRA does not fit the UNet (modules, ranks or alphas), or a file is broken.
    """
    from ..core.sdm_lora import SDMLoraConfig, SDMLoraStateDicts, add_sdm_lora, load_sdm_lora_state_dicts
    from ..core.spade import find_spade_sites, get_spade_adapter, is_spade_patched

    lora_path = Path(path)
    spade_path = spade_path_for(lora_path)
    lora_file = load_lora_file(lora_path)
    if lora_file.metadata is not None:
        lora_file.metadata.check(
            label_set=label_set, hint_encoding=hint_encoding, base_model=base_model, source=str(lora_path)
        )
    if not spade_path.exists():
        raise WeightsFileError(
            f"{str(lora_path)!r} has no SPADE companion {spade_path.name!r} next to it; an SDM-LoRA needs both files "
            "(a stock LoRA loader can use the LoRA file alone, without the layout conditioning)"
        )
    spade = load_spade_file(spade_path, label_set=label_set, hint_encoding=hint_encoding, base_model=base_model)
    has_lora = adapter_name in getattr(unet, "peft_config", {})
    if is_spade_patched(unet) != has_lora:
        raise WeightsError(
            "the UNet is half prepared (SPADE patched without the LoRA adapter, or the reverse); pass a plain UNet "
            "or one prepared with add_sdm_lora"
        )
    if has_lora:
        adapter = get_spade_adapter(unet)
        spade.check_sites(
            list(zip(adapter.site_names, adapter.config["feature_channels"])), "the UNet's SPADE adapter"
        )
    else:
        spade.check_sites([(s.name, s.num_channels) for s in find_spade_sites(unet)], "the UNet")
    lora = convert_lora_state_dict(lora_file.state_dict, "peft", unet_config=unet.config, prefix="")
    if has_lora:
        for key in _INT_FIELDS:
            if int(adapter.config[key]) != spade.spade_config[key]:
                raise WeightsError(
                    f"{spade_path}: {key}={spade.spade_config[key]} but the UNet's SPADE adapter has "
                    f"{adapter.config[key]}; build it with the file's sizes (or pass a plain UNet)"
                )
        have = lora_alphas_of(unet, adapter_name)
        wrong = [
            f"{p}: file {lora.alphas[p]:g}, UNet {have[p]:g}"
            for p in lora.modules
            if p in have and abs(lora.alphas[p] - have[p]) > 1e-6 * max(1.0, have[p])
        ]
        if wrong:
            raise WeightsError(
                f"{lora_path}: LoRA alpha differs from the UNet's: {wrong[:4]}; build the UNet with the file's "
                "lora_alpha (or pass a plain UNet)"
            )
    else:
        config = SDMLoraConfig(
            layout_channels=spade.spade_config["layout_channels"],
            rank=int(_uniform(lora.ranks, "rank", lora_path)),
            lora_alpha=float(_uniform(lora.alphas, "alpha", lora_path)),
            target_modules=tuple(lora.modules),
            spade_hidden_channels=spade.spade_config["hidden_channels"],
            spade_kernel_size=spade.spade_config["kernel_size"],
            spade_shared_kernel_size=spade.spade_config["shared_kernel_size"],
            adapter_name=adapter_name,
        )
        add_sdm_lora(unet, config)
    try:
        load_sdm_lora_state_dicts(
            unet, SDMLoraStateDicts(lora=lora.state_dict, spade=spade.state_dict), adapter_name=adapter_name
        )
    except ValueError as e:
        raise WeightsError(f"{lora_path}: {e}") from None
    return SDMLoraFiles(lora_path, spade_path, lora, spade)
