"""Everything a training run is made of, built from a checked `Config`: models, adapter, optimizers, schedules, EMA.

`build_training_models` loads the frozen SD 1.5 parts (`trainer.models.load_base_models`), adds the adapter of
``model.mode`` with its conditioner (`trainer.conditioning`), the discriminator and the x̂0 decoder, and returns
them as `TrainingModels`. Precision follows design/trainers.md §7: trainable weights (adapter, LoRA, SPADE, D)
are float32 everywhere; frozen weights are half precision on CUDA only (``train.precision``), float32 on the CPU.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.controlnet import build_controlnet, build_t2i_adapter, hint_spec_for
from ..core.discriminator import build_discriminator, tiny_segmenter_config
from ..core.hints import build_class_embedding_table, clip_text_encode_fn
from ..core.labels import LabelSet
from ..core.logging import get_logger
from ..core.sdm_lora import SDMLoraConfig, add_sdm_lora, load_sdm_lora_state_dicts
from ..core.spade import get_spade_context
from .conditioning import ControlNetConditioner, SpadeConditioner, T2IAdapterConditioner
from .config import Config, ConfigError, DiscriminatorConfig, OptimConfig
from .step import AdversarialConfig

__all__ = [
    "ParameterEMA",
    "TrainingModels",
    "build_discriminator_optimizer",
    "build_generator_optimizer",
    "build_lr_schedule",
    "build_training_models",
    "count_discriminator_updates",
    "is_bitsandbytes_available",
    "is_tensorboard_available",
]

logger = get_logger(__name__)

# Widths of SD's standard ControlNet hint block; the first log2(VAE factor) + 1 are used for smaller VAEs.
_STANDARD_HINT_WIDTHS = (16, 32, 96, 256)
_HINT_ENCODINGS = {"rgb": "rgb", "onehot": "onehot", "embedding": "embedding"}


@functools.cache
def is_bitsandbytes_available() -> bool:
    """Whether ``bitsandbytes`` (8-bit AdamW) can be imported."""
    return importlib.util.find_spec("bitsandbytes") is not None


@functools.cache
def is_tensorboard_available() -> bool:
    """Whether TensorBoard logging works (``tensorboard`` installed)."""
    return importlib.util.find_spec("tensorboard") is not None


def half_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the frozen weights: fp16/bf16 with mixed precision on CUDA, float32 otherwise."""
    if device.type != "cuda" or precision == "no":
        return torch.float32
    return torch.float16 if precision == "fp16" else torch.bfloat16


@dataclass
class TrainingModels:
    """The models of one run.

    Args:
        bundle (`ModelBundle`): the frozen UNet (LoRA + SPADE inside for ``sdm_lora``), VAE, text encoder, tokenizer
            and noise scheduler.
        mode (`str`): ``controlnet``, ``sdm_lora`` or ``t2i_adapter``.
        adapter (`torch.nn.Module`): the module whose weights are trained (the ControlNet, the T2I-Adapter, or the
            UNet itself for ``sdm_lora``, where only its LoRA and SPADE parameters train).
        conditioner: the `trainer.conditioning` object that feeds the layout.
        trainable (`list[tuple[str, torch.nn.Parameter]]`): the trained parameters by name (float32).
        discriminator (`SegmenterDiscriminator`, *optional*): D (float32), when adversarial training is on.
        decoder (*optional*): decodes x̂0 for D (the VAE or TAESD).
        label_set (`LabelSet`): the classes.
        table (`torch.Tensor`, *optional*): `(N + 1, D)` class-embedding table for the ``embedding`` hint.
        hint_encoding (`str`): the metadata name of the layout encoding.
        layout_channels (`int`): channels of the layout the adapter reads.
        sdm_lora_config (`SDMLoraConfig`, *optional*): for ``sdm_lora``.
        base_model_name (`str`): recorded in exported files.
    """

    bundle: object
    mode: str
    adapter: torch.nn.Module
    conditioner: object
    trainable: list[tuple[str, torch.nn.Parameter]]
    discriminator: torch.nn.Module | None
    decoder: torch.nn.Module | None
    label_set: LabelSet
    table: torch.Tensor | None
    hint_encoding: str
    layout_channels: int
    sdm_lora_config: SDMLoraConfig | None
    base_model_name: str

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.trainable]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights by name, detached CPU float32 copies (what a checkpoint stores)."""
        return {name: p.detach().to("cpu", torch.float32).clone().contiguous() for name, p in self.trainable}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved weights into the trained parameters; the key sets must match exactly."""
        names = {n for n, _ in self.trainable}
        missing, unexpected = sorted(names - state.keys()), sorted(state.keys() - names)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint weights do not fit this run's {self.mode} adapter: missing {missing[:5]} "
                f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}); resume with the config the "
                "checkpoint was written with"
            )
        with torch.no_grad():
            for name, p in self.trainable:
                p.copy_(state[name].to(p.device, p.dtype))

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return self.bundle.frozen_modules()


