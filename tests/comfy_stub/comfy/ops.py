"""Stand-in for ``comfy.ops`` weight casting (ComfyUI 0.8.0): ``cast_bias_weight`` returns weight, bias and an
offload stream (None here); ``uncast_bias_weight`` is a no-op. ``CALLS`` counts casts for tests."""

from __future__ import annotations

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
