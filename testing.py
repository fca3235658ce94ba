"""Tiny model configs and builders shared by the test suite and the benchmarks (like diffusers'
``diffusers.utils.testing_utils``). Not part of the user-facing API: the shapes are chosen to be fast on a CPU,
not to produce images.

Every ``*_config`` function returns a fresh dict of constructor kwargs; keyword overrides replace (or add) keys,
so a caller states only how its model differs from the shared one, e.g. ``tiny_unet_config(cross_attention_dim=16)``.
torch, diffusers and transformers are imported inside the functions that need them; nothing here imports ComfyUI.

For checks that a stock loader (diffusers, peft, transformers) takes a file without complaint,
`capture_loader_messages` records its log records and Python warnings and `loader_problems` picks the lines about
keys or weights (`LOADER_PROBLEM`) other than the expected one (`LOADER_EXPECTED`)::

    with capture_loader_messages() as lines:
        pipe.load_lora_weights(path)
    assert loader_problems(lines) == []
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import socket
import urllib.request
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "FLOAT_OUTPUT_ULPS",
    "LOADER_EXPECTED",
    "LOADER_LOGGERS",
    "LOADER_PROBLEM",
    "TINY_VOCAB",
    "assert_close_for_dtype",
    "capture_loader_messages",
    "declared_size_png",
    "float_tolerance",
    "free_port",
    "http_json",
    "loader_problems",
    "sd1x_tiny_unet_config",
    "tiny_clip",
    "tiny_clip_text_config",
    "tiny_unet_config",
    "tiny_vae_config",
    "write_tiny_sd",
]


def tiny_unet_config(**overrides: Any) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs for the suite's tiny toy-world UNet.

    Two levels, blocks (32, 64): ``CrossAttnDownBlock2D`` + ``DownBlock2D`` down, ``UpBlock2D`` +
    ``CrossAttnUpBlock2D`` up, one resnet per level, 8 GroupNorm groups, 8-channel attention heads, 4 latent
    channels in and out at ``sample_size`` 16, text context (B, T, 32). About 0.8M parameters.
    """
    return {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
        **overrides,
    }


def sd1x_tiny_unet_config(**overrides: Any) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs with SD 1.5's block structure at tiny widths.

    Four levels, blocks (32, 32, 64, 64): three ``CrossAttnDownBlock2D`` + one ``DownBlock2D`` down, the mirror up,
    two resnets per level (``layers_per_block=2``), so module names, SPADE sites and kohya/ldm key arithmetic match
    SD 1.x; otherwise as `tiny_unet_config` (8 groups, 8-channel heads, ``sample_size`` 16, context width 32).
    """
    return tiny_unet_config(
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        **overrides,
    )


def tiny_vae_config(**overrides: Any) -> dict[str, Any]:
    """``AutoencoderKL`` kwargs for a tiny 2x VAE: RGB (B, 3, H, W) <-> latents (B, 4, H/2, W/2).

    Blocks (8, 16), one resnet per level, 4 GroupNorm groups, ``sample_size`` 32. For SD's 8x factor (and with it
    the ControlNet's standard hint block) pass four levels, e.g. ``block_out_channels=(8, 8, 8, 8)`` with
    ``down_block_types=("DownEncoderBlock2D",) * 4`` and ``up_block_types=("UpDecoderBlock2D",) * 4``.
    """
    return {
        "block_out_channels": (8, 16),
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "layers_per_block": 1,
        "sample_size": 32,
        **overrides,
    }


#: The tiny tokenizer's vocabulary: start/end tokens and the 26 lowercase letters, each also as a word end.
TINY_VOCAB: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
for _ch in "abcdefghijklmnopqrstuvwxyz":
    TINY_VOCAB[_ch] = len(TINY_VOCAB)
    TINY_VOCAB[_ch + "</w>"] = len(TINY_VOCAB)
del _ch


def tiny_clip_text_config(**overrides: Any) -> dict[str, Any]:
    """``CLIPTextConfig`` kwargs for a tiny CLIP text encoder over `TINY_VOCAB` (54 tokens).

    Hidden width 16 (the prompt embedding is (B, 16, 16) at the tokenizer's 16 tokens), 2 layers of 2 heads,
    MLP width 24; the end token doubles as padding. Pass ``hidden_size`` to match a UNet's ``cross_attention_dim``.
    """
    return {
        "vocab_size": len(TINY_VOCAB),
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        **overrides,
    }


def tiny_clip(folder: Path, **overrides: Any):
    """A tiny ``(CLIPTextModel, CLIPTokenizer)`` pair with random weights (seed torch before calling).

    Writes the tokenizer's ``vocab.json`` (`TINY_VOCAB`) and an empty ``merges.txt`` into ``folder`` (created if
    missing); the tokenizer pads/truncates to 16 tokens. ``overrides`` go to `tiny_clip_text_config`. The model is
    returned in training mode, as constructed.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(TINY_VOCAB))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    return CLIPTextModel(CLIPTextConfig(**tiny_clip_text_config(**overrides))), tokenizer


