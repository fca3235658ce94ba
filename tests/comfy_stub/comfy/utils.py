"""Stand-in for the parts of ``comfy.utils`` (ComfyUI 0.8.0) the pack and the other stand-ins use."""

from __future__ import annotations

import math

import torch


def load_torch_file(ckpt, safe_load=False, device=None, return_metadata=False):
    """safetensors only (what the tests write); ``return_metadata`` gives ``(sd, metadata)`` like the real one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    sd = load_file(str(ckpt), device=str(device or "cpu"))
    if return_metadata:
        with safe_open(str(ckpt), framework="pt") as f:
            return sd, f.metadata()
    return sd


def weight_dtype(sd, prefix=""):
    counts: dict = {}
    for k, w in sd.items():
        if k.startswith(prefix):
            counts[w.dtype] = counts.get(w.dtype, 0) + w.numel()
    return max(counts, key=counts.get) if counts else None


def repeat_to_batch_size(tensor, batch_size, dim=0):
    if tensor.shape[dim] > batch_size:
        return tensor.narrow(dim, 0, batch_size)
    if tensor.shape[dim] < batch_size:
        reps = [1] * tensor.ndim
        reps[dim] = math.ceil(batch_size / tensor.shape[dim])
        return tensor.repeat(reps).narrow(dim, 0, batch_size)
    return tensor


def common_upscale(samples, width, height, upscale_method, crop):
    """Centre-crop to the target aspect ratio (``crop="center"``), then ``F.interpolate`` with ``upscale_method``
    (4-D input; bislerp/lanczos are not modelled)."""
    if crop == "center":
        old_h, old_w = samples.shape[-2], samples.shape[-1]
        old_aspect, new_aspect = old_w / old_h, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        samples = samples.narrow(-2, y, old_h - 2 * y).narrow(-1, x, old_w - 2 * x)
    if upscale_method in ("bislerp", "lanczos"):
        raise NotImplementedError(f"the stand-in does not model {upscale_method!r}")
    return torch.nn.functional.interpolate(samples, size=(height, width), mode=upscale_method)


def unet_to_diffusers(unet_config):
    """diffusers UNet key -> ldm key for a ComfyUI UNet config. The stand-in uses the pack's re-implementation of
    ComfyUI's rule (``weights.lora_check``); the tests with ``COMFYUI_PATH`` check it against the real one."""
    from layout2image.weights.lora_check import comfyui_unet_to_diffusers

    return comfyui_unet_to_diffusers(unet_config)
