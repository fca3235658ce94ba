"""The pixel-space Semantic Diffusion Model (SDM, design/sdm.md): UNet, conditioning, guidance, sampling step.

Typical use::

    unet = SDMUNet.from_sdm_config(sdm_preset("ade20k"))          # or weights.load_sdm_file("sdm_ade20k.pt")
    y = sdm_condition(labels, get_label_set("ade20k"))             # (B, 151, H, W): one-hot + "unknown"
    out = guided_sdm_output(unet, x_t, t, y, guidance_scale=1.5)   # (B, 6, H, W): guided ε, then v
    x_prev = p_sample_step(SDMSchedule.linear(), out, x_t, t)      # one ancestral DDPM step

Modules: ``config`` (settings and presets), ``layers``/``attention``/``resblocks`` (blocks), ``unet`` (the model),
``conditioning`` (the label tensor y), ``guidance`` (classifier-free guidance on ε), ``diffusion`` (schedule,
learned-range variance, one step and the 1000-step reference sampler).
"""

from .attention import AttentionBlock, legacy_qkv_attention
from .conditioning import SDM_CONDITIONS, SDM_ID_SPACES, SDMConditionSpec, null_layout_like, sdm_condition
from .config import SDM_NORM_GROUPS, SDM_PRESETS, SDMConfig, sdm_preset
from .diffusion import SDMPrediction, SDMSchedule, p_mean_variance, p_sample_step, sample_sdm
from .guidance import SDM_GUIDANCE_SCALES, guided_sdm_output, sdm_guidance
from .layers import GroupNorm32, sdm_timestep_embedding
from .resblocks import SDMDecoderResBlock, SDMEncoderResBlock, SDMSpadeNorm
from .unet import SDMUNet

__all__ = [
    "SDM_CONDITIONS",
    "SDM_GUIDANCE_SCALES",
    "SDM_ID_SPACES",
    "SDM_NORM_GROUPS",
    "SDM_PRESETS",
    "AttentionBlock",
    "GroupNorm32",
    "SDMConditionSpec",
    "SDMConfig",
    "SDMDecoderResBlock",
    "SDMEncoderResBlock",
    "SDMPrediction",
    "SDMSchedule",
    "SDMSpadeNorm",
    "SDMUNet",
    "guided_sdm_output",
    "legacy_qkv_attention",
    "null_layout_like",
    "p_mean_variance",
    "p_sample_step",
    "sample_sdm",
    "sdm_condition",
    "sdm_guidance",
    "sdm_preset",
    "sdm_timestep_embedding",
]
