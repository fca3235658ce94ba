"""`LayoutPipeline`: label maps + prompts -> images, from a base model and a layout adapter on local paths.

::

    from layout2image.pipelines import LayoutPipeline

    pipe = LayoutPipeline.from_pretrained("builtin:toy", adapter="l2i_demo/run/export", scheduler="dpm-solver++")
    out = pipe(label_map, "a city street at night with two cars", num_inference_steps=20, seed=0)
    out.images[0].save("night.png")

Base models (loaded by `layout2image.trainer.models.load_base_models`): a diffusers folder, a single SD 1.x file
(``.safetensors``/``.ckpt``), or ``builtin:toy`` (the shipped toy world). Adapters (`resolve_adapter`):

==========================================  =======================================================================
adapter path                                what is loaded
==========================================  =======================================================================
an export folder (``<run>/export``)         what its ``manifest.json`` names: ``controlnet.safetensors`` (else the
                                            ``controlnet/`` folder) or ``sdm_lora.safetensors``
a ControlNet file or diffusers folder       palette RGB, one-hot (+ edges) or ALDM-native; the ALDM-native hint
                                            needs its class-embedding table ``<name>.table.safetensors`` beside it
an SDM-LoRA file                            the LoRA with its SPADE companion ``<name>.spade.safetensors`` beside it
                                            (and ``sdm_lora.table.safetensors`` for the ``embedding`` layout)
==========================================  =======================================================================

The label set comes from the adapter's metadata; ``label_set=`` is needed only for third-party files without it,
and must match when both are there (`PipelineError` names both). Sampling is `layout2image.core.sampling`: text
guidance ``guidance_scale``, layout guidance ``layout_guidance_scale`` (1 = off), any diffusers scheduler by name
(`layout2image.core.sampling.make_scheduler`), and one seed per image: image ``i`` depends on its seed, label
map and prompt only, not on the batch it was sampled in (up to float rounding of batched kernels).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.labels import LabelSet, load_label_set, read_label_map
from ..core.logging import get_logger
from ..core.sampling import ControlInput, decode_to_images, encode_prompts, make_scheduler, sample_latents

__all__ = ["AdapterFiles", "LayoutPipeline", "LayoutPipelineOutput", "PipelineError", "resolve_adapter"]

logger = get_logger(__name__)

#: Seeds drawn when none is given lie in [0, 2**31 - 1), so every recorded seed fits a JSON/int32 field.
_MAX_SEED = 2**31 - 1


class PipelineError(ValueError):
    """What was given cannot build or run the pipeline; the message names the input and the fix."""


@dataclass(frozen=True)
class AdapterFiles:
    """The files of one adapter, found by `resolve_adapter`.

    Args:
        kind (`str`): ``"controlnet"`` or ``"sdm_lora"``.
        path (`Path`): the ControlNet file or folder, or the SDM-LoRA's LoRA file.
        companions (`tuple[Path, ...]`): other files read with it (SPADE companion, class-embedding table).
    """

    kind: str
    path: Path
    companions: tuple[Path, ...] = ()

    @property
    def all_files(self) -> tuple[Path, ...]:
        return (self.path, *self.companions)


def resolve_adapter(path: str | os.PathLike) -> AdapterFiles:
    """Find the adapter files behind ``path`` (an export folder, a ControlNet file/folder, or an SDM-LoRA file).

    Raises:
        PipelineError: the path does not exist, or is a folder that is neither an export nor a ControlNet folder,
            or an export of a kind the pipeline does not load yet (T2I-Adapter).
    """
    from ..weights.aldm_import import table_path_for
    from ..weights.spade_file import spade_path_for

    path = Path(os.fspath(path)).expanduser()
    if not path.exists():
        raise PipelineError(
            f"adapter {str(path)!r} does not exist; give an export folder, a ControlNet or an SDM-LoRA"
        )
    if path.is_dir() and (path / "manifest.json").is_file() and not (path / "config.json").is_file():
        try:
            mode = json.loads((path / "manifest.json").read_text(encoding="utf-8")).get("mode")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise PipelineError(f"cannot read {str(path / 'manifest.json')!r}: {e}") from None
        if mode == "controlnet":
            single = path / "controlnet.safetensors"
            path = single if single.is_file() else path / "controlnet"
        elif mode == "sdm_lora":
            path = path / "sdm_lora.safetensors"
        else:
            raise PipelineError(
                f"export folder {str(path)!r} holds a {mode!r} adapter; the pipeline loads ControlNets and SDM-LoRAs "
                "(T2I-Adapters are not supported yet)"
            )
        if not path.exists():
            raise PipelineError(f"the export's manifest names {str(path)!r}, which is missing")
    elif path.is_dir() and not (path / "config.json").is_file():
        raise PipelineError(
            f"adapter folder {str(path)!r} has neither manifest.json (an export folder) nor config.json (a diffusers "
            "ControlNet folder)"
        )
    if path.is_file() and spade_path_for(path).is_file():
        return AdapterFiles("sdm_lora", path, (spade_path_for(path),))
    table = table_path_for(path)
    return AdapterFiles("controlnet", path, (table,) if table.is_file() else ())


def _pick_label_set(
    from_adapter: LabelSet | None, given: LabelSet | str | os.PathLike | None, source: str
) -> LabelSet:
    given_set = None if given is None else (given if isinstance(given, LabelSet) else load_label_set(given))
    if from_adapter is None and given_set is None:
        raise PipelineError(
            f"{source} records no label set (a third-party file); pass label_set= (a built-in name or a YAML file)"
        )
    if from_adapter is not None and given_set is not None and from_adapter.fingerprint() != given_set.fingerprint():
        from ..weights.metadata import describe_label_set

        raise PipelineError(
            f"label set mismatch: the adapter {source} was trained on {describe_label_set(from_adapter)}, but "
            f"{describe_label_set(given_set)} was given; use the adapter's label set (or an adapter trained on yours)"
        )
    return from_adapter if from_adapter is not None else given_set


@dataclass
class LayoutPipelineOutput:
    """What a `LayoutPipeline` call returns.

    Args:
        images (`list[PIL.Image.Image]` or `torch.Tensor`): RGB images (``output_type="pil"``), or `(B, 3, H, W)`
            float in [0, 1] on the CPU (``output_type="pt"``).
        seeds (`list[int]`): the noise seed of each image.
        prompts (`list[str]`): the prompt of each image.
    """

    images: Any
    seeds: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)


class LayoutPipeline:
    """Label maps + prompts -> images with a frozen base model and one layout adapter (see the module docstring).

    Build it with `from_pretrained`; the constructor takes ready modules.

    Args:
        bundle (`ModelBundle`): the base model's parts (`layout2image.trainer.models`).
        label_set (`LabelSet`): the classes the adapter reads.
        controlnet (*optional*): a ControlNet on the bundle's device and dtype; with ``hint_spec`` (and ``table``
            for the ALDM-native hint).
        spade_encoding (`str`, *optional*): ``"onehot"`` or ``"embedding"`` when the UNet carries an SDM-LoRA.
        table (`torch.Tensor`, *optional*): `(N + 1, D)` class-embedding table (ALDM-native hint, SPADE embedding).
        scheduler (`str`, defaults to ``"ddim"``): the default scheduler name (see `make_scheduler`).
        adapter_files (`AdapterFiles`, *optional*): recorded in `model_files`.
    """

    def __init__(
        self,
        bundle,
        label_set: LabelSet,
        *,
        controlnet=None,
        hint_spec=None,
        spade_encoding: str | None = None,
        table: torch.Tensor | None = None,
        scheduler: str = "ddim",
        adapter_files: AdapterFiles | None = None,
    ) -> None:
        if (controlnet is None) == (spade_encoding is None):
            raise PipelineError("a LayoutPipeline needs exactly one adapter: a ControlNet or an SDM-LoRA")
        if controlnet is not None and hint_spec is None:
            raise PipelineError("a ControlNet needs its hint_spec (layout2image.core.controlnet.hint_spec_for)")
        self.bundle = bundle
        self.label_set = label_set
        self.controlnet = controlnet
        self.hint_spec = hint_spec
        self.spade_encoding = spade_encoding
        self.table = None if table is None else table.to(bundle.device, torch.float32)
        make_scheduler(scheduler, bundle.noise_scheduler.config)  # an unknown name fails here, not mid-run
        self.scheduler = scheduler
        self.adapter_files = adapter_files

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        adapter: str | os.PathLike,
        *,
        label_set: LabelSet | str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype | str | None = None,
        scheduler: str = "ddim",
        config_dir: str | os.PathLike | None = None,
    ) -> LayoutPipeline:
        """Load a base model and an adapter from local paths.

        Args:
            base (`str` or `os.PathLike`): a diffusers folder, a single SD 1.x file, or ``builtin:toy``.
            adapter (`str` or `os.PathLike`): an export folder, a ControlNet file/folder or an SDM-LoRA file.
            label_set (*optional*): a `LabelSet`, built-in name or file; needed only when the adapter has no metadata.
            device, torch_dtype: where and in which precision the frozen weights go (half precision on CUDA only).
            scheduler (`str`, defaults to ``"ddim"``): the default scheduler (a call may pick another).
            config_dir (*optional*): configs + tokenizer for a single-file base (default: the shipped SD 1.5 ones).

        Raises:
            PipelineError: no such adapter, a label set mismatch or none known, a missing table.
            ModelLoadError, WeightsError, MetadataError: the base or adapter files are not what they claim
                (all `ValueError`s, with the file named).
        """
        from ..trainer.models import load_base_models, resolve_builtin_path

        files = resolve_adapter(adapter)
        bundle = load_base_models(
            resolve_builtin_path(os.fspath(base)), device=device, dtype=torch_dtype, config_dir=config_dir
        )
        if files.kind == "controlnet":
            return cls._with_controlnet(bundle, files, label_set, scheduler)
        return cls._with_sdm_lora(bundle, files, label_set, scheduler)

    @classmethod
    def _with_controlnet(cls, bundle, files: AdapterFiles, label_set, scheduler: str) -> LayoutPipeline:
        from ..core.controlnet import hint_spec_for
        from ..weights.aldm_import import load_class_embedding_table, table_path_for
        from ..weights.controlnet import controlnet_from_file, load_controlnet_file

        source = repr(str(files.path))
        metadata = load_controlnet_file(files.path).metadata
        ls = _pick_label_set(None if metadata is None else metadata.label_set, label_set, source)
        model = controlnet_from_file(files.path, label_set=ls if metadata is not None else None)
        encoding = None if metadata is None else metadata.hint_encoding
        kind = {"onehot_edges": "onehot"}.get(encoding, encoding)
        spec = hint_spec_for(model, ls, kind=kind)
        table = None
        if spec.kind == "embedding":
            path = table_path_for(files.path)
            if metadata is not None and metadata.extra.get("table_file"):
                path = files.path.parent / metadata.extra["table_file"]
            if not path.is_file():
                raise PipelineError(
                    f"the ALDM-native ControlNet {source} needs its class-embedding table {str(path)!r}, which is "
                    "missing; put it beside the ControlNet"
                )
            table = load_class_embedding_table(path, ls).table
            files = AdapterFiles(files.kind, files.path, (path,))
        model = model.to(bundle.device)
        if bundle.dtype != torch.float32:  # a no-op cast would only make diffusers warn
            model = model.to(bundle.dtype)
        model = model.eval().requires_grad_(False)
        return cls(bundle, ls, controlnet=model, hint_spec=spec, table=table, scheduler=scheduler, adapter_files=files)

    @classmethod
    def _with_sdm_lora(cls, bundle, files: AdapterFiles, label_set, scheduler: str) -> LayoutPipeline:
        from ..weights.aldm_import import load_class_embedding_table
        from ..weights.spade_file import load_sdm_lora, load_spade_file

        spade_path = files.companions[0]
        spade_md = load_spade_file(spade_path).metadata
        ls = _pick_label_set(spade_md.label_set, label_set, repr(str(spade_path)))
        load_sdm_lora(bundle.unet, files.path, ls)
        bundle.unet.to(bundle.device, bundle.dtype).eval().requires_grad_(False)
        encoding = spade_md.hint_encoding
        table = None
        if encoding == "embedding":
            path = spade_path.parent / spade_md.extra.get("table_file", "sdm_lora.table.safetensors")
            if not path.is_file():
                raise PipelineError(
                    f"the SDM-LoRA {str(files.path)!r} reads class embeddings: its table {str(path)!r} is missing"
                )
            table = load_class_embedding_table(path, ls).table
            files = AdapterFiles(files.kind, files.path, (*files.companions, path))
        elif encoding != "onehot":
            raise PipelineError(f"{str(spade_path)!r}: SPADE layout encoding {encoding!r} is not 'onehot'/'embedding'")
        return cls(bundle, ls, spade_encoding=encoding, table=table, scheduler=scheduler, adapter_files=files)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.bundle.device

    @property
    def dtype(self) -> torch.dtype:
        return self.bundle.dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.bundle.vae_scale_factor

    @property
    def adapter_kind(self) -> str:
        """``"controlnet"`` or ``"sdm_lora"``."""
        return "controlnet" if self.controlnet is not None else "sdm_lora"

    @property
    def model_files(self) -> list[Path]:
        """Every file or folder the weights came from: the base, then the adapter and its companions."""
        adapter = [] if self.adapter_files is None else list(self.adapter_files.all_files)
        return [Path(self.bundle.source), *adapter]

    # ------------------------------------------------------------------ inputs
    def prepare_labels(self, label_maps) -> torch.Tensor:
        """Label maps -> `(B, H, W)` int64 on the device, checked against the label set.

        Args:
            label_maps: an `(H, W)` or `(B, H, W)` integer array or tensor, a label-map file (PNG of ids or colours,
                ``.npy``), or a list of `(H, W)` arrays/files of one size.

        Raises:
            PipelineError: wrong shape or dtype, sizes that differ, or a size that is not a multiple of the VAE
                factor. `LabelMapError`: a file cannot be read or holds ids/colours outside the label set.
        """
        from ..core.hints.encoders import validate_label_tensor

        items = label_maps if isinstance(label_maps, list | tuple) else [label_maps]
        arrays = []
        for k, item in enumerate(items):
            if isinstance(item, str | os.PathLike):
                item = read_label_map(item, self.label_set).ids
            arr = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
            if arr.dtype.kind not in "iu":
                raise PipelineError(f"label map {k} has dtype {arr.dtype}; label maps hold integer class ids")
            if arr.ndim == 2:
                arr = arr[None]
            if arr.ndim != 3 or (len(items) > 1 and arr.shape[0] != 1):
                raise PipelineError(
                    f"label map {k} has shape {tuple(np.shape(item))}; expected (H, W), (B, H, W), or a list of (H, W)"
                )
            arrays.append(arr.astype(np.int64))
        sizes = sorted({a.shape[1:] for a in arrays})
        if len(sizes) != 1:
            raise PipelineError(f"label maps of one call must share a size, got {sizes}; call once per size")
        h, w = sizes[0]
        f = self.vae_scale_factor
        if h % f or w % f or h == 0 or w == 0:
            raise PipelineError(f"label map size {h}x{w} is not a multiple of the VAE factor {f}; crop or resize it")
        labels = torch.from_numpy(np.concatenate(arrays))
        validate_label_tensor(labels, self.label_set.num_classes, self.label_set.ignore_index, "label map")
        return labels.to(self.device)

    def layout_inputs(self, labels: torch.Tensor, controlnet_conditioning_scale: float = 1.0) -> dict[str, Any]:
        """``sample_latents`` keywords for `(B, H, W)` labels: ``control`` (ControlNet) or ``spade_layout``."""
        if self.controlnet is not None:
            hint = self.hint_spec.make(
                labels, self.label_set, table=self.table, vae_scale_factor=self.vae_scale_factor, dtype=self.dtype
            )
            return {"control": ControlInput(self.controlnet, hint, scale=controlnet_conditioning_scale)}
        from ..core.hints import class_embedding_hint, one_hot

        ls = self.label_set
        if self.spade_encoding == "onehot":
            layout = one_hot(labels, ls.num_classes, ls.ignore_index)
        else:
            layout = class_embedding_hint(labels, self.table, ls.ignore_index, stride=1)
        return {"spade_layout": layout.to(self.dtype)}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        label_maps,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] = "",
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        layout_guidance_scale: float = 1.0,
        controlnet_conditioning_scale: float = 1.0,
        seed: int | Sequence[int] | None = None,
        scheduler: str | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        on_step: Callable[[], None] | None = None,
    ) -> LayoutPipelineOutput:
        """Sample one image per label map.

        Args:
            label_maps: see `prepare_labels`; the images have the label maps' size.
            prompt (`str` or list): one prompt for all, or one per label map.
            negative_prompt (`str` or list, defaults to ``""``): the text-guidance baseline.
            num_inference_steps (`int`, defaults to 25): sampler steps.
            guidance_scale (`float`, defaults to 7.5): text guidance (<= 1: off).
            layout_guidance_scale (`float`, defaults to 1.0): layout guidance (1: off).
            controlnet_conditioning_scale (`float`, defaults to 1.0): ControlNet residual scale.
            seed (`int`, list or None): ``s`` gives image ``i`` the seed ``s + i``; a list gives each its own;
                None draws seeds from torch's global generator (returned in the output).
            scheduler (`str`, *optional*): a scheduler name for this call (default: the pipeline's).
            eta (`float`, defaults to 0.0): DDIM η.
            output_type (`str`, defaults to ``"pil"``): ``"pil"`` or ``"pt"``.
            on_step (*optional*): called after each sampler step.

        Returns:
            `LayoutPipelineOutput`.
        """
        if output_type not in ("pil", "pt"):
            raise PipelineError(f"output_type={output_type!r}; use 'pil' or 'pt'")
        if int(num_inference_steps) < 1:
            raise PipelineError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        labels = self.prepare_labels(label_maps)
        batch = labels.shape[0]
        prompts = _per_item(prompt, batch, "prompt")
        negatives = _per_item(negative_prompt, batch, "negative_prompt")
        if seed is None:
            seeds = torch.randint(0, _MAX_SEED, (batch,)).tolist()
        elif isinstance(seed, int | np.integer):
            seeds = [int(seed) + i for i in range(batch)]
        else:
            seeds = [int(s) for s in seed]
            if len(seeds) != batch:
                raise PipelineError(f"got {len(seeds)} seeds for {batch} label maps; pass one per label map")
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        b = self.bundle
        sched = make_scheduler(scheduler or self.scheduler, b.noise_scheduler.config)
        text = encode_prompts(b.text_encoder, b.tokenizer, prompts, device=self.device)
        negative = (
            encode_prompts(b.text_encoder, b.tokenizer, negatives, device=self.device) if guidance_scale > 1 else None
        )
        f = self.vae_scale_factor
        latents = sample_latents(
            b.unet,
            sched,
            text,
            negative,
            latent_size=(labels.shape[-2] // f, labels.shape[-1] // f),
            num_steps=int(num_inference_steps),
            guidance_scale=guidance_scale,
            layout_guidance_scale=layout_guidance_scale,
            eta=eta,
            generator=generators,
            on_step=on_step,
            **self.layout_inputs(labels, controlnet_conditioning_scale),
        )
        images = decode_to_images(b.vae, latents).float().cpu()
        if output_type == "pt":
            return LayoutPipelineOutput(images, seeds, prompts)
        return LayoutPipelineOutput(to_pil(images), seeds, prompts)


def to_pil(images: torch.Tensor) -> list:
    """`(B, 3, H, W)` float in [0, 1] -> RGB PIL images (rounded to the nearest uint8)."""
    from PIL import Image

    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


def _per_item(value: str | Sequence[str], batch: int, name: str) -> list[str]:
    if isinstance(value, str):
        return [value] * batch
    values = [str(v) for v in value]
    if len(values) != batch:
        raise PipelineError(f"got {len(values)} {name}s for {batch} label maps; pass one, or one per label map")
    return values
