"""Would ComfyUI's and A1111's LoRA loaders load every key of a UNet LoRA? A checker built from their rules.

This re-implements, from reading the loaders (ComfyUI 0.8 and AUTOMATIC1111 1.10), only the naming and
matching rules for SD-family UNets; nothing is imported from either program. `check_lora_state_dict` takes a
LoRA state dict (or just its key -> shape table) and the base UNet's diffusers config and says, per key, what
each loader does with it.

**ComfyUI** (``comfy/sd.py`` ``load_lora_for_models`` -> ``comfy/lora.py`` ``model_lora_keys_unet`` + ``load_lora``):

1. The key map (`comfyui_lora_key_map`) holds, for every ``.weight`` of the ldm model's state dict
   ``diffusion_model.<p>.weight``: ``lora_unet_<p with "_">`` and ``diffusion_model.<p>``; and for every
   ``.weight`` that ``comfy.utils.unet_to_diffusers`` maps (computed from the ComfyUI unet config:
   ``num_res_blocks``, ``transformer_depth``, ``transformer_depth_output``, ``transformer_depth_middle``,
   `comfyui_unet_config` derives it from the diffusers config): ``lora_unet_<diffusers path with "_">``,
   ``lycoris_<same>``, and the diffusers-LoRA spellings ``<path>``/``unet.<path>`` with ``.to_*`` written
   ``.processor.to_*`` and ``to_out.0`` written ``to_out``.
2. For each name ``x`` in the map, ``load_lora`` takes ``x.alpha``, ``x.dora_scale`` and the first LoRA pair found
   among ``x.lora_up.weight``/``x.lora_down.weight`` (+ ``x.lora_mid.weight``), ``x_lora.up/down.weight``,
   ``x.lora_B/lora_A.weight``, ``x.lora.up/down.weight``, ``x.lora_B``/``x.lora_A``,
   ``x.lora_linear_layer.up/down.weight``, ``x.lora_B/lora_A.default.weight``; then ``w_norm``/``b_norm``,
   ``diff``, ``diff_b``, ``set_weight``. An up key without its down key raises ``KeyError`` (loading fails).
3. Every file key not taken logs **"lora key not loaded: <key>"**; a patch whose target weight the model lacks logs
   "NOT LOADED <target>". The patch ``(alpha / r) * up @ down`` is reshaped to the weight's shape; a size mismatch
   logs an error and leaves the weight unchanged.

**A1111** (``extensions-builtin/Lora/networks.py`` ``load_network``, ``network_lora.py``, ``network.py``):

1. The key is split at its first "." into a module name and a part (``lora_down.weight``, ``alpha``, ...).
2. The name goes through ``convert_diffusers_name_to_compvis`` (`a1111_convert_name`: regexes for diffusers-named
   kohya keys with SD 1.x/2.x block arithmetic, ``input_blocks_{1 + 3i + j}``, ``output_blocks_{3i + j}``, the
   upsampler at ``output_blocks_{3i + 2}_{2 if i > 0 else 1}_conv``) and is looked up among the ldm model's
   module names with "." -> "_" (``diffusion_model_input_blocks_1_1_...``); failing that, ``<name>_[qkv]_proj``
   is cut to ``<name>``, and then ``lora_unet`` is replaced by ``diffusion_model`` in the original name.
3. A name found nowhere goes to ``keys_failed_to_match``, logged at DEBUG only: silently not loaded. Two names that
   land on one module (the SD 1.x arithmetic on another layout can do that) share its ``NetworkWeights``: the later
   key's tensor replaces the earlier one, which is silently not loaded.
4. The parts of each matched module must fit a module type; for LoRA ``lora_up.weight`` + ``lora_down.weight``
   (or ``lora_A``/``lora_B``), on a Linear or Conv2d. Otherwise A1111 raises ``AssertionError`` and the **whole**
   LoRA fails to load. The scale is ``alpha / lora_down.shape[0]``, 1 without alpha.

Adapter types other than LoRA (LoHa, LoKr, GLoRA, OFT, IA3) are not modelled: their keys get the verdict
``"not modelled"``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .safe_load import read_safetensors_header

__all__ = [
    "LORA_CHECK_VERDICTS",
    "LoraCheckReport",
    "LoraKeyCheck",
    "a1111_convert_name",
    "a1111_module_names",
    "check_lora_file",
    "check_lora_state_dict",
    "comfyui_lora_key_map",
    "comfyui_unet_config",
    "comfyui_unet_to_diffusers",
    "ldm_unet_shapes",
]

#: Per key and loader: ``loaded``; ``not loaded`` (ComfyUI warns "lora key not loaded"/"NOT LOADED", A1111 skips
#: it silently); ``error`` (the loader raises, or logs an error and skips the weight); ``not modelled``.
LORA_CHECK_VERDICTS = ("error", "loaded", "not loaded", "not modelled")

_RESNET_PARAMS = {  # ldm -> diffusers, inside a resnet
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_ATTENTION_PARAMS = ("proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias", "norm.weight", "norm.bias")
_TRANSFORMER_PARAMS = (
    *(f"norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")),
    *(f"{a}.{q}.weight" for a in ("attn1", "attn2") for q in ("to_q", "to_k", "to_v", "to_out.0")),
    "attn1.to_out.0.bias",
    "attn2.to_out.0.bias",
    "ff.net.0.proj.weight",
    "ff.net.0.proj.bias",
    "ff.net.2.weight",
    "ff.net.2.bias",
)
_TOP_PARAMS = {  # ldm -> diffusers
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "class_embedding.linear_1",
    "label_emb.0.2": "class_embedding.linear_2",
}
# ComfyUI's LoRA pairs: (up suffix, down suffix, mid suffix or None); the first present wins.
_COMFY_LORA_PAIRS = (
    (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
    ("_lora.up.weight", "_lora.down.weight", None),
    (".lora_B.weight", ".lora_A.weight", None),
    (".lora.up.weight", ".lora.down.weight", None),
    (".lora_B", ".lora_A", None),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),
    (".lora_B.default.weight", ".lora_A.default.weight", None),
)
_COMFY_SINGLE = (".alpha", ".dora_scale", ".w_norm", ".b_norm", ".diff", ".diff_b", ".set_weight")
# Parts of adapter types other than LoRA (LoHa, LoKr, OFT, GLoRA, IA3), which the checker does not model.
_OTHER_ADAPTER_PART = re.compile(r"^(hada_|lokr_|oft_|[ab][12]\.weight$|on_input$)")
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


# ---------------------------------------------------------------------------------------------------- configs
def _config(unet_config: Any) -> dict[str, Any]:
    from .lora_naming import _config_dict

    return _config_dict(unet_config)


def comfyui_unet_config(unet_config: Any = None) -> dict[str, Any]:
    """The ComfyUI unet config fields ``unet_to_diffusers`` reads, for a diffusers UNet config (SD 1.5's if None).

    ``transformer_depth`` has one entry per down resnet (0 without attention); ``transformer_depth_output`` one per
    output block, ordered by *down* level (ComfyUI pops it from the end, so its last entries belong to
    ``up_blocks.0``), as ComfyUI's ``model_detection`` builds them.
    """
    config = _config(unet_config)
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    levels = len(down)
    lpb = config.get("layers_per_block", 2)
    lpb = [lpb] * levels if isinstance(lpb, int) else list(lpb)
    depth = config.get("transformer_layers_per_block", 1)
    depth = [depth] * levels if isinstance(depth, int) else list(depth)
    up_depth = config.get("reverse_transformer_layers_per_block") or list(reversed(depth))
    td, tdo = [], []
    for x in range(levels):
        td += [depth[x] if "CrossAttn" in down[x] else 0] * lpb[x]
        u = levels - 1 - x  # the up block at this resolution
        tdo += [up_depth[u] if "CrossAttn" in up[u] else 0] * (lpb[x] + 1)
    boc = list(config.get("block_out_channels", [320, 640, 1280, 1280]))
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    return {
        "num_res_blocks": lpb,
        "channel_mult": [c // boc[0] for c in boc],
        "transformer_depth": td,
        "transformer_depth_output": tdo,
        "transformer_depth_middle": depth[-1] if mid == "UNetMidBlock2DCrossAttn" else -1,
    }


def comfyui_unet_to_diffusers(comfy_config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers key -> ldm key, by the rules of ComfyUI's ``comfy.utils.unet_to_diffusers``.

    Note the rules' own assumptions, kept here: level ``x`` of the encoder starts at ``input_blocks.{1 + (n + 1) x}``
    (equal ``num_res_blocks``), a downsampler key is listed for every level (the last one has none in the model),
    every resnet lists a ``conv_shortcut``, and the mid block is resnet / attention / resnet.
    """
    n_res = list(comfy_config["num_res_blocks"])
    depth = list(comfy_config["transformer_depth"])
    depth_out = list(comfy_config["transformer_depth_output"])
    mid_depth = comfy_config.get("transformer_depth_middle", 1)
    levels = len(comfy_config["channel_mult"])
    out: dict[str, str] = {}

    def resnet(src: str, dst: str) -> None:
        for ldm, diff in _RESNET_PARAMS.items():
            for p in ("weight", "bias"):
                out[f"{src}.{diff}.{p}"] = f"{dst}.{ldm}.{p}"

    def attention(src: str, dst: str, n: int, always: bool = False) -> None:
        if n > 0 or always:  # ComfyUI lists the mid block's proj_in/proj_out/norm whatever its depth
            out.update({f"{src}.{p}": f"{dst}.{p}" for p in _ATTENTION_PARAMS})
        for t in range(n):
            out.update(
                {f"{src}.transformer_blocks.{t}.{p}": f"{dst}.transformer_blocks.{t}.{p}" for p in _TRANSFORMER_PARAMS}
            )

    for x in range(levels):
        k = 1 + (n_res[x] + 1) * x
        for i in range(n_res[x]):
            resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{k}.0")
            attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{k}.1", depth.pop(0))
            k += 1
        for p in ("weight", "bias"):
            out[f"down_blocks.{x}.downsamplers.0.conv.{p}"] = f"input_blocks.{k}.0.op.{p}"
    attention("mid_block.attentions.0", "middle_block.1", max(mid_depth, 0), always=True)
    resnet("mid_block.resnets.0", "middle_block.0")
    resnet("mid_block.resnets.1", "middle_block.2")
    up_res = list(reversed(n_res))
    for x in range(levels):
        k = (up_res[x] + 1) * x
        last = up_res[x]
        for i in range(last + 1):
            resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{k}.0")
            n = depth_out.pop()
            attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{k}.1", n)
            if i == last:
                for p in ("weight", "bias"):
                    out[f"up_blocks.{x}.upsamplers.0.conv.{p}"] = f"output_blocks.{k}.{2 if n > 0 else 1}.conv.{p}"
            k += 1
    for ldm, diff in _TOP_PARAMS.items():
        for p in ("weight", "bias"):
            out[f"{diff}.{p}"] = f"{ldm}.{p}"
    return out


@functools.lru_cache(maxsize=8)
def _ldm_shapes_cached(config_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = json.loads(config_json)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    mapping = comfyui_unet_to_diffusers(comfyui_unet_config(config))
    return tuple((mapping[k], tuple(v.shape)) for k, v in unet.state_dict().items() if k in mapping)


def ldm_unet_shapes(unet_config: Any = None) -> dict[str, tuple[int, ...]]:
    """ldm key (no ``diffusion_model.`` prefix) -> shape of every tensor of the UNet (built on the meta device).

    The ldm names come from the ComfyUI mapping (`comfyui_unet_to_diffusers`) of the diffusers model's keys: the
    state dict ComfyUI's (and A1111's) ldm UNet has for this config.
    """
    return dict(_ldm_shapes_cached(json.dumps(_config(unet_config), sort_keys=True)))


# ---------------------------------------------------------------------------------------------------- ComfyUI
def comfyui_lora_key_map(unet_config: Any = None) -> dict[str, str]:
    """LoRA module name -> model key ``diffusion_model.<ldm key>``: ComfyUI's ``model_lora_keys_unet`` (SD UNets)."""
    config = _config(unet_config)
    key_map: dict[str, str] = {}
    for ldm in ldm_unet_shapes(config):
        full = f"diffusion_model.{ldm}"
        if ldm.endswith(".weight"):
            key_map["lora_unet_" + ldm[: -len(".weight")].replace(".", "_")] = full
            key_map[full[: -len(".weight")]] = full
        else:
            key_map[full] = full
    for diff, ldm in comfyui_unet_to_diffusers(comfyui_unet_config(config)).items():
        if not diff.endswith(".weight"):
            continue
        target, path = f"diffusion_model.{ldm}", diff[: -len(".weight")]
        key_map["lora_unet_" + path.replace(".", "_")] = target
        key_map["lycoris_" + path.replace(".", "_")] = target
        spelled = path.replace(".to_", ".processor.to_")
        if spelled.endswith(".to_out.0"):
            spelled = spelled[: -len(".0")]
        key_map[spelled] = target
        key_map["unet." + spelled] = target
    return key_map


# ---------------------------------------------------------------------------------------------------- A1111
_A1111_RESNET = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def a1111_convert_name(name: str) -> str:
    """A1111's ``convert_diffusers_name_to_compvis`` for UNet names (SD 1.x block arithmetic); others unchanged."""

    def inner(kind: str, rest: str) -> str:
        return _A1111_RESNET.get(rest, rest) if kind == "resnets" else rest

    if m := re.match(r"lora_unet_conv_in(.*)", name):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if m := re.match(r"lora_unet_conv_out(.*)", name):
        return f"diffusion_model_out_2{m[1]}"
    if m := re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", name):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        block = 1 + int(m[1]) * 3 + int(m[3])
        return f"diffusion_model_input_blocks_{block}_{1 if m[2] == 'attentions' else 0}_{inner(m[2], m[4])}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", name):
        block = 1 if m[1] == "attentions" else int(m[2]) * 2
        return f"diffusion_model_middle_block_{block}_{inner(m[1], m[3])}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        block = int(m[1]) * 3 + int(m[3])
        return f"diffusion_model_output_blocks_{block}_{1 if m[2] == 'attentions' else 0}_{inner(m[2], m[4])}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", name):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", name):
        i = int(m[1])
        return f"diffusion_model_output_blocks_{2 + i * 3}_{2 if i > 0 else 1}_conv"
    return name


