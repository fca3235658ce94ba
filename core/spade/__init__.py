"""SPADE: layout-modulated GroupNorms patched into a diffusers UNet's decoder, and the per-call layout.

Typical use::

    adapter = SPADEAdapter.from_unet(unet, layout_channels=C_m)
    patch_unet(unet, adapter)                      # 28 sites for SD 1.5
    with spade_layout(unet, layout):               # layout (B, C_m, H, W) float
        eps = unet(latents, t, encoder_hidden_states=text).sample
    unpatch_unet(unet)                             # original GroupNorm objects back

On an ldm UNet (ComfyUI, A1111, Forge) the sites are found with ``ldm_site_paths``, the layout is encoded per
feature size by ``SPADELayoutEncoder`` and ``LdmSPADEPatch`` patches the GroupNorms in place (A1111 extension).
"""

from .adapter import SPADEAdapter
from .context import (
    CFG_COND_UNCOND,
    CFG_UNCOND_COND,
    CHUNK_KINDS,
    SPADELayoutContext,
    SPADELayoutError,
    expand_layout_batch,
)
from .encoding import SPADE_LAYOUT_ENCODINGS, SPADELayoutEncoder
from .ldm import LdmSiteError, LdmSPADEPatch, ldm_site_paths, schedule_fraction, tile_layout_rows
from .module import (
    SPADE,
    SPADEGroupNorm,
    SPADEModulation,
    dispatch_spade_wrapper,
    resize_layout,
    spade_group_norm,
)
from .patch import (
    SPADEPatchError,
    clear_spade_layout,
    get_spade_adapter,
    get_spade_context,
    is_spade_patched,
    patch_unet,
    set_spade_layout,
    spade_layout,
    unpatch_unet,
)
from .sites import SPADESite, find_spade_sites, site_key

__all__ = [
    "CFG_COND_UNCOND",
    "CFG_UNCOND_COND",
    "CHUNK_KINDS",
    "SPADE",
    "SPADE_LAYOUT_ENCODINGS",
    "LdmSPADEPatch",
    "LdmSiteError",
    "SPADEAdapter",
    "SPADEGroupNorm",
    "SPADELayoutContext",
    "SPADELayoutEncoder",
    "SPADELayoutError",
    "SPADEModulation",
    "SPADEPatchError",
    "SPADESite",
    "clear_spade_layout",
    "dispatch_spade_wrapper",
    "expand_layout_batch",
    "find_spade_sites",
    "get_spade_adapter",
    "get_spade_context",
    "is_spade_patched",
    "ldm_site_paths",
    "patch_unet",
    "resize_layout",
    "schedule_fraction",
    "set_spade_layout",
    "site_key",
    "spade_group_norm",
    "spade_layout",
    "tile_layout_rows",
    "unpatch_unet",
]
