"""SDM-LoRA: SPADE-modulated decoder GroupNorms plus PEFT LoRA inside a frozen diffusers UNet (sdm.md §10).

Assembly order (sdm.md §10.7): freeze the whole UNet, patch the SPADE sites, add the LoRA adapter with
``unet.add_adapter`` (PEFT marks only its own layers trainable, freezing the SPADE modules too), then mark
the SPADE modules trainable. Exactly the LoRA and SPADE parameters end up with ``requires_grad``.

The two parts are saved separately: the LoRA part as PEFT's ``get_peft_model_state_dict`` gives it
(diffusers module paths, ``lora_A``/``lora_B`` suffixes, no adapter name, no alpha: alpha lives in the
config), the SPADE part as the ``SPADEAdapter`` state dict (``sites.<site key>.sem_*``). File formats
(kohya keys, the ``*.spade.safetensors`` companion) are the business of ``weights/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .logging import get_logger
from .spade import SPADEAdapter, get_spade_adapter, patch_unet, unpatch_unet

logger = get_logger(__name__)

__all__ = [
    "SDMLoraConfig",
    "SDMLoraSetup",
    "SDMLoraStateDicts",
    "add_sdm_lora",
    "get_sdm_lora_state_dicts",
    "load_sdm_lora_state_dicts",
    "sdm_lora_parameters",
]

_SPADE_NAME_PREFIX = "sem_"


@dataclass
class SDMLoraConfig:
    """What ``add_sdm_lora`` adds to a UNet."""

    layout_channels: int = field(
        metadata={"help": "C_m, channels of the layout encoding fed to SPADE (N one-hot classes [+1 edge], 768 ...)."}
    )
    rank: int = field(default=64, metadata={"help": "LoRA rank r (sdm.md §10.7: ablate 16, 64, 128)."})
    lora_alpha: float = field(default=64.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    target_modules: tuple[str, ...] = field(
        default=("to_q", "to_k", "to_v", "to_out.0"),
        metadata={"help": "Module-name suffixes that get LoRA (the attention projections by default)."},
    )
    conv_target_modules: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Extra targets, e.g. the resnet convs conv1, conv2, conv_shortcut (empty: none)."},
    )
    spade_hidden_channels: int = field(default=128, metadata={"help": "Width of each SPADE shared conv."})
    spade_kernel_size: int = field(
        default=3, metadata={"help": "Kernel size of the SPADE gamma/beta convs (odd; 1 is the budget variant)."}
    )
    spade_shared_kernel_size: int = field(default=3, metadata={"help": "Kernel size of the SPADE shared conv (odd)."})
    adapter_name: str = field(default="default", metadata={"help": "PEFT adapter name of the LoRA part."})

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        self.conv_target_modules = tuple(self.conv_target_modules)
        for name in ("layout_channels", "rank", "spade_hidden_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        for name in ("spade_kernel_size", "spade_shared_kernel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
                raise ValueError(f"`{name}` must be a positive odd int, got {value!r}.")
        if not self.lora_alpha > 0:
            raise ValueError(f"`lora_alpha` must be > 0, got {self.lora_alpha!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        if not self.target_modules:
            raise ValueError("`target_modules` is empty; give at least one module suffix such as 'to_q'.")
        for target in self.all_target_modules:
            if not isinstance(target, str) or not target:
                raise ValueError(
                    f"`target_modules`/`conv_target_modules` entries must be non-empty strings, got {target!r}."
                )
            if target.split(".")[-1].startswith(_SPADE_NAME_PREFIX) or target in ("spade", "base_layer"):
                raise ValueError(
                    f"target {target!r} would put LoRA inside the SPADE wrappers; SPADE is trained in full, "
                    "target attention or resnet layers only."
                )
        if len(set(self.all_target_modules)) != len(self.all_target_modules):
            raise ValueError(f"duplicate LoRA targets in {self.all_target_modules!r}.")
        if not self.adapter_name or not isinstance(self.adapter_name, str):
            raise ValueError(f"`adapter_name` must be a non-empty string, got {self.adapter_name!r}.")

    @property
    def all_target_modules(self) -> tuple[str, ...]:
        return tuple(self.target_modules) + tuple(self.conv_target_modules)

    def to_lora_config(self):
        """The ``peft.LoraConfig`` of the LoRA part (B zero-initialised: no change at step 0)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            init_lora_weights=True,
            target_modules=list(self.all_target_modules),
        )


@dataclass
class SDMLoraSetup:
    """What ``add_sdm_lora`` put into the UNet.

    Args:
        adapter (`SPADEAdapter`): the SPADE modules (also reachable as ``get_spade_adapter(unet)``).
        site_names (`list[str]`): the patched GroupNorm sites.
        lora_module_names (`list[str]`): the modules that received LoRA.
    """

    adapter: SPADEAdapter
    site_names: list[str]
    lora_module_names: list[str]