def a1111_module_names(unet_config: Any = None) -> dict[str, str]:
    """A1111's ``network_layer_mapping`` names of the UNet (``diffusion_model_...``) -> module kind.

    Kinds: ``"linear"``, ``"conv"``, ``"norm"`` (from the weight's rank) or ``"container"`` (no own weight).
    """
    names: dict[str, str] = {"diffusion_model": "container"}
    for key, shape in ldm_unet_shapes(unet_config).items():
        parts = key.split(".")
        for i in range(1, len(parts) - 1):
            names.setdefault("diffusion_model_" + "_".join(parts[:i]), "container")
        if parts[-1] == "weight":
            kind = {2: "linear", 4: "conv"}.get(len(shape), "norm")
            names["diffusion_model_" + "_".join(parts[:-1])] = kind
    return names


def _a1111_lookup(name: str, modules: Mapping[str, str]) -> str | None:
    key = a1111_convert_name(name)
    if key in modules:
        return key
    if (m := _X_PROJ.match(key)) and m[1] in modules:
        return m[1]
    if "lora_unet" in name:
        key = name.replace("lora_unet", "diffusion_model")
        if key in modules:
            return key
    return None


# ---------------------------------------------------------------------------------------------------- the check
@dataclass(frozen=True)
class LoraKeyCheck:
    """What each loader does with one key.

    Args:
        key (`str`): the state-dict key.
        comfyui (`str`): one of `LORA_CHECK_VERDICTS`.
        comfyui_detail (`str`): the model weight it patches, or why not.
        a1111 (`str`): one of `LORA_CHECK_VERDICTS`.
        a1111_detail (`str`): the A1111 module it patches, or why not.
    """

    key: str
    comfyui: str
    comfyui_detail: str
    a1111: str
    a1111_detail: str


