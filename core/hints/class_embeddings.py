"""The class-embedding table behind ALDM's hint: one text embedding per class name plus a null row.

The builder takes any *encode function* (a list of texts -> `(len, D)` tensor), so the same code serves a
transformers CLIP text encoder loaded from a local path (`clip_text_encode_fn`) and, in the ComfyUI layer,
ComfyUI's own CLIP object.

Which CLIP output is used (the ALDM release does not document it, see design/aldm.md §3): by default the
*pooled* output of transformers' `CLIPTextModel`, i.e. the final-layer-normed hidden state at the EOS token,
before any projection. For SD 1.5's ViT-L/14 its norm is about 28, like the official table's rows. ``pooling=
"mean"`` averages the final hidden states over the prompt's tokens instead. The null row (ignore pixels) is the
encoding of ``null_text`` (the empty prompt by default) or zeros.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..files import save_safetensors_atomic
from ..labels.labelset import LabelSet
from ..logging import get_logger

__all__ = ["DEFAULT_TEMPLATE", "build_class_embedding_table", "class_prompts", "clip_text_encode_fn"]

logger = get_logger(__name__)

DEFAULT_TEMPLATE = "a photo of {name}"
EncodeFn = Callable[[list[str]], torch.Tensor]

_memory_cache: dict[str, torch.Tensor] = {}


def class_prompts(label_set: LabelSet, template: str = DEFAULT_TEMPLATE) -> list[str]:
    """The texts encoded for each class: ``template`` with ``{name}`` filled by the class name (``_`` -> space)."""
    if "{name}" not in template:
        raise ValueError(f"template {template!r} must contain '{{name}}', e.g. {DEFAULT_TEMPLATE!r}")
    return [template.format(name=n.replace("_", " ")) for n in label_set.names]


def _cache_key(label_set: LabelSet, template: str, null: str, encoder_id: str) -> str:
    payload = json.dumps([label_set.fingerprint(), template, null, encoder_id]).encode()
    return hashlib.sha256(payload).hexdigest()[:24]


def build_class_embedding_table(
    label_set: LabelSet,
    encode_fn: EncodeFn,
    *,
    template: str = DEFAULT_TEMPLATE,
    null_text: str | None = "",
    encoder_id: str | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Encode every class name and append the null row.

    Args:
        label_set (`LabelSet`): the classes, in id order.
        encode_fn (`Callable[[list[str]], torch.Tensor]`): texts -> `(len(texts), D)` embeddings.
        template (`str`, defaults to ``"a photo of {name}"``): prompt per class.
        null_text (`str` or None, defaults to ``""``): text encoded for the null row; None gives a zero row.
        encoder_id (`str`, *optional*): a stable name for the encoder (path or hub id plus revision). With it,
            tables are cached in memory, and on disk under ``cache_dir``, keyed by (label set, template, null,
            encoder). Without it nothing is cached, since two encoders could not be told apart.
        cache_dir (`str` or `Path`, *optional*): folder for ``<key>.safetensors`` cache files.
        batch_size (`int`, defaults to 64): texts per ``encode_fn`` call.

    Returns:
        `torch.Tensor`: `(N + 1, D)` float32 on the CPU; row N is the null embedding.
    """
    null_key = "<zeros>" if null_text is None else null_text
    key = _cache_key(label_set, template, null_key, encoder_id) if encoder_id else None
    if key is not None and key in _memory_cache:
        return _memory_cache[key].clone()
    cache_file = Path(cache_dir) / f"class_embeddings_{key}.safetensors" if (key and cache_dir) else None
    if cache_file is not None and cache_file.exists():
        from safetensors.torch import load_file

        table = load_file(str(cache_file))["table"]
        _memory_cache[key] = table
        return table.clone()

    texts = class_prompts(label_set, template)
    if null_text is not None:
        texts.append(null_text)
    chunks = []
    for start in range(0, len(texts), batch_size):
        out = encode_fn(texts[start : start + batch_size])
        out = torch.as_tensor(out).detach().to("cpu", torch.float32)
        if out.ndim != 2 or out.shape[0] != len(texts[start : start + batch_size]):
            raise ValueError(
                f"encode_fn returned shape {tuple(out.shape)} for {len(texts[start : start + batch_size])} texts; "
                f"it must return (len(texts), D)"
            )
        chunks.append(out)
    table = torch.cat(chunks, dim=0)
    if null_text is None:
        table = torch.cat([table, torch.zeros(1, table.shape[1])], dim=0)
    if key is not None:
        _memory_cache[key] = table
    if cache_file is not None:
        save_safetensors_atomic(
            {"table": table.contiguous()},
            cache_file,
            metadata={"label_set": label_set.name, "template": template, "null_text": null_key, "encoder": encoder_id},
        )
        logger.info("cached class-embedding table for %r at %s", label_set.name, cache_file)
    return table.clone()


def clip_text_encode_fn(
    text_encoder: torch.nn.Module,
    tokenizer,
    *,
    pooling: str = "eos",
    device: torch.device | str | None = None,
) -> EncodeFn:
    """An encode function over a transformers `CLIPTextModel` and its tokenizer.

    Args:
        text_encoder (`transformers.CLIPTextModel`): the text tower (SD 1.5's ViT-L/14, or the toy encoder).
        tokenizer (`transformers.CLIPTokenizer`): its tokenizer; texts are padded to ``model_max_length``.
        pooling (`str`, defaults to ``"eos"``): ``"eos"`` = ``pooler_output`` (final-layer-normed hidden state
            at the EOS token); ``"mean"`` = mean of the final hidden states over non-padding tokens.
        device (*optional*): where to run; defaults to the encoder's device.
    """
    if pooling not in ("eos", "mean"):
        raise ValueError(f"pooling={pooling!r} is not valid; use 'eos' or 'mean'")

    @torch.no_grad()
    def encode(texts: Sequence[str]) -> torch.Tensor:
        dev = device or next(text_encoder.parameters()).device
        tokens = tokenizer(
            list(texts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(dev)
        mask = tokens.attention_mask.to(dev)
        out = text_encoder(input_ids=ids, attention_mask=mask if pooling == "mean" else None)
        if pooling == "eos":
            return out.pooler_output.float()
        hidden = out.last_hidden_state.float()
        weights = mask.unsqueeze(-1).float()
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    return encode
