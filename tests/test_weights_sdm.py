"""Pixel-space SDM files: official ``.pt`` -> SDMUNet (strict) -> safetensors -> ``.pt``, detection, config inference,
safety, clear errors, inspect and ``l2i-convert sdm``.

The "official" files are tiny-config state dicts with every tensor random (no zero-init tensor, so two swapped keys
cannot hide behind equal zeros), saved as the official code saves them: a plain ``torch.save(state_dict)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from layout2image.cli.convert import _SDM_TARGETS, main
from layout2image.core.labels import get_label_set
from layout2image.core.sdm import SDMConditionSpec, SDMUNet, sdm_preset
from layout2image.testing import assert_close_for_dtype
from layout2image.weights import (
    SDM_TARGETS,
    MetadataError,
    SDMFormatError,
    SDMKeyMismatchError,
    UnsafeCheckpointError,
    WeightsFileError,
    check_sdm_state_dict,
    convert_sdm_file,
    infer_sdm_config,
    inspect_weights,
    is_sdm_state_dict,
    load_sdm_file,
    save_sdm_file,
    save_sdm_pt,
    sdm_from_file,
)

TOY = get_label_set("toy")
TOY_SPEC = SDMConditionSpec(TOY.num_classes, edges=True)
TINY = sdm_preset("tiny")
# what a file without l2i.config needs to rebuild the tiny preset exactly (these set no shape)
TINY_NON_SHAPE = dict(image_size=16, num_head_channels=32)
MANIFEST = Path(__file__).parent / "data" / "sdm_ade20k_manifest.json"


def _random_state(config=TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    with torch.device("meta"):
        unet = SDMUNet.from_sdm_config(config)
    return {k: torch.randn(v.shape) for k, v in unet.state_dict().items()}


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = _random_state()
    path = tmp_path_factory.mktemp("sdm") / "model.pt"
    torch.save(state, path)
    return path, state


def _sample_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 16, 16, generator=g)
    y = torch.rand(1, TINY.label_channels, 16, 16, generator=g)
    return x, torch.tensor([123]), y


# ---------------------------------------------------------------------------------------------------- detection
def test_detection_and_config_inference(official):
    _, state = official
    assert is_sdm_state_dict(state)
    assert infer_sdm_config(state, **TINY_NON_SHAPE) == TINY
    manifest = {k: tuple(v) for k, v in json.loads(MANIFEST.read_text())["keys"].items()}
    assert infer_sdm_config(manifest) == sdm_preset("ade20k")
    assert not is_sdm_state_dict({"input_blocks.0.0.weight": torch.zeros(4, 3, 3, 3)})
    with pytest.raises(SDMFormatError, match="not an SDM UNet state dict: missing signature key"):
        infer_sdm_config({"control_model.time_embed.0.weight": (1280, 320)})


@pytest.mark.parametrize(
    "changes",
    [dict(resblock_updown=False), dict(use_scale_shift_norm=False, learn_sigma=False), dict(channel_mult=(1, 1, 2))],
)
def test_config_inference_for_other_layouts(changes):
    config = TINY.replace(**changes)
    shapes = {k: tuple(v.shape) for k, v in _meta_state(config).items()}
    assert infer_sdm_config(shapes, **TINY_NON_SHAPE) == config


def _meta_state(config):
    with torch.device("meta"):
        return SDMUNet.from_sdm_config(config).state_dict()


# ---------------------------------------------------------------------------------------------------- round trips
def test_pt_to_module_to_safetensors_to_pt_is_exact(official, tmp_path):
    path, state = official
    unet = sdm_from_file(path, label_set=TOY, condition=TOY_SPEC, **TINY_NON_SHAPE)
    assert unet.sdm_config == TINY
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    st = save_sdm_file(tmp_path / "sdm.safetensors", unet, label_set=TOY, condition=TOY_SPEC, source="test")
    back = convert_sdm_file(st, tmp_path / "back.pt")
    assert back.to == "pt" and back.num_tensors == len(state)
    reread = torch.load(back.path, weights_only=True)
    assert list(reread) == list(state), "key order differs from the official module order"
    assert all(torch.equal(reread[k], state[k]) and reread[k].dtype == state[k].dtype for k in state)
    # the safetensors file carries our metadata, and rebuilds the same model
    loaded = load_sdm_file(st, label_set=TOY)
    md = loaded.metadata
    assert md.kind == "sdm" and md.hint_encoding == "onehot_edges" and md.label_set == TOY
    assert md.extra["label_channels"] == "9" and md.extra["source"] == "test"
    assert loaded.config == TINY and loaded.condition == TOY_SPEC
    rebuilt = loaded.build_unet()
    assert rebuilt.state_dict().keys() == unet.state_dict().keys()
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in rebuilt.state_dict().items())  # weights: bit for bit
    x, t, y = _sample_inputs()
    with torch.no_grad():  # outputs: up to rounding (the file's tensors are not 64-byte aligned; kernels differ)
        assert_close_for_dtype(rebuilt(x, t, y), unet(x, t, y))


def test_convert_pt_to_safetensors_and_fp16(official, tmp_path):
    path, state = official
    conv = convert_sdm_file(path, tmp_path / "half.safetensors", label_set=TOY, condition=TOY_SPEC,
                            dtype=torch.float16, **TINY_NON_SHAPE)  # fmt: skip
    assert conv.to == "safetensors" and conv.config == TINY and conv.label_set == TOY
    with safe_open(str(conv.path), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        assert json.loads(f.metadata()["l2i.config"])["image_size"] == 16
    back = convert_sdm_file(conv.path, tmp_path / "full.pt", dtype=torch.float32)
    reread = torch.load(back.path, weights_only=True)
    assert all(reread[k].dtype == torch.float32 and torch.equal(reread[k], state[k].half().float()) for k in state)


def test_official_label_set_is_found_from_c_y(tmp_path):
    config = TINY.replace(label_channels=20)  # CelebAMask-HQ: 19 classes + edge
    path = save_sdm_pt(tmp_path / "celeba.pt", _random_state(config), config=config)
    loaded = load_sdm_file(path, **TINY_NON_SHAPE)
    assert loaded.label_set.name == "celebamask_hq" and loaded.condition.channels == 20
    assert loaded.metadata.hint_encoding == "onehot_edges"


# ---------------------------------------------------------------------------------------------------- errors
class _LightningLike:
    """Stands for a Lightning ``AttributeDict``/callback state or any other class in a pickle."""

    def __init__(self):
        self.lr = 1e-4


def _payload(marker: Path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return Payload()


@pytest.mark.parametrize("kind", ["lightning", "os.system"])
def test_unsafe_pickles_are_refused(official, tmp_path, kind):
    _, state = official
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    extra = _LightningLike() if kind == "lightning" else _payload(marker)
    torch.save({"state_dict": state, "hparams": extra}, path)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        load_sdm_file(path)
    with pytest.raises(UnsafeCheckpointError):
        inspect_weights(path)
    assert not marker.exists()


def test_a_state_dict_wrapper_is_accepted(official, tmp_path):
    _, state = official
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": state, "step": 10}, path)
    assert load_sdm_file(path, label_set=TOY, condition=TOY_SPEC, **TINY_NON_SHAPE).config == TINY


@pytest.mark.parametrize("container", ["pt", "safetensors"])
def test_truncated_files_give_a_clear_error(official, tmp_path, container):
    path, _ = official
    if container == "safetensors":
        path = save_sdm_file(tmp_path / "full.safetensors", _random_state(), config=TINY, label_set=TOY,
                             condition=TOY_SPEC)  # fmt: skip
    data = path.read_bytes()
    cut = tmp_path / f"cut.{container}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match="truncated"):
        load_sdm_file(cut)


def test_wrong_c_y_for_the_label_set_is_a_clear_error(official, tmp_path):
    path, _ = official
    with pytest.raises(MetadataError, match=r"reads C_y = 9 label channels, but label set 'ade20k' encoded as 150"):
        load_sdm_file(path, label_set="ade20k")
    with pytest.raises(MetadataError, match=r"C_y = 9 .* 8 one-hot channels gives C_y = 8"):
        load_sdm_file(path, label_set=TOY)  # the toy set without the edge channel
    st = save_sdm_file(tmp_path / "toy.safetensors", _random_state(), config=TINY, label_set=TOY, condition=TOY_SPEC)
    with pytest.raises(MetadataError, match="label set mismatch: .* trained on label set 'toy'"):
        load_sdm_file(st, label_set=get_label_set("cityscapes"))


def test_key_mismatch_lists_missing_unexpected_and_misshapen(official):
    _, state = official
    broken = dict(state)
    del broken["out.0.bias"]
    broken["extra.weight"] = torch.zeros(1)
    broken["time_embed.2.bias"] = torch.zeros(5)
    with pytest.raises(SDMKeyMismatchError) as info:
        check_sdm_state_dict(broken, TINY)
    message = str(info.value)
    assert "1 missing key(s), e.g. ['out.0.bias']" in message
    assert "1 unexpected key(s), e.g. ['extra.weight']" in message
    assert "time_embed.2.bias: [5] in the file, [128] in the model" in message
    assert set(broken) == (set(state) - {"out.0.bias"}) | {"extra.weight"}  # the check changes nothing


def test_not_an_sdm_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(SDMFormatError, match="not an SDM UNet"):
        load_sdm_file(path)


# ---------------------------------------------------------------------------------------------------- inspect, CLI
def test_inspect_names_sdm_files_and_their_loaders(official, tmp_path):
    path, _ = official
    report = inspect_weights(path)
    assert report.kind == "sdm" and "C_y 9" in report.summary
    assert any("official semantic-diffusion-model" in x for x in report.loaders)
    st = save_sdm_file(tmp_path / "s.safetensors", _random_state(), config=TINY, label_set=TOY, condition=TOY_SPEC)
    report = inspect_weights(st)
    assert report.kind == "sdm" and report.metadata.label_set == TOY
    assert report.loaders == ("layout2image (weights.sdm_from_file / load_sdm_file, core.sdm.SDMUNet)",)
    assert "l2i-convert sdm --to pt" in report.to_text()


def test_cli_sdm_round_trip_and_errors(official, tmp_path, capsys):
    path, state = official
    assert _SDM_TARGETS == SDM_TARGETS
    st = tmp_path / "cli.safetensors"
    args = ["--label-set", "toy", "--edges", "--image-size", "16", "--num-head-channels", "32"]
    assert main(["sdm", str(path), str(st), *args]) == 0
    assert "SDM UNet, safetensors, 200 tensors" in capsys.readouterr().out
    back = tmp_path / "cli.pt"
    assert main(["sdm", str(st), str(back), "--dtype", "keep"]) == 0
    reread = torch.load(back, weights_only=True)
    assert list(reread) == list(state) and all(torch.equal(reread[k], state[k]) for k in state)
    # wrong label set: exit 1 with the C_y message
    assert main(["sdm", str(path), str(tmp_path / "x.safetensors"), "--label-set", "ade20k"]) == 1
    assert "C_y = 9" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # --edges without a label set
        main(["sdm", str(path), str(tmp_path / "y.safetensors"), "--edges"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):  # the output exists
        main(["sdm", str(path), str(st)])
