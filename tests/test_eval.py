"""l2i-eval and core.evaluation: hand-computed mIoU, a Fréchet distance of 0 for identical sets, the CLI on a small
toy dataset with the shipped segmenter (per-domain rows, eval.json/eval.md, refusal, one-line errors)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from layout2image.cli import eval as eval_cli
from layout2image.core.evaluation import (
    TOY_FRECHET_NAME,
    EvaluationError,
    list_images,
    read_domains,
    read_image,
    scores_dict,
    segmenter_frechet_distance,
)
from layout2image.core.labels import get_label_set
from layout2image.core.metrics import segmentation_scores
from layout2image.core.segmenters import load_segmenter, pooled_features
from layout2image.core.toy import DOMAINS, HELDOUT_START, write_dataset

pytest.importorskip("torchmetrics")  # the `eval` extra; CI installs it with `dev`

TOY = get_label_set("toy")


@pytest.fixture(scope="module")
def toy_sets(tmp_path_factory):
    """Held-out real toy images at 128²: 8 to score (2 per domain) and 8 others as a reference."""
    root = tmp_path_factory.mktemp("eval")
    write_dataset(root / "gen", 8, size=128, start=HELDOUT_START, preview_rows=0)
    write_dataset(root / "ref", 8, size=128, start=HELDOUT_START + 100, preview_rows=0)
    return root


def _copy(toy_sets, tmp_path, name="gen"):
    return shutil.copytree(toy_sets / name, tmp_path / name)


def test_hand_made_confusion_gives_hand_computed_scores():
    confusion = torch.zeros(8, 8, dtype=torch.long)  # rows: target class, columns: predicted (toy: sky, road, ...)
    confusion[:2, :2] = torch.tensor([[3, 1], [2, 4]])
    scores = scores_dict(segmentation_scores(confusion), TOY)
    # IoU sky = 3 / (4 + 5 - 3) = 1/2; IoU road = 4 / (6 + 5 - 4) = 4/7; the rest absent from both: null, not averaged
    assert scores["per_class_iou"] == pytest.approx({"sky": 1 / 2, "road": 4 / 7, **dict.fromkeys(TOY.names[2:])})
    assert scores["miou"] == pytest.approx((1 / 2 + 4 / 7) / 2)
    assert scores["pixel_accuracy"] == pytest.approx(7 / 10)


def test_identical_sets_give_zero_distance(toy_sets):
    seg = load_segmenter("builtin:toy")
    files = list_images(toy_sets / "gen")
    other = list_images(toy_sets / "ref")
    results = segmenter_frechet_distance({"same": files, "other": other, "one": files[:1]}, files, seg)
    same, different = results["same"].value, results["other"].value
    # The trace term sums sqrt(eigenvalues of S @ S) over D dims: each of the (many) zero eigenvalues of a rank-7
    # covariance comes out of float64 eigvals as about eps64 * |S|^2, so its root adds up to sqrt(eps64) * tr(S).
    features = pooled_features(seg.model, torch.stack([read_image(f) for f in files]), seg.input_norm).double()
    dims, trace = features.shape[1], float(torch.cov(features.T).trace())
    assert abs(same) <= dims * torch.finfo(torch.float64).eps ** 0.5 * trace
    assert different > 0.1 and different > 1e3 * abs(same)
    assert results["one"] is None  # no covariance from one image
    assert results["same"].num_features == 16 + 32 + 64 + 128 and results["same"].size == (128, 128)


def test_missing_torchmetrics_is_a_clear_error(toy_sets, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)
    files = list_images(toy_sets / "gen")
    with pytest.raises(EvaluationError, match="needs torchmetrics, which is not installed"):
        segmenter_frechet_distance({"all": files}, files, load_segmenter("builtin:toy"))


def test_domains_from_manifest_before_captions(tmp_path):
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png", "caption": "x", "domain": "day"}\n')
    assert read_domains(tmp_path) == {"a": "day"}
    manifest = {"settings": {}, "images": [{"file": "images/a.png", "domain": "night", "seed": 1}, {"file": "b.png"}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert read_domains(tmp_path) == {"a": "night"}
    (tmp_path / "manifest.json").write_text(json.dumps({"a.png": {"domain": "fog"}}))
    assert read_domains(tmp_path) == {"a": "fog"}
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(EvaluationError, match="manifest.json' is not readable JSON"):
        read_domains(tmp_path)


def test_cli_scores_the_toy_dataset_per_domain(toy_sets, tmp_path, capsys):
    gen = _copy(toy_sets, tmp_path)
    assert eval_cli.main([str(gen), "--reference", str(toy_sets / "ref"), "--quiet"]) == 0
    report = json.loads((gen / "eval.json").read_text())
    layout = report["layout"]
    # the shipped evaluation segmenter has mIoU ~0.91 on held-out real images
    assert layout["overall"]["miou"] > 0.8
    assert set(layout["per_domain"]) == set(DOMAINS) and layout["counts"] == dict.fromkeys(sorted(DOMAINS), 2)
    assert all(d["miou"] > 0.6 for d in layout["per_domain"].values())
    assert set(layout["overall"]["per_class_iou"]) == set(TOY.names)
    frechet = report["frechet_distance"]
    assert frechet["name"] == TOY_FRECHET_NAME and "not Inception" in frechet["name"]
    assert set(frechet["values"]) == {"all", *DOMAINS} and frechet["values"]["all"] > 0
    # the reference names its domains (captions.jsonl): each domain is compared with its own 2 reference images
    assert frechet["reference_images"]["all"] == {"domain": "all", "num": 8}
    assert frechet["reference_images"]["night"] == {"domain": "night", "num": 2}
    assert set(report["not_computed"]) == {"inception_fid", "kid", "lpips_diversity", "clip_score"}
    md = (gen / "eval.md").read_text()
    assert "| all | 8 |" in md and "| night | 2 |" in md and TOY_FRECHET_NAME in md
    assert capsys.readouterr().out == ""  # --quiet


def test_existing_evaluation_is_refused_without_overwrite(toy_sets, tmp_path, capsys):
    gen = _copy(toy_sets, tmp_path)
    (gen / "eval.json").write_text("{}")
    assert eval_cli.main([str(gen), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "eval.json' already exists" in err and "--overwrite" in err
    assert (gen / "eval.json").read_text() == "{}" and not (gen / "eval.md").exists()
    assert eval_cli.main([str(gen), "--quiet", "--overwrite"]) == 0
    assert json.loads((gen / "eval.json").read_text())["num_images"] == 8
    # --out elsewhere leaves the dataset folder alone
    assert eval_cli.main([str(gen), "--quiet", "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "eval.md").is_file()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_label", "1 image(s) without a label map"),
        ("label_set", "has no class named ['wall', 'fence'"),
        ("model", "is not a loadable transformers segmentation model folder"),
        ("reference", "reference folder"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(toy_sets, tmp_path, capsys, case, expected):
    gen = _copy(toy_sets, tmp_path)
    args = [str(gen), "--quiet"]
    if case == "missing_label":
        (gen / "labels" / "toy_1000003.png").unlink()
    elif case == "label_set":
        args += ["--label-set", "cityscapes"]
    elif case == "model":
        bad = tmp_path / "seg"
        bad.mkdir()
        (bad / "config.json").write_text('{"model_type": "segformer"}')  # no weights
        args += ["--segmenter", str(bad)]
    else:
        args += ["--reference", str(tmp_path / "nowhere")]
    assert eval_cli.main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "l2i-eval" in line]
    assert len(lines) == 1 and lines[0].startswith("l2i-eval: error: ") and expected in lines[0]
    assert "Traceback" not in err
    assert not (gen / "eval.json").exists() and not (gen / "eval.md").exists()


def test_reference_without_domains_is_used_whole_for_every_domain(toy_sets, tmp_path):
    gen = _copy(toy_sets, tmp_path)
    plain = shutil.copytree(toy_sets / "ref" / "images", tmp_path / "plain")  # images only: no domains
    assert eval_cli.main([str(gen), "--reference", str(plain), "--quiet"]) == 0
    frechet = json.loads((gen / "eval.json").read_text())["frechet_distance"]
    assert all(ref == {"domain": "all", "num": 8} for ref in frechet["reference_images"].values())
    assert "(vs all, 8)" in (gen / "eval.md").read_text()
