"""Write sdm_ade20k_manifest.json: the official SDM ADE20K UNet's keys and shapes, from design/sdm.md §3 alone.

Deliberately independent of ``layout2image.core.sdm`` (it imports nothing from the package), so that
tests/test_sdm.py compares our ``SDMUNet`` against a second, separately written derivation. Block contents follow
the official modules (guided_diffusion/unet.py ``ResBlock``, ``SDMResBlock``, ``AttentionBlock``).

Run once: ``python tests/data/make_sdm_manifest.py`` (prints the counts that were checked by hand).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

C_Y = 151  # ADE20K: 150 classes + "unknown", no edge channel
EMB = 1024  # 4 × 256
SPADE_HIDDEN = 128
# sdm.md §3 level table: (resolution, width, attention)
LEVELS = [(256, 256, False), (128, 256, False), (64, 512, False), (32, 512, True), (16, 1024, True), (8, 1024, True)]

keys: dict[str, list[int]] = {}


def add(name: str, *shape: int) -> None:
    keys[name] = list(shape)


def group_norm(prefix: str, ch: int) -> None:
    add(prefix + ".weight", ch)
    add(prefix + ".bias", ch)


def conv(prefix: str, cin: int, cout: int, k: int = 3) -> None:
    add(prefix + ".weight", cout, cin, k, k)
    add(prefix + ".bias", cout)


def linear(prefix: str, cin: int, cout: int) -> None:
    add(prefix + ".weight", cout, cin)
    add(prefix + ".bias", cout)


def spade(prefix: str, ch: int) -> None:
    conv(prefix + ".mlp_shared.0", C_Y, SPADE_HIDDEN)
    conv(prefix + ".mlp_gamma", SPADE_HIDDEN, ch)
    conv(prefix + ".mlp_beta", SPADE_HIDDEN, ch)


def sde(prefix: str, cin: int, cout: int) -> None:
    """Encoder ResBlock: in_layers = [GN, SiLU, Conv], out_layers = [GN, SiLU, Dropout, Conv]."""
    group_norm(prefix + ".in_layers.0", cin)
    conv(prefix + ".in_layers.2", cin, cout)
    linear(prefix + ".emb_layers.1", EMB, 2 * cout)
    group_norm(prefix + ".out_layers.0", cout)
    conv(prefix + ".out_layers.3", cout, cout)
    if cin != cout:
        conv(prefix + ".skip_connection", cin, cout, 1)


def sdd(prefix: str, cin: int, cout: int) -> None:
    """SDMResBlock: in_norm/out_norm SPADE, in_layers = [SiLU, Conv], out_layers = [SiLU, Dropout, Conv]."""
    spade(prefix + ".in_norm", cin)
    conv(prefix + ".in_layers.1", cin, cout)
    linear(prefix + ".emb_layers.1", EMB, 2 * cout)
    spade(prefix + ".out_norm", cout)
    conv(prefix + ".out_layers.2", cout, cout)
    if cin != cout:
        conv(prefix + ".skip_connection", cin, cout, 1)


def attention(prefix: str, ch: int) -> None:
    group_norm(prefix + ".norm", ch)
    add(prefix + ".qkv.weight", 3 * ch, ch, 1)
    add(prefix + ".qkv.bias", 3 * ch)
    add(prefix + ".proj_out.weight", ch, ch, 1)
    add(prefix + ".proj_out.bias", ch)


def main() -> None:
    linear("time_embed.0", 256, EMB)
    linear("time_embed.2", EMB, EMB)
    conv("input_blocks.0.0", 3, 256)
    skips, i, ch = [256], 1, 256
    for level, (_, width, attn) in enumerate(LEVELS):
        for _ in range(2):
            sde(f"input_blocks.{i}.0", ch, width)
            ch = width
            if attn:
                attention(f"input_blocks.{i}.1", width)
            skips.append(width)
            i += 1
        if level < len(LEVELS) - 1:  # down-SDE
            sde(f"input_blocks.{i}.0", ch, ch)
            skips.append(ch)
            i += 1
    num_skips = len(skips)
    sdd("middle_block.0", ch, ch)
    attention("middle_block.1", ch)
    sdd("middle_block.2", ch, ch)
    o = 0
    for level in reversed(range(len(LEVELS))):
        _, width, attn = LEVELS[level]
        for j in range(3):
            sdd(f"output_blocks.{o}.0", ch + skips.pop(), width)
            ch, n = width, 1
            if attn:
                attention(f"output_blocks.{o}.1", width)
                n = 2
            if level and j == 2:  # up-SDD
                sdd(f"output_blocks.{o}.{n}", width, width)
            o += 1
    group_norm("out.0", 256)
    conv("out.2", 256, 6)

    total = sum(math.prod(s) for s in keys.values())
    num_sdd = len({k.rsplit(".in_norm.", 1)[0] for k in keys if ".in_norm." in k})
    num_spade = sum(k.endswith("mlp_shared.0.weight") for k in keys)
    print(
        f"{len(keys)} tensors, {total} parameters, {num_sdd} SDD blocks, {num_spade} SPADE modules, {num_skips} skips"
    )
    comment = (
        "Official SDM UNet for ADE20K (WeilunWang/semantic-diffusion-model, guided_diffusion/unet.py UNetModel with "
        "image_size 256, num_channels 256, channel_mult (1,1,2,2,4,4), num_res_blocks 2, attention_resolutions "
        "32,16,8, num_head_channels 64, resblock_updown, use_scale_shift_norm, learn_sigma, num_classes 151). "
        "Key -> shape, written out by tests/data/make_sdm_manifest.py from the level table of design/sdm.md "
        "section 3 and the official block structure (SDE: in_layers.{0,2}, emb_layers.1, out_layers.{0,3}; SDD: "
        "in_norm/out_norm.mlp_{shared.0,gamma,beta}, in_layers.1, emb_layers.1, out_layers.2 (SiLU, Dropout, Conv: "
        "index 2, not 3 as sdm.md section 9 says); attention: norm, qkv, proj_out), not from layout2image's "
        f"SDMUNet. Checked by hand: {num_sdd} SDD blocks (2 middle + 18 + 5 up) = {num_spade} SPADE modules, "
        f"{num_skips} skips, {len(keys)} tensors, {total} parameters (sdm.md: ~660.6 M)."
    )
    lines = [
        "{",
        f'  "_comment": {json.dumps(comment)},',
        f'  "num_tensors": {len(keys)},',
        f'  "num_parameters": {total},',
        '  "keys": {',
    ]
    items = list(keys.items())
    lines += [
        f"    {json.dumps(k)}: {json.dumps(v)}" + ("," if n < len(items) - 1 else "") for n, (k, v) in enumerate(items)
    ]
    lines += ["  }", "}", ""]
    (Path(__file__).parent / "sdm_ade20k_manifest.json").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