def _hint_widths(vae_scale_factor: int, widths: tuple[int, ...] | None) -> tuple[int, ...]:
    levels = int(math.log2(vae_scale_factor)) + 1
    if 2 ** (levels - 1) != vae_scale_factor:
        raise ConfigError(f"the VAE downsamples by {vae_scale_factor}, not a power of two; this UNet is not supported")
    if widths is None:
        if levels > len(_STANDARD_HINT_WIDTHS):
            raise ConfigError(
                f"the VAE downsamples by {vae_scale_factor}; set model.conditioning_embedding_out_channels to "
                f"{levels} widths"
            )
        return _STANDARD_HINT_WIDTHS[:levels]
    if len(widths) != levels:
        raise ConfigError(
            f"model.conditioning_embedding_out_channels={list(widths)} downsamples by {2 ** (len(widths) - 1)} but the "
            f"VAE by {vae_scale_factor}; give {levels} widths (or null for the default)"
        )
    return tuple(widths)


def _class_embedding_table(config: Config, bundle, label_set: LabelSet, cache_dir: Path | None) -> torch.Tensor:
    m = config.model
    if m.embedding_table:
        from ..weights import load_class_embedding_table

        return load_class_embedding_table(m.embedding_table, label_set).table.float()
    encode = clip_text_encode_fn(bundle.text_encoder, bundle.tokenizer, pooling=m.embedding_pooling)
    return build_class_embedding_table(
        label_set,
        encode,
        template=m.embedding_template,
        null_text="" if m.embedding_null == "empty" else None,
        encoder_id=f"{bundle.source}|text_encoder|{m.embedding_pooling}",
        cache_dir=cache_dir,
    ).float()


def _load_sdm_lora_init(unet, folder: str) -> None:
    from .export import load_sdm_lora_export

    load_sdm_lora_state_dicts(unet, load_sdm_lora_export(folder))
    logger.info("SDM-LoRA weights initialised from %s", folder)


