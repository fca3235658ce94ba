"""The dataset check before a run: every bad sample listed in one error (ids outside the label set, truncated or
missing images, size mismatches), re-runs that read only changed files, and the mid-run reporting wrappers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from layout2image.core.toy import write_dataset
from layout2image.trainer.data import DatasetError, FolderDataset, TransformConfig
from layout2image.trainer.data.check import (
    MAX_LISTED,
    ReportingDataset,
    SampleReadError,
    check_dataset,
    collate_reporting,
    raise_if_failed,
)

TRANSFORM = TransformConfig(resolution=32)


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    write_dataset(root, 6, size=32, preview_rows=0)
    return root


def _labels(root: Path, stem: str) -> Path:
    return root / "labels" / f"{stem}.png"


def write_label_id(root: Path, stem: str, value: int) -> None:
    """Put the id ``value`` into one pixel of a sample's palette label map (keeps its palette)."""
    path = _labels(root, stem)
    with Image.open(path) as img:
        arr = np.array(img)
        palette = img.getpalette()
    arr[0, 0] = value
    out = Image.fromarray(arr, "P")
    out.putpalette(palette)
    out.save(path)


def truncate_image(root: Path, stem: str) -> Path:
    path = root / "images" / f"{stem}.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _counting(calls: list[int]):
    def read(ds, i):
        calls.append(i)
        return ds.get(i, 0)

    return read


def test_bad_ids_and_a_truncated_image_are_listed_in_one_error(data, tmp_path):
    write_label_id(data, "toy_000001", 42)  # the toy set has 8 classes + ignore 255
    bad_image = truncate_image(data, "toy_000004")
    dataset = FolderDataset(data, transform=TRANSFORM, check_sizes=False)
    with pytest.raises(DatasetError) as info:
        check_dataset(dataset, cache_dir=tmp_path / "cache", progress=False)
    message = str(info.value)
    assert "2 of 6 training sample(s) cannot be used" in message
    assert str(_labels(data, "toy_000001")) in message and "42" in message
    assert str(bad_image) in message
    assert "toy_000000" not in message


def test_a_rerun_reads_only_files_that_changed(data, tmp_path):
    dataset = FolderDataset(data, transform=TRANSFORM)
    calls: list[int] = []
    first = check_dataset(dataset, cache_dir=tmp_path / "cache", progress=False, read=_counting(calls))
    assert sorted(calls) == list(range(6)) and (first.read, first.cached) == (6, 0)
    assert first.cache_file is not None and first.cache_file.is_file()
    calls.clear()
    second = check_dataset(dataset, cache_dir=tmp_path / "cache", progress=False, read=_counting(calls))
    assert calls == [] and (second.read, second.cached) == (0, 6)
    # A file that changes (new bytes, new mtime) is read again, and a bad one is found.
    write_label_id(data, "toy_000003", 42)
    later = _labels(data, "toy_000003").stat().st_mtime_ns + 10**9
    os.utime(_labels(data, "toy_000003"), ns=(later, later))
    with pytest.raises(DatasetError, match="toy_000003"):
        check_dataset(dataset, cache_dir=tmp_path / "cache", progress=False, read=_counting(calls))
    assert calls == [3]
    # Another label set (or transform) is another check: nothing is taken from the cache.
    calls.clear()
    other = FolderDataset(data, transform=TransformConfig(resolution=16))
    with pytest.raises(DatasetError):
        check_dataset(other, cache_dir=tmp_path / "cache", progress=False, read=_counting(calls))
    assert sorted(calls) == list(range(6))


def test_many_bad_samples_are_counted_after_the_first_few(tmp_path):
    root = tmp_path / "data"
    write_dataset(root, MAX_LISTED + 3, size=32, preview_rows=0)
    for path in sorted((root / "labels").iterdir()):
        write_label_id(root, path.stem, 42)
    dataset = FolderDataset(root, transform=TRANSFORM)
    with pytest.raises(DatasetError) as info:
        check_dataset(dataset, progress=False, workers=4)
    message = str(info.value)
    assert f"{MAX_LISTED + 3} of {MAX_LISTED + 3}" in message and "... and 3 more" in message
    assert message.count("toy_0000") == MAX_LISTED


def test_a_sample_that_fails_after_the_check_arrives_as_a_message(data):
    dataset = FolderDataset(data, transform=TRANSFORM)
    write_label_id(data, "toy_000002", 42)
    loader = DataLoader(ReportingDataset(dataset), batch_size=3, collate_fn=collate_reporting, num_workers=1)
    batches = list(loader)
    raise_if_failed(batches[1], step=5)  # samples 3..5 are fine: nothing raised
    assert batches[1]["labels"].shape == (3, 32, 32)
    with pytest.raises(SampleReadError) as info:
        raise_if_failed(batches[0], step=7)
    message = str(info.value)
    assert message.startswith("step 7: a training sample could not be read:")
    assert str(_labels(data, "toy_000002")) in message and "Traceback" not in message and "\n" not in message
