"""``l2i-convert``: inspect, ControlNet conversions, the official ALDM import, exit codes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from layout2image.cli.convert import _TARGETS, main
from layout2image.core.controlnet import build_controlnet
from layout2image.core.labels import get_label_set
from layout2image.testing import tiny_unet_config
from layout2image.weights import (
    CONVERSION_TARGETS,
    WeightsMetadata,
    controlnet_config_of,
    convert_controlnet_state_dict,
    load_class_embedding_table,
    load_controlnet_file,
    save_controlnet,
)

LABELS = get_label_set("toy")
EMBED = 8
TINY_UNET = tiny_unet_config(norm_num_groups=32)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    rgb = build_controlnet(unet, hint="rgb", conditioning_embedding_out_channels=(4, 8, 8, 16))
    aldm = build_controlnet(unet, hint="embedding", embedding_dim=EMBED, hint_block_out_channels=(8, 8, 8, 8))
    md = WeightsMetadata(kind="controlnet", hint_encoding="embedding", label_set=LABELS, base_model="toy/base")
    out = {
        "rgb_folder": save_controlnet(rgb, root / "rgb_folder", to="diffusers-folder"),
        "aldm": save_controlnet(aldm, root / "aldm.safetensors", metadata=md),
    }
    control = convert_controlnet_state_dict(aldm.state_dict(), "ldm", config=controlnet_config_of(aldm)).state_dict
    state = {"model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3), "first_stage_model.x": torch.zeros(2)}
    torch.save({"state_dict": {**state, **control}, "epoch": 1, "global_step": 10}, root / "official.ckpt")
    torch.save(torch.randn(LABELS.num_classes, EMBED), root / "classes.pth")
    torch.save(torch.randn(1, EMBED), root / "null.pth")
    out.update(ckpt=root / "official.ckpt", classes=root / "classes.pth", null=root / "null.pth")
    return out


def test_inspect_prints_kind_and_metadata(files, capsys):
    assert main(["inspect", str(files["aldm"])]) == 0
    text = capsys.readouterr().out
    assert "kind:       controlnet" in text and "aldm hint block" in text
    assert "label set:       'toy'" in text and "base model:      toy/base" in text
    assert "only layout2image" in text or "stock loaders cannot use it" in text
    assert main(["inspect", str(files["ckpt"])]) == 0
    text = capsys.readouterr().out
    assert "controlnet_checkpoint" in text and "l2i-convert import-aldm" in text and "global_step=10" in text
    assert main(["inspect", str(files["rgb_folder"])]) == 0
    text = capsys.readouterr().out
    assert "diffusers-folder" in text and "from_pretrained" in text
    assert main(["inspect", str(files["classes"])]) == 0
    assert "class embeddings" in capsys.readouterr().out


@pytest.mark.parametrize("to", ["ldm", "diffusers", "diffusers-folder"])
def test_controlnet_conversions(files, tmp_path, to, capsys):
    out = tmp_path / f"converted_{to}"
    assert main(["controlnet", "--to", to, str(files["rgb_folder"]), str(out), "--half"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    loaded = load_controlnet_file(out)
    assert loaded.format.layout == ("ldm" if to == "ldm" else "diffusers")
    assert {v.dtype for v in loaded.state_dict.values()} == {torch.float16}
    back = tmp_path / "back"
    assert main(["controlnet", "--to", "diffusers-folder", str(out), str(back), "--dtype", "fp32"]) == 0
    want = load_controlnet_file(files["rgb_folder"]).state_dict
    got = load_controlnet_file(back).state_dict
    assert all(torch.equal(got[k], want[k].half().float()) for k in want)


def test_import_aldm(files, tmp_path, capsys):
    out = tmp_path / "aldm_toy.safetensors"
    argv = ["import-aldm", str(files["ckpt"]), str(out), "--label-set", "toy"]
    argv += ["--class-embeddings", str(files["classes"]), "--null-embedding", str(files["null"])]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ALDM-native ControlNet" in printed and "aldm_toy.table.safetensors" in printed
    loaded = load_controlnet_file(out)
    assert loaded.format.hint_block == "aldm" and loaded.metadata.label_set == LABELS
    table = load_class_embedding_table(tmp_path / "aldm_toy.table.safetensors", LABELS).table
    assert table.shape == (LABELS.num_classes + 1, EMBED)
    with pytest.raises(SystemExit) as info:  # OUT exists now
        main(argv)
    assert info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--label-set", "cityscapes"]) == 1
    assert "19 classes" in capsys.readouterr().err


def test_bad_files_exit_1_with_a_message(files, tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 5)
    assert main(["inspect", str(garbage)]) == 1
    assert "l2i-convert: error:" in capsys.readouterr().err
    unknown = tmp_path / "unknown.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(unknown))
    assert main(["controlnet", "--to", "ldm", str(unknown), str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "Known formats" in err and "diffusers layout" in err
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Payload()}}, evil)
    assert main(["controlnet", "--to", "ldm", str(evil), str(tmp_path / "e.safetensors")]) == 1
    assert "refusing to load" in capsys.readouterr().err and not marker.exists()
    assert main(["inspect", str(tmp_path / "missing.ckpt")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_inspect_names_a_reshaped_hint_block_tensor(files, tmp_path, capsys):
    """A ControlNet without metadata whose hint block holds a tensor of another shape (same values, reshaped): the
    report names the tensor and its shape instead of the generic "no known signature"."""
    from safetensors.torch import load_file

    state = load_file(str(files["rgb_folder"] / "diffusion_pytorch_model.safetensors"))
    key = "controlnet_cond_embedding.blocks.3.weight"
    state[key] = state[key].reshape(-1, 1, 3, 3).contiguous()
    path = tmp_path / "reshaped.safetensors"
    save_file(state, str(path))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    width = state[key].shape[0]
    assert f"{key}.weight" not in out and f"{key} has shape [{width}, 1, 3, 3]: 1 input channel(s)" in out
    assert "controlnet_cond_embedding.blocks.2 gives 8" in out and "diffusers layout" in out
    assert "no known signature" not in out and "no loader takes it" in out


@pytest.mark.parametrize("to", ["peft", "kohya"])
def test_lora_with_nan_or_inf_is_refused_in_one_line_and_nothing_is_written(tmp_path, capsys, to):
    """A kohya LoRA (SD 1.5 module names) whose matrices hold NaN and inf: one line naming the count and the
    tensors, a non-zero exit, no output file (also for kohya -> kohya, where the input would be copied as is)."""
    from layout2image.weights import kohya_module_name

    g = torch.Generator().manual_seed(0)
    lora, names = {}, []
    for proj in ("to_q", "to_k"):
        name = kohya_module_name(f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.{proj}")
        names.append(name)
        lora[f"{name}.lora_down.weight"] = torch.randn(4, 320, generator=g)
        lora[f"{name}.lora_up.weight"] = torch.randn(320, 4, generator=g)
        lora[f"{name}.alpha"] = torch.tensor(4.0)
    lora[f"{names[0]}.lora_down.weight"][1, :5] = float("nan")
    lora[f"{names[1]}.lora_up.weight"][0, 0] = float("inf")
    source = tmp_path / "diverged.safetensors"
    save_file(lora, str(source))
    output = tmp_path / "out" / "converted.safetensors"
    status = main(["lora", "--to", to, str(source), str(output)])
    err = capsys.readouterr().err
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"l2i-convert: error: {str(source)!r}: 2 LoRA tensor(s) hold NaN or infinite values: ")
    assert f"{names[0]}.lora_down.weight (5 NaN of 1280 values)" in lines[0]
    assert f"{names[1]}.lora_up.weight (1 inf of 1280 values)" in lines[0]
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["diverged.safetensors"]


def test_bad_arguments_exit_2(files, tmp_path):
    for argv in (
        [],
        ["controlnet", str(files["aldm"]), str(tmp_path / "x")],  # no --to
        ["controlnet", "--to", "onnx", str(files["aldm"]), str(tmp_path / "x")],
        ["controlnet", "--to", "ldm", str(files["aldm"]), str(files["aldm"])],  # output == input
        ["controlnet", "--to", "ldm", "--half", "--dtype", "fp32", str(files["aldm"]), str(tmp_path / "y")],
        ["import-aldm", str(files["ckpt"]), str(tmp_path / "z")],  # no --label-set
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2, argv


_SCRIPT = shutil.which("l2i-convert", path=str(Path(sys.executable).parent)) or shutil.which("l2i-convert")


def test_console_script_is_declared():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("l2i-convert") == "layout2image.cli.convert:main"
    assert _TARGETS == CONVERSION_TARGETS


@pytest.mark.skipif(_SCRIPT is None, reason="console script not installed (pip install -e .)")
def test_console_script_runs():
    done = subprocess.run([_SCRIPT, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "inspect" in done.stdout and "import-aldm" in done.stdout
