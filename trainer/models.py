"""Load the frozen Stable Diffusion 1.5 parts the trainer builds on, with no network by default.

`load_base_models` returns a `ModelBundle` (UNet, VAE, CLIP text encoder, tokenizer, noise scheduler) from one of:

* **a local diffusers folder** (``model_index.json`` plus ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
  ``scheduler/``), read with ``from_pretrained(..., local_files_only=True)``;
* **a single-file checkpoint** in the original (ldm / CompVis) layout, e.g. ``v1-5-pruned-emaonly.safetensors``
  or a ``.ckpt``. The file is read once by `layout2image.weights.safe_load` (``.ckpt`` only through
  ``torch.load(weights_only=True)``) and its keys are checked against the SD 1.5 signature below. The UNet and VAE
  parts are renamed by diffusers' own ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint``, checked key
  by key against the configs (diffusers itself would leave a missing weight on the meta device and fail later
  without naming it), and handed to
  ``from_single_file(state_dict, config=<local folder>, subfolder=..., local_files_only=True)``. The component configs and the CLIP BPE tokenizer come from a local folder,
  `SD15_CONFIG_DIR` (shipped with the package) unless ``config_dir`` names another one. That folder is checked to
  exist before diffusers sees it: given a string that is not a folder, diffusers would take it for a Hub repo id.
  The text encoder's keys only lose their ``cond_stage_model.transformer.`` prefix, so it is loaded here with a
  strict key check instead of through diffusers' private CLIP helper;
* **a Hugging Face Hub id** (``"stable-diffusion-v1-5/stable-diffusion-v1-5"``) when ``local_files_only=False``:
  plain ``from_pretrained``, which downloads into the Hugging Face cache. For users who are online; the tests only
  cover the two local routes.

Precision (design/architecture.md, Decisions): frozen weights are half precision on CUDA only. On any other device a
half ``dtype`` is refused with a warning and everything stays float32 (fp16 matmuls are ~8x slower on CPU).
Trainable modules (ControlNet, LoRA, SPADE, discriminator) are not built here and always stay float32.

Attention runs through PyTorch's ``scaled_dot_product_attention``: diffusers' ``AttnProcessor2_0`` on the UNet and
the VAE, ``attn_implementation="sdpa"`` on the text encoder.

Signature of an SD 1.5 single file (`SD15_SIGNATURE_KEYS`); the shapes (SD 1.5's given here) are checked against
the config folder, so a tiny test model with its own configs passes too:

* UNet: ``model.diffusion_model.input_blocks.0.0.weight`` (320, 4, 3, 3), ``model.diffusion_model.out.2.weight``
  (4, 320, 3, 3), and any ``model.diffusion_model.*.attn2.to_k.weight`` (*, 768): SD 2.x has 1024 there.
* VAE: ``first_stage_model.encoder.conv_in.weight`` (128, 3, 3, 3), ``first_stage_model.decoder.conv_out.weight``
  (3, 128, 3, 3).
* text encoder: ``cond_stage_model.transformer.text_model.embeddings.token_embedding.weight`` (49408, 768) and
  ``...position_embedding.weight`` (77, 768).

A file without these keys is refused with the missing keys named and a guess at what it is instead (SDXL, SD 2.x,
a ControlNet, a LoRA, a diffusers component, a standalone VAE).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.logging import get_logger

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

__all__ = [
    "COMPONENT_SUBFOLDERS",
    "SD15_CONFIG_DIR",
    "SD15_SIGNATURE_KEYS",
    "SINGLE_FILE_EXTENSIONS",
    "TOY_WEIGHTS_DIR",
    "ModelBundle",
    "ModelLoadError",
    "check_sd15_checkpoint_keys",
    "load_base_models",
    "resolve_builtin_path",
    "resolve_frozen_dtype",
]

logger = get_logger(__name__)

#: The shipped SD 1.5 component configs and CLIP tokenizer (no weights) used for single-file loading.
SD15_CONFIG_DIR = Path(__file__).resolve().parent / "sd15_config"

#: Where the shipped toy base models live (``weights/toy`` in the package; see docs/TOY_WORLD.md).
TOY_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "toy"

#: Prefix of paths inside the package's shipped weights: ``builtin:toy`` is `TOY_WEIGHTS_DIR`,
#: ``builtin:toy/segmenter`` its evaluation segmenter. Presets use it because they cannot know the install folder.
BUILTIN_PREFIX = "builtin:"


def resolve_builtin_path(value: str | None) -> str | None:
    """``builtin:<path>`` -> the absolute path under the package's ``weights/`` folder; anything else unchanged.

    Raises:
        ModelLoadError: the shipped path does not exist (e.g. weights/toy was not installed or not yet trained).
    """
    if not isinstance(value, str) or not value.startswith(BUILTIN_PREFIX):
        return value
    rest = value[len(BUILTIN_PREFIX) :].strip("/")
    path = TOY_WEIGHTS_DIR.parent / rest
    if not rest or ".." in Path(rest).parts or not path.exists():
        raise ModelLoadError(
            f"{value!r} names shipped weights that are not in this install ({path}); the toy base models are "
            f"rebuilt by `l2i-train --preset toy-base --output {TOY_WEIGHTS_DIR}` (see docs/TOY_WORLD.md)"
        )
    return str(path)


#: Subfolder of a diffusers folder -> the file(s) in it that must exist (any one of a tuple).
COMPONENT_SUBFOLDERS: dict[str, tuple[str, ...]] = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("vocab.json", "tokenizer.json"),
    "scheduler": ("scheduler_config.json",),
}

#: File name endings accepted as single-file checkpoints. The container itself is recognised from the file's first
#: bytes (`layout2image.weights.safe_load.sniff_file_format`); the ending only catches a wrong file passed by mistake.
SINGLE_FILE_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth")

_UNET = "model.diffusion_model."
_VAE = "first_stage_model."
_TEXT = "cond_stage_model.transformer."

#: Keys every SD 1.5 single file (original ldm layout) has, by part.
SD15_SIGNATURE_KEYS: dict[str, tuple[str, ...]] = {
    "unet": (f"{_UNET}input_blocks.0.0.weight", f"{_UNET}out.2.weight"),
    "vae": (f"{_VAE}encoder.conv_in.weight", f"{_VAE}decoder.conv_out.weight"),
    "text_encoder": (
        f"{_TEXT}text_model.embeddings.token_embedding.weight",
        f"{_TEXT}text_model.embeddings.position_embedding.weight",
    ),
}

_DTYPE_NAMES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class _DropEmptyFp32Warning(logging.Filter):
    """Drop diffusers' "modules that should be kept in float32: []" warning, which any ``.to(dtype)`` gives."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@contextlib.contextmanager