def write_tiny_sd(
    folder: Path, unet: dict[str, Any] | None = None, vae: dict[str, Any] | None = None, seed: int = 0
) -> Path:
    """Write a tiny SD 1.x-shaped diffusers folder with random weights and return it.

    ``unet``/``vae`` are constructor kwargs (default: `tiny_unet_config` with ``cross_attention_dim=16`` and
    `tiny_vae_config`); the text encoder is `tiny_clip` with ``hidden_size`` = the UNet's ``cross_attention_dim``.
    Subfolders unet, vae, text_encoder, tokenizer, plus SD 1.5's ``model_index.json`` and DDPM scheduler config
    from ``trainer/sd15_config``; the tokenizer's source ``vocab.json``/``merges.txt`` stay in ``folder``.
    torch is seeded with ``seed`` once, then UNet, VAE and text encoder are built in that order.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .trainer.models import SD15_CONFIG_DIR

    folder = Path(folder)
    unet = tiny_unet_config(cross_attention_dim=16) if unet is None else unet
    vae = tiny_vae_config() if vae is None else vae
    torch.manual_seed(seed)
    UNet2DConditionModel(**unet).save_pretrained(folder / "unet")
    AutoencoderKL(**vae).save_pretrained(folder / "vae")
    text, tokenizer = tiny_clip(folder, hidden_size=unet["cross_attention_dim"])
    tokenizer.save_pretrained(folder / "tokenizer")
    text.save_pretrained(folder / "text_encoder")
    shutil.copy(SD15_CONFIG_DIR / "model_index.json", folder / "model_index.json")
    shutil.copytree(SD15_CONFIG_DIR / "scheduler", folder / "scheduler")
    return folder


#: Loggers `capture_loader_messages` listens to: the root logger and those of the libraries that load weights
#: (diffusers and transformers do not propagate to the root logger).
LOADER_LOGGERS = ("", "diffusers", "peft", "transformers", "accelerate")
#: A captured line about weights or keys: what a loader says when a key does not land, or anything its LoRA or
#: ControlNet code logs (the logger name is part of the line, e.g. ``diffusers.loaders.lora_pipeline``).
LOADER_PROBLEM = re.compile(
    r"unexpected|missing|not loaded|not used|were not|mismatch|not initiali|not found|lora|controlnet|key",
    re.IGNORECASE,
)
#: The one expected line: a UNet-only LoRA has no text-encoder keys, which diffusers notes ("safe to ignore").
LOADER_EXPECTED = re.compile(r"No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'")


@contextlib.contextmanager
def capture_loader_messages(level: int = logging.INFO) -> Iterator[list[str]]:
    """Record what the weight loaders log and warn inside the ``with`` block, as it happens.

    Yields a list that fills with one ``"LEVEL logger: message"`` line per log record at ``level`` or above on
    `LOADER_LOGGERS` (a record that reaches several of them once), and one ``"WARNING py.warnings: Category:
    message"`` line per Python warning (every warning, repeats included; it is not printed). A library's own
    logger level still decides which records exist: e.g. diffusers logs INFO only after
    ``diffusers.utils.logging.set_verbosity_info()``.

    Args:
        level (`int`, defaults to `logging.INFO`): the lowest log level kept.
    """
    lines: list[str] = []

    class _Lines(logging.Handler):
        last: logging.LogRecord | None = None

        def emit(self, record: logging.LogRecord) -> None:
            if record is not self.last:  # the same record propagating from one of the loggers to another
                self.last = record
                lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        lines.append(f"WARNING py.warnings: {category.__name__}: {message}")

    handler = _Lines(level=level)
    loggers = [logging.getLogger(name) for name in LOADER_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings():  # restores the filters and showwarning on exit
            warnings.simplefilter("always")
            warnings.showwarning = show
            yield lines
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def loader_problems(lines: Iterable[str], level: int = logging.WARNING) -> list[str]:
    """The lines of `capture_loader_messages` at ``level`` or above (Python warnings count as WARNING) that match
    `LOADER_PROBLEM` and not `LOADER_EXPECTED`; ``[]`` when a load went through without complaint.

    Args:
        lines (`Iterable[str]`): captured ``"LEVEL logger: message"`` lines.
        level (`int`, defaults to `logging.WARNING`): the lowest log level that counts.
    """
    levels = logging.getLevelNamesMapping()
    return [
        line
        for line in lines
        if levels.get(line.partition(" ")[0], logging.CRITICAL) >= level
        and LOADER_PROBLEM.search(line)
        and not LOADER_EXPECTED.search(line)
    ]


# ---------------------------------------------------------------------------------------------------- a ComfyUI server
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a headless ComfyUI server started by a test or benchmark)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, payload: Any = None, timeout: float = 10.0) -> Any:
    """GET ``url`` (or POST ``payload`` as JSON when given) and decode the JSON answer, as ComfyUI's HTTP API speaks.

    Raises:
        urllib.error.URLError: the server is not (yet) reachable; `urllib.error.HTTPError` for an error status.
    """
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode())


# ---------------------------------------------------------------------------------------------------- float outputs
# How far two computations of the same float function may drift apart, in units of the dtype's eps times the
# largest magnitude of the expected output. Kernels pick their summation order (SIMD width, blocking, threads) by
# CPU, storage alignment and batch size, so the same model on two CPUs, or over weights in two differently aligned
# buffers, rounds differently. Measured: a tiny random SDM UNet (outputs up to 51) differs by 4.1e-5 between
# weights read from safetensors and the original module, i.e. about 7 eps of its magnitude; 64 leaves room for
# deeper reductions while a wrong weight or a missed term (differences of order of the output) still fails.
FLOAT_OUTPUT_ULPS = 64


def float_tolerance(dtype: Any, magnitude: float, ulps: float = FLOAT_OUTPUT_ULPS) -> float:
    """The absolute tolerance for outputs of ``dtype`` whose largest magnitude is ``magnitude``:
    ``ulps * torch.finfo(dtype).eps * magnitude``."""
    import torch

    return float(ulps * torch.finfo(dtype).eps * float(magnitude))


def assert_close_for_dtype(actual: Any, expected: Any, *, ulps: float = FLOAT_OUTPUT_ULPS, msg: str = "") -> None:
    """Assert that two float outputs (torch tensors or numpy arrays) agree up to rounding.

    Outputs of float kernels are never compared bit for bit (only weights and data read back from files are): the
    tolerance is `float_tolerance` of the dtype and the largest magnitude of ``expected``, applied to every
    element, since an element near zero (a cancellation) carries the rounding of the large terms it came from.
    Shapes, dtypes and NaN positions must match exactly.

    Args:
        actual, expected (`torch.Tensor` or `np.ndarray`): same shape and float dtype.
        ulps (`float`, defaults to `FLOAT_OUTPUT_ULPS`): allowed drift in units of eps times the magnitude.
        msg (`str`): prefix of the failure message (e.g. which output).
    """
    import torch

    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    if not expected.is_floating_point():
        raise TypeError(f"assert_close_for_dtype compares float outputs, got {expected.dtype}; use torch.equal")
    finite = expected[torch.isfinite(expected)]
    magnitude = float(finite.abs().max()) if finite.numel() else 0.0
    atol = float_tolerance(expected.dtype, magnitude, ulps)
    prefix = f"{msg}: " if msg else ""
    torch.testing.assert_close(
        actual,
        expected,
        rtol=0,
        atol=atol,
        equal_nan=True,
        msg=lambda m: (
            f"{prefix}{m}\n(tolerance {atol:.3g} = {ulps:g} x eps({expected.dtype}) x magnitude {magnitude:.3g})"
        ),
    )


# ---------------------------------------------------------------------------------------------------- bad images
def declared_size_png(path: Path, width: int, height: int) -> Path:
    """Write a PNG of about 100 bytes whose header declares ``width`` x ``height`` 1-bit grey pixels.

    Only the header is real (the pixel data is a stub): what a pixel-limit check must refuse before decoding, the
    way a 140 KB PNG declaring 12000x12000 would otherwise take gigabytes to open.
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    stub = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stub) + chunk(b"IEND", b""))
    return path
