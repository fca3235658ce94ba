"""Layout ControlNets (palette RGB, one-hot, ALDM class embeddings) and T2I-Adapters built from a diffusers UNet.

Typical use::

    controlnet = build_controlnet(unet, hint="embedding", embedding_dim=768)   # ALDMControlNetModel
    spec = hint_spec_for(controlnet, label_set)                                # kind, channels, size
    hint = spec.make(labels, label_set, table=table)                           # (B, 768, H/4, W/4)
    out = controlnet(latents, t, encoder_hidden_states=text, controlnet_cond=hint)
    controlnet.save_pretrained(path); controlnet = load_controlnet(path)       # class picked from the config
"""

from .aldm_embedding import ALDM_HINT_CONV_INDICES, ALDM_HINT_DOWNSAMPLE, ALDMConditioningEmbedding
from .hint_spec import HintSpec, hint_spec_for
from .models import (
    ALDM_HINT_ENCODING,
    HINT_KINDS,
    ALDMControlNetModel,
    build_controlnet,
    build_t2i_adapter,
    load_controlnet,
)

__all__ = [
    "ALDM_HINT_CONV_INDICES",
    "ALDM_HINT_DOWNSAMPLE",
    "ALDM_HINT_ENCODING",
    "HINT_KINDS",
    "ALDMConditioningEmbedding",
    "ALDMControlNetModel",
    "HintSpec",
    "build_controlnet",
    "build_t2i_adapter",
    "hint_spec_for",
    "load_controlnet",
]