@dataclass
class SDMLoraStateDicts:
    """The two trained parts, as separate state dicts of detached tensors.

    Args:
        lora (`dict[str, torch.Tensor]`): PEFT names with diffusers module paths, e.g.
            ``"up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"``.
        spade (`dict[str, torch.Tensor]`): ``SPADEAdapter`` names, e.g.
            ``"sites.up_blocks_0_resnets_0_norm1.sem_gamma.weight"``.
    """

    lora: dict[str, torch.Tensor]
    spade: dict[str, torch.Tensor]


def add_sdm_lora(unet: nn.Module, config: SDMLoraConfig) -> SDMLoraSetup:
    """Turn a diffusers UNet into an SDM-LoRA model in place: SPADE on the decoder norms plus LoRA.

    At step 0 the UNet's output is unchanged (γ/β convs and LoRA B are zero). Afterwards exactly the LoRA and
    SPADE parameters are trainable. On failure the UNet is left unpatched.

    Args:
        unet (`nn.Module`): a diffusers ``UNet2DConditionModel``; mutated (frozen, patched, LoRA added).
        config (`SDMLoraConfig`): ranks, targets, SPADE sizes.

    Returns:
        `SDMLoraSetup`: the adapter, the SPADE sites and the LoRA module names.
    """
    if not hasattr(unet, "add_adapter"):
        raise TypeError(f"`unet` must be a diffusers model with `add_adapter` (PEFT), got {type(unet).__name__}.")
    unet.requires_grad_(False)
    adapter = SPADEAdapter.from_unet(
        unet,
        layout_channels=config.layout_channels,
        hidden_channels=config.spade_hidden_channels,
        kernel_size=config.spade_kernel_size,
        shared_kernel_size=config.spade_shared_kernel_size,
    )
    site_names = patch_unet(unet, adapter)
    try:
        unet.add_adapter(config.to_lora_config(), adapter_name=config.adapter_name)
    except Exception:
        unpatch_unet(unet)
        raise
    # PEFT froze everything but its own layers, SPADE included; SPADE is trained in full.
    adapter.requires_grad_(True)
    lora_modules = sorted({name.rsplit(".lora_", 1)[0] for name, _ in unet.named_parameters() if ".lora_" in name})
    n_lora = sum(p.numel() for name, p in unet.named_parameters() if ".lora_" in name)
    logger.info(
        "SDM-LoRA: %d SPADE sites (%.2fM params), LoRA r=%d on %d modules (%.2fM params)",
        len(site_names),
        sum(p.numel() for p in adapter.parameters()) / 1e6,
        config.rank,
        len(lora_modules),
        n_lora / 1e6,
    )
    return SDMLoraSetup(adapter=adapter, site_names=site_names, lora_module_names=lora_modules)


def sdm_lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of an SDM-LoRA UNet (LoRA + SPADE), for the optimizer."""
    return [p for p in unet.parameters() if p.requires_grad]


def get_sdm_lora_state_dicts(unet: nn.Module, adapter_name: str = "default") -> SDMLoraStateDicts:
    """The LoRA and SPADE weights of an SDM-LoRA UNet, as separate state dicts (detached, not copied)."""
    from peft import get_peft_model_state_dict

    if adapter_name not in getattr(unet, "peft_config", {}):
        raise ValueError(
            f"no LoRA adapter {adapter_name!r} on this UNet (adapters: {list(getattr(unet, 'peft_config', {}))}); "
            "call add_sdm_lora first."
        )
    lora = {k: v.detach() for k, v in get_peft_model_state_dict(unet, adapter_name=adapter_name).items()}
    spade = {k: v.detach() for k, v in get_spade_adapter(unet).state_dict().items()}
    return SDMLoraStateDicts(lora=lora, spade=spade)


def load_sdm_lora_state_dicts(unet: nn.Module, state_dicts: SDMLoraStateDicts, adapter_name: str = "default") -> None:
    """Load both parts into a UNet prepared with ``add_sdm_lora`` (same config); strict on keys and shapes.

    Raises:
        `ValueError`: keys missing from or unknown to the UNet (listed), or shapes that differ.
    """
    from peft import set_peft_model_state_dict

    expected = get_sdm_lora_state_dicts(unet, adapter_name=adapter_name)
    for part in ("lora", "spade"):
        have, want = getattr(state_dicts, part), getattr(expected, part)
        missing = sorted(set(want) - set(have))
        unexpected = sorted(set(have) - set(want))
        shapes = [
            f"{k}: {tuple(have[k].shape)} != {tuple(want[k].shape)}"
            for k in want
            if k in have and have[k].shape != want[k].shape
        ]
        if missing or unexpected or shapes:
            raise ValueError(
                f"{part} state dict does not fit this SDM-LoRA UNet: missing {missing[:5]} ({len(missing)}), "
                f"unexpected {unexpected[:5]} ({len(unexpected)}), shape mismatches {shapes[:5]}. Build the UNet "
                "with the SDMLoraConfig the weights were trained with."
            )
    result = set_peft_model_state_dict(unet, state_dicts.lora, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"PEFT did not place these LoRA keys: {unexpected[:5]} ({len(unexpected)}).")
    get_spade_adapter(unet).load_state_dict(state_dicts.spade, strict=True)
