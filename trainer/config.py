"""The training configuration: one dataclass per section, loaded from YAML presets/files plus dotted overrides.

Sections of `Config` (every field has ``help`` metadata; ``l2i-train --print-config`` shows the resolved values):

=================  ======================================================================================
``model``          `ModelConfig`: base model, mode (``controlnet``, ``sdm_lora``, ``t2i_adapter``), hint, widths
``data``           `layout2image.trainer.data.DataConfig`: dataset format, root, splits, transform
``adversarial``    `layout2image.trainer.step.AdversarialConfig`: ALDM's discriminator loss and unrolling
``discriminator``  `DiscriminatorConfig`: segmenter backbone and weights, its optimizer and OneCycle schedule
``optim``          `OptimConfig`: the adapter's optimizer, learning rate schedule and gradient clipping
``train``          `TrainConfig`: steps, batch, precision, seed, EMA, intervals, output folder
``validation``     `ValidationConfig`: fixed label maps and seeds, sampler settings, evaluation segmenter
``export``         `ExportConfig`: file formats written on save and at the end
=================  ======================================================================================

Resolution order (`load_config`): the dataclass defaults, then a preset (``trainer/presets/<name>.yaml``), then
each ``--config`` file (YAML, or TOML by extension), then the overrides. Mappings merge key by key.

**Overrides** are ``section.key=value`` strings (``--set train.steps=100 adversarial.num_unroll_steps=3``); nested
dataclasses take more dots (``data.transform.resolution=64``). The value is parsed as YAML (``3``, ``1e-5``,
``true``, ``null``, ``[32, 32]``); a text field keeps the raw text (``model.pretrained=123`` is the folder ``"123"``).
Every value is checked against the field's type (`layout2image.trainer.config_io`, which holds the generic
machinery); an unknown key or a wrong type raises `ConfigError` naming the key (with a close match when there is
one). `Config.check_ready` adds what a run needs (base model, data, output folder, a discriminator when adversarial)
and is called before any model loads; `Config.hash` (16 hex digits, recorded in every exported file) covers every
setting except the output folder, ``train.resume``, ``train.num_workers`` and ``data.root``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.hints import DEFAULT_TEMPLATE
from ..core.sdm_lora import SDMLoraConfig
from .config_io import ConfigError, apply_overrides, build_dataclass, merge, plain, read_config_file
from .data import DataConfig
from .preset_names import PRESETS_DIR, list_presets
from .step import AdversarialConfig

__all__ = [
    "MODES",
    "PRESETS_DIR",
    "Config",
    "ConfigError",
    "DiscriminatorConfig",
    "ExportConfig",
    "ModelConfig",
    "OptimConfig",
    "SDMLoraSettings",
    "TrainConfig",
    "ValidationConfig",
    "config_from_dict",
    "list_presets",
    "load_config",
]

MODES = ("controlnet", "sdm_lora", "t2i_adapter")
HINTS = ("rgb", "onehot", "embedding")
PRECISIONS = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")
SCHEDULES = ("constant", "cosine", "linear")
DECODERS = ("vae", "taesd")
CONTROLNET_EXPORT_FORMATS = ("diffusers-folder", "diffusers", "ldm")


def _choice(section: str, name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name}={value!r} is not valid; use one of {list(choices)}")


def _at_least(section: str, name: str, value: Any, low: float, what: str = "") -> None:
    if value < low:
        raise ConfigError(f"{section}.{name}={value!r} must be >= {low}{what}")


@dataclass
class SDMLoraSettings:
    """`layout2image.core.sdm_lora.SDMLoraConfig` without ``layout_channels`` (derived from the label set)."""

    rank: int = field(default=64, metadata={"help": "LoRA rank r (sdm.md §10.7: ablate 16, 64, 128)."})
    lora_alpha: float = field(default=64.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    target_modules: tuple[str, ...] = field(
        default=("to_q", "to_k", "to_v", "to_out.0"), metadata={"help": "Module-name suffixes that get LoRA."}
    )
    conv_target_modules: tuple[str, ...] = field(
        default=(), metadata={"help": "Extra LoRA targets, e.g. [conv1, conv2, conv_shortcut] (LoCon style)."}
    )
    spade_hidden_channels: int = field(default=128, metadata={"help": "Width of each SPADE shared conv."})
    spade_kernel_size: int = field(default=3, metadata={"help": "Kernel of the SPADE gamma/beta convs (odd)."})
    spade_shared_kernel_size: int = field(default=3, metadata={"help": "Kernel of the SPADE shared conv (odd)."})
    layout_size: tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "Resize label maps (nearest) to [h, w] before encoding the SPADE layout (memory); null: full."
        },
    )

    def __post_init__(self) -> None:
        try:
            self.to_sdm_lora_config(1)
        except ValueError as e:
            raise ConfigError(f"model.sdm_lora: {e}") from None

    def to_sdm_lora_config(self, layout_channels: int) -> SDMLoraConfig:
        """The core config for a layout encoding with ``layout_channels`` channels."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layout_size"}
        return SDMLoraConfig(layout_channels=layout_channels, **kwargs)


