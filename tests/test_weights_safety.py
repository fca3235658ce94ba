"""Safe loading (no unpickling of arbitrary objects; clear errors for broken files) and the metadata schema."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from layout2image.core.labels import get_label_set
from layout2image.weights import (
    FORMAT_VERSION,
    MetadataError,
    UnsafeCheckpointError,
    WeightsFileError,
    WeightsMetadata,
    has_l2i_metadata,
    inspect_weights,
    load_controlnet_file,
    load_official_class_embeddings,
    load_safetensors,
    load_torch_file,
    read_safetensors_header,
    sniff_file_format,
    training_config_hash,
)

LABELS = get_label_set("toy")


class _Payload:
    """Pickles to a call of ``os.system``: what a malicious ``.pt`` / ``.ckpt`` does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def malicious(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": _Payload(marker)}, path)
    assert not marker.exists()
    return path, marker


@pytest.fixture
def good_safetensors(tmp_path) -> Path:
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.arange(10)}, str(path), metadata={"x": "y"})
    return path


# ---------------------------------------------------------------------------------------------------- pickles
def test_malicious_pickle_is_refused_and_does_not_run(malicious):
    path, marker = malicious
    with pytest.raises(UnsafeCheckpointError) as info:
        load_torch_file(path)
    message = str(info.value)
    assert "system" in message  # names the object it wanted
    assert "weights_only=True" in message and "run code" in message
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["load_controlnet_file", "inspect_weights", "class_embeddings"])
def test_every_loader_refuses_the_malicious_pickle(malicious, entry, tmp_path):
    path, marker = malicious
    with pytest.raises(UnsafeCheckpointError):
        if entry == "load_controlnet_file":
            load_controlnet_file(path)
        elif entry == "inspect_weights":
            inspect_weights(path)
        else:
            load_official_class_embeddings(path, path)
    assert not marker.exists()


def test_legacy_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pth"
    torch.save({"x": _Payload(marker)}, path, _use_new_zipfile_serialization=False)
    assert sniff_file_format(path) == "torch-legacy"
    with pytest.raises(UnsafeCheckpointError):
        load_torch_file(path)
    assert not marker.exists()


def test_plain_torch_files_load_with_and_without_mmap(tmp_path, l2i_caplog):
    state = {"w": torch.randn(3, 3), "step": 7}
    torch.save(state, tmp_path / "zip.ckpt")
    torch.save(state, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    for name in ("zip.ckpt", "legacy.ckpt"):
        loaded = load_torch_file(tmp_path / name)
        assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7
    assert "cannot be memory-mapped" in l2i_caplog.text


# ---------------------------------------------------------------------------------------------------- broken files
def test_truncated_safetensors_gives_a_clear_error(tmp_path, good_safetensors):
    data = good_safetensors.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 1000])
    for read in (load_safetensors, read_safetensors_header, load_controlnet_file, inspect_weights):
        with pytest.raises(WeightsFileError) as info:
            read(truncated)
        message = str(info.value)
        assert "truncated" in message and "1000 missing" in message and str(truncated) in message
        assert "incomplete metadata" in message  # what safetensors itself says, kept for reference


def test_safetensors_truncated_inside_its_header(tmp_path, good_safetensors):
    path = tmp_path / "head.safetensors"
    path.write_bytes(good_safetensors.read_bytes()[:20])
    with pytest.raises(WeightsFileError, match="truncated inside its header"):
        load_safetensors(path)


def test_empty_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    for read in (load_safetensors, read_safetensors_header, load_torch_file, load_controlnet_file, inspect_weights):
        with pytest.raises(WeightsFileError, match="is empty \\(0 bytes\\)"):
            read(path)


def test_corrupt_header_and_foreign_files(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(struct.pack("<Q", 10) + b"{not json!" + b"\0" * 16)
    with pytest.raises(WeightsFileError, match="JSON header is corrupt"):
        load_safetensors(corrupt)
    html = tmp_path / "model.ckpt"
    html.write_bytes(b"<!DOCTYPE html><html>404</html>")
    with pytest.raises(WeightsFileError, match="HTML error page"):
        load_controlnet_file(html)
    with pytest.raises(WeightsFileError, match="does not exist"):
        load_torch_file(tmp_path / "missing.ckpt")


def test_truncated_torch_zip_gives_a_clear_error(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"w": torch.randn(256, 256)}, path)
    path.write_bytes(path.read_bytes()[:50_000])
    with pytest.raises(WeightsFileError, match="truncated or corrupt"):
        load_torch_file(path)


def test_container_is_sniffed_from_content_not_name(tmp_path, good_safetensors):
    renamed = tmp_path / "weights.ckpt"
    renamed.write_bytes(good_safetensors.read_bytes())
    assert sniff_file_format(renamed) == "safetensors"
    torch.save({"w": torch.zeros(1)}, tmp_path / "weights.safetensors")
    assert sniff_file_format(tmp_path / "weights.safetensors") == "torch-zip"
    assert torch.equal(load_torch_file(tmp_path / "weights.safetensors")["w"], torch.zeros(1))


