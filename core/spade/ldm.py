"""SPADE on an ldm ``UNetModel`` (CompVis / ComfyUI / A1111 / Forge): site paths and an in-place GroupNorm patch.

SPADE files name their sites by diffusers path (``up_blocks.1.resnets.2.norm2``). The UIs run the ldm UNet
(``openaimodel.UNetModel``: ``input_blocks``, ``middle_block``, ``output_blocks``, ``ResBlock.in_layers`` /
``out_layers``), so

* `ldm_site_paths` maps the sites onto the ldm module tree: ``norm1`` is a ``ResBlock``'s ``in_layers.0`` and
  ``norm2`` its ``out_layers.0``; mid-block resnets are the ResBlocks of ``middle_block`` in order (0 and 2 for
  SD); up-block ``i`` resnet ``j`` is ``output_blocks[k].0`` with ``k`` counted through ``num_res_blocks + 1``
  blocks per level (``up_blocks.1.resnets.2.norm2`` -> ``output_blocks.5.0.out_layers.0`` for SD 1.5);
* `LdmSPADEPatch` rebinds the *instance* ``forward`` of each site's GroupNorm to a closure that returns
  ``spade_group_norm(x, layout, spade, ...)`` with the GroupNorm's own weight and bias: exactly core's formula,
  the state dict and the class untouched. A forward pre-hook on the UNet reads each call's timestep and switches
  the modulation on only inside the ``start``/``end`` window. ``restore`` puts everything back as it was.

ComfyUI goes through ModelPatcher injections instead (``nodes/spade.py``) but shares `ldm_site_paths`,
`SPADELayoutEncoder` and `spade_group_norm`; the A1111 extension (``a1111/``) uses `LdmSPADEPatch` directly.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..logging import get_logger
from .adapter import SPADEAdapter
from .context import expand_layout_batch
from .encoding import SPADELayoutEncoder
from .module import SPADE, spade_group_norm
from .patch import SPADEPatchError

logger = get_logger(__name__)

__all__ = [
    "LdmSPADEPatch",
    "LdmSiteError",
    "ldm_site_paths",
    "schedule_fraction",
    "tile_layout_rows",
]

_SITE_RE = re.compile(r"^(?:mid_block|up_blocks\.(\d+))\.resnets\.(\d+)\.(norm1|norm2)$")
_NORM_PATHS = {"norm1": "in_layers.0", "norm2": "out_layers.0"}
# Attribute on a patched ldm UNet holding its `LdmSPADEPatch` (plain attribute: no state-dict keys).
_STATE_ATTR = "_l2i_ldm_spade_patch"


class LdmSiteError(ValueError):
    """A SPADE site does not exist in an ldm UNet, or the module there is not a GroupNorm of the right width."""


def _is_resblock(module: nn.Module) -> bool:
    return isinstance(getattr(module, "in_layers", None), nn.Sequential) and isinstance(
        getattr(module, "out_layers", None), nn.Sequential
    )


def ldm_site_paths(diffusion_model: nn.Module, site_names: Sequence[str], prefix: str = "") -> dict[str, str]:
    """Map diffusers SPADE site names onto module paths of an ldm ``UNetModel``.

    Args:
        diffusion_model (`nn.Module`): the ldm UNet (``middle_block``, ``output_blocks`` and ``num_res_blocks`` as in
            ``openaimodel.UNetModel``): ComfyUI's ``model.get_model_object("diffusion_model")``, A1111's
            ``shared.sd_model.model.diffusion_model``.
        site_names (`Sequence[str]`): ``mid_block.resnets.K.normN`` / ``up_blocks.I.resnets.J.normN``.
        prefix (`str`, *optional*): prepended with a "." to every path (ComfyUI: ``"diffusion_model"``).

    Returns:
        `dict[str, str]`: site name -> path, e.g. ``"up_blocks.0.resnets.0.norm1"`` -> ``"output_blocks.0.0.in_layers.0"``.

    Raises:
        LdmSiteError: the model is not an SD-style ldm UNet, or a site does not exist in it.
    """
    middle = getattr(diffusion_model, "middle_block", None)
    output_blocks = getattr(diffusion_model, "output_blocks", None)
    num_res_blocks = getattr(diffusion_model, "num_res_blocks", None)
    if output_blocks is None or num_res_blocks is None:
        raise LdmSiteError(
            f"the diffusion model ({type(diffusion_model).__name__}) is not an SD-style UNet with output_blocks and "
            "num_res_blocks; SPADE supports SD 1.x/2.x-style UNets"
        )
    mid_positions = [i for i, m in enumerate(middle or []) if _is_resblock(m)]
    up_sizes = [int(n) + 1 for n in reversed(list(num_res_blocks))]
    offsets = [sum(up_sizes[:i]) for i in range(len(up_sizes))]
    paths = {}
    for name in site_names:
        m = _SITE_RE.match(name)
        if m is None:
            raise LdmSiteError(f"SPADE site {name!r} is not a decoder ResNet norm (mid_block/up_blocks resnets)")
        up, j, norm = m.group(1), int(m.group(2)), m.group(3)
        if up is None:
            if j >= len(mid_positions):
                raise LdmSiteError(
                    f"SPADE site {name!r}: the model's middle block has {len(mid_positions)} ResBlock(s)"
                )
            path = f"middle_block.{mid_positions[j]}.{_NORM_PATHS[norm]}"
        else:
            i = int(up)
            if i >= len(up_sizes) or j >= up_sizes[i]:
                raise LdmSiteError(
                    f"SPADE site {name!r} does not exist in the model (up blocks of {up_sizes} resnets); the file "
                    "belongs to another base model"
                )
            k = offsets[i] + j
            if k >= len(output_blocks) or not _is_resblock(output_blocks[k][0]):
                raise LdmSiteError(f"SPADE site {name!r}: output_blocks.{k}.0 of the model is not a ResBlock")
            path = f"output_blocks.{k}.0.{_NORM_PATHS[norm]}"
        paths[name] = f"{prefix}.{path}" if prefix else path
    return paths


def tile_layout_rows(layout: torch.Tensor, rows: int) -> torch.Tensor:
    """Lay `L` layouts over a UNet batch of ``rows`` made of whole image batches (A1111's CFG batch).

    A1111's CFG denoiser stacks the cond rows (one per image) and then the uncond rows (one per image), and with
    ``batch_cond_uncond`` off calls the UNet once per block; either way the batch is a whole number of image
    batches in image order. So one layout is broadcast to every row, and `L` layouts (one per image) are tiled
    ``[l0, l1, l0, l1]`` (``expand_layout_batch`` with one chunk per image batch).

    Args:
        layout (`torch.Tensor`): `(L, C_m, h, w)` float.
        rows (`int`): the UNet batch.

    Returns:
        `torch.Tensor`: `(rows, C_m, h, w)`.

    Raises:
        ValueError: ``rows`` is not a multiple of `L` (e.g. ``AND`` prompts with several label maps: use one map).
    """
    n = int(layout.shape[0])
    if n == 1:
        return layout.expand(rows, *layout.shape[1:])
    if rows < 1 or rows % n != 0:
        raise ValueError(
            f"the UNet batch of {rows} rows is not a whole number of image batches of {n} (one label map per image); "
            "composable prompts (AND) add rows per image: use a single label map for the whole batch"
        )
    return expand_layout_batch(layout, rows, ("layout",) * (rows // n))


def schedule_fraction(timesteps: torch.Tensor | float | None, num_timesteps: int = 1000) -> float | None:
    """How far sampling has got, from a UNet call's timestep: 0.0 at the first step (t = T - 1), 1.0 at t = 0.

    This is ComfyUI's ``start_percent``/``end_percent`` scale (``percent_to_sigma``), read from the model time,
    so it does not depend on the sampler's step count; img2img and hires passes start above 0. A batch's largest
    timestep counts.

    Returns:
        `float | None`: the fraction, or None when the call carries no timestep.
    """
    if timesteps is None:
        return None
    t = (
        float(torch.as_tensor(timesteps).detach().float().max())
        if isinstance(timesteps, torch.Tensor)
        else float(timesteps)
    )
    return min(max(1.0 - t / max(num_timesteps - 1, 1), 0.0), 1.0)


class LdmSPADEPatch:
    """SPADE-modulate the decoder GroupNorms of an ldm UNet in place, and undo it.

    Each site's GroupNorm gets an instance ``forward`` (its class, parameters and state dict stay as they are)
    computing ``GN(x; w0, b0) · (1 + s·γ) + s·β`` with ``spade_group_norm`` when the patch is active, and its
    previous forward otherwise. The layout comes from ``encoder`` at each feature map's size and is laid over the
    batch by ``rows`` (`tile_layout_rows` by default).

    Example::

        patch = LdmSPADEPatch(unet, adapter, SPADELayoutEncoder(ids, label_set, "onehot"), strength=1.0)
        patch.patch()
        try:
            out = unet(x, t, context=c)
        finally:
            patch.restore()

    Args:
        diffusion_model (`nn.Module`): the ldm UNet (patched in place; see `ldm_site_paths`).
        adapter (`SPADEAdapter`): the SPADE modules; not modified (per-device/dtype copies are made as needed).
        encoder (`SPADELayoutEncoder`): the label map; its ``layout_channels`` must be the adapter's.
        strength (`float`, *optional*, defaults to 1.0): ``s``, scales γ and β (0: the plain UNet).
        start (`float`, *optional*, defaults to 0.0), end (`float`, *optional*, defaults to 1.0): the window of
            `schedule_fraction` where the modulation is on (0 = first step, 1 = last).
        num_timesteps (`int`, *optional*, defaults to 1000): the model's training timesteps, for the window.
        rows (`Callable`, *optional*): ``(layout (L, C_m, h, w), batch) -> (batch, C_m, h, w)``; `tile_layout_rows`.
        weight_hook (`Callable`, *optional*): called with the GroupNorm before its weight is read, for UIs that
            update norm weights lazily in the class forward (A1111's built-in Lora extension for norm LoRAs).
        half_on_cuda (`bool`, *optional*, defaults to True): run the SPADE convs in the feature map's half dtype on
            CUDA (frozen weights in half precision only there, as the rest of the pack); fp32 otherwise.

    Raises:
        LdmSiteError: a site is missing, or the module there is no GroupNorm of the SPADE module's width.
        ValueError: bad strength/window, or the encoder's channels differ from the adapter's.
    """

    def __init__(
        self,
        diffusion_model: nn.Module,
        adapter: SPADEAdapter,
        encoder: SPADELayoutEncoder,
        *,
        strength: float = 1.0,
        start: float = 0.0,
        end: float = 1.0,
        num_timesteps: int = 1000,
        rows: Callable[[torch.Tensor, int], torch.Tensor] = tile_layout_rows,
        weight_hook: Callable[[nn.Module], None] | None = None,
        half_on_cuda: bool = True,
    ):
        channels = int(adapter.config.layout_channels)
        if encoder.layout_channels != channels:
            raise ValueError(
                f"the SPADE modules read {channels} layout channels, but the {encoder.encoding!r} layout of label set "
                f"{encoder.label_set.name!r} has {encoder.layout_channels}; use the label set the file was trained on"
            )
        self.diffusion_model = diffusion_model
        self.adapter = adapter
        self.encoder = encoder
        self.rows = rows
        self.weight_hook = weight_hook
        self.num_timesteps = int(num_timesteps)
        self.half_on_cuda = half_on_cuda
        self.set_schedule(strength, start, end)
        self.paths = ldm_site_paths(diffusion_model, adapter.site_names)
        for name, path in self.paths.items():
            gn = diffusion_model.get_submodule(path)
            spade = adapter.spade_for(name)
            if not isinstance(gn, nn.GroupNorm) or gn.num_channels != spade.feature_channels:
                raise LdmSiteError(
                    f"SPADE site {name!r} -> {path}: the model has {type(gn).__name__} with "
                    f"{getattr(gn, 'num_channels', '?')} channels there, the SPADE file expects a GroupNorm with "
                    f"{spade.feature_channels}; the file belongs to another base model"
                )
        self._hook = None
        self._active = True
        self._call_cache: dict[tuple, torch.Tensor] = {}
        self._spade_cache: dict[tuple, SPADE] = {}

    # ------------------------------------------------------------------------------------------------ settings
    def set_schedule(self, strength: float, start: float, end: float) -> None:
        """Change strength and window (also while patched)."""
        strength, start, end = float(strength), float(start), float(end)
        if not math.isfinite(strength):
            raise ValueError(f"`strength` must be finite, got {strength!r}")
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"need 0 <= start <= end <= 1, got start {start} and end {end}")
        self.strength, self.start, self.end = strength, start, end

    def in_window(self, fraction: float | None) -> bool:
        """Whether the modulation is on at `schedule_fraction` ``fraction`` (None: a call without timestep)."""
        if fraction is None:
            return True
        return self.start <= fraction <= self.end

    # ------------------------------------------------------------------------------------------------ patching
    @property
    def is_patched(self) -> bool:
        return self.diffusion_model.__dict__.get(_STATE_ATTR) is self

    @staticmethod
    def current(diffusion_model: nn.Module) -> LdmSPADEPatch | None:
        """The `LdmSPADEPatch` applied to ``diffusion_model``, or None."""
        return diffusion_model.__dict__.get(_STATE_ATTR)

    @staticmethod
    def restore_any(diffusion_model: nn.Module) -> bool:
        """Undo whatever `LdmSPADEPatch` is applied to ``diffusion_model`` (e.g. left over by a failed run).

        Returns:
            `bool`: whether there was one.
        """
        patch = LdmSPADEPatch.current(diffusion_model)
        if patch is None:
            return False
        patch.restore()
        return True

    def patch(self) -> None:
        """Rebind the site GroupNorms' forwards and add the timestep pre-hook.

        Raises:
            SPADEPatchError: the UNet already carries a (this or another) SPADE patch; restore it first.
        """
        if self.current(self.diffusion_model) is not None:
            raise SPADEPatchError(
                "this UNet is already SPADE-patched; restore the previous patch first (LdmSPADEPatch.restore_any)"
            )
        for path in self.paths.values():
            gn = self.diffusion_model.get_submodule(path)
            gn.forward = self._make_forward(gn, path, gn.__dict__.get("forward"))
        self._hook = self.diffusion_model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        self.diffusion_model.__dict__[_STATE_ATTR] = self
        logger.debug("SPADE patched %d GroupNorms of %s", len(self.paths), type(self.diffusion_model).__name__)

    def restore(self) -> None:
        """Put the GroupNorms' previous forwards back and remove the hook; a no-op when not patched."""
        if not self.is_patched:
            return
        for path in self.paths.values():
            gn = self.diffusion_model.get_submodule(path)
            current = gn.__dict__.get("forward")
            if getattr(current, "l2i_spade_patch", None) is not self:
                logger.warning("SPADE site %s was rebound by another tool since patching; leaving it alone", path)
                continue
            if current.l2i_previous is None:
                del gn.forward
            else:
                gn.forward = current.l2i_previous
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        del self.diffusion_model.__dict__[_STATE_ATTR]
        self._call_cache.clear()
        self._spade_cache.clear()
        self._active = True
        logger.debug("SPADE restored %d GroupNorms of %s", len(self.paths), type(self.diffusion_model).__name__)

    # ------------------------------------------------------------------------------------------------ per call
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        timesteps = args[1] if len(args) > 1 else kwargs.get("timesteps", kwargs.get("t"))
        self._active = self.strength != 0.0 and self.in_window(schedule_fraction(timesteps, self.num_timesteps))
        self._call_cache.clear()

    def _spade_for(self, name: str, x: torch.Tensor) -> SPADE:
        spade = self.adapter.spade_for(name)
        dtype = x.dtype if (self.half_on_cuda and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)) else None
        weight = spade.sem_shared.weight
        if weight.device == x.device and (dtype is None or weight.dtype == dtype):
            return spade
        key = (name, x.device, dtype)
        cached = self._spade_cache.get(key)
        if cached is None:
            cached = self._spade_cache[key] = copy.deepcopy(spade).to(device=x.device, dtype=dtype or weight.dtype)
        return cached

    def layout_for(self, x: torch.Tensor) -> torch.Tensor:
        """The layout for a feature map ``x`` `(B, C, h, w)`: `(B, C_m, h, w)` float32 on ``x.device``."""
        key = (int(x.shape[0]), tuple(x.shape[-2:]), x.device)
        layout = self._call_cache.get(key)
        if layout is None:
            layout = self._call_cache[key] = self.rows(self.encoder.at(x.shape[-2:], x.device), int(x.shape[0]))
        return layout

    def _make_forward(self, gn: nn.GroupNorm, path: str, previous: Callable | None) -> Callable:
        name = next(n for n, p in self.paths.items() if p == path)

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not (self._active and self.is_patched):
                return previous(x) if previous is not None else type(gn).forward(gn, x)
            if self.weight_hook is not None:
                self.weight_hook(gn)
            weight, bias = gn.weight, gn.bias
            if weight is not None and weight.device != x.device:
                weight = weight.to(x.device)
            if bias is not None and bias.device != x.device:
                bias = bias.to(x.device)
            return spade_group_norm(
                x, self.layout_for(x), self._spade_for(name, x), gn.num_groups, weight, bias, gn.eps, self.strength
            )

        forward.l2i_spade_patch = self
        forward.l2i_previous = previous
        return forward