@dataclass
class ModelConfig:
    """The base model and the adapter trained on it."""

    pretrained: str | None = field(
        default=None,
        metadata={
            "help": "Base SD 1.5 model: a local diffusers folder or a single-file checkpoint (.safetensors/.ckpt). "
            "Loaded with no network (trainer/models.py)."
        },
    )
    config_dir: str | None = field(
        default=None,
        metadata={"help": "Single files only: folder with the component configs + tokenizer (default: shipped)."},
    )
    base_model_name: str | None = field(
        default=None,
        metadata={
            "help": "Name recorded in exported files (e.g. runwayml/stable-diffusion-v1-5); default: pretrained."
        },
    )
    mode: str = field(
        default="controlnet",
        metadata={"help": "What is trained: controlnet (ALDM), sdm_lora (LoRA + SPADE norms) or t2i_adapter."},
    )
    hint: str = field(
        default="embedding",
        metadata={
            "help": "Layout encoding: rgb (palette, stock loaders), onehot (N channels) or embedding (ALDM class "
            "embeddings). sdm_lora: onehot or embedding (the SPADE layout). t2i_adapter: rgb or onehot."
        },
    )
    with_edges: bool = field(default=False, metadata={"help": "onehot ControlNet/T2I only: add a boundary channel."})
    embedding_table: str | None = field(
        default=None,
        metadata={
            "help": "embedding hint: a saved class-embedding table (.safetensors, weights.save_class_embedding_table); "
            "null: encode the class names with the base model's text encoder."
        },
    )
    embedding_template: str = field(
        default=DEFAULT_TEMPLATE, metadata={"help": "Prompt per class for the embedding table ('{name}' = class)."}
    )
    embedding_pooling: str = field(
        default="eos", metadata={"help": "Text-encoder pooling for the table: eos or mean."}
    )
    embedding_null: str = field(
        default="empty", metadata={"help": "Null row of the table (ignore pixels): 'empty' (encode '') or 'zeros'."}
    )
    hint_block_out_channels: tuple[int, ...] = field(
        default=(768, 512, 256, 256),
        metadata={"help": "embedding ControlNet: the 4 widths of ALDM's hint encoder (tiny worlds: e.g. [32]*4)."},
    )
    conditioning_embedding_out_channels: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "help": "rgb/onehot ControlNet: widths of the standard hint block; it downsamples 2**(len-1) = the VAE "
            "factor. null: (16, 32, 96, 256) cut to the VAE factor."
        },
    )
    t2i_adapter_type: str = field(default="full_adapter", metadata={"help": "full_adapter or light_adapter."})
    t2i_num_res_blocks: int = field(default=2, metadata={"help": "T2I-Adapter residual blocks per level."})
    null_layout_prob: float | None = field(
        default=None,
        metadata={"help": "Probability per sample of the null layout (zero hint). null: 0.2 for sdm_lora, else 0."},
    )
    sdm_lora: SDMLoraSettings = field(default_factory=SDMLoraSettings, metadata={"help": "SDM-LoRA settings."})
    init_weights: str | None = field(
        default=None,
        metadata={
            "help": "Start from these adapter weights: a ControlNet folder/file (controlnet), a T2I-Adapter folder, "
            "or an SDM-LoRA export folder (lora.safetensors + spade.safetensors)."
        },
    )
    decoder: str = field(
        default="vae",
        metadata={
            "help": "Decoder of x̂0 for the discriminator: vae (full, checkpointed) or taesd (needs model.taesd)."
        },
    )
    taesd: str | None = field(
        default=None, metadata={"help": "Local AutoencoderTiny (TAESD) folder for decoder=taesd."}
    )

    def __post_init__(self) -> None:
        _choice("model", "mode", self.mode, MODES)
        _choice("model", "hint", self.hint, HINTS)
        _choice("model", "embedding_pooling", self.embedding_pooling, ("eos", "mean"))
        _choice("model", "embedding_null", self.embedding_null, ("empty", "zeros"))
        _choice("model", "t2i_adapter_type", self.t2i_adapter_type, ("full_adapter", "light_adapter"))
        _choice("model", "decoder", self.decoder, DECODERS)
        if self.mode == "sdm_lora" and self.hint == "rgb":
            raise ConfigError(
                "model.hint='rgb' is not a SPADE layout; with model.mode='sdm_lora' use onehot or embedding"
            )
        if self.mode == "t2i_adapter" and self.hint == "embedding":
            raise ConfigError(
                "model.hint='embedding' is ControlNet/SPADE only; with model.mode='t2i_adapter' use rgb/onehot"
            )
        if self.with_edges and (self.hint != "onehot" or self.mode == "sdm_lora"):
            raise ConfigError("model.with_edges=true needs model.hint='onehot' with a controlnet or t2i_adapter")
        if "{name}" not in self.embedding_template:
            raise ConfigError(f"model.embedding_template={self.embedding_template!r} must contain '{{name}}'")
        if len(self.hint_block_out_channels) != 4 or min(self.hint_block_out_channels) < 1:
            raise ConfigError(f"model.hint_block_out_channels={list(self.hint_block_out_channels)} must be 4 widths")
        widths = self.conditioning_embedding_out_channels
        if widths is not None and (len(widths) < 1 or min(widths) < 1):
            raise ConfigError(f"model.conditioning_embedding_out_channels={widths!r} must be positive widths or null")
        if self.null_layout_prob is not None and not 0.0 <= self.null_layout_prob < 1.0:
            raise ConfigError(f"model.null_layout_prob={self.null_layout_prob} must be in [0, 1) or null")
        _at_least("model", "t2i_num_res_blocks", self.t2i_num_res_blocks, 1)
        if self.decoder == "taesd" and not self.taesd:
            raise ConfigError("model.decoder='taesd' needs model.taesd, a local AutoencoderTiny folder")

    @property
    def layout_dropout(self) -> float:
        """The null-layout probability in use (the mode's default when unset)."""
        if self.null_layout_prob is not None:
            return self.null_layout_prob
        return 0.2 if self.mode == "sdm_lora" else 0.0