def build_training_models(
    config: Config, label_set: LabelSet, device: torch.device, *, cache_dir: Path | None = None
) -> TrainingModels:
    """Load the base model and build the adapter, conditioner, discriminator and decoder of ``config``.

    Args:
        config (`Config`): a checked config (`Config.check_ready` passed).
        label_set (`LabelSet`): the data's classes.
        device (`torch.device`): where everything runs.
        cache_dir (`Path`, *optional*): where the class-embedding table is cached.
    """
    from .models import load_base_models

    m, train = config.model, config.train
    frozen_dtype = half_dtype(train.precision, device)
    bundle = load_base_models(
        m.pretrained,
        device=device,
        dtype=frozen_dtype,
        config_dir=m.config_dir,
        gradient_checkpointing_unet=train.gradient_checkpointing,
    )
    factor = bundle.vae_scale_factor
    n = label_set.num_classes
    table = _class_embedding_table(config, bundle, label_set, cache_dir) if m.hint == "embedding" else None
    dropout = m.layout_dropout
    hint_encoding = "onehot_edges" if m.with_edges else _HINT_ENCODINGS[m.hint]

    if m.mode == "controlnet":
        if m.init_weights:
            from ..weights import controlnet_from_file

            adapter = controlnet_from_file(m.init_weights, label_set=label_set, hint_encoding=hint_encoding)
            logger.info("ControlNet initialised from %s", m.init_weights)
        else:
            adapter = build_controlnet(
                bundle.unet,
                m.hint,
                num_classes=n,
                with_edges=m.with_edges,
                embedding_dim=table.shape[1] if table is not None else 768,
                hint_block_out_channels=m.hint_block_out_channels,
                conditioning_embedding_out_channels=_hint_widths(factor, m.conditioning_embedding_out_channels),
            )
        adapter = adapter.to(device).train().requires_grad_(True)
        if train.gradient_checkpointing:
            adapter.enable_gradient_checkpointing()
        spec = hint_spec_for(adapter, label_set, kind=m.hint)
        conditioner = ControlNetConditioner(
            adapter, spec, label_set, table=table, vae_scale_factor=factor, null_layout_prob=dropout
        )
        trainable = list(adapter.named_parameters())
        layout_channels, lora_cfg = spec.channels, None
    elif m.mode == "t2i_adapter":
        if m.init_weights:
            from diffusers import T2IAdapter

            adapter = T2IAdapter.from_pretrained(m.init_weights, local_files_only=True)
        else:
            adapter = build_t2i_adapter(
                bundle.unet,
                m.hint,
                num_classes=n,
                with_edges=m.with_edges,
                downscale_factor=factor,
                num_res_blocks=m.t2i_num_res_blocks,
                adapter_type=m.t2i_adapter_type,
            )
        adapter = adapter.to(device).train().requires_grad_(True)
        spec = hint_spec_for(adapter, label_set, kind=m.hint)
        conditioner = T2IAdapterConditioner(
            adapter, spec, label_set, table=table, vae_scale_factor=factor, null_layout_prob=dropout
        )
        trainable = list(adapter.named_parameters())
        layout_channels, lora_cfg = spec.channels, None
    elif m.mode == "sdm_lora":
        layout_channels = n if m.hint == "onehot" else int(table.shape[1])
        lora_cfg = m.sdm_lora.to_sdm_lora_config(layout_channels)
        adapter = bundle.unet
        add_sdm_lora(adapter, lora_cfg)
        if m.init_weights:
            _load_sdm_lora_init(adapter, m.init_weights)
        trainable = [(name, p) for name, p in adapter.named_parameters() if p.requires_grad]
        adapter.train()
        conditioner = SpadeConditioner(
            get_spade_context(adapter),
            m.hint,
            label_set,
            table=table,
            null_layout_prob=dropout,
            layout_size=m.sdm_lora.layout_size,
        )
    else:
        raise ConfigError(f"model.mode={m.mode!r} is not valid; use controlnet, sdm_lora or t2i_adapter")
    # Trainable weights stay float32 whatever the frozen dtype (fp16 grads cannot be unscaled; trainers.md §5).
    for _, p in trainable:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    if not trainable:
        raise ConfigError(f"model.mode={m.mode!r} left no trainable parameters")

    discriminator = decoder = None
    if config.adversarial.enabled:
        discriminator = _build_discriminator(config.discriminator, label_set, train.seed).to(device)
        decoder = _build_decoder(config, bundle, device, frozen_dtype)
    name = m.base_model_name or Path(str(m.pretrained)).name
    logger.info(
        "%s (%s hint): %.2fM trainable parameters%s",
        m.mode,
        m.hint,
        sum(p.numel() for _, p in trainable) / 1e6,
        ""
        if discriminator is None
        else f", discriminator {sum(p.numel() for p in discriminator.parameters()) / 1e6:.2f}M",
    )
    return TrainingModels(
        bundle=bundle,
        mode=m.mode,
        adapter=adapter,
        conditioner=conditioner,
        trainable=trainable,
        discriminator=discriminator,
        decoder=decoder,
        label_set=label_set,
        table=table,
        hint_encoding=hint_encoding,
        layout_channels=layout_channels,
        sdm_lora_config=lora_cfg,
        base_model_name=name,
    )


