"""Files the pack writes get the umask's mode (``0o666 & ~umask``) and folders ``0o777 & ~umask``.

safetensors' ``save_file`` and ``save_pretrained`` on top of it leave their files ``0o600``: an export written that
way is unreadable to a UI running as another user (issue 15, A6). The tests set an unusual umask (``0o027``, so
``0o600`` / ``0o644`` / ``0o755`` all fail) and check every file and folder each writer leaves behind.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from layout2image.core.labels import get_label_set, load_label_set
from layout2image.testing import write_tiny_sd

UMASK = 0o027
FILE_MODE, DIR_MODE = 0o666 & ~UMASK, 0o777 & ~UMASK

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")


@pytest.fixture
def umask():
    previous = os.umask(UMASK)
    try:
        yield UMASK
    finally:
        os.umask(previous)


def _wrong_modes(root: Path) -> list[str]:
    """Every path under ``root`` (itself included) whose permission bits are not the umask's."""
    wrong = []
    for path in [root, *sorted(root.rglob("*"))]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        want = DIR_MODE if path.is_dir() else FILE_MODE
        if mode != want:
            wrong.append(f"{path.relative_to(root.parent)}: {oct(mode)} (want {oct(want)})")
    return wrong


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    from layout2image.core.toy import write_dataset

    root = tmp_path_factory.mktemp("modes_world")
    write_tiny_sd(root / "sd")
    write_dataset(root / "data", 4, size=32, preview_rows=0)
    return root


def _trainer(world: Path, out: Path, mode: str, hint: str):
    from layout2image.trainer.config import load_config
    from layout2image.trainer.loop import Trainer

    overrides = [
        f"model.pretrained={world / 'sd'}",
        f"data.root={world / 'data'}",
        f"train.output_dir={out}",
        f"model.mode={mode}",
        f"model.hint={hint}",
        "data.transform.resolution=32",
        "model.hint_block_out_channels=[8, 8, 8, 8]",
        "model.sdm_lora.rank=4",
        "model.sdm_lora.lora_alpha=4",
        "model.sdm_lora.spade_hidden_channels=8",
        "train.batch_size=2",
        "train.num_workers=0",
        "train.checkpoint_every=0",
        "validation.every=0",
        "validation.at_end=false",
        "discriminator.pretrained=null",
        "discriminator.tiny=true",
        "validation.segmenter=null",
        "export.controlnet_formats=[diffusers-folder, diffusers, ldm]",
    ]
    return Trainer(load_config("toy", overrides=overrides))


EXPORTS = [("controlnet", "embedding"), ("sdm_lora", "onehot"), ("t2i_adapter", "rgb")]


@pytest.mark.parametrize("mode, hint", EXPORTS, ids=[m for m, _ in EXPORTS])
def test_every_exported_file_and_folder_has_the_umask_mode(tiny_world, tmp_path, umask, mode, hint):
    trainer = _trainer(tiny_world, tmp_path / "run", mode, hint)
    result = trainer.export(tmp_path / "export")
    written = {str(p) for p in result.files}
    # The files that were 0o600 before the fix are among those checked.
    expected = {
        "controlnet": {"controlnet", "controlnet.safetensors", "controlnet.ldm.safetensors"},
        "sdm_lora": {"lora.safetensors", "spade.safetensors", "sdm_lora.safetensors", "sdm_lora.spade.safetensors"},
        "t2i_adapter": {"t2i_adapter"},
    }[mode] | {"discriminator"}
    assert expected <= written
    assert (tmp_path / "export" / "discriminator" / "model.safetensors").is_file()
    assert _wrong_modes(tmp_path / "export") == []


def test_weights_writers_and_caches_give_the_umask_mode(tmp_path, umask):
    from layout2image.core.hints.class_embeddings import build_class_embedding_table
    from layout2image.core.sdm import SDMConditionSpec, SDMUNet, sdm_preset
    from layout2image.trainer.data.cache import EncodingCache
    from layout2image.weights import save_class_embedding_table
    from layout2image.weights.sdm_file import save_sdm_file

    toy = get_label_set("toy")
    out = tmp_path / "out"
    table = torch.randn(toy.num_classes + 1, 8)
    save_class_embedding_table(out / "weights" / "table.safetensors", table, toy)
    config = sdm_preset("tiny")
    with torch.device("meta"):
        shapes = SDMUNet.from_sdm_config(config).state_dict()
    state = {k: torch.zeros(v.shape) for k, v in shapes.items()}
    save_sdm_file(
        out / "weights" / "sdm.safetensors",
        state,
        config=config,
        label_set=toy,
        condition=SDMConditionSpec(toy.num_classes, edges=True),
    )
    build_class_embedding_table(
        toy, lambda texts: torch.ones(len(texts), 4), encoder_id="ones", cache_dir=out / "table_cache"
    )
    cache = EncodingCache(out / "encodings", image_encoder_id="vae", text_encoder_id="te")
    cache.text_embeddings(["a road"], lambda caps: torch.zeros(len(caps), 3, 2))

    assert len(list((out / "table_cache").glob("*.safetensors"))) == 1
    assert len(list((out / "encodings").rglob("*.safetensors"))) == 1
    assert _wrong_modes(out) == []


def test_controlnet_files_in_every_format_have_the_umask_mode(tmp_path, umask):
    from diffusers import ControlNetModel

    from layout2image.weights import save_controlnet_file

    model = ControlNetModel(
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        layers_per_block=1,
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
        conditioning_embedding_out_channels=(4, 8),
    )
    for to, name in (("diffusers-folder", "folder"), ("diffusers", "cn.safetensors"), ("ldm", "cn.ldm.safetensors")):
        save_controlnet_file(tmp_path / "out" / name, model.state_dict(), dict(model.config), to=to)
    assert (tmp_path / "out" / "folder" / "diffusion_pytorch_model.safetensors").is_file()
    assert _wrong_modes(tmp_path / "out") == []


def test_the_default_umask_gives_readable_files(tmp_path):
    """The everyday case: umask 022 gives 0o644 files that other users can read."""
    from layout2image.weights import save_class_embedding_table

    previous = os.umask(0o022)
    try:
        toy = load_label_set("toy")
        path = save_class_embedding_table(tmp_path / "t.safetensors", torch.zeros(toy.num_classes + 1, 4), toy)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_move_into_fresh_folder_never_reuses_a_folder(tmp_path):
    """Two set-asides in the same second get two folders; nothing is deleted, missing paths are skipped."""
    from layout2image.core.files import move_into_fresh_folder

    (tmp_path / "a").write_text("1")
    (tmp_path / "b").mkdir()
    first = move_into_fresh_folder(tmp_path, "replaced", [tmp_path / "a", tmp_path / "b", tmp_path / "gone"])
    (tmp_path / "a").write_text("2")
    second = move_into_fresh_folder(tmp_path, "replaced", [tmp_path / "a"])
    assert first != second and first.name.startswith("replaced-") and second.name.startswith("replaced-")
    assert (first / "a").read_text() == "1" and (first / "b").is_dir() and (second / "a").read_text() == "2"
    assert not (tmp_path / "a").exists()
