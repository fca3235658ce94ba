"""The N+1 segmenter discriminator: shapes, head remap by class name, input normalisation, train/eval rules."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import SegformerForSemanticSegmentation, UperNetForSemanticSegmentation

from layout2image.core.discriminator import (
    BACKBONES,
    CITYSCAPES_FROM_ADE20K,
    FAKE_CLASS_NAME,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DiscriminatorError,
    InputNorm,
    build_discriminator,
    get_classifier,
    normalize_class_name,
    remap_classifier_head,
    running_stat_norms,
    tiny_segmenter_config,
)
from layout2image.core.labels import get_label_set

CUSTOM = ("sky", "road", "tree", "car", "boat")
# (backbone, UperNet backbone) pairs covered by the shape tests.
BACKBONE_CASES = [("segformer", "convnext"), ("upernet", "convnext"), ("upernet", "swin")]
# Cityscapes class -> 0-based ADE20K row, as the table must resolve (aldm.md §12 pitfall 6 fixes included).
EXPECTED_ADE_ROWS = {
    "road": 6,
    "sidewalk": 11,
    "building": 1,
    "wall": 0,
    "fence": 32,
    "pole": 93,
    "traffic light": 136,
    "traffic sign": 43,
    "vegetation": 4,
    "terrain": 9,
    "sky": 2,
    "person": 12,
    "rider": None,
    "car": 20,
    "truck": 83,
    "bus": 80,
    "train": None,
    "motorcycle": 116,
    "bicycle": 127,
}


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _disc(backbone: str = "segformer", upernet_backbone: str = "convnext", labels=CUSTOM):
    torch.manual_seed(0)
    return build_discriminator(labels, backbone=backbone, config=tiny_segmenter_config(backbone, upernet_backbone))


def _pretrained_ade(tmp_path, backbone: str, aux_head: bool = False, id2label="ade20k"):
    """A tiny 'ADE20K-finetuned' segmenter saved to a folder: 150-row head, ADE names (or none) in id2label."""
    torch.manual_seed(1)
    config = tiny_segmenter_config(backbone)
    if id2label == "ade20k":
        config.id2label = dict(enumerate(get_label_set("ade20k").names))
    else:
        config.num_labels = 150  # LABEL_0 ... LABEL_149
    config.label2id = {v: k for k, v in config.id2label.items()}
    if backbone == "upernet":
        config.use_auxiliary_head = aux_head
        model = UperNetForSemanticSegmentation(config)
    else:
        model = SegformerForSemanticSegmentation(config)
    with torch.no_grad():  # spread the head so copied and random rows are easy to tell apart
        get_classifier(model).weight.normal_(0.0, 1.0)
        get_classifier(model).bias.normal_(0.0, 1.0)
    folder = tmp_path / f"{backbone}-ade"
    model.save_pretrained(str(folder))
    return folder, model


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("backbone,upernet_backbone", BACKBONE_CASES)
@pytest.mark.parametrize("image_size,label_size", [((32, 48), None), ((64, 32), (32, 16)), ((48, 80), (96, 160))])
def test_logits_shape_at_label_size(backbone, upernet_backbone, image_size, label_size):
    disc = _disc(backbone, upernet_backbone)
    logits = disc(_images(2, *image_size), size=label_size)
    expected = label_size or image_size
    assert logits.shape == (2, len(CUSTOM) + 1, *expected)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert disc.num_outputs == len(CUSTOM) + 1 and disc.fake_index == len(CUSTOM)
    assert disc.model.config.num_labels == len(CUSTOM) + 1
    assert disc.model.config.id2label[disc.fake_index] == FAKE_CLASS_NAME


def test_bad_input_shape_is_refused():
    disc = _disc()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        disc(torch.zeros(1, 1, 16, 16))


def test_bad_backbone_lists_valid_ones():
    with pytest.raises(DiscriminatorError) as err:
        build_discriminator(CUSTOM, backbone="deeplab")
    for name in BACKBONES:
        assert name in str(err.value)


def test_config_is_not_mutated():
    config = tiny_segmenter_config("upernet")
    before = config.to_dict()
    build_discriminator(CUSTOM, backbone="upernet", config=config)
    assert config.to_dict() == before


# ---------------------------------------------------------------- head remap


def test_cityscapes_table_resolves_to_ade_indices():
    ade = [normalize_class_name(n) for n in get_label_set("ade20k").names]
    table = {e.target: e.source for e in CITYSCAPES_FROM_ADE20K}
    assert tuple(table) == get_label_set("cityscapes").names
    resolved = {t: (None if s is None else ade.index(normalize_class_name(s))) for t, s in table.items()}
    assert resolved == EXPECTED_ADE_ROWS
    # ALDM's README errors must not come back: 128 is 'lake', 72 'palm', 38 'railing'.
    assert ade[128] == "lake" and resolved["bicycle"] == 127
    assert 72 not in resolved.values() and 38 not in resolved.values()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_remap_cityscapes_from_ade20k_folder(tmp_path, backbone):
    folder, source = _pretrained_ade(tmp_path, backbone, aux_head=backbone == "upernet")
    src_w = get_classifier(source).weight.detach()
    src_b = get_classifier(source).bias.detach()
    cityscapes = get_label_set("cityscapes")
    disc = build_discriminator(cityscapes, pretrained=folder, generator=torch.Generator().manual_seed(0))

    new = get_classifier(disc.model)
    assert new.weight.shape == (20, *src_w.shape[1:])
    report = disc.remap_report
    assert report.table == "ade20k->cityscapes" and report.num_source_rows == 150
    for i, name in enumerate(cityscapes.names):
        ade_row = EXPECTED_ADE_ROWS[name]
        if ade_row is None:
            continue
        assert report.copied[i] == ade_row, name
        torch.testing.assert_close(new.weight[i], src_w[ade_row], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(new.bias[i], src_b[ade_row], rtol=0, atol=0, msg=name)

    random_rows = [cityscapes.names.index("rider"), cityscapes.names.index("train"), disc.fake_index]
    assert sorted(report.random_rows) == sorted(random_rows)
    assert report.rows[-1].origin == "fake"
    expected_std = 0.1 * src_w.std().item()
    assert report.random_std == pytest.approx(expected_std)
    for i in random_rows:
        assert torch.all(new.bias[i] == 0)
        assert 0 < new.weight[i].std().item() < 0.5 * src_w.std().item()

    assert disc.model.config.num_labels == 20
    assert disc.model.config.id2label[19] == FAKE_CLASS_NAME
    assert disc.model.config.label2id["traffic sign"] == 7
    assert getattr(disc.model, "auxiliary_head", None) is None
    # the pretrained folder itself is untouched
    assert len(json.loads((folder / "config.json").read_text())["id2label"]) == 150
    assert disc(_images(2, 32, 32)).shape == (2, 20, 32, 32)


def test_exact_name_matching_custom_label_set():
    torch.manual_seed(0)
    config = tiny_segmenter_config("segformer")
    config.id2label = dict(enumerate(["Sky", "Traffic_Light", "tree;palm", "car", "building"]))
    config.label2id = {v: k for k, v in config.id2label.items()}
    source = SegformerForSemanticSegmentation(config)
    with torch.no_grad():
        get_classifier(source).weight.normal_()
    src_w = get_classifier(source).weight.detach().clone()

    target = ["traffic light", "palm", "boat", "SKY"]
    report = remap_classifier_head(source, target, name_map=None, generator=torch.Generator().manual_seed(0))
    assert report.copied == {0: 1, 1: 2, 3: 0}
    assert report.table is None
    assert [r.origin for r in report.rows] == ["exact", "exact", "random", "exact", "fake"]
    new_w = get_classifier(source).weight
    for dst, src in report.copied.items():
        torch.testing.assert_close(new_w[dst], src_w[src], rtol=0, atol=0)
    assert source.config.id2label == {0: "traffic light", 1: "palm", 2: "boat", 3: "SKY", 4: FAKE_CLASS_NAME}
    assert source.config.num_labels == 5


def test_user_name_map_overrides_and_is_checked():
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(tiny_segmenter_config("segformer"))
    names = ["sky", "car", "boat"]
    report = remap_classifier_head(model, names, source_labels=["sky", "car"], name_map={"boat": "car", "car": None})
    assert report.copied == {0: 0, 2: 1}
    assert report.table == "user"
    assert [r.origin for r in report.rows] == ["exact", "table_none", "table", "fake"]

    model = SegformerForSemanticSegmentation(tiny_segmenter_config("segformer"))
    with pytest.raises(DiscriminatorError, match="does not have"):
        remap_classifier_head(model, names, source_labels=["sky", "car"], name_map={"boat": "ship"})
    with pytest.raises(DiscriminatorError, match="not in our label set"):
        remap_classifier_head(model, names, source_labels=["sky", "car"], name_map={"plane": "car"})


def test_generic_or_missing_id2label_needs_source_labels(tmp_path):
    folder, _ = _pretrained_ade(tmp_path, "segformer", id2label="generic")
    with pytest.raises(DiscriminatorError, match="source_labels"):
        build_discriminator(get_label_set("cityscapes"), pretrained=folder)
    disc = build_discriminator(get_label_set("cityscapes"), pretrained=folder, source_labels=get_label_set("ade20k"))
    assert disc.remap_report.copied[0] == 6  # road

    model = SegformerForSemanticSegmentation(tiny_segmenter_config("segformer"))
    model.config.id2label = None
    with pytest.raises(DiscriminatorError, match="id2label is missing"):
        remap_classifier_head(model, CUSTOM)
    with pytest.raises(DiscriminatorError, match="2 rows"):
        remap_classifier_head(model, CUSTOM, source_labels=["a", "b", "c"])


def test_pretrained_folder_checks(tmp_path):
    with pytest.raises(DiscriminatorError, match="config.json"):
        build_discriminator(CUSTOM, pretrained=tmp_path / "missing")
    folder, _ = _pretrained_ade(tmp_path, "segformer")
    with pytest.raises(DiscriminatorError, match="'segformer' model"):
        build_discriminator(CUSTOM, backbone="upernet", pretrained=folder)
    with pytest.raises(DiscriminatorError, match="not both"):
        build_discriminator(CUSTOM, pretrained=folder, config=tiny_segmenter_config())


def test_save_and_reload_keeps_head_and_norm(tmp_path):
    disc = _disc("upernet", labels=get_label_set("cityscapes").names)
    disc.input_norm = InputNorm((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    torch.testing.assert_close(disc.input_mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    disc.save_pretrained(tmp_path / "d")
    again = build_discriminator(get_label_set("cityscapes"), pretrained=tmp_path / "d")
    assert again.remap_report is None
    assert again.input_norm.mean == pytest.approx((0.1, 0.2, 0.3))
    x = _images(2, 32, 32)
    disc.eval()
    again.eval()
    torch.testing.assert_close(again(x), disc(x))
    torch.testing.assert_close(get_classifier(again.model).weight, get_classifier(disc.model).weight)
    with pytest.raises(DiscriminatorError, match="trained for classes"):
        build_discriminator(CUSTOM, pretrained=tmp_path / "d")


# ---------------------------------------------------------------- input normalisation


def test_input_norm_modes(tmp_path):
    x = _images(1, 8, 8)
    half = build_discriminator(CUSTOM, config=tiny_segmenter_config(), input_norm="half")
    torch.testing.assert_close(half.normalize(x), x)
    imagenet = build_discriminator(CUSTOM, config=tiny_segmenter_config())  # "auto" without a folder
    assert imagenet.input_norm.mean == IMAGENET_MEAN and imagenet.input_norm.std == IMAGENET_STD
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(imagenet.normalize(x), ((x + 1) / 2 - mean) / std)
    with pytest.raises(DiscriminatorError, match="imagenet"):
        build_discriminator(CUSTOM, config=tiny_segmenter_config(), input_norm="bgr")

    folder, _ = _pretrained_ade(tmp_path, "segformer")
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2], "rescale_factor": 1 / 255})
    )
    from_file = build_discriminator(get_label_set("cityscapes"), pretrained=folder)
    assert from_file.input_norm.mean == pytest.approx((0.5, 0.4, 0.3))
    assert from_file.input_norm.std == pytest.approx((0.2, 0.2, 0.2))
    forced = build_discriminator(get_label_set("cityscapes"), pretrained=folder, input_norm="imagenet")
    assert forced.input_norm.mean == IMAGENET_MEAN


# ---------------------------------------------------------------- train / eval rules


def test_generator_mode_restores_modes_and_requires_grad():
    disc = _disc("upernet")
    disc.train()
    frozen = next(disc.model.backbone.parameters())
    frozen.requires_grad_(False)
    disc.model.decode_head.eval()
    before_modes = {name: m.training for name, m in disc.named_modules()}
    before_grads = {name: p.requires_grad for name, p in disc.named_parameters()}

    with disc.generator_mode():
        assert not any(m.training for m in disc.modules())
        assert not any(p.requires_grad for p in disc.parameters())
    assert {name: m.training for name, m in disc.named_modules()} == before_modes
    assert {name: p.requires_grad for name, p in disc.named_parameters()} == before_grads

    with pytest.raises(RuntimeError, match="boom"), disc.generator_mode():
        raise RuntimeError("boom")
    assert {name: m.training for name, m in disc.named_modules()} == before_modes
    assert {name: p.requires_grad for name, p in disc.named_parameters()} == before_grads


@pytest.mark.parametrize("backbone", BACKBONES)
def test_gradient_reaches_input_in_generator_mode(backbone):
    disc = _disc(backbone)
    stats = {name: b.clone() for name, b in disc.named_buffers() if "running" in name}
    images = _images(1, 32, 32).requires_grad_(True)
    with disc.generator_mode():
        disc(images).logsumexp(1).mean().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
    for name, value in disc.named_buffers():
        if name in stats:
            torch.testing.assert_close(value, stats[name], rtol=0, atol=0, msg=name)


def test_batch_of_one_update_keeps_batchnorm_in_eval():
    disc = _disc("upernet")
    norms = running_stat_norms(disc)
    assert norms, "UperNet has BatchNorm layers"
    disc.train()
    with pytest.raises(ValueError, match="more than 1 value"):
        disc(_images(1, 32, 32))  # plain train mode: pyramid pooling BN on a 1x1 map fails

    stats = {name: b.clone() for name, b in disc.named_buffers() if "running" in name}
    disc.eval()
    with disc.update_mode(batch_size=1):
        assert disc.training and not any(n.training for n in norms)
        disc(_images(1, 32, 32)).mean().backward()
    assert not disc.training  # restored
    for name, value in disc.named_buffers():
        if name in stats:
            torch.testing.assert_close(value, stats[name], rtol=0, atol=0, msg=name)
    assert any(p.grad is not None for p in disc.parameters())

    with disc.update_mode(batch_size=2):
        assert all(n.training for n in norms)
        disc(_images(2, 32, 32))
    changed = [name for name, b in disc.named_buffers() if name in stats and not torch.equal(b, stats[name])]
    assert changed, "a batch of 2 trains the BatchNorm statistics"

    with pytest.raises(ValueError, match="batch_size"), disc.update_mode(batch_size=0):
        pass