def _build_discriminator(d: DiscriminatorConfig, label_set: LabelSet, seed: int):
    generator = torch.Generator().manual_seed(seed)
    if d.tiny:
        return build_discriminator(
            label_set,
            backbone=d.backbone or "segformer",
            config=tiny_segmenter_config(d.backbone or "segformer"),
            input_norm=d.input_norm,
            generator=generator,
        )
    return build_discriminator(
        label_set, backbone=d.backbone, pretrained=d.pretrained, input_norm=d.input_norm, generator=generator
    )


def _build_decoder(config: Config, bundle, device: torch.device, dtype: torch.dtype):
    if config.model.decoder == "vae":
        return bundle.vae
    from diffusers import AutoencoderTiny

    taesd = AutoencoderTiny.from_pretrained(config.model.taesd, local_files_only=True, torch_dtype=dtype)
    return taesd.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------- optimizers


def build_generator_optimizer(params: list[torch.nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (torch) or 8-bit AdamW (bitsandbytes) over the adapter's parameters."""
    kwargs = {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}
    if optim.optimizer == "adamw8bit":
        if not is_bitsandbytes_available():
            raise ImportError(
                "optim.optimizer='adamw8bit' needs bitsandbytes: pip install bitsandbytes (or pip install "
                "'layout2image[train]'); or set optim.optimizer=adamw"
            )
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    elif optim.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    else:
        raise ConfigError(f"optim.optimizer={optim.optimizer!r} is not valid; use adamw or adamw8bit")


def build_lr_schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int):
    """Linear warm-up over ``optim.warmup_steps``, then constant, cosine or linear decay to 0 at ``total_steps``."""
    warmup, kind = optim.warmup_steps, optim.schedule

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(max((step - warmup) / max(1, total_steps - warmup), 0.0), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def count_discriminator_updates(steps: int, adversarial: AdversarialConfig) -> int:
    """How many steps in ``[0, steps)`` update D (the OneCycle schedule's length)."""
    if not adversarial.enabled:
        return 0
    return sum(1 for s in range(adversarial.d_start_step, steps) if s % adversarial.lazy_every == 0)


def build_discriminator_optimizer(discriminator, d: DiscriminatorConfig, updates: int):
    """AdamW for D and ALDM's OneCycle schedule, stepped once per D update (aldm.md §5)."""
    optimizer = torch.optim.AdamW(
        [p for p in discriminator.parameters() if p.requires_grad],
        lr=d.lr,
        betas=tuple(d.betas),
        weight_decay=d.weight_decay,
    )
    # OneCycle needs a few steps per phase; one spare step so the last update never runs past the end.
    total = max(d.total_updates or updates, 4) + 1
    pct = min(max(d.warmup_steps / total, 2.0 / total), 0.5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=d.lr,
        total_steps=total,
        pct_start=pct,
        anneal_strategy="cos",
        div_factor=d.div_factor,
        final_div_factor=d.final_div_factor,
        cycle_momentum=False,
    )
    return optimizer, schedule


class ParameterEMA:
    """An exponential moving average of parameters, in float32 (``shadow = decay · shadow + (1 − decay) · p``).

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (as diffusers' EMAModel), so early
    averages are not dominated by the initial weights.
    """

    def __init__(self, named_parameters: list[tuple[str, torch.nn.Parameter]], decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.names = [n for n, _ in named_parameters]
        self.shadow = [p.detach().float().clone() for _, p in named_parameters]

    @torch.no_grad()
    def update(self, parameters: list[torch.nn.Parameter]) -> None:
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        self.num_updates += 1
        for s, p in zip(self.shadow, parameters):
            s.lerp_(p.detach().float(), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: s.cpu().contiguous() for name, s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        if set(state) != set(self.names):
            raise ValueError("the checkpoint's EMA weights do not match this run's trainable parameters")
        self.shadow = [state[n].to(s.device, torch.float32).clone() for n, s in zip(self.names, self.shadow)]
        self.num_updates = num_updates

    @torch.no_grad()
    def swap(self, parameters: list[torch.nn.Parameter]) -> None:
        """Exchange the live weights and the averages (call twice to restore)."""
        for s, p in zip(self.shadow, parameters):
            live = p.detach().clone()
            p.copy_(s.to(p.dtype))
            s.copy_(live.float())