def _quiet_dtype_casts() -> Iterator[None]:
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    quiet = _DropEmptyFp32Warning()
    diffusers_logger.addFilter(quiet)
    try:
        yield
    finally:
        diffusers_logger.removeFilter(quiet)


class ModelLoadError(ValueError):
    """The base model cannot be loaded from what was given; the message names the path, the problem and the fix."""


@dataclass
class ModelBundle:
    """The frozen SD 1.5 parts, all with ``requires_grad=False``, in eval mode, on one device and dtype.

    Shapes for SD 1.5 at an image size of ``H x W`` (multiples of 8); ``h = H / f``, ``w = W / f`` with
    ``f = vae_scale_factor`` (8 for SD 1.5):

    * ``tokenizer(prompts, padding="max_length", max_length=77, truncation=True)``: ``input_ids`` ``(B, 77)``
      int64, ``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407 (also the padding id).
    * ``text_encoder(input_ids).last_hidden_state``: ``(B, 77, D)`` in ``dtype``; ``D`` = 768
      (``unet.config.cross_attention_dim``).
    * ``vae.encode(images).latent_dist``: images ``(B, 3, H, W)`` in [-1, 1]; a sample times ``scaling_factor``
      (0.18215) gives the latents ``(B, 4, h, w)`` the UNet works on. ``vae.decode(latents / scaling_factor)``
      goes back to ``(B, 3, H, W)``, roughly in [-1, 1].
    * ``unet(noisy_latents, timesteps, encoder_hidden_states).sample``: ``(B, 4, h, w)`` ε prediction
      (``noise_scheduler.config.prediction_type``, ``"epsilon"`` for SD 1.5) for latents ``(B, 4, h, w)``,
      timesteps ``(B,)`` int64 in ``[0, 1000)`` and text states ``(B, 77, D)``.
    * ``noise_scheduler``: a `DDIMScheduler` built from the model's scheduler config (SD 1.5: scaled_linear
      β 0.00085-0.012, 1000 steps, ``set_alpha_to_one=False``, ``steps_offset=1``). Training uses ``add_noise``,
      ``get_velocity`` and ``alphas_cumprod``; its DDIM config is what `layout2image.core.ddim` reads.

    Args:
        unet (`UNet2DConditionModel`): the frozen denoiser.
        vae (`AutoencoderKL`): the frozen autoencoder.
        text_encoder (`CLIPTextModel`): the frozen CLIP ViT-L/14 text tower.
        tokenizer (`CLIPTokenizer`): the CLIP BPE tokenizer (``model_max_length`` 77).
        noise_scheduler (`DDIMScheduler`): the training noise schedule.
        source (`str`): the folder, file or Hub id the weights came from.
        source_kind (`str`): ``"diffusers_folder"``, ``"single_file"`` or ``"hub"``.
        config_dir (`str`): where the configs and the tokenizer came from (``source`` except for single files).
        device (`torch.device`): where every part lives.
        dtype (`torch.dtype`): the dtype of every frozen weight (float32 unless on CUDA).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDIMScheduler
    source: str
    source_kind: str
    config_dir: str
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD 1.5)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        """The factor latents are multiplied by after ``vae.encode`` (0.18215 for SD 1.5)."""
        return float(self.vae.config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        """Channels of the UNet's input (4 for SD 1.5)."""
        return int(self.unet.config.in_channels)

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """The three frozen networks by name (``"unet"``, ``"vae"``, ``"text_encoder"``)."""
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per frozen network (SD 1.5: UNet 859,520,964; VAE 83,653,863; text 123,060,480)."""
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.frozen_modules().items()}


def resolve_frozen_dtype(dtype: torch.dtype | str | None, device: str | torch.device) -> torch.dtype:
    """The dtype frozen weights get on ``device``: half precision only on CUDA, float32 everywhere else.

    Args:
        dtype (`torch.dtype`, `str` or `None`): ``torch.float32``/``float16``/``bfloat16``, one of ``"fp32"``,
            ``"fp16"``, ``"bf16"`` (and their long names), or ``None``/``"auto"``: bfloat16 on CUDA devices that
            support it, float16 on older CUDA devices, float32 elsewhere.
        device (`str` or `torch.device`): where the models will run.

    Returns:
        `torch.dtype`: the dtype to use. A half dtype asked for on a non-CUDA device gives float32 and a warning.

    Raises:
        ModelLoadError: an unknown dtype name or a dtype other than the three above.
    """
    device = torch.device(device)
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in _DTYPE_NAMES:
            raise ModelLoadError(f"dtype={dtype!r} is not a known precision; expected one of {sorted(_DTYPE_NAMES)}")
        dtype = _DTYPE_NAMES[key]
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ModelLoadError(
            f"dtype={dtype} is not supported for the frozen weights; use torch.float32, torch.float16 or torch.bfloat16"
        )
    if dtype != torch.float32 and device.type != "cuda":
        logger.warning(
            "dtype=%s asked for on device %s: frozen weights are half precision on CUDA only, using torch.float32 "
            "(half precision is much slower than float32 on CPU)",
            dtype,
            device,
        )
        return torch.float32
    return dtype


def load_base_models(
    source: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    config_dir: str | os.PathLike | None = None,
    local_files_only: bool = True,
    use_ema_weights: bool = True,
    gradient_checkpointing_unet: bool = False,
    gradient_checkpointing_vae: bool = False,
) -> ModelBundle:
    """Load the frozen SD 1.5 UNet, VAE, text encoder, tokenizer and noise scheduler.

    Args:
        source (`str` or `os.PathLike`): a diffusers folder, a single-file checkpoint (``.safetensors``, ``.ckpt``,
            ``.pt``, ``.pth``; SD 1.5 ldm layout) or, with ``local_files_only=False``, a Hugging Face Hub id.
        device (`str` or `torch.device`, defaults to `"cpu"`): where the models are put.
        dtype (`torch.dtype`, `str` or `None`, defaults to `None`): precision of the frozen weights; see
            `resolve_frozen_dtype` (half precision on CUDA only; ``None`` picks bf16/fp16 on CUDA, fp32 elsewhere).
        config_dir (`str` or `os.PathLike`, *optional*): for single files, the local folder with the component
            configs and the tokenizer (defaults to the shipped `SD15_CONFIG_DIR`). Ignored for folders and Hub ids.
        local_files_only (`bool`, defaults to `True`): never touch the network. Set to `False` only to download a
            Hub id; local folders and files never need it.
        use_ema_weights (`bool`, defaults to `True`): for single files holding both EMA (``model_ema.*``) and
            non-EMA UNet weights, take the EMA ones (what inference uses; ``*-emaonly`` files hold only those).
        gradient_checkpointing_unet (`bool`, defaults to `False`): recompute UNet block activations in the backward
            pass (the UNet is frozen, but gradients flow through it to ControlNet residuals or LoRA/SPADE weights).
            diffusers checks ``torch.is_grad_enabled()``, not ``training``, so it works in eval mode.
        gradient_checkpointing_vae (`bool`, defaults to `False`): the same for the VAE, for losses on decoded x0.

    Returns:
        `ModelBundle`: every part frozen (``requires_grad_(False)``), in eval mode, on ``device`` in the resolved
        dtype, with SDPA attention.

    Raises:
        ModelLoadError: a missing path, a folder lacking a component subfolder (named), a file with an unknown
            ending, a file that is not an SD 1.5 checkpoint (the missing signature keys are named), or parts that do
            not fit together.
        layout2image.weights.safe_load.WeightsFileError: a truncated, corrupt or unsafe (pickled code) weight file.
    """
    device = torch.device(device)
    frozen_dtype = resolve_frozen_dtype(dtype, device)
    with _quiet_dtype_casts():
        bundle = _load(source, device, frozen_dtype, config_dir, local_files_only, use_ema_weights)
    _finish(bundle, gradient_checkpointing_unet, gradient_checkpointing_vae)
    counts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in bundle.parameter_counts().items())
    logger.info(
        "loaded base model from %s (%s): %s parameters, %s on %s",
        source,
        bundle.source_kind,
        counts,
        bundle.dtype,
        bundle.device,
    )
    return bundle


def _load(source, device, frozen_dtype, config_dir, local_files_only, use_ema_weights) -> ModelBundle:
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        _check_diffusers_folder(path, role="source")
        parts = _load_from_pretrained(str(path.resolve()), frozen_dtype, local_files_only=True)
        kind, cfg = "diffusers_folder", str(path.resolve())
    elif path.is_file():
        cfg_path = Path(os.fspath(config_dir)).expanduser() if config_dir is not None else SD15_CONFIG_DIR
        parts = _load_single_file(path, cfg_path, frozen_dtype, use_ema_weights=use_ema_weights)
        kind, cfg = "single_file", str(cfg_path.resolve())
    elif not local_files_only and _HUB_ID.match(os.fspath(source)):
        logger.info("%s is not a local path: downloading it from the Hugging Face Hub", source)
        parts = _load_from_pretrained(os.fspath(source), frozen_dtype, local_files_only=False)
        kind, cfg = "hub", os.fspath(source)
    else:
        hint = ""
        if _HUB_ID.match(os.fspath(source)):
            hint = " If you meant a Hugging Face Hub id, pass local_files_only=False (needs network)."
        raise ModelLoadError(
            f"model source {os.fspath(source)!r} does not exist: give a local diffusers folder (model_index.json, "
            "unet/, vae/, text_encoder/, tokenizer/, scheduler/) or an SD 1.5 single-file checkpoint "
            f"({', '.join(SINGLE_FILE_EXTENSIONS)}).{hint}"
        )
    unet, vae, text_encoder, tokenizer, scheduler = parts
    _check_compatible(unet, vae, text_encoder, os.fspath(source))
    return ModelBundle(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=scheduler,
        source=os.fspath(source),
        source_kind=kind,
        config_dir=cfg,
        device=device,
        dtype=frozen_dtype,
    )


# --------------------------------------------------------------------------------------------------------------------
# folders and Hub ids
# --------------------------------------------------------------------------------------------------------------------


def _check_diffusers_folder(folder: Path, *, role: str) -> None:
    """Raise unless ``folder`` has every component subfolder with its config (weights are not required)."""
    missing = [name for name in COMPONENT_SUBFOLDERS if not (folder / name).is_dir()]
    if len(missing) == len(COMPONENT_SUBFOLDERS):
        files = sorted(p.name for p in folder.iterdir() if p.suffix in SINGLE_FILE_EXTENSIONS)
        hint = f" It holds {files}: pass that file itself to load a single-file checkpoint." if files else ""
        raise ModelLoadError(
            f"{role} folder {str(folder)!r} is not a diffusers model folder: it has none of the subfolders "
            f"{list(COMPONENT_SUBFOLDERS)} (and {'a' if (folder / 'model_index.json').is_file() else 'no'} "
            f"model_index.json).{hint}"
        )
    if missing:
        raise ModelLoadError(
            f"{role} folder {str(folder)!r} lacks the subfolder(s) {missing}; a diffusers SD 1.5 folder needs "
            f"{list(COMPONENT_SUBFOLDERS)}. Copy the missing part(s) from the original model "
            f"(the shipped {str(SD15_CONFIG_DIR)!r} has their configs)."
        )
    for name, files in COMPONENT_SUBFOLDERS.items():
        if not any((folder / name / f).is_file() for f in files):
            raise ModelLoadError(
                f"{role} folder {str(folder)!r}: subfolder {name!r} has no {' or '.join(files)}; it is incomplete"
            )


def _load_from_pretrained(where: str, dtype: torch.dtype, *, local_files_only: bool) -> tuple:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    kwargs = {"local_files_only": local_files_only}
    unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", torch_dtype=dtype, **kwargs)
    vae = AutoencoderKL.from_pretrained(where, subfolder="vae", torch_dtype=dtype, **kwargs)
    # transformers 5 loads in the file's dtype by default: cast explicitly in _finish.
    text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", attn_implementation="sdpa", **kwargs)
    tokenizer, scheduler = _load_tokenizer_and_scheduler(where, local_files_only=local_files_only)
    return unet, vae, text_encoder, tokenizer, scheduler


def _load_tokenizer_and_scheduler(where: str, *, local_files_only: bool) -> tuple:
    from diffusers import DDIMScheduler
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", local_files_only=local_files_only)
    # DDIMScheduler.from_config keeps set_alpha_to_one/steps_offset whatever class the folder names (PNDM for SD 1.5).
    config = DDIMScheduler.load_config(where, subfolder="scheduler", local_files_only=local_files_only)
    scheduler = DDIMScheduler.from_config(config)
    return tokenizer, scheduler


# --------------------------------------------------------------------------------------------------------------------
# single files
# --------------------------------------------------------------------------------------------------------------------


def _read_checkpoint(path: Path, config_dir: Path) -> dict[str, torch.Tensor]:
    """Read an SD 1.5 single file once, after checking its keys (from the header alone for safetensors)."""
    from ..weights.safe_load import load_safetensors, load_torch_file, read_safetensors_header, sniff_file_format

    if path.suffix.lower() not in SINGLE_FILE_EXTENSIONS:
        raise ModelLoadError(
            f"{str(path)!r} has the ending {path.suffix or '(none)'!r}, which is not a checkpoint this loader reads; "
            f"give an SD 1.5 single file ({', '.join(SINGLE_FILE_EXTENSIONS)}) or a diffusers folder"
        )
    container = sniff_file_format(path)
    if container == "safetensors":
        header = read_safetensors_header(path)
        check_sd15_checkpoint_keys({k: v.shape for k, v in header.tensors.items()}, config_dir, source=str(path))
        return load_safetensors(path).state_dict
    loaded: Any = load_torch_file(path)
    while isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]  # Lightning checkpoints keep the weights under "state_dict"
    if not isinstance(loaded, Mapping):
        raise ModelLoadError(f"{str(path)!r} holds a {type(loaded).__name__}, not a state dict of tensors")
    state_dict = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    check_sd15_checkpoint_keys({k: v.shape for k, v in state_dict.items()}, config_dir, source=str(path))
    return state_dict


def _describe_other_format(keys: list[str]) -> str:
    """What a file without the SD 1.5 signature looks like, for the error message."""

    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    if has("conditioner.embedders."):
        return "an SDXL checkpoint (conditioner.embedders.*); layout2image trains on SD 1.5 only"
    if has("cond_stage_model.model."):
        return "an SD 2.x checkpoint (OpenCLIP text encoder under cond_stage_model.model.*)"
    if has("control_model.") or has("input_hint_block.") or has("controlnet_cond_embedding."):
        return "a ControlNet, not a base model"
    if has("lora_unet_") or has("lora_te") or has(".lora_down.") or has(".lora_A."):
        return "a LoRA, not a base model"
    if has("down_blocks.0.resnets.0.conv1.weight") and has("conv_in.weight"):
        return "a single diffusers-layout component; load its diffusers folder instead"
    if has("encoder.conv_in.weight") and has("decoder.conv_out.weight"):
        return "a standalone VAE"
    if has(_UNET):
        return "an ldm checkpoint that lacks some parts (e.g. a UNet-only file)"
    else:
        return "no format layout2image knows"


def check_sd15_checkpoint_keys(
    shapes: Mapping[str, tuple[int, ...] | torch.Size], config_dir: str | os.PathLike, *, source: str = "checkpoint"
) -> None:
    """Check that a state dict is an SD 1.5 single file in the original (ldm) layout that fits ``config_dir``.

    Args:
        shapes (`Mapping[str, tuple[int, ...]]`): key -> tensor shape of the whole file (a header is enough).
        config_dir (`str` or `os.PathLike`): the component configs the file will be loaded with.
        source (`str`, defaults to `"checkpoint"`): the file name, for messages.

    Raises:
        ModelLoadError: signature keys missing (named, with a guess at what the file is instead), or shapes that
            do not fit the configs (named with both shapes).
    """
    keys = list(shapes)
    missing = [k for part in SD15_SIGNATURE_KEYS.values() for k in part if k not in shapes]
    if missing:
        raise ModelLoadError(
            f"{source!r} is not a Stable Diffusion 1.5 checkpoint in the original (ldm) layout: it lacks the "
            f"signature key(s) {missing}. It looks like {_describe_other_format(keys)} ({len(keys)} keys, e.g. "
            f"{keys[:3]}). Expected UNet keys {_UNET}*, VAE keys {_VAE}* and CLIP text keys {_TEXT}text_model.*; "
            "for a diffusers-layout model give its folder instead"
        )
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    cfg_dir = str(Path(config_dir).resolve())
    unet = UNet2DConditionModel.load_config(cfg_dir, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.load_config(cfg_dir, subfolder="vae", local_files_only=True)
    text = CLIPTextConfig.from_pretrained(cfg_dir, subfolder="text_encoder", local_files_only=True)
    c0, v0 = unet["block_out_channels"][0], vae["block_out_channels"][0]
    expected = {
        f"{_UNET}input_blocks.0.0.weight": (c0, unet["in_channels"], 3, 3),
        f"{_UNET}out.2.weight": (unet["out_channels"], c0, 3, 3),
        f"{_VAE}encoder.conv_in.weight": (v0, vae["in_channels"], 3, 3),
        f"{_VAE}decoder.conv_out.weight": (vae["out_channels"], v0, 3, 3),
        f"{_TEXT}text_model.embeddings.token_embedding.weight": (text.vocab_size, text.hidden_size),
        f"{_TEXT}text_model.embeddings.position_embedding.weight": (text.max_position_embeddings, text.hidden_size),
    }
    wrong = [f"{k}: {tuple(shapes[k])} (config: {v})" for k, v in expected.items() if tuple(shapes[k]) != v]
    to_k = next((k for k in keys if k.startswith(_UNET) and k.endswith(".attn2.to_k.weight")), None)
    if to_k is None:
        wrong.append(f"no cross-attention key {_UNET}*.attn2.to_k.weight")
    elif tuple(shapes[to_k])[-1] != unet["cross_attention_dim"]:
        wrong.append(
            f"{to_k}: text width {tuple(shapes[to_k])[-1]} (config cross_attention_dim: {unet['cross_attention_dim']}; "
            "SD 2.x uses 1024, SD 1.5 768)"
        )
    if wrong:
        raise ModelLoadError(
            f"{source!r} has the SD 1.5 key layout but does not fit the configs in {cfg_dir!r}: "
            + "; ".join(wrong)
            + ". Pass config_dir= a folder whose unet/vae/text_encoder configs match this checkpoint"
        )


def _text_encoder_from_ldm(state_dict: Mapping[str, torch.Tensor], config_dir: str) -> CLIPTextModel:
    """Build the CLIP text encoder from ``cond_stage_model.transformer.*`` keys (a prefix rename, checked strictly)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder", local_files_only=True)
    config._attn_implementation = "sdpa"
    with init_empty_weights():  # parameters on the meta device; the non-persistent position_ids buffer stays real
        model = CLIPTextModel(config)
    wanted = set(model.state_dict())
    # transformers >= 5.6 dropped the ``text_model.`` level of CLIPTextModel; older versions keep it.
    nested = any(k.startswith("text_model.") for k in wanted)
    weights = {}
    for key, value in state_dict.items():
        if not key.startswith(_TEXT) or key.endswith("position_ids"):
            continue
        name = key[len(_TEXT) :]
        weights[name if nested else name.removeprefix("text_model.")] = value
    missing = sorted(wanted - weights.keys())
    if missing:
        raise ModelLoadError(
            f"the checkpoint's text encoder lacks {len(missing)} weight(s) the config in {config_dir!r} needs, e.g. "
            f"{[_TEXT + ('' if nested else 'text_model.') + k for k in missing[:5]]}"
        )
    unexpected = sorted(weights.keys() - wanted)
    if unexpected:
        logger.warning("ignoring %d text-encoder key(s) the model does not use: %s", len(unexpected), unexpected[:5])
    model.load_state_dict({k: weights[k] for k in wanted}, strict=True, assign=True)
    return model


