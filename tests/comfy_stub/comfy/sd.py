"""Stand-in for ``comfy.sd.load_lora_for_models`` (ComfyUI 0.8.0): key map, ``load_lora``, patches on clones."""

from __future__ import annotations

import logging

import comfy.lora

CALLS: list[dict] = []


def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
    CALLS.append({"lora": lora, "strength_model": strength_model, "strength_clip": strength_clip, "clip": clip})
    key_map = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    loaded = comfy.lora.load_lora(lora, key_map)
    new_model, k = None, ()
    if model is not None:
        new_model = model.clone()
        k = new_model.add_patches(loaded, strength_model)
    new_clip = None
    if clip is not None:
        new_clip = clip.clone()
    for x in loaded:
        if x not in set(k):
            logging.warning(f"NOT LOADED {x}")
    return new_model, new_clip
