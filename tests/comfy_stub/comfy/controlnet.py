"""Stand-in for ``comfy.controlnet`` (ComfyUI 0.8.0): ``ControlBase``/``ControlNet`` with the same attributes,
``copy()``/``copy_to``, ``set_cond_hint`` and the same ``get_control`` hint pipeline (resize the original hint to
latent size x ``compression_ratio`` with ``common_upscale(..., upscale_algorithm, "center")``, then
``preprocess_image``, cast, ``broadcast_image_to`` the batch); ``controlnet_config``; and
``load_controlnet_state_dict`` for ldm-layout SD ControlNets (``control_model.`` prefix or none).

``CALLS`` records the state dicts handed to ``load_controlnet_state_dict`` (tests check which loader ran).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import comfy.cldm.cldm
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.utils
import torch

CALLS: list[dict] = []


def broadcast_image_to(tensor, target_batch_size, batched_number):
    current = tensor.shape[0]
    if current == 1:
        return tensor
    per_batch = target_batch_size // batched_number
    tensor = tensor[:per_batch]
    if per_batch > tensor.shape[0]:
        tensor = torch.cat([tensor] * (per_batch // tensor.shape[0]) + [tensor[: per_batch % tensor.shape[0]]], dim=0)
    if tensor.shape[0] == target_batch_size:
        return tensor
    return torch.cat([tensor] * batched_number, dim=0)


class ControlBase:
    def __init__(self):
        self.cond_hint_original = None
        self.cond_hint = None
        self.strength = 1.0
        self.timestep_percent_range = (0.0, 1.0)
        self.latent_format = None
        self.vae = None
        self.global_average_pooling = False
        self.timestep_range = None
        self.compression_ratio = 8
        self.upscale_algorithm = "nearest-exact"
        self.extra_args = {}
        self.previous_controlnet = None
        self.extra_conds = []
        self.concat_mask = False
        self.extra_concat_orig = []
        self.extra_hooks = None
        self.preprocess_image = lambda a: a

    def set_cond_hint(
        self,
        cond_hint,
        strength=1.0,
        timestep_percent_range=(0.0, 1.0),
        vae=None,
        extra_concat=[],  # noqa: B006
    ):
        self.cond_hint_original = cond_hint
        self.strength = strength
        self.timestep_percent_range = timestep_percent_range
        if self.latent_format is not None:
            self.vae = vae
        self.extra_concat_orig = extra_concat.copy()
        return self

    def pre_run(self, model, percent_to_timestep_function):
        self.timestep_range = (
            percent_to_timestep_function(self.timestep_percent_range[0]),
            percent_to_timestep_function(self.timestep_percent_range[1]),
        )
        if self.previous_controlnet is not None:
            self.previous_controlnet.pre_run(model, percent_to_timestep_function)

    def set_previous_controlnet(self, controlnet):
        self.previous_controlnet = controlnet
        return self

    def cleanup(self):
        if self.previous_controlnet is not None:
            self.previous_controlnet.cleanup()
        self.cond_hint = None
        self.timestep_range = None

    def get_models(self):
        return [] if self.previous_controlnet is None else self.previous_controlnet.get_models()

    def copy_to(self, c):
        c.cond_hint_original = self.cond_hint_original
        c.strength = self.strength
        c.timestep_percent_range = self.timestep_percent_range
        c.global_average_pooling = self.global_average_pooling
        c.compression_ratio = self.compression_ratio
        c.upscale_algorithm = self.upscale_algorithm
        c.latent_format = self.latent_format
        c.extra_args = self.extra_args.copy()
        c.vae = self.vae
        c.extra_conds = self.extra_conds.copy()
        c.concat_mask = self.concat_mask
        c.extra_concat_orig = self.extra_concat_orig.copy()
        c.extra_hooks = self.extra_hooks
        c.preprocess_image = self.preprocess_image

    def control_merge(self, control, control_prev, output_dtype):
        out = {"input": [], "middle": [], "output": []}
        for key, values in control.items():
            for x in values:
                if x is not None:
                    x = x * self.strength
                    if output_dtype is not None:
                        x = x.to(output_dtype)
                out[key].append(x)
        if control_prev is not None:
            for key in out:
                for i, prev in enumerate(control_prev[key]):
                    if i >= len(out[key]):
                        out[key].append(prev)
                    elif prev is not None:
                        out[key][i] = prev if out[key][i] is None else prev + out[key][i]
        return out


class ControlNet(ControlBase):
    def __init__(self, control_model=None, global_average_pooling=False, compression_ratio=8, latent_format=None,
                 load_device=None, manual_cast_dtype=None, extra_conds=["y"], strength_type=None,  # noqa: B006
                 concat_mask=False, preprocess_image=lambda a: a):  # fmt: skip
        super().__init__()
        self.control_model = control_model
        self.load_device = load_device
        if control_model is not None:
            self.control_model_wrapped = comfy.model_patcher.ModelPatcher(
                control_model, load_device=load_device, offload_device=comfy.model_management.unet_offload_device()
            )
        self.compression_ratio = compression_ratio
        self.global_average_pooling = global_average_pooling
        self.model_sampling_current = None
        self.manual_cast_dtype = manual_cast_dtype
        self.latent_format = latent_format
        self.extra_conds += extra_conds
        self.concat_mask = concat_mask
        self.preprocess_image = preprocess_image

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        control_prev = None
        if self.previous_controlnet is not None:
            control_prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        if self.timestep_range is not None and (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]):
            return control_prev
        dtype = self.manual_cast_dtype if self.manual_cast_dtype is not None else self.control_model.dtype
        ratio = self.compression_ratio
        if self.cond_hint is None or tuple(self.cond_hint.shape[-2:]) != (
            x_noisy.shape[2] * ratio,
            x_noisy.shape[3] * ratio,
        ):
            hint = comfy.utils.common_upscale(
                self.cond_hint_original, x_noisy.shape[-1] * ratio, x_noisy.shape[-2] * ratio, self.upscale_algorithm,
                "center",
            )  # fmt: skip
            self.cond_hint = self.preprocess_image(hint).to(device=x_noisy.device, dtype=dtype)
        if x_noisy.shape[0] != self.cond_hint.shape[0]:
            self.cond_hint = broadcast_image_to(self.cond_hint, x_noisy.shape[0], batched_number)
        context = cond.get("crossattn_controlnet", cond["c_crossattn"])
        timestep = self.model_sampling_current.timestep(t)
        x_noisy = self.model_sampling_current.calculate_input(t, x_noisy)
        control = self.control_model(
            x=x_noisy.to(dtype), hint=self.cond_hint, timesteps=timestep.to(dtype), context=context.to(dtype)
        )
        return self.control_merge(control, control_prev, output_dtype=None)

    def copy(self):
        c = ControlNet(None, global_average_pooling=self.global_average_pooling, load_device=self.load_device,
                       manual_cast_dtype=self.manual_cast_dtype)  # fmt: skip
        c.control_model = self.control_model
        c.control_model_wrapped = self.control_model_wrapped
        self.copy_to(c)
        return c

    def get_models(self):
        return super().get_models() + [self.control_model_wrapped]

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        self.model_sampling_current = model.model_sampling

    def cleanup(self):
        self.model_sampling_current = None
        super().cleanup()


def _detect(sd: dict) -> dict:
    """The part of ``model_detection.detect_unet_config`` the stand-in needs, with SD 1.5's heads when it matches."""
    conv_in = sd["input_blocks.0.0.weight"]
    context = next((v.shape[1] for k, v in sorted(sd.items()) if k.endswith("attn2.to_k.weight")), None)
    config = {
        "image_size": 32,
        "in_channels": int(conv_in.shape[1]),
        "model_channels": int(conv_in.shape[0]),
        "out_channels": 4,
        "num_res_blocks": [1],
        "context_dim": context,
        "use_spatial_transformer": True,
    }
    if config["model_channels"] == 320 and context == 768:
        config.update(num_heads=8, num_head_channels=-1)  # supported_models.SD15.unet_extra_config
    else:
        config.update(num_heads=-1, num_head_channels=64)  # supported_models_base.BASE.unet_extra_config
    return config


