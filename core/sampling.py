"""Sampling with a layout: text classifier-free guidance, layout guidance, ControlNet residuals and SPADE.

One sampler serves validation in the trainer, the generation CLI, the demo and the reference path the ComfyUI
nodes are compared against.

Guidance (``s_t`` = ``guidance_scale``, ``s_l`` = ``layout_guidance_scale``; 1.0 switches either off)::

    ε = ε(∅, L) + s_t · (ε(c, L) − ε(∅, L)) + (s_l − 1) · (ε(c, L) − ε(c, ∅_L))

with ``c`` the prompt, ``∅`` the negative prompt, ``L`` the layout and ``∅_L`` the null layout (SPADE: zeros;
ControlNet: no residuals). With ``s_t = 1`` the first two terms are ``ε(c, L)``, and the formula is SDM's layout
guidance ``ε(c, ∅_L) + s_l · (ε(c, L) − ε(c, ∅_L))``. As in ALDM, the layout enters both text branches. All the
passes of a step run as one UNet batch ``[∅-text | text | text without layout]``.

Any diffusers scheduler drives the loop (`make_scheduler` builds one by name from a model's scheduler config), and
``generator`` may be one generator per sample: each sample's initial noise (and an ancestral sampler's step noise)
then depends on its own seed only, not on the other samples of its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .spade import get_spade_context, is_spade_patched

__all__ = [
    "SCHEDULERS",
    "ControlInput",
    "decode_to_images",
    "encode_prompts",
    "guided_noise",
    "make_scheduler",
    "sample_latents",
]

#: Short scheduler names -> (diffusers class name, config overrides). Any diffusers scheduler class name works too.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpm-solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsolver_multistep": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}


def make_scheduler(name: str, config) -> object:
    """A fresh diffusers scheduler by name, built from a model's scheduler config (its betas and timestep spacing).

    Args:
        name (`str`): a key of `SCHEDULERS` (``ddim``, ``dpm-solver++``/``dpmsolver_multistep``, ``euler``,
            ``euler_a``/``euler_ancestral``, ``unipc``, ``pndm``; case and ``-``/``_`` do not matter) or the name of
            any diffusers scheduler class (``"HeunDiscreteScheduler"``).
        config: the base model's scheduler config (``scheduler.config`` or a dict).

    Raises:
        ValueError: an unknown name (the known names are listed).
    """
    import diffusers

    key = name.strip().lower().replace("_", "-")
    short = {k.replace("_", "-"): v for k, v in SCHEDULERS.items()}
    if key in short:
        class_name, overrides = short[key]
    else:
        class_name, overrides = name.strip(), {}
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(
            f"scheduler {name!r} is not known; use one of {', '.join(SCHEDULERS)} or a diffusers scheduler class name "
            "(e.g. HeunDiscreteScheduler)"
        )
    return cls.from_config(dict(config), **overrides)


@dataclass
class ControlInput:
    """A ControlNet and its hint for sampling.

    Args:
        controlnet (`diffusers.ControlNetModel`): the ControlNet (any hint variant).
        hint (`torch.Tensor`): `(B, C_hint, h, w)` hint, one per sample (already encoded, see
            `core.controlnet.HintSpec.make`).
        scale (`float`, defaults to 1.0): multiplies every residual.
        start (`float`, defaults to 0.0), end (`float`, defaults to 1.0): fraction of the sampling steps in which
            the residuals are applied (0 = first step).
    """

    controlnet: torch.nn.Module
    hint: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def active(self, step_index: int, num_steps: int) -> bool:
        frac = step_index / max(num_steps, 1)
        return self.start <= frac < self.end or (self.end >= 1.0 and frac >= self.start)


@torch.no_grad()
def encode_prompts(
    text_encoder, tokenizer, prompts: Sequence[str], device: torch.device | str | None = None
) -> torch.Tensor:
    """Prompts -> the UNet's ``encoder_hidden_states``: `(B, T, D)`, the text encoder's last hidden state.

    Texts are padded/truncated to ``tokenizer.model_max_length`` (77 for SD 1.5), as SD was trained.
    """
    device = device or next(text_encoder.parameters()).device
    tokens = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return text_encoder(tokens.input_ids.to(device))[0]


def _repeat_batch(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([x] * n, dim=0) if n > 1 else x


def guided_noise(
    unet,
    latents: torch.Tensor,
    timestep: torch.Tensor | int,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None = None,
    *,
    control: ControlInput | None = None,
    control_active: bool = True,
    spade_layout: torch.Tensor | None = None,
    spade_strength: float = 1.0,
    guidance_scale: float = 7.5,
    layout_guidance_scale: float = 1.0,
) -> torch.Tensor:
    """One guided model prediction (see the module docstring for the formula).

    Args:
        unet (`UNet2DConditionModel`): possibly SPADE-patched.
        latents (`torch.Tensor`): `(B, C, h, w)` current sample ``x_t`` (already scaled by the scheduler).
        timestep (`int` or `torch.Tensor`): the current timestep.
        prompt_embeds (`torch.Tensor`): `(B, T, D)` prompt embeddings.
        negative_embeds (`torch.Tensor`, *optional*): `(B, T, D)`; needed when ``guidance_scale > 1``.
        control (`ControlInput`, *optional*): ControlNet residuals; ``control_active`` False skips them this step.
        spade_layout (`torch.Tensor`, *optional*): `(B, C_m, H, W)` layout for a SPADE-patched UNet.
        spade_strength (`float`, defaults to 1.0): scales SPADE's γ and β.
        guidance_scale (`float`, defaults to 7.5): text CFG ``s_t``; <= 1 disables it.
        layout_guidance_scale (`float`, defaults to 1.0): layout guidance ``s_l``; 1 disables it.

    Returns:
        `torch.Tensor`: `(B, C, h, w)` guided model output.
    """
    use_text_cfg = guidance_scale > 1.0
    use_layout_cfg = layout_guidance_scale != 1.0
    has_layout = (control is not None and control_active) or spade_layout is not None
    if use_layout_cfg and not has_layout:
        raise ValueError("layout_guidance_scale != 1 needs a layout: pass `control` (active) or `spade_layout`")
    if use_text_cfg and negative_embeds is None:
        raise ValueError("guidance_scale > 1 needs `negative_embeds` (encode the negative prompt, '' by default)")
    if spade_layout is not None and not is_spade_patched(unet):
        raise ValueError("`spade_layout` was given but the UNet is not SPADE-patched (core.spade.patch_unet)")
    if spade_layout is None and is_spade_patched(unet):
        raise ValueError("the UNet is SPADE-patched: pass `spade_layout` (or a null layout of zeros)")

    # Passes, in batch order: [∅-text with layout] (text CFG), [text with layout], [text without layout] (layout CFG).
    passes = (["uncond"] if use_text_cfg else []) + ["cond"] + (["nolayout"] if use_layout_cfg else [])
    n = len(passes)
    batch = latents.shape[0]
    text = torch.cat([negative_embeds if p == "uncond" else prompt_embeds for p in passes], dim=0)
    x = _repeat_batch(latents, n)
    t = torch.as_tensor(timestep, device=latents.device)
    if t.ndim == 0:
        t = t.expand(batch * n)
    else:
        t = _repeat_batch(t, n)

    down_res = mid_res = None
    if control is not None and control_active:
        with_layout = [p for p in passes if p != "nolayout"]
        k = len(with_layout)
        down, mid = control.controlnet(
            _repeat_batch(latents, k),
            t[: batch * k],
            encoder_hidden_states=text[: batch * k],
            controlnet_cond=_repeat_batch(control.hint.to(latents.dtype), k),
            conditioning_scale=control.scale,
            return_dict=False,
        )
        if k < n:  # the layout-free pass gets no residuals: zeros
            down = [torch.cat([d, torch.zeros_like(d[:batch])], dim=0) for d in down]
            mid = torch.cat([mid, torch.zeros_like(mid[:batch])], dim=0)
        down_res, mid_res = down, mid

    kwargs = {}
    if down_res is not None:
        kwargs = {"down_block_additional_residuals": down_res, "mid_block_additional_residual": mid_res}
    if spade_layout is not None:
        chunks = tuple("null" if p == "nolayout" else "layout" for p in passes)
        with get_spade_context(unet).use(spade_layout, chunks=chunks, strength=spade_strength):
            out = unet(x, t, encoder_hidden_states=text, **kwargs).sample
    else:
        out = unet(x, t, encoder_hidden_states=text, **kwargs).sample

    parts = dict(zip(passes, out.chunk(n)))
    eps_c = parts["cond"]
    eps = parts["uncond"] + guidance_scale * (eps_c - parts["uncond"]) if use_text_cfg else eps_c
    if use_layout_cfg:
        eps = eps + (layout_guidance_scale - 1.0) * (eps_c - parts["nolayout"])
    return eps


@torch.no_grad()
def sample_latents(
    unet,
    scheduler,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None = None,
    *,
    latent_size: tuple[int, int],
    control: ControlInput | None = None,
    spade_layout: torch.Tensor | None = None,
    spade_strength: float = 1.0,
    num_steps: int = 25,
    guidance_scale: float = 7.5,
    layout_guidance_scale: float = 1.0,
    eta: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Run the sampler and return clean latents.

    Args:
        unet, prompt_embeds, negative_embeds, control, spade_layout, spade_strength, guidance_scale,
            layout_guidance_scale: see `guided_noise`.
        scheduler: a diffusers scheduler (DDIM recommended; it is used as given, ``set_timesteps`` is called).
        latent_size (`tuple[int, int]`): `(h, w)` of the latents (image size / VAE factor).
        num_steps (`int`, defaults to 25): sampling steps.
        eta (`float`, defaults to 0.0): DDIM η (ignored by schedulers without it).
        generator (`torch.Generator` or a list of them, *optional*): for the initial noise (and η / ancestral noise);
            a list gives one generator per sample (`(1, C, h, w)` noise drawn from each in turn), so a sample's
            noise does not depend on the batch it is in.
        latents (`torch.Tensor`, *optional*): `(B, C, h, w)` initial noise to use instead of drawing it.
        on_step (`Callable[[], None]`, *optional*): called after each sampling step (a progress bar's update).

    Returns:
        `torch.Tensor`: `(B, C, h, w)` float latents (divide by the VAE scaling factor to decode).
    """
    import inspect

    batch = prompt_embeds.shape[0]
    device = prompt_embeds.device
    if isinstance(generator, Sequence) and len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for a batch of {batch}; pass one per sample")
    if latents is None:
        shape = (batch, unet.config.in_channels, int(latent_size[0]), int(latent_size[1]))
        if isinstance(generator, Sequence):
            draws = [torch.randn((1, *shape[1:]), generator=g, device="cpu", dtype=torch.float32) for g in generator]
            latents = torch.cat(draws).to(device)
        else:
            latents = torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32).to(device)
        latents = latents.to(prompt_embeds.dtype) * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_steps, device=device)
    step_kwargs = {}
    params = inspect.signature(scheduler.step).parameters
    if "eta" in params:
        step_kwargs["eta"] = eta
    if "generator" in params:  # diffusers' randn_tensor takes a list: one draw per sample
        step_kwargs["generator"] = list(generator) if isinstance(generator, Sequence) else generator
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        model_in = scheduler.scale_model_input(latents, t)
        control_active = control is not None and control.active(i, len(timesteps))
        # Outside the ControlNet's window (and without SPADE) there is no layout to guide with this step.
        layout_active = control_active or spade_layout is not None
        eps = guided_noise(
            unet,
            model_in,
            t,
            prompt_embeds,
            negative_embeds,
            control=control,
            control_active=control_active,
            spade_layout=spade_layout,
            spade_strength=spade_strength,
            guidance_scale=guidance_scale,
            layout_guidance_scale=layout_guidance_scale if layout_active else 1.0,
        )
        latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
        if on_step is not None:
            on_step()
    return latents


@torch.no_grad()
def decode_to_images(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents `(B, 4, h, w)` -> images `(B, 3, H, W)` float in [0, 1] with the VAE's scaling factor applied."""
    scale = getattr(vae.config, "scaling_factor", 1.0)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = vae.decode(latents / scale + shift).sample
    return ((images.float().clamp(-1, 1) + 1) / 2).clamp(0, 1)