def _converted_and_checked(cls, subfolder: str, state_dict, config_dir: str, convert, **kwargs) -> dict:
    """Convert ldm keys to diffusers keys with diffusers' own converter, and check them against the config.

    diffusers' ``from_single_file`` leaves parameters a file lacks on the meta device and then fails with "Cannot
    copy out of meta tensor", naming nothing; checking here names the missing weights.
    """
    from accelerate import init_empty_weights

    config = cls.load_config(config_dir, subfolder=subfolder, local_files_only=True)
    converted = {k: v for k, v in convert(state_dict, config=config, **kwargs).items() if v is not None}
    with init_empty_weights():
        wanted = set(cls.from_config(config).state_dict())
    missing = sorted(wanted - converted.keys())
    if missing:
        raise ModelLoadError(
            f"the checkpoint's {subfolder} weights are incomplete: {len(missing)} parameter(s) the config in "
            f"{config_dir!r} needs are missing after conversion, e.g. {missing[:5]} (diffusers names); the file is "
            "pruned too far or is not the model the configs describe"
        )
    unexpected = sorted(converted.keys() - wanted)
    if unexpected:
        logger.warning("ignoring %d %s key(s) the model does not use: %s", len(unexpected), subfolder, unexpected[:5])
    return {k: converted[k] for k in wanted}