def controlnet_config(sd, model_options={}):  # noqa: B006
    model_config = SimpleNamespace(unet_config=_detect(sd), supported_inference_dtypes=[torch.float32])
    unet_dtype = model_options.get("dtype", torch.float32)
    load_device = comfy.model_management.get_torch_device()
    manual_cast_dtype = comfy.model_management.unet_manual_cast(unet_dtype, load_device)
    operations = model_options.get("custom_operations") or comfy.ops.pick_operations(unet_dtype, manual_cast_dtype)
    offload_device = comfy.model_management.unet_offload_device()
    return model_config, operations, load_device, unet_dtype, manual_cast_dtype, offload_device


def controlnet_load_state_dict(control_model, sd):
    missing, unexpected = control_model.load_state_dict(sd, strict=False)
    if missing:
        logging.warning(f"missing controlnet keys: {missing}")
    return control_model


def load_controlnet_state_dict(state_dict, model=None, model_options={}):  # noqa: B006
    CALLS.append(state_dict)
    if "controlnet_cond_embedding.conv_in.weight" in state_dict:
        raise NotImplementedError("the stand-in reads ldm-layout ControlNets only")
    if "control_model.zero_convs.0.0.weight" in state_dict:
        sd = {k[len("control_model.") :]: v for k, v in state_dict.items() if k.startswith("control_model.")}
    elif "zero_convs.0.0.weight" in state_dict:
        sd = dict(state_dict)
    else:
        logging.error("error could not detect control model type.")
        return None
    model_config, operations, load_device, unet_dtype, manual_cast_dtype, offload_device = controlnet_config(
        sd, model_options
    )
    config = dict(model_config.unet_config)
    config.pop("out_channels")
    config.update(operations=operations, dtype=unet_dtype, device=offload_device,
                  hint_channels=sd["input_hint_block.0.weight"].shape[1])  # fmt: skip
    control_model = comfy.cldm.cldm.ControlNet(**config)
    missing, unexpected = control_model.load_state_dict(sd, strict=False)
    if missing:
        logging.warning(f"missing controlnet keys: {missing}")
    return ControlNet(control_model, global_average_pooling=model_options.get("global_average_pooling", False),
                      load_device=load_device, manual_cast_dtype=manual_cast_dtype)  # fmt: skip


def load_controlnet(ckpt_path, model=None, model_options={}):  # noqa: B006
    return load_controlnet_state_dict(comfy.utils.load_torch_file(ckpt_path, safe_load=True), model, model_options)
