"""An optional on-disk cache of VAE latents and text embeddings, one safetensors file per entry.

The cache knows no model: callers pass the encoders as callables and an id string for each (what the result
depends on: the model files, the scaling factor, the dtype). Keys are hashes of

- latents: the sample's ``pixel_key`` (the image file's bytes, the resize, the crop box and the flip flag; see
  `SegmentationDataset.get`) and the image encoder id;
- text embeddings: the caption text and the text encoder id.

So a changed file, crop, flip or encoder misses, and nothing is ever stale. Random crops and flips give a new
key each epoch; the latent cache pays off when the augmentation is off or repeats (validation, center crops,
``flip_prob=0``, several runs over the same data). Writes are atomic (temporary file + rename), so an
interrupted run or several processes never leave a half-written entry; an entry that cannot be read anyway is
recomputed and rewritten, with a warning.

Layout: ``root/{latents,text}/<key[:2]>/<key>.safetensors`` holding one tensor ``"value"`` and the key in the
metadata.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...core.files import atomic_path
from ...core.logging import get_logger

__all__ = ["CacheStats", "EncodingCache"]

logger = get_logger(__name__)

_FORMAT = "layout2image-cache-v1"


@dataclass
class CacheStats:
    """Counts since the cache was made.

    Args:
        hits (`int`): entries read from disk.
        misses (`int`): entries computed because they were absent.
        corrupt (`int`): entries that existed but could not be read, and were recomputed.
    """

    hits: int = 0
    misses: int = 0
    corrupt: int = 0


class EncodingCache:
    """Latents and text embeddings on disk, computed through the callables given on a miss.

    Args:
        root (`str` or `os.PathLike`): the cache folder (created on first write).
        image_encoder_id (`str`): identifies the image encoder (e.g. the VAE path, dtype and scaling factor);
            part of every latent key.
        text_encoder_id (`str`): identifies the text encoder and tokenizer; part of every text key.

    Example::

        cache = EncodingCache(out / "cache", image_encoder_id=f"{vae_path}|sf=0.18215|fp16", text_encoder_id=te_id)
        latents = cache.latents(batch, lambda x: vae.encode(x.to(device)).latent_dist.mean * 0.18215, device=device)
        text = cache.text_embeddings(batch["caption"], encode_prompts, device=device)
    """

    def __init__(self, root: str | os.PathLike, *, image_encoder_id: str, text_encoder_id: str) -> None:
        for name, value in (("image_encoder_id", image_encoder_id), ("text_encoder_id", text_encoder_id)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name}={value!r} must be a non-empty string that identifies the encoder")
        self.root = Path(root)
        self.image_encoder_id = image_encoder_id
        self.text_encoder_id = text_encoder_id
        self.stats = CacheStats()

    # ------------------------------------------------------------------ keys and files
    def latent_key(self, pixel_key: str) -> str:
        """Key of the latent of a sample with ``pixel_key`` (from `SegmentationDataset.get`)."""
        return hashlib.sha256(f"latent\0{self.image_encoder_id}\0{pixel_key}".encode()).hexdigest()

    def text_key(self, caption: str) -> str:
        """Key of the embedding of ``caption``."""
        return hashlib.sha256(f"text\0{self.text_encoder_id}\0{caption}".encode()).hexdigest()

    def path_of(self, kind: str, key: str) -> Path:
        """File of an entry; ``kind`` is ``"latents"`` or ``"text"``."""
        if kind not in ("latents", "text"):
            raise ValueError(f"kind={kind!r} is not valid; use 'latents' or 'text'")
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def _read(self, path: Path, key: str) -> torch.Tensor | None:
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key or meta.get("format") != _FORMAT:
                    raise ValueError(f"metadata {meta} does not match key {key}")
                return f.get_tensor("value")
        except Exception as e:  # safetensors raises its own error types (and OSError, ValueError) for bad files
            self.stats.corrupt += 1
            logger.warning("cache entry %s cannot be read (%s); recomputing it", path, e)
            return None

    def _write(self, path: Path, key: str, value: torch.Tensor) -> None:
        from safetensors.torch import save_file

        # No fsync per entry (hundreds of small files): an entry a power cut truncates fails `_read`'s check and is
        # recomputed.
        with atomic_path(path, fsync=False) as tmp:
            save_file(
                {"value": value.detach().to("cpu").contiguous()}, str(tmp), metadata={"key": key, "format": _FORMAT}
            )

    def _get(
        self,
        kind: str,
        keys: Sequence[str],
        compute: Callable[[list[int]], torch.Tensor],
        what: str,
        device: torch.device | str | None,
    ) -> torch.Tensor:
        corrupt_before = self.stats.corrupt
        found: list[torch.Tensor | None] = [self._read(self.path_of(kind, k), k) for k in keys]
        missing = [i for i, v in enumerate(found) if v is None]
        self.stats.hits += len(keys) - len(missing)
        self.stats.misses += len(missing) - (self.stats.corrupt - corrupt_before)
        if missing:
            computed = compute(missing)
            if not isinstance(computed, torch.Tensor) or computed.ndim < 1 or computed.shape[0] != len(missing):
                shape = tuple(computed.shape) if isinstance(computed, torch.Tensor) else type(computed).__name__
                raise ValueError(
                    f"the {what} encoder returned {shape} for {len(missing)} input(s); it must return a tensor "
                    f"with one row per input, (B, ...)"
                )
            for row, i in enumerate(missing):
                found[i] = computed[row]
                self._write(self.path_of(kind, keys[i]), keys[i], computed[row])
        target = device if device is not None else "cpu"
        values = [v.to(target) for v in found]  # type: ignore[union-attr]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ValueError(
                f"cached {what} have different shapes {sorted(shapes)}; the encoder id does not capture "
                "everything the output depends on (e.g. the resolution or model), or the cache folder is shared "
                "by different encoders"
            )
        return torch.stack(values)

    # ------------------------------------------------------------------ public API
    def latents(
        self,
        batch: Mapping[str, Any],
        encode: Callable[[torch.Tensor], torch.Tensor],
        *,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Latents of a collated batch, from disk where cached, else ``encode`` (one call for all misses).

        Args:
            batch (`Mapping`): a `collate`d batch with ``pixel_values`` `(B, 3, H, W)` float32 in [-1, 1] and
                ``pixel_key`` (list of `str`).
            encode (`Callable`): `(b, 3, H, W)` float32 in [-1, 1] (the rows not cached, on the CPU) ->
                `(b, C, H/8, W/8)` latents (already scaled as the model expects).
            device (*optional*): device of the result; defaults to the CPU.

        Returns:
            `(B, C, H/8, W/8)` tensor, in the dtype ``encode`` returned.
        """
        if "pixel_values" not in batch or "pixel_key" not in batch:
            raise KeyError("batch needs 'pixel_values' and 'pixel_key' (a collated batch of dataset samples)")
        pixel_values = batch["pixel_values"]
        keys = [self.latent_key(k) for k in batch["pixel_key"]]
        if pixel_values.shape[0] != len(keys):
            raise ValueError(f"batch has {pixel_values.shape[0]} images but {len(keys)} pixel keys")

        def compute(rows: list[int]) -> torch.Tensor:
            with torch.no_grad():
                return encode(pixel_values[rows])

        return self._get("latents", keys, compute, "image", device)

    def text_embeddings(
        self,
        captions: Sequence[str],
        encode: Callable[[list[str]], torch.Tensor],
        *,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Text embeddings of ``captions``, from disk where cached, else ``encode`` (one call for all misses).

        Args:
            captions (`Sequence[str]`): one caption per batch item.
            encode (`Callable`): list of `b` captions -> `(b, L, D)` embeddings (e.g. `(b, 77, 768)` for SD 1.5).
            device (*optional*): device of the result; defaults to the CPU.

        Returns:
            `(B, L, D)` tensor, in the dtype ``encode`` returned.
        """
        if isinstance(captions, str):
            raise TypeError("captions must be a sequence of strings, one per batch item, not one string")
        captions = list(captions)
        keys = [self.text_key(c) for c in captions]

        def compute(rows: list[int]) -> torch.Tensor:
            with torch.no_grad():
                return encode([captions[i] for i in rows])

        return self._get("text", keys, compute, "text", device)