@dataclass(frozen=True)
class LoraCheckReport:
    """Per-key verdicts of `check_lora_state_dict`.

    Args:
        checks (`tuple[LoraKeyCheck, ...]`): one per key, in input order.
        unet_config (`dict`): the diffusers UNet config checked against.
    """

    checks: tuple[LoraKeyCheck, ...]
    unet_config: dict[str, Any]

    def failing(self, loader: str) -> list[LoraKeyCheck]:
        """Keys ``loader`` (``"comfyui"`` or ``"a1111"``) does not load."""
        if loader not in ("comfyui", "a1111"):
            raise ValueError(f"loader={loader!r}: expected 'comfyui' or 'a1111'")
        return [c for c in self.checks if getattr(c, loader) != "loaded"]

    @property
    def comfyui_ok(self) -> bool:
        return not self.failing("comfyui")

    @property
    def a1111_ok(self) -> bool:
        return not self.failing("a1111")

    @property
    def ok(self) -> bool:
        """Every key is loaded by both loaders."""
        return self.comfyui_ok and self.a1111_ok

    def comfyui_warnings(self) -> list[str]:
        """The warnings ComfyUI would log (``lora key not loaded: <key>``; ``NOT LOADED <weight>``)."""
        out = []
        for c in self.checks:
            if c.comfyui == "not loaded":
                out.append(
                    c.comfyui_detail if c.comfyui_detail.startswith("NOT LOADED") else f"lora key not loaded: {c.key}"
                )
        return out

    def to_text(self, limit: int = 20) -> str:
        lines = [f"{len(self.checks)} keys checked"]
        for loader, label in (("comfyui", "ComfyUI"), ("a1111", "A1111")):
            bad = self.failing(loader)
            lines.append(f"{label}: " + ("every key loads" if not bad else f"{len(bad)} key(s) do not load"))
            for c in bad[:limit]:
                lines.append(f"  {c.key}: {getattr(c, loader)} ({getattr(c, loader + '_detail')})")
            if len(bad) > limit:
                lines.append(f"  ... {len(bad) - limit} more")
        return "\n".join(lines)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def _delta_fits(up: tuple[int, ...], down: tuple[int, ...], weight: tuple[int, ...]) -> str:
    """Empty when ``up @ down`` can be reshaped to the weight, else why not."""
    if len(up) < 2 or len(down) < 2 or math.prod(up[1:]) != down[0]:
        return f"up {list(up)} and down {list(down)} do not multiply"
    if up[0] * math.prod(down[1:]) != math.prod(weight):
        return f"up @ down has {up[0] * math.prod(down[1:])} values, the weight {list(weight)} {math.prod(weight)}"
    return ""


