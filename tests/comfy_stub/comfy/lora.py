"""Stand-in for ``comfy.lora`` (ComfyUI 0.8.0): the kohya (ldm and diffusers module names) and generic UNet key maps, and ``load_lora`` for
``lora_down``/``lora_up``/``alpha`` triples (the only LoRA type the pack writes). Unmatched keys log
``lora key not loaded: <key>`` as ComfyUI does."""

from __future__ import annotations

import logging

_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def model_lora_keys_unet(model, key_map={}):  # noqa: B006 - ComfyUI's signature (callers pass a fresh dict)
    for k in model.state_dict():
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                key_map["lora_unet_{}".format(k[len("diffusion_model.") : -len(".weight")].replace(".", "_"))] = k
                key_map[k[: -len(".weight")]] = k
            else:
                key_map[k] = k
    config = getattr(getattr(model, "model_config", None), "unet_config", None)
    if config is not None:  # diffusers-named kohya keys, as ComfyUI maps them
        import comfy.utils

        state = model.state_dict()
        for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(config).items():
            if diffusers_key.endswith(".weight") and f"diffusion_model.{ldm_key}" in state:
                name = diffusers_key[: -len(".weight")].replace(".", "_")
                key_map[f"lora_unet_{name}"] = f"diffusion_model.{ldm_key}"
    return key_map


def load_lora(lora, to_load, log_missing=True):
    patch_dict, loaded = {}, set()
    for module, target in to_load.items():
        down = lora.get(f"{module}.lora_down.weight")
        up = lora.get(f"{module}.lora_up.weight")
        if down is None or up is None:
            continue
        alpha_key = f"{module}.alpha"
        alpha = lora[alpha_key].item() if alpha_key in lora else None
        patch_dict[target] = ("lora", (up, down, alpha, None, None, None))
        loaded.update({f"{module}.lora_down.weight", f"{module}.lora_up.weight", alpha_key})
    if log_missing:
        for k in lora:
            if k not in loaded:
                logging.warning(f"lora key not loaded: {k}")
    return patch_dict
