"""l2i-eval reads what l2i-generate writes: its domains (manifest.json), its image/label pairs, its label set."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from layout2image.cli import eval as eval_cli
from layout2image.core.controlnet import build_controlnet
from layout2image.core.evaluation import read_domains
from layout2image.core.labels import get_label_set
from layout2image.core.toy import HELDOUT_START, write_dataset
from layout2image.testing import tiny_unet_config, write_tiny_sd
from layout2image.weights import WeightsMetadata, save_controlnet

pytest.importorskip("torchmetrics")
generate_cli = pytest.importorskip("layout2image.cli.generate")

TOY = get_label_set("toy")


def test_eval_of_a_generated_dataset_reads_its_domains(tmp_path):
    layouts = tmp_path / "layouts"
    write_dataset(layouts, 2, size=32, start=HELDOUT_START, preview_rows=0)
    base = write_tiny_sd(tmp_path / "base", unet=tiny_unet_config(cross_attention_dim=16))
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    control = build_controlnet(unet, "onehot", num_classes=TOY.num_classes, conditioning_embedding_out_channels=(8, 8))
    md = WeightsMetadata(kind="controlnet", hint_encoding="onehot", label_set=TOY, base_model="tiny")
    adapter = save_controlnet(control, tmp_path / "control.safetensors", metadata=md)
    out = tmp_path / "synth"
    argv = ["--base", str(base), "--adapter", str(adapter), "--input", str(layouts), "--out", str(out)]
    assert generate_cli.main([*argv, "--steps", "1", "--domains", "night", "fog"]) == 0

    manifest = json.loads((out / "manifest.json").read_text())
    expected = {r["file"].rsplit(".", 1)[0]: r["domain"] for r in manifest["images"]}
    assert read_domains(out) == expected and sorted(set(expected.values())) == ["fog", "night"]

    assert eval_cli.main([str(out), "--reference", str(layouts), "--quiet"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["num_images"] == 4 and report["label_set"] == "toy"
    assert report["layout"]["counts"] == {"fog": 2, "night": 2}
    assert 0.0 <= report["layout"]["overall"]["miou"] <= 1.0
    # the 2 toy reference images are day and night: too few per domain, so every group is compared with both
    assert report["frechet_distance"]["reference_images"]["night"] == {"domain": "all", "num": 2}
    assert set(report["frechet_distance"]["values"]) == {"all", "fog", "night"}