@dataclass
class DiscriminatorConfig:
    """The segmenter discriminator (aldm.md §5) and its optimizer."""

    backbone: str | None = field(
        default=None, metadata={"help": "segformer or upernet; read from the pretrained folder when given."}
    )
    pretrained: str | None = field(
        default=None, metadata={"help": "Local transformers segmenter folder (its head is remapped by class name)."}
    )
    tiny: bool = field(
        default=False, metadata={"help": "Random tiny segmenter (tests, toy world) instead of weights."}
    )
    input_norm: str = field(default="auto", metadata={"help": "Input normalisation: auto, imagenet or half."})
    lr: float = field(default=1e-6, metadata={"help": "Max learning rate of the OneCycle schedule (ALDM 1e-6)."})
    weight_decay: float = field(default=0.005, metadata={"help": "AdamW weight decay (ALDM 0.005)."})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip D's gradient norm (null: no clipping)."})
    warmup_steps: int = field(
        default=200, metadata={"help": "OneCycle warm-up in D updates (pct_start = this/total)."}
    )
    div_factor: float = field(default=10.0, metadata={"help": "OneCycle initial lr = lr / div_factor."})
    final_div_factor: float = field(
        default=100.0, metadata={"help": "OneCycle final lr = initial / final_div_factor."}
    )
    total_updates: int | None = field(
        default=None, metadata={"help": "OneCycle length in D updates; null: the number of D updates in the run."}
    )

    def __post_init__(self) -> None:
        if self.backbone is not None:
            _choice("discriminator", "backbone", self.backbone, ("segformer", "upernet"))
        _choice("discriminator", "input_norm", self.input_norm, ("auto", "imagenet", "half"))
        if self.pretrained and self.tiny:
            raise ConfigError("discriminator.pretrained and discriminator.tiny=true exclude each other; pick one")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"discriminator.lr={self.lr} must be > 0 and weight_decay={self.weight_decay} >= 0")
        _at_least("discriminator", "warmup_steps", self.warmup_steps, 0)
        if self.div_factor <= 0 or self.final_div_factor <= 0:
            raise ConfigError("discriminator.div_factor and final_div_factor must be > 0")
        if self.total_updates is not None:
            _at_least("discriminator", "total_updates", self.total_updates, 1)


