"""Checking a dataset before a run, and reporting a sample that still fails during one.

`check_dataset` reads every sample the way training reads it (`SegmentationDataset.get`: the image decoded in full,
the label map read and its ids checked against the label set, image and label sizes compared, the transform
planned, the caption read) and raises one `DatasetError` listing the samples that fail (the first
`MAX_LISTED`, then a count). A bad file found here costs seconds; found at step 14 it used to cost the run.

Re-runs are fast: the samples that passed are remembered in ``<cache_dir>/data_check/<dataset key>.json``, keyed by
each file's path, size and modification time and by everything that decides how a sample is read (dataset class,
label set fingerprint, label mode, id remap, transform); a sample is read again only when one of these changed.

A file can still change after the check. `ReportingDataset` and `collate_reporting` turn an error reading a sample
(in the main process or a DataLoader worker) into data, so the training loop gets the message itself, not a worker's
traceback, and raises `SampleReadError`: it saves a checkpoint and stops with one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ...core.logging import get_logger
from .base import SegmentationDataset, collate
from .errors import DatasetError

__all__ = [
    "MAX_LISTED",
    "DataCheckResult",
    "ReportingDataset",
    "SampleReadError",
    "check_dataset",
    "collate_reporting",
    "sample_errors",
]

logger = get_logger(__name__)

#: Bad samples listed by name in one error; the rest are counted.
MAX_LISTED = 10
_CACHE_FORMAT = 1
# Key of a failed sample in what `ReportingDataset` returns and `collate_reporting` passes on.
_FAILED = "__l2i_sample_error__"


def sample_errors() -> tuple[type[BaseException], ...]:
    """What reading a bad sample raises: the pack's errors (ValueError subclasses: DatasetError, LabelMapError),
    OSError, and PIL's DecompressionBombError (no ValueError). Anything else is a bug and keeps its traceback."""
    errors: tuple[type[BaseException], ...] = (ValueError, OSError)
    try:
        from PIL import Image

        errors = (*errors, Image.DecompressionBombError)
    except ImportError:  # pragma: no cover - PIL is a dependency
        pass
    return errors


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class SampleReadError(DatasetError):
    """A sample failed to load during training (its file changed after the check); the message names it."""


@dataclass
class DataCheckResult:
    """What `check_dataset` did.

    Args:
        samples (`int`): samples in the dataset.
        read (`int`): samples read now.
        cached (`int`): samples skipped because an earlier check passed them and nothing changed.
        seconds (`float`): wall time.
        cache_file (`Path`, *optional*): where the passed samples are remembered.
    """

    samples: int
    read: int
    cached: int
    seconds: float
    cache_file: Path | None = None


def _file_key(path: Path | None) -> str:
    if path is None:
        return "-"
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}|missing"
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def _dataset_fingerprint(dataset: SegmentationDataset) -> str:
    parts = [
        f"format={_CACHE_FORMAT}",
        type(dataset).__name__,
        f"labels={dataset.label_set.name}:{dataset.label_set.fingerprint()}",
        f"label_mode={dataset.label_mode}",
        f"remap={dataset.apply_remap}",
        f"transform={dataset.transform.describe()}",
    ]
    return ";".join(parts)


def _sample_key(dataset: SegmentationDataset, index: int) -> str:
    f = dataset.files[index]
    text = "|".join((_file_key(f.image), _file_key(f.label), _file_key(f.caption_file)))
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _cache_path(cache_dir: Path, dataset: SegmentationDataset, fingerprint: str) -> Path:
    where = str(dataset.root.resolve()) if dataset.root is not None else str(dataset.files[0].image.parent.resolve())
    name = hashlib.sha256(f"{where};{fingerprint}".encode()).hexdigest()[:16]
    return cache_dir / "data_check" / f"{name}.json"