def _load_single_file(path: Path, config_dir: Path, dtype: torch.dtype, *, use_ema_weights: bool) -> tuple:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    if not config_dir.is_dir():
        # Never let diffusers see a non-folder string as ``config``: it would take it for a Hub repo id.
        raise ModelLoadError(
            f"config_dir {str(config_dir)!r} is not a folder; single-file loading needs a local folder with the "
            f"component configs and tokenizer (the shipped one is {str(SD15_CONFIG_DIR)!r})"
        )
    _check_diffusers_folder(config_dir, role="config_dir")
    cfg = str(config_dir.resolve())
    state_dict = _read_checkpoint(path, config_dir)
    unet_sd = _converted_and_checked(
        UNet2DConditionModel, "unet", state_dict, cfg, convert_ldm_unet_checkpoint, extract_ema=use_ema_weights
    )
    vae_sd = _converted_and_checked(AutoencoderKL, "vae", state_dict, cfg, convert_ldm_vae_checkpoint)
    # Already in diffusers layout with exactly the model's keys, so from_single_file loads them as they are; it
    # reads only the local config folder (a directory path, local_files_only=True): no Hub call is made.
    common = {"config": cfg, "local_files_only": True, "torch_dtype": dtype}
    unet = UNet2DConditionModel.from_single_file(unet_sd, subfolder="unet", **common)
    vae = AutoencoderKL.from_single_file(vae_sd, subfolder="vae", **common)
    text_encoder = _text_encoder_from_ldm(state_dict, cfg)
    tokenizer, scheduler = _load_tokenizer_and_scheduler(cfg, local_files_only=True)
    return unet, vae, text_encoder, tokenizer, scheduler


