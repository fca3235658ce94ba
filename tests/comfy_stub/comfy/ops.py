"""Stand-in for ``comfy.ops`` (ComfyUI 0.8.0): weight casting and the operation classes models are built with.

``cast_bias_weight`` returns weight, bias and an offload stream (None here); ``uncast_bias_weight`` is a no-op.
``CALLS`` counts casts for tests. ``disable_weight_init`` layers skip their init (weights come from a file) and cast
per call when ``comfy_cast_weights`` is set, as ``manual_cast``'s do.
"""

from __future__ import annotations

import torch

CALLS = {"cast": 0, "uncast": 0}


def cast_bias_weight(s, input=None, dtype=None, device=None, bias_dtype=None, offloadable=False):
    if input is not None:
        dtype = input.dtype if dtype is None else dtype
        bias_dtype = dtype if bias_dtype is None else bias_dtype
        device = input.device if device is None else device
    CALLS["cast"] += 1
    weight = s.weight.to(device=device, dtype=dtype)
    bias = None if s.bias is None else s.bias.to(device=device, dtype=bias_dtype)
    if offloadable:
        return weight, bias, None
    return weight, bias


def uncast_bias_weight(s, weight, bias, offload_stream) -> None:
    CALLS["uncast"] += 1


class CastWeightBiasOp:
    comfy_cast_weights = False
    weight_function: list = []
    bias_function: list = []


class disable_weight_init:
    class Linear(torch.nn.Linear, CastWeightBiasOp):
        def reset_parameters(self):
            return None

        def forward(self, input):
            if self.comfy_cast_weights:
                weight, bias, stream = cast_bias_weight(self, input, offloadable=True)
                out = torch.nn.functional.linear(input, weight, bias)
                uncast_bias_weight(self, weight, bias, stream)
                return out
            return super().forward(input)

    class Conv2d(torch.nn.Conv2d, CastWeightBiasOp):
        def reset_parameters(self):
            return None

        def forward(self, input):
            if self.comfy_cast_weights:
                weight, bias, stream = cast_bias_weight(self, input, offloadable=True)
                out = self._conv_forward(input, weight, bias)
                uncast_bias_weight(self, weight, bias, stream)
                return out
            return super().forward(input)

    class GroupNorm(torch.nn.GroupNorm, CastWeightBiasOp):
        def reset_parameters(self):
            return None

    @classmethod
    def conv_nd(cls, dims, *args, **kwargs):
        if dims == 2:
            return cls.Conv2d(*args, **kwargs)
        raise ValueError(f"unsupported dimensions: {dims}")


class manual_cast(disable_weight_init):
    class Linear(disable_weight_init.Linear):
        comfy_cast_weights = True

    class Conv2d(disable_weight_init.Conv2d):
        comfy_cast_weights = True

    class GroupNorm(disable_weight_init.GroupNorm):
        comfy_cast_weights = True


def pick_operations(weight_dtype, compute_dtype, load_device=None, disable_fast_fp8=False, fp8_optimizations=False,
                    model_config=None):  # fmt: skip
    if compute_dtype is None or weight_dtype == compute_dtype:
        return disable_weight_init
    return manual_cast