def _read_cache(path: Path, fingerprint: str) -> set[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(data, dict) or data.get("fingerprint") != fingerprint or not isinstance(data.get("ok"), list):
        return set()
    return {k for k in data["ok"] if isinstance(k, str)}


def _write_cache(path: Path, fingerprint: str, ok: set[str]) -> None:
    from ...core.files import atomic_write_text

    try:
        atomic_write_text(path, json.dumps({"fingerprint": fingerprint, "ok": sorted(ok)}) + "\n")
    except OSError as e:  # a read-only cache folder costs a slower next check, not the run
        logger.warning("could not remember the data check in %s: %s", path, e)


def check_dataset(
    dataset: SegmentationDataset,
    *,
    cache_dir: str | os.PathLike | None = None,
    what: str = "training",
    progress: bool = True,
    workers: int | None = None,
    read: Callable[[SegmentationDataset, int], Any] | None = None,
) -> DataCheckResult:
    """Read every sample of ``dataset`` as training will; raise one error listing those that fail.

    Args:
        dataset (`SegmentationDataset`): the dataset to check.
        cache_dir (`str` or `os.PathLike`, *optional*): remember passed samples in ``cache_dir/data_check/``
            (see the module docstring); None checks everything every time.
        what (`str`, defaults to ``"training"``): the split, for messages.
        progress (`bool`, defaults to True): show a progress bar (tqdm) while samples are read.
        workers (`int`, *optional*): reader threads (image decoding releases the GIL); default: up to 8.
        read (`Callable`, *optional*): how one sample is read; default ``dataset.get(index, 0)``.

    Returns:
        `DataCheckResult`.

    Raises:
        DatasetError: samples that cannot be used: the first `MAX_LISTED` messages (each names its file), then how
            many more.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    n = len(dataset)
    fingerprint = _dataset_fingerprint(dataset)
    cache_path = _cache_path(Path(cache_dir), dataset, fingerprint) if cache_dir is not None else None
    passed = _read_cache(cache_path, fingerprint) if cache_path is not None else set()
    keys = [_sample_key(dataset, i) for i in range(n)]
    todo = [i for i in range(n) if keys[i] not in passed]
    read = read if read is not None else (lambda ds, i: ds.get(i, 0))
    errors = sample_errors()

    def one(index: int) -> str | None:
        try:
            read(dataset, index)
        except errors as e:
            return _one_line(e)
        return None

    failures: list[tuple[int, str]] = []
    if todo:
        threads = workers if workers is not None else min(8, (os.cpu_count() or 1) * 2)
        bar = tqdm(
            total=len(todo), desc=f"checking {what} data", unit="sample", disable=not progress, dynamic_ncols=True
        )
        try:
            if threads <= 1 or len(todo) < 8:
                results = []
                for i in todo:
                    results.append(one(i))
                    bar.update(1)
            else:
                with ThreadPoolExecutor(max_workers=threads) as pool:
                    results = []
                    for r in pool.map(one, todo):
                        results.append(r)
                        bar.update(1)
        finally:
            bar.close()
        failures = [(i, msg) for i, msg in zip(todo, results) if msg is not None]
        if cache_path is not None:
            good = {keys[i] for i, msg in zip(todo, results) if msg is None}
            # Keep only entries of files as they are now (a changed file gets a new key; the old one is dropped).
            current = set(keys)
            _write_cache(cache_path, fingerprint, (passed & current) | good)
    seconds = time.perf_counter() - started
    if failures:
        # One entry per line, each ended so the message still reads well joined into one line by a CLI.
        listed = [_naming(dataset, i, msg).rstrip(". ") for i, msg in failures[:MAX_LISTED]]
        more = f";\n  ... and {len(failures) - MAX_LISTED} more" if len(failures) > MAX_LISTED else ""
        raise DatasetError(
            f"data check: {len(failures)} of {n} {what} sample(s) cannot be used:\n  "
            + ";\n  ".join(listed)
            + more
            + ".\nFix or remove these files, then run again (samples that passed are not read again)."
        )
    logger.info(
        "data check: %d %s samples usable (%d read, %d unchanged since the last check) in %.1f s",
        n,
        what,
        len(todo),
        n - len(todo),
        seconds,
    )
    return DataCheckResult(n, len(todo), n - len(todo), seconds, cache_path)


def _naming(dataset: SegmentationDataset, index: int, message: str) -> str:
    """The message, with the sample's image file in front when the message names neither of its files."""
    f = dataset.files[index]
    return message if str(f.image) in message or str(f.label) in message else f"{str(f.image)!r}: {message}"


class ReportingDataset(Dataset):
    """``dataset[item]``, or ``{_FAILED: message}`` when the sample cannot be read (see `sample_errors`).

    A DataLoader worker would re-raise the error wrapped in its own traceback text; returned as data, the message
    reaches the training loop as it was written (naming the file).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Any) -> dict[str, Any]:
        try:
            return self.dataset[item]
        except sample_errors() as e:
            return {_FAILED: _one_line(e)}


def collate_reporting(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`collate`, or ``{_FAILED: [messages]}`` when a sample of the batch failed in `ReportingDataset`."""
    failed = [s[_FAILED] for s in samples if _FAILED in s]
    if failed:
        return {_FAILED: failed}
    return collate(samples)


def raise_if_failed(batch: Mapping[str, Any], step: int) -> None:
    """Raise `SampleReadError` for a batch from `collate_reporting` that holds failed samples."""
    failed = batch.get(_FAILED)
    if failed:
        more = f" (and {len(failed) - 1} more in the batch)" if len(failed) > 1 else ""
        raise SampleReadError(f"step {step}: a training sample could not be read: {failed[0]}{more}")