# --------------------------------------------------------------------------------------------------------------------
# common
# --------------------------------------------------------------------------------------------------------------------


def _check_compatible(unet, vae, text_encoder, source: str) -> None:
    width, cross = text_encoder.config.hidden_size, unet.config.cross_attention_dim
    if width != cross:
        raise ModelLoadError(
            f"{source!r}: the text encoder's width {width} does not match the UNet's cross_attention_dim {cross}; "
            "this is not an SD 1.5 model (SD 2.x and SDXL are not supported)"
        )
    if vae.config.latent_channels != unet.config.in_channels:
        raise ModelLoadError(
            f"{source!r}: the VAE has {vae.config.latent_channels} latent channels but the UNet takes "
            f"{unet.config.in_channels}; inpainting and other variant UNets are not supported"
        )


def _finish(bundle: ModelBundle, ckpt_unet: bool, ckpt_vae: bool) -> None:
    """Freeze, cast, move, switch to SDPA attention and eval mode; enable the requested checkpointing."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet, vae, text_encoder = bundle.unet, bundle.vae, bundle.text_encoder
    with _quiet_dtype_casts():
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False)
            if any(p.dtype != bundle.dtype for p in module.parameters()):
                module.to(dtype=bundle.dtype)
            module.to(bundle.device)
            module.eval()
    unet.set_attn_processor(AttnProcessor2_0())
    vae.set_attn_processor(AttnProcessor2_0())
    if getattr(text_encoder.config, "_attn_implementation", "sdpa") != "sdpa":
        if hasattr(text_encoder, "set_attn_implementation"):
            text_encoder.set_attn_implementation("sdpa")
        else:
            logger.warning("this transformers version cannot switch the text encoder to SDPA attention")
    if ckpt_unet:
        unet.enable_gradient_checkpointing()
    if ckpt_vae:
        vae.enable_gradient_checkpointing()