def test_header_is_read_without_tensor_data(good_safetensors):
    header = read_safetensors_header(good_safetensors)
    assert header.metadata == {"x": "y"}
    assert header.tensors["a"].shape == (64, 64) and header.tensors["a"].dtype == "F32"
    assert header.tensors["b"].dtype == "I64"


# ---------------------------------------------------------------------------------------------------- metadata
def _metadata(**changes) -> WeightsMetadata:
    base = dict(
        kind="controlnet",
        hint_encoding="rgb",
        label_set=LABELS,
        base_model="runwayml/stable-diffusion-v1-5",
        training_config_hash=training_config_hash({"lr": 1e-5}),
        extra={"config": "{}"},
    )
    return WeightsMetadata(**{**base, **changes})


def test_metadata_round_trips_through_safetensors(tmp_path):
    md = _metadata()
    table = md.to_safetensors()
    assert table["format"] == "pt" and table["l2i.kind"] == "controlnet"
    assert table["l2i.format_version"] == str(FORMAT_VERSION)
    assert json.loads(table["l2i.label_set"])["name"] == "toy"
    assert table["l2i.label_set_fingerprint"] == LABELS.fingerprint()
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata=table)
    back = WeightsMetadata.from_safetensors(read_safetensors_header(path).metadata, source=str(path))
    assert back == md and back.label_set == LABELS and has_l2i_metadata(table)


def test_metadata_without_label_set(tmp_path):
    md = _metadata(label_set=None, base_model="", training_config_hash="")
    assert "l2i.label_set" not in md.to_safetensors()
    assert WeightsMetadata.from_safetensors(md.to_safetensors()) == md


def test_label_set_mismatch_names_both_sets():
    other = get_label_set("cityscapes")
    with pytest.raises(MetadataError) as info:
        _metadata().check(label_set=other, source="cn.safetensors")
    message = str(info.value)
    assert "cn.safetensors" in message
    assert "'toy'" in message and f"{LABELS.num_classes} classes" in message and LABELS.fingerprint() in message
    assert "'cityscapes'" in message and "19 classes" in message and other.fingerprint() in message
    _metadata().check(label_set=LABELS, kind="controlnet", hint_encoding="rgb")  # the right set passes


def test_label_set_palette_only_difference_is_explained():
    palette = LABELS.palette.copy()
    palette[0] = (1, 2, 3)
    recoloured = dataclasses.replace(LABELS, palette=palette)
    with pytest.raises(MetadataError, match="class names match but 1 palette colour"):
        _metadata().check(label_set=recoloured)


@pytest.mark.parametrize(
    "table, match",
    [
        ({"format": "pt"}, "no layout2image metadata"),
        ({"l2i.kind": "controlnet", "l2i.format_version": str(FORMAT_VERSION + 1)}, "update layout2image"),
        ({"l2i.kind": "controlnet", "l2i.format_version": "one"}, "not an integer"),
        ({"l2i.kind": "checkpoint", "l2i.format_version": "1"}, "not a known file kind"),
        ({"l2i.kind": "controlnet", "l2i.format_version": "1", "l2i.hint_encoding": "bgr"}, "hint_encoding"),
        ({"l2i.kind": "controlnet", "l2i.format_version": "1", "l2i.label_set": "{"}, "not a valid label set"),
    ],
)
def test_malformed_metadata_is_rejected(table, match):
    with pytest.raises(MetadataError, match=match):
        WeightsMetadata.from_safetensors(table, source="f.safetensors")


def test_edited_label_set_is_detected_by_its_fingerprint():
    table = _metadata().to_safetensors()
    data = json.loads(table["l2i.label_set"])
    data["classes"][0]["name"] = "heaven"
    table["l2i.label_set"] = json.dumps(data)
    with pytest.raises(MetadataError, match="edited by hand"):
        WeightsMetadata.from_safetensors(table)


def test_other_mismatches_name_the_field():
    md = _metadata()
    with pytest.raises(MetadataError, match="'rgb' hints, but 'embedding'"):
        md.check(hint_encoding="embedding")
    with pytest.raises(MetadataError, match="not a 'lora' one"):
        md.check(kind="lora")
    with pytest.raises(MetadataError, match="base model 'runwayml/stable-diffusion-v1-5'"):
        md.check(base_model="toy")
    with pytest.raises(MetadataError, match="16 lowercase hex"):
        _metadata(training_config_hash="abc")
    with pytest.raises(MetadataError, match="clashes"):
        _metadata(extra={"kind": "x"})


@dataclasses.dataclass
class _Config:
    lr: float = 1e-5
    steps: int = 100
    widths: tuple = (1, 2)


def test_training_config_hash_is_stable():
    h = training_config_hash(_Config())
    assert len(h) == 16 and h == training_config_hash({"steps": 100, "widths": [1, 2], "lr": 1e-5})
    assert h != training_config_hash(_Config(lr=2e-5))