def _comfyui(shapes: Mapping[str, tuple[int, ...]], config: dict[str, Any]) -> dict[str, tuple[str, str]]:
    key_map = comfyui_lora_key_map(config)
    model = {f"diffusion_model.{k}": v for k, v in ldm_unet_shapes(config).items()}
    verdict: dict[str, tuple[str, str]] = {}
    for x, target in key_map.items():
        for suffix in _COMFY_SINGLE:
            if x + suffix in shapes:
                verdict[x + suffix] = ("loaded", target)
        for up_s, down_s, mid_s in _COMFY_LORA_PAIRS:
            up, down = x + up_s, x + down_s
            if up not in shapes:
                continue
            if down not in shapes:
                verdict[up] = ("error", f"{down!r} is missing: ComfyUI's LoRA loader raises KeyError")
                break
            why = _delta_fits(shapes[up], shapes[down], model[target]) if target in model else ""
            state = ("error", f"{why}: ComfyUI logs an error and skips {target}") if why else ("loaded", target)
            verdict[up] = verdict[down] = state
            if mid_s and x + mid_s in shapes:
                verdict[x + mid_s] = state
            if x + ".reshape_weight" in shapes:
                verdict[x + ".reshape_weight"] = state
            break
    for key, (state, target) in list(verdict.items()):
        if state == "loaded" and target not in model:
            verdict[key] = ("not loaded", f"NOT LOADED {target} (the model has no such weight)")
    for key in shapes:
        if key not in verdict:
            if any(_OTHER_ADAPTER_PART.match(key[i + 1 :]) for i, c in enumerate(key) if c == "."):
                verdict[key] = ("not modelled", "adapter type other than LoRA")
            else:
                verdict[key] = ("not loaded", "no entry of model_lora_keys_unet takes it")
    return verdict