@dataclass
class OptimConfig:
    """The adapter's (generator's) optimizer and learning-rate schedule."""

    optimizer: str = field(
        default="adamw", metadata={"help": "adamw (torch) or adamw8bit (bitsandbytes: pip install bitsandbytes)."}
    )
    lr: float = field(default=1e-5, metadata={"help": "Learning rate (ALDM 1e-5 CS / 2e-5 ADE; SDM-LoRA ~1e-4)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas."})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Clip the gradient norm (null: off)."})
    schedule: str = field(default="constant", metadata={"help": "After warm-up: constant, cosine or linear decay."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up from 0 over this many optimizer steps."})

    def __post_init__(self) -> None:
        _choice("optim", "optimizer", self.optimizer, OPTIMIZERS)
        _choice("optim", "schedule", self.schedule, SCHEDULES)
        if self.lr <= 0 or self.weight_decay < 0 or self.eps <= 0:
            raise ConfigError(f"optim.lr={self.lr}, eps={self.eps} must be > 0, weight_decay >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"optim.max_grad_norm={self.max_grad_norm} must be > 0 or null")
        _at_least("optim", "warmup_steps", self.warmup_steps, 0)


@dataclass
class TrainConfig:
    """The run: length, batch, precision, seed, EMA, intervals and the output folder."""

    output_dir: str | None = field(default=None, metadata={"help": "Run folder (config, checkpoints, validation)."})
    steps: int = field(
        default=1000, metadata={"help": "Optimizer steps (each = gradient_accumulation_steps batches)."}
    )
    batch_size: int = field(default=1, metadata={"help": "Samples per batch per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    precision: str = field(default="no", metadata={"help": "Mixed precision: no (fp32), fp16 or bf16 (accelerate)."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Checkpoint the UNet and adapter blocks."})
    seed: int = field(default=777, metadata={"help": "Seed of everything: each step draws from (seed, step)."})
    ema: bool = field(default=False, metadata={"help": "Keep an EMA of the trainable weights (exported if on)."})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay."})
    num_workers: int = field(
        default=2, metadata={"help": "DataLoader worker processes (0: load in the main process)."}
    )
    empty_prompt_prob: float = field(default=0.0, metadata={"help": "Probability of training with the empty prompt."})
    log_every: int = field(default=10, metadata={"help": "TensorBoard scalars every N steps."})
    checkpoint_every: int = field(default=500, metadata={"help": "Checkpoint every N steps (0: only at the end)."})
    keep_last: int = field(default=3, metadata={"help": "Checkpoints kept (older ones are deleted; 0: keep all)."})
    export_on_checkpoint: bool = field(
        default=True, metadata={"help": "Also write the export formats per checkpoint."}
    )
    resume: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder to resume from."})
    cache_encodings: bool = field(
        default=False, metadata={"help": "Cache VAE latents (posterior mean) and text embeddings on disk."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Encoding cache folder (default: <output>/cache)."})
    cpu: bool = field(default=False, metadata={"help": "Train on the CPU even when a GPU is present."})
    allow_tf32: bool = field(default=True, metadata={"help": "TF32 matmuls on Ampere+ GPUs."})
    tensorboard: bool = field(default=True, metadata={"help": "Log to TensorBoard when it is installed."})

    def __post_init__(self) -> None:
        _choice("train", "precision", self.precision, PRECISIONS)
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "log_every"):
            _at_least("train", name, getattr(self, name), 1)
        for name in ("num_workers", "checkpoint_every", "keep_last", "seed"):
            _at_least("train", name, getattr(self, name), 0)
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={self.ema_decay} must be in (0, 1)")
        if not 0.0 <= self.empty_prompt_prob <= 1.0:
            raise ConfigError(f"train.empty_prompt_prob={self.empty_prompt_prob} must be in [0, 1]")


@dataclass
class ValidationConfig:
    """Validation samples on fixed label maps and seeds, scored by an evaluation segmenter (never D)."""

    every: int = field(default=500, metadata={"help": "Validate every N steps (0: only at the end, if at_end)."})
    at_start: bool = field(default=False, metadata={"help": "Also validate before the first step."})
    at_end: bool = field(default=True, metadata={"help": "Validate after the last step."})
    num_images: int = field(default=4, metadata={"help": "Label maps from the validation split (the first N)."})
    indices: tuple[int, ...] | None = field(default=None, metadata={"help": "Exact sample indices instead."})
    seed: int = field(default=1234, metadata={"help": "Image i uses seed + 177 * i (ALDM's scheme)."})
    num_steps: int = field(default=25, metadata={"help": "DDIM steps (ALDM: 25)."})
    guidance_scale: float = field(default=7.5, metadata={"help": "Text CFG scale (ALDM: 7.5)."})
    layout_guidance_scale: float = field(default=1.0, metadata={"help": "Layout guidance (SDM-LoRA: e.g. 1.5)."})
    negative_prompt: str = field(default="", metadata={"help": "Negative / unconditional prompt."})
    batch_size: int = field(default=4, metadata={"help": "Images sampled at once."})
    segmenter: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation segmenter for mIoU (transformers folder; head matched by class name). Must not be "
            "the discriminator. null: no mIoU and no prediction column."
        },
    )

    def __post_init__(self) -> None:
        for name in ("every", "seed"):
            _at_least("validation", name, getattr(self, name), 0)
        for name in ("num_images", "num_steps", "batch_size"):
            _at_least("validation", name, getattr(self, name), 1)
        if self.indices is not None and (not self.indices or min(self.indices) < 0):
            raise ConfigError(f"validation.indices={self.indices!r} must be non-negative sample indices or null")


@dataclass
class ExportConfig:
    """What is written on each checkpoint (if train.export_on_checkpoint) and at the end (``<output>/export``)."""

    controlnet_formats: tuple[str, ...] = field(
        default=("diffusers-folder", "diffusers"),
        metadata={
            "help": "ControlNet files: diffusers-folder (config.json + weights), diffusers (one safetensors, loads "
            "in ComfyUI/A1111/Forge) and/or ldm (control_model.* keys for older tools)."
        },
    )
    dtype: str = field(default="fp32", metadata={"help": "Exported weights dtype: fp32 or fp16."})
    use_ema: bool = field(default=True, metadata={"help": "With train.ema: export the EMA weights."})
    discriminator: bool = field(default=True, metadata={"help": "Also export the discriminator folder."})

    def __post_init__(self) -> None:
        for fmt in self.controlnet_formats:
            _choice("export", "controlnet_formats", fmt, CONTROLNET_EXPORT_FORMATS)
        if not self.controlnet_formats:
            raise ConfigError(
                "export.controlnet_formats is empty; give at least one of diffusers-folder/diffusers/ldm"
            )
        _choice("export", "dtype", self.dtype, ("fp32", "fp16"))


_HASH_EXCLUDED = {("train", "output_dir"), ("train", "resume"), ("train", "num_workers"), ("data", "root")}


@dataclass
class Config:
    """The whole training configuration (see the module docstring)."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Base model and adapter."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Training data."})
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig, metadata={"help": "ALDM settings."})
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig, metadata={"help": "Segmenter D."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Adapter optimizer."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "The run."})
    validation: ValidationConfig = field(default_factory=ValidationConfig, metadata={"help": "Validation."})
    export: ExportConfig = field(default_factory=ExportConfig, metadata={"help": "Exported files."})

    def __post_init__(self) -> None:
        from .models import ModelLoadError, resolve_builtin_path

        d, v = self.discriminator, self.validation
        # ``builtin:toy/...`` (what presets use for the shipped toy weights) -> the install's absolute paths.
        for section, key in (("model", "pretrained"), ("discriminator", "pretrained"), ("validation", "segmenter")):
            obj = getattr(self, section)
            try:
                setattr(obj, key, resolve_builtin_path(getattr(obj, key)))
            except ModelLoadError as e:
                raise ConfigError(f"{section}.{key}: {e}") from None
        if v.segmenter and d.pretrained and Path(v.segmenter).resolve() == Path(d.pretrained).resolve():
            raise ConfigError(
                f"validation.segmenter={v.segmenter!r} is the discriminator's starting point; mIoU must come from an "
                "independent evaluation segmenter (a different folder)"
            )

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) in field order, for YAML/JSON."""
        return plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path, header: str | None = None) -> Path:
        """Write the resolved config as YAML (atomically, with the umask's file mode).

        Args:
            path (`str` or `Path`): the file; its folder is created if missing.
            header (`str`, *optional*): YAML comment lines (``# ...``) written first, e.g. the settings changed on
                resume.
        """
        from ..core.files import atomic_write_text

        return atomic_write_text(path, (header or "") + self.to_yaml())

    def hash(self) -> str:
        """16 hex digits over the settings that shape the weights (not the output folder, resume or workers)."""
        from ..weights.metadata import training_config_hash

        data = self.to_dict()
        for section, key in _HASH_EXCLUDED:
            data[section].pop(key, None)
        return training_config_hash(data)

    def check_ready(self) -> None:
        """What a run needs beyond a valid config (``--print-config`` works without them)."""
        if not self.model.pretrained:
            raise ConfigError(
                "model.pretrained is not set: give an SD 1.5 diffusers folder or single file (--set "
                "model.pretrained=PATH), or builtin:toy for the toy world's base model (weights/toy/)"
            )
        if not self.data.root:
            raise ConfigError("data.root is not set: give the dataset folder (--data DIR or --set data.root=DIR)")
        if not self.train.output_dir:
            raise ConfigError("train.output_dir is not set: give the run folder (--output DIR)")
        d = self.discriminator
        if self.adversarial.enabled and not d.pretrained and not d.tiny:
            raise ConfigError(
                "adversarial.enabled=true needs a discriminator: set discriminator.pretrained=<segmenter folder> "
                "(e.g. a SegFormer/UperNet fine-tuned on ADE20K), or discriminator.tiny=true for tests and the toy "
                "world, or adversarial.enabled=false for plain diffusion training"
            )


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build and check a `Config` from nested plain data; raises `ConfigError` naming the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    return build_dataclass(Config, data)


def load_config(
    preset: str | None = None,
    files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults <- preset <- files <- ``extra`` (e.g. the CLI's --data/--output) <- overrides, checked.

    Raises:
        ConfigError: an unknown preset, an unreadable file, an unknown key or a wrong type (the key is named).
    """
    data: dict[str, Any] = {}
    if preset is not None:
        path = PRESETS_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(list_presets())}")
        data = merge(data, read_config_file(path))
    for f in files:
        data = merge(data, read_config_file(f))
    if extra:
        data = merge(data, extra)
    data = apply_overrides(Config, data, overrides)
    return config_from_dict(data)
