"""Stand-in for ``comfy.model_management`` (ComfyUI 0.8.0, ``--cpu``): everything on the CPU in fp32."""

from __future__ import annotations

import torch


def get_torch_device() -> torch.device:
    return torch.device("cpu")


def unet_offload_device() -> torch.device:
    return torch.device("cpu")


def intermediate_device() -> torch.device:
    return torch.device("cpu")


def unet_dtype(device=None, model_params=0, supported_dtypes=(torch.float16, torch.bfloat16, torch.float32),
               weight_dtype=None):  # fmt: skip
    return torch.float32


def unet_manual_cast(weight_dtype, inference_device, supported_dtypes=(torch.float16, torch.bfloat16, torch.float32)):
    return None


def loaded_models(only_currently_used=False) -> list:
    return []


def load_models_gpu(models, *args, **kwargs) -> None:
    return None


def cast_to_device(tensor, device, dtype, copy=False):
    return tensor.to(device=device, dtype=dtype, copy=copy)