_A1111_PARTS = {"lora": ({"lora_up.weight", "lora_down.weight"}, {"lora_A.weight", "lora_B.weight"})}


def _a1111(shapes: Mapping[str, tuple[int, ...]], config: dict[str, Any]) -> dict[str, tuple[str, str]]:
    modules = a1111_module_names(config)
    weights = {
        "diffusion_model_" + k[: -len(".weight")].replace(".", "_"): v
        for k, v in ldm_unet_shapes(config).items()
        if k.endswith(".weight")
    }
    verdict: dict[str, tuple[str, str]] = {}
    groups: dict[str, dict[str, str]] = {}
    for key in shapes:
        name, _, part = key.partition(".")
        module = _a1111_lookup(name, modules)
        if module is None:
            verdict[key] = ("not loaded", f"{name!r} matches no module (keys_failed_to_match, logged at DEBUG)")
        else:
            group = groups.setdefault(module, {})
            if part in group:  # two names land on one module: A1111 keeps the later tensor (NetworkWeights.w[part])
                earlier = group[part]
                verdict[earlier] = ("not loaded", f"{module} also named by {key!r}, whose tensor replaces it")
            group[part] = key
    for module, parts in groups.items():
        names = set(parts)
        lora_pair = next((p for p in _A1111_PARTS["lora"] if p <= names), None)
        kind = modules[module]
        if lora_pair is not None:
            if kind not in ("linear", "conv"):
                state = ("error", f"LoRA on {module} ({kind}): A1111 raises AssertionError (unsupported layer type)")
            else:
                up = parts["lora_up.weight" if "lora_up.weight" in names else "lora_B.weight"]
                down = parts["lora_down.weight" if "lora_down.weight" in names else "lora_A.weight"]
                why = _delta_fits(shapes[up], shapes[down], weights[module]) if module in weights else ""
                state = ("error", f"{why}: the weight is not patched") if why else ("loaded", module)
        elif "diff" in names or names & {"w_norm", "b_norm"}:
            state = ("loaded", module)
        elif any(_OTHER_ADAPTER_PART.match(p) for p in names):
            state = ("not modelled", "adapter type other than LoRA")
        else:
            state = ("error", f"parts {sorted(names)} fit no module type: A1111 raises AssertionError, the LoRA fails")
        for key in parts.values():
            verdict[key] = state
    return verdict


