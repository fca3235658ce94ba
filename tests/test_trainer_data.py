"""Training data: folder format, Cityscapes/ADE20K/COCO-Stuff loaders, joint transforms, captions, cache."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from layout2image.core.errors import LabelMapError
from layout2image.core.labels import LabelSet, random_joint_crop_flip
from layout2image.trainer.data import (
    ADE20KDataset,
    CaptionTable,
    CityscapesDataset,
    COCOStuffDataset,
    DataConfig,
    DatasetError,
    EncodingCache,
    FolderDataset,
    TransformConfig,
    build_dataset,
    class_phrase,
    collate,
    default_transform,
    fallback_caption,
    load_captions,
)

H, W = 32, 64
NO_AUG = TransformConfig(resolution=None, resize="none", crop="none", flip_prob=0.0)
CLASSES = ("road", "car", "traffic_light", "sky", "building")


def small_label_set() -> LabelSet:
    palette = np.array([[128, 64, 128], [0, 0, 142], [250, 170, 30], [70, 130, 180], [70, 70, 70]])
    return LabelSet(name="small", names=CLASSES, palette=palette)


def label_map(i: int, size=(H, W), num_classes: int = len(CLASSES)) -> np.ndarray:
    """Ids that change along both axes (so a flip or shift is visible), with an ignore block."""
    rows, cols = np.mgrid[0 : size[0], 0 : size[1]]
    ids = (rows // 8 + cols // 4 + i) % num_classes
    ids[:4, :4] = 255
    return ids.astype(np.int64)


def encode_labels(ids: np.ndarray) -> np.ndarray:
    """An RGB image whose red channel is a function of the label id (an image that 'knows' its label)."""
    red = np.where(ids == 255, 7, ids * 40 + 20).astype(np.uint8)
    img = np.stack([red, np.full_like(red, 90), np.full_like(red, 200)], axis=-1)
    return img


def write_rgb(path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def write_ids(path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint8), mode="L").save(path)


def make_folder(root, n: int = 3, captions: str | None = "jsonl", size=(H, W)):
    """A folder-format dataset with `n` samples and captions from `captions`: jsonl, captions_txt, images_txt, None."""
    root.mkdir(parents=True, exist_ok=True)
    small_label_set().save(root / "labelset.yaml")
    lines = []
    for i in range(n):
        stem = f"s{i:02d}"
        ids = label_map(i, size)
        write_rgb(root / "images" / f"{stem}.png", encode_labels(ids))
        write_ids(root / "labels" / f"{stem}.png", ids)
        if captions == "jsonl":
            lines.append(json.dumps({"file": f"{stem}.png", "caption": f"caption {i}", "domain": f"d{i}"}))
        elif captions == "captions_txt":
            (root / "captions").mkdir(exist_ok=True)
            (root / "captions" / f"{stem}.txt").write_text(f"text caption {i}\n")
        elif captions == "images_txt":
            (root / "images" / f"{stem}.txt").write_text(f"image-side caption {i}")
    if lines:
        (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


# ---------------------------------------------------------------------------------------------- folder format
def test_folder_sample_keys_shapes_and_jsonl_captions(tmp_path):
    root = make_folder(tmp_path / "ds")
    ds = FolderDataset(root, transform=TransformConfig(resolution=16))
    assert len(ds) == 3 and ds.stems == ["s00", "s01", "s02"]
    assert ds.label_set.names == CLASSES
    s = ds[1]
    assert s["pixel_values"].shape == (3, 16, 16) and s["pixel_values"].dtype == torch.float32
    assert -1.0 <= s["pixel_values"].min() and s["pixel_values"].max() <= 1.0
    assert s["labels"].shape == (16, 16) and s["labels"].dtype == torch.int64
    assert set(s["labels"].unique().tolist()) <= set(range(len(CLASSES))) | {255}
    assert s["caption"] == "caption 1" and not s["caption_is_fallback"]
    assert s["meta"] == {"domain": "d1"}
    assert s["stem"] == "s01" and s["index"] == 1
    assert isinstance(s["flipped"], bool)
    assert s["crop"].tolist()[2:] == [16, 16] and s["original_size"].tolist() == [H, W]


@pytest.mark.parametrize(
    "kind, expected", [("captions_txt", "text caption 2"), ("images_txt", "image-side caption 2")]
)
def test_folder_per_file_txt_captions(tmp_path, kind, expected):
    ds = FolderDataset(make_folder(tmp_path / "ds", captions=kind), transform=NO_AUG)
    assert ds[2]["caption"] == expected and not ds[2]["caption_is_fallback"]


def test_folder_without_captions_uses_class_names_largest_first(tmp_path):
    root = make_folder(tmp_path / "ds", n=1, captions=None)
    ids = np.zeros((H, W), dtype=np.int64)  # road 50%
    ids[:, 32:48] = 1  # car 25%
    ids[:, 48:60] = 4  # building 18.75%
    ids[:, 60:62] = 2  # traffic_light
    ids[:, 62:] = 255
    write_ids(root / "labels" / "s00.png", ids)
    s = FolderDataset(root, transform=NO_AUG)[0]
    assert s["caption_is_fallback"]
    assert s["caption"] == "a photo with road, car, building and traffic light"
    # a blank caption entry counts as missing
    (root / "captions.jsonl").write_text(json.dumps({"file": "s00.png", "caption": "  ", "domain": "x"}) + "\n")
    s = FolderDataset(root, transform=NO_AUG)[0]
    assert s["caption_is_fallback"] and s["meta"] == {"domain": "x"}


def test_folder_npy_labels_and_explicit_label_set(tmp_path):
    root = make_folder(tmp_path / "ds", n=2)
    ids = label_map(0)
    (root / "labels" / "s00.png").unlink()
    np.save(root / "labels" / "s00.npy", ids)
    (root / "labelset.yaml").unlink()
    with pytest.raises(DatasetError, match="labelset.yaml"):
        FolderDataset(root)
    ds = FolderDataset(root, small_label_set(), transform=NO_AUG)
    assert torch.equal(ds[0]["labels"], torch.from_numpy(ids))


def test_toy_world_folder_loads(tmp_path):
    toy = pytest.importorskip("layout2image.core.toy")
    summary = toy.write_dataset(tmp_path / "toy", 3, size=(32, 64), preview_rows=0)
    ds = FolderDataset(summary.root, transform=TransformConfig(resolution=32))
    s = ds[0]
    assert ds.label_set.name == "toy" and s["pixel_values"].shape == (3, 32, 32)
    assert s["meta"]["domain"] in toy.DOMAINS and s["caption"] and not s["caption_is_fallback"]


# ---------------------------------------------------------------------------------------------- named datasets
def test_cityscapes_label_ids_become_train_ids(tmp_path):
    raw = np.array([7, 8, 26, 0, 33, 24, 40, 7], dtype=np.uint8)
    expected = np.array([0, 1, 13, 255, 18, 11, 255, 0])
    raw_map = np.repeat(np.repeat(raw[None, :], H, axis=0), W // len(raw), axis=1)
    for split, city, n in (("train", "aachen", 2), ("train", "bremen", 1), ("val", "lindau", 1)):
        for i in range(n):
            stem = f"{city}_000000_{i:06d}"
            write_rgb(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", encode_labels(raw_map))
            write_ids(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", raw_map)
    captions = tmp_path / "cityscapes_caption_train.json"
    captions.write_text(json.dumps({"aachen_000000_000000_leftImg8bit": "a street in aachen"}))
    ds = CityscapesDataset(tmp_path, "train", transform=NO_AUG, captions=captions)
    assert ds.stems == ["aachen_000000_000000", "aachen_000000_000001", "bremen_000000_000000"]
    s = ds[0]
    assert s["labels"][0, :: W // len(raw)].tolist() == expected.tolist()
    assert s["caption"] == "a street in aachen"
    assert ds[1]["caption_is_fallback"] and ds[1]["caption"].startswith("a photo with road")
    assert len(CityscapesDataset(tmp_path, "val", transform=NO_AUG)) == 1
    with pytest.raises(DatasetError, match="splits found"):
        CityscapesDataset(tmp_path, "test")
    # ALDM's default recipe: resize to 512x1024 then a 512 crop
    assert default_transform("cityscapes").resized_size((H, W)) == (512, 1024)


def test_ade20k_shift_and_ignore(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    raw = np.zeros((H, W), dtype=np.uint8)
    raw[:, 16:32], raw[:, 32:48], raw[:, 48:] = 1, 3, 150
    for split, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        write_rgb(base / "images" / split / f"{stem}.jpg", encode_labels(raw))
        write_ids(base / "annotations" / split / f"{stem}.png", raw)
    ds = ADE20KDataset(tmp_path, "train", transform=NO_AUG)  # parent folder and the short split name work
    labels = ds[0]["labels"]
    assert labels[0, [0, 16, 32, 48]].tolist() == [255, 0, 2, 149]
    assert ADE20KDataset(base, "validation", transform=NO_AUG).stems == ["ADE_val_00000001"]


def test_coco_stuff_remap_unused_ids_and_255(tmp_path):
    raw = np.array([0, 11, 12, 181, 255, 91, 0, 0], dtype=np.uint8)
    raw_map = np.repeat(np.repeat(raw[None, :], H, axis=0), W // len(raw), axis=1)
    write_rgb(tmp_path / "images" / "val2017" / "000000000139.jpg", encode_labels(raw_map % 5))
    write_ids(tmp_path / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png", raw_map)
    ds = COCOStuffDataset(tmp_path, "val", transform=NO_AUG)
    assert ds.label_set.num_classes == 171
    assert ds[0]["labels"][0, :: W // len(raw)].tolist() == [0, 255, 11, 170, 255, 80, 0, 0]
    assert ds[0]["caption"] == "a photo with person, stop sign, banner and wood"  # ties: class id order
    # ALDM's COCO caption file maps a stem to five captions: one is picked per (seed, epoch, index)
    options = ["A woman stands in the dining area.", "A room with chairs.", "A kitchen by a window."]
    captions = _write(tmp_path / "coco_caption_val.json", json.dumps({"000000000139": options}))
    ds = COCOStuffDataset(tmp_path, "val2017", transform=NO_AUG, captions=captions)
    picked = [ds.get(0, epoch)["caption"] for epoch in range(12)]
    assert set(picked) == set(options) and picked == [ds.get(0, epoch)["caption"] for epoch in range(12)]


# ---------------------------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("crop", ["random", "center"])
def test_joint_crop_and_flip_keep_image_and_label_aligned(tmp_path, crop):
    root = make_folder(tmp_path / "ds", n=2)
    ds = FolderDataset(root, transform=TransformConfig(resolution=16, resize="none", crop=crop, flip_prob=0.5))
    seen_flips = set()
    for epoch in range(6):
        for i in range(len(ds)):
            s = ds.get(i, epoch)
            labels = s["labels"].numpy()
            red = ((s["pixel_values"][0].numpy() + 1) * 127.5).round().astype(np.int64)
            assert np.array_equal(red, encode_labels(labels)[..., 0]), "image and labels went out of alignment"
            top, left, h, w = s["crop"].tolist()
            expected = label_map(i)[top : top + h, left : left + w]
            assert np.array_equal(labels, expected[:, ::-1] if s["flipped"] else expected)
            seen_flips.add(s["flipped"])
    assert seen_flips == {False, True}


def test_transform_matches_random_joint_crop_flip_and_is_deterministic(tmp_path):
    cfg = TransformConfig(resolution=16, resize="none", seed=3)
    image, labels = encode_labels(label_map(0)), label_map(0)
    for index, epoch in [(0, 0), (5, 2), (7, 9)]:
        plan = cfg.plan((H, W), index, epoch)
        out = cfg.apply(image, labels, plan)
        rng = np.random.default_rng([3, epoch, index])
        ref = random_joint_crop_flip(image, labels, (16, 16), rng, 0.5)
        assert np.array_equal(out[0], ref[0]) and np.array_equal(out[1], ref[1])
        assert cfg.plan((H, W), index, epoch) == plan
    plans = {cfg.plan((H, W), 1, epoch) for epoch in range(8)}
    assert len(plans) > 1, "the augmentation must change between epochs"

    root = make_folder(tmp_path / "ds", n=3)
    a = FolderDataset(root, transform=cfg)
    b = FolderDataset(root, transform=cfg)
    b.set_epoch(4)
    for i in range(3):
        assert torch.equal(a.get(i, 4)["pixel_values"], b[i]["pixel_values"])
        assert torch.equal(a[(i, 4)]["labels"], b[i]["labels"])
        assert a.get(i, 4)["pixel_key"] == b[i]["pixel_key"]


def test_resize_modes_and_nearest_labels(tmp_path):
    assert TransformConfig(resolution=16).resized_size((H, W)) == (16, 32)
    assert TransformConfig(resolution=(16, 48)).resized_size((H, W)) == (24, 48)
    assert TransformConfig(resolution=16, resize_to=24).resized_size((H, W)) == (24, 48)
    assert TransformConfig(resolution=16, resize="exact", resize_to=(40, 20)).resized_size((H, W)) == (40, 20)
    assert TransformConfig(resolution=(24, 40), resize="exact", crop="none").resized_size((H, W)) == (24, 40)
    root = make_folder(tmp_path / "ds", n=1)
    ds = FolderDataset(root, transform=TransformConfig(resolution=(24, 40), resize="exact", crop="none", flip_prob=0))
    s = ds[0]
    assert s["pixel_values"].shape == (3, 24, 40) and s["labels"].shape == (24, 40)
    assert set(s["labels"].unique().tolist()) <= set(np.unique(label_map(0)).tolist())
    val = TransformConfig(resolution=16, seed=1).for_validation()
    assert val.crop == "center" and val.flip_prob == 0 and not val.is_random
    assert val.plan((H, W), 0, 0).crop == (0, 8, 16, 16)  # shorter side 16 -> 16x32, centred


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"resolution": 30}, "multiple of 8"),
        ({"resolution": [16, 0]}, "positive"),
        ({"resize": "fit"}, "resize='fit'"),
        ({"crop": "corner"}, "crop='corner'"),
        ({"flip_prob": 1.5}, "flip_prob"),
        ({"interpolation": "nearest"}, "interpolation='nearest'"),
        ({"resize": "none", "resize_to": 64}, "resize_to"),
        ({"resize": "shorter", "resize_to": [16, 16]}, "resize_to"),
        ({"resolution": None}, "resize='shorter' needs resize_to"),
        ({"resolution": None, "resize": "none"}, "crop='random' needs a resolution"),
        ({"seed": -1}, "seed"),
    ],
)
def test_transform_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- captions
def test_fallback_caption_rules():
    ls = small_label_set()
    ids = np.array([[2, 2, 0, 0, 0, 255]])
    assert fallback_caption(ids, ls) == "a photo with road and traffic light"
    assert fallback_caption(np.array([[1, 0]]), ls) == "a photo with road and car"  # ties: class id order
    assert fallback_caption(np.array([[3, 3, 3, 1, 1, 0, 4]]), ls, max_names=2) == "a photo with sky and car"
    assert fallback_caption(np.full((2, 2), 255), ls) == "a photo"
    assert fallback_caption(torch.tensor([[4]]), ls, prefix="an image of") == "an image of building"
    assert class_phrase("wall-other") == "wall" and class_phrase("traffic_light") == "traffic light"


def test_caption_files_report_the_bad_line(tmp_path):
    bad = tmp_path / "captions.jsonl"
    bad.write_text('{"file": "a.png", "caption": "x"}\n{not json}\n')
    with pytest.raises(DatasetError, match="line 2"):
        load_captions(bad)
    bad.write_text('{"file": "a.png", "caption": "x"}\n{"file": "a.png", "caption": "y"}\n')
    with pytest.raises(DatasetError, match="line 2 repeats"):
        load_captions(bad)
    bad.write_text('{"name": "a.png", "caption": "x"}\n')
    with pytest.raises(DatasetError, match="file key"):
        load_captions(bad)
    table = CaptionTable.from_json(_write(tmp_path / "c.json", json.dumps({"a": "cap a", "b": ""})))
    assert table.lookup(["z", "a"]) == ("cap a", {}) and table.lookup(["b"]) is None


def _write(path, text):
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- bad datasets
def test_image_without_label_names_the_file(tmp_path):
    root = make_folder(tmp_path / "ds")
    (root / "labels" / "s01.png").unlink()
    with pytest.raises(DatasetError, match=r"(?s)without a label map.*s01\.png"):
        FolderDataset(root)


def test_label_without_image_names_the_file(tmp_path):
    root = make_folder(tmp_path / "ds")
    (root / "images" / "s02.png").unlink()
    with pytest.raises(DatasetError, match=r"(?s)without an image.*s02\.png"):
        FolderDataset(root)


@pytest.mark.parametrize("threaded", [False, True])
def test_size_mismatch_names_the_file_and_both_sizes(tmp_path, monkeypatch, threaded):
    if threaded:  # header reads of large datasets go through a thread pool
        monkeypatch.setattr("layout2image.trainer.data.base._PARALLEL_FROM", 1)
    root = make_folder(tmp_path / "ds")
    write_ids(root / "labels" / "s01.png", label_map(1, size=(32, 48)))
    with pytest.raises(DatasetError, match=r"s01\.png' is 32x64 .* is 32x48"):
        FolderDataset(root)
    ds = FolderDataset(root, transform=NO_AUG, check_sizes=False)  # found when read instead
    with pytest.raises(DatasetError, match=r"s01\.png' is 32x64 .* is 32x48"):
        ds[1]


def test_ids_out_of_range_raise_label_map_error_naming_the_file(tmp_path):
    root = make_folder(tmp_path / "ds")
    ids = label_map(2)
    ids[5, 7] = 9
    write_ids(root / "labels" / "s02.png", ids)
    ds = FolderDataset(root, transform=NO_AUG)
    ds[0]
    with pytest.raises(LabelMapError, match=r"s02\.png.*id 9 at \(row 5, col 7\)"):
        ds[2]
    with pytest.raises(LabelMapError, match=r"s02\.png"):
        ds.scan_labels()


def test_empty_and_malformed_folders_name_the_folder(tmp_path):
    root = tmp_path / "empty"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    with pytest.raises(DatasetError, match=r"empty.*is empty"):
        FolderDataset(root, "cityscapes")
    (tmp_path / "nolabels" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"nolabels' has no 'labels/'"):
        FolderDataset(tmp_path / "nolabels", "cityscapes")
    root = make_folder(tmp_path / "dup", n=1)
    write_rgb(root / "images" / "s00.jpg", encode_labels(label_map(0)))
    with pytest.raises(DatasetError, match="same stem"):
        FolderDataset(root)


def test_crop_larger_than_image_fails_at_construction(tmp_path):
    root = make_folder(tmp_path / "ds", n=1)
    with pytest.raises(DatasetError, match=r"s00\.png.*crop 40x40"):
        FolderDataset(root, transform=TransformConfig(resolution=40, resize="none"))


# ---------------------------------------------------------------------------------------------- batching
def test_dataloader_with_workers_and_pickling(tmp_path):
    root = make_folder(tmp_path / "ds", n=4)
    ds = FolderDataset(root, transform=TransformConfig(resolution=16, seed=7))
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone.get(3, 2)["pixel_values"], ds.get(3, 2)["pixel_values"])
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, num_workers=2, collate_fn=collate, sampler=[(i, 1) for i in range(4)]
    )
    batches = list(loader)
    assert len(batches) == 2
    b = batches[1]
    assert b["pixel_values"].shape == (2, 3, 16, 16) and b["labels"].shape == (2, 16, 16)
    assert b["flipped"].dtype == torch.bool and b["crop"].shape == (2, 4) and b["index"].tolist() == [2, 3]
    assert b["caption"] == ["caption 2", "caption 3"] and b["meta"] == [{"domain": "d2"}, {"domain": "d3"}]
    assert torch.equal(b["pixel_values"][0], ds.get(2, 1)["pixel_values"])


def test_collate_names_samples_of_different_sizes(tmp_path):
    root = make_folder(tmp_path / "ds", n=2)
    write_rgb(root / "images" / "s01.png", encode_labels(label_map(1, (40, 64))))
    write_ids(root / "labels" / "s01.png", label_map(1, (40, 64)))
    ds = FolderDataset(root, transform=TransformConfig(resolution=None, resize="none", crop="none"))
    with pytest.raises(DatasetError, match=r"(?s)pixel_values.*s00: \(3, 32, 64\).*s01: \(3, 40, 64\)"):
        collate([ds[0], ds[1]])


# ---------------------------------------------------------------------------------------------- config factory
def test_build_dataset_from_mapping_and_validation_split(tmp_path):
    make_folder(tmp_path / "ds" / "train", n=3)
    make_folder(tmp_path / "ds" / "val", n=2, captions=None)
    config = {"root": str(tmp_path / "ds"), "split": "train", "val_split": "val", "transform": {"resolution": 16}}
    train = build_dataset(config)
    val = build_dataset(config, validation=True)
    assert len(train) == 3 and len(val) == 2
    assert train.transform.crop == "random" and val.transform.crop == "center" and val.transform.flip_prob == 0
    assert val[0]["caption_is_fallback"]
    dumped = yaml.safe_load(yaml.safe_dump(DataConfig.from_dict(config).to_dict()))
    assert dumped["transform"]["resolution"] == [16, 16]
    with pytest.raises(ValueError, match=r"unknown data setting\(s\) \['resolution'\]"):
        build_dataset({"root": str(tmp_path), "resolution": 16})
    with pytest.raises(ValueError, match="data.format='voc'"):
        DataConfig(format="voc")
    with pytest.raises(ValueError, match="data.root is not set"):
        build_dataset(DataConfig())


# ---------------------------------------------------------------------------------------------- cache
class CountingEncoder:
    def __init__(self, kind: str):
        self.kind, self.calls, self.rows = kind, 0, 0

    def __call__(self, x):
        self.calls += 1
        self.rows += len(x)
        if self.kind == "image":
            pooled = torch.nn.functional.avg_pool2d(x, 8)
            return torch.cat([pooled, pooled[:, :1]], dim=1)  # (b, 4, H/8, W/8)
        return torch.stack([torch.full((3, 2), float(len(c))) for c in x])  # (b, L, D)


def test_cache_hits_misses_and_keys(tmp_path):
    root = make_folder(tmp_path / "ds", n=2)
    plain = FolderDataset(root, transform=TransformConfig(resolution=16, crop="center", flip_prob=0.0))
    flipped = FolderDataset(root, transform=TransformConfig(resolution=16, crop="center", flip_prob=1.0))
    batch = collate([plain[0], plain[1]])
    cache = EncodingCache(tmp_path / "cache", image_encoder_id="vae-a", text_encoder_id="te-a")
    enc = CountingEncoder("image")
    first = cache.latents(batch, enc)
    assert first.shape == (2, 4, 2, 2) and (enc.calls, enc.rows) == (1, 2)
    second = cache.latents(batch, enc)
    assert torch.equal(first, second) and enc.calls == 1
    assert (cache.stats.hits, cache.stats.misses, cache.stats.corrupt) == (2, 2, 0)
    # the flip flag is part of the key; so is the encoder id
    cache.latents(collate([flipped[0]]), enc)
    assert enc.rows == 3
    EncodingCache(tmp_path / "cache", image_encoder_id="vae-b", text_encoder_id="te-a").latents(batch, enc)
    assert enc.rows == 5
    # text embeddings
    text = CountingEncoder("text")
    emb = cache.text_embeddings(["a road", "sky"], text)
    assert emb.shape == (2, 3, 2) and emb[1, 0, 0] == 3
    cache.text_embeddings(["sky", "a road", "new"], text)
    assert (text.calls, text.rows) == (2, 3)
    assert not list((tmp_path / "cache").rglob("*.tmp")), "temporary files must be renamed or removed"
    with pytest.raises(ValueError, match="one row per input"):
        cache.text_embeddings(["other"], lambda caps: torch.zeros(2, 3, 2))


def test_cache_recomputes_a_corrupt_entry_with_a_warning(tmp_path, l2i_caplog):
    ds = FolderDataset(make_folder(tmp_path / "ds", n=2), transform=NO_AUG.for_validation())
    batch = collate([ds[0], ds[1]])
    cache = EncodingCache(tmp_path / "cache", image_encoder_id="vae", text_encoder_id="te")
    enc = CountingEncoder("image")
    reference = cache.latents(batch, enc)
    bad = cache.path_of("latents", cache.latent_key(batch["pixel_key"][1]))
    bad.write_bytes(b"not a safetensors file")
    again = cache.latents(batch, enc)
    assert torch.equal(again, reference)
    assert (enc.calls, enc.rows) == (2, 3) and cache.stats.corrupt == 1
    assert "cannot be read" in l2i_caplog.text and bad.name in l2i_caplog.text
    cache.latents(batch, enc)
    assert enc.calls == 2, "the rewritten entry is read back"