def check_lora_state_dict(state_dict: Mapping[str, Any], unet_config: Any = None) -> LoraCheckReport:
    """Say, per key, whether ComfyUI's and A1111's stock LoRA loaders load it for a UNet of ``unet_config``.

    Args:
        state_dict (`Mapping[str, Any]`): key -> tensor, `TensorInfo` or shape tuple (only shapes are read).
        unet_config (`Mapping` or UNet, *optional*): the base UNet's diffusers config; SD 1.5's when None.

    Returns:
        `LoraCheckReport`: ``report.ok`` when every key loads in both; ``report.comfyui_warnings()`` lists what
        ComfyUI would print.
    """
    config = _config(unet_config)
    shapes = {str(k): _shape(v) for k, v in state_dict.items()}
    comfy, a1111 = _comfyui(shapes, config), _a1111(shapes, config)
    checks = tuple(LoraKeyCheck(k, *comfy[k], *a1111[k]) for k in shapes)
    return LoraCheckReport(checks, config)


def check_lora_file(path: str | os.PathLike, unet_config: Any = None) -> LoraCheckReport:
    """`check_lora_state_dict` on a safetensors file's header (no tensor data read).

    The UNet config is ``unet_config``, else the file's ``l2i.unet_config``, else SD 1.5's.
    """
    header = read_safetensors_header(Path(path))
    if unet_config is None and header.metadata.get("l2i.unet_config"):
        unet_config = json.loads(header.metadata["l2i.unet_config"])
    return check_lora_state_dict({k: v.shape for k, v in header.tensors.items()}, unet_config)
