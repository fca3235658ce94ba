"""Layout encoders and the class-embedding table builder."""

from __future__ import annotations

import pytest
import torch

from layout2image.core.hints import (
    build_class_embedding_table,
    class_embedding_hint,
    class_prompts,
    clip_text_encode_fn,
    null_layout_like,
    one_hot,
    palette_rgb,
)
from layout2image.core.labels import get_label_set
from layout2image.testing import tiny_clip as build_tiny_clip

CS = get_label_set("cityscapes")


def _labels():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 19, (2, 8, 12), generator=g)
    labels[0, 0, :3] = 255
    return labels


def test_palette_rgb_matches_palette_and_blacks_out_ignore():
    labels = _labels()
    hint = palette_rgb(labels, CS)
    assert hint.shape == (2, 3, 8, 12) and hint.dtype == torch.float32
    assert 0.0 <= hint.min() and hint.max() <= 1.0
    b, y, x = 1, 4, 5
    assert torch.allclose(hint[b, :, y, x] * 255, torch.tensor(CS.palette[labels[b, y, x]], dtype=torch.float32))
    assert hint[0, :, 0, :3].abs().sum() == 0


def test_one_hot_shapes_ignore_and_edges():
    labels = _labels()
    oh = one_hot(labels, 19)
    assert oh.shape == (2, 19, 8, 12)
    assert oh[0, :, 0, :3].sum() == 0  # ignore -> all zeros
    valid = labels != 255
    assert torch.equal(oh.sum(1), valid.float())
    assert torch.equal(oh.argmax(1)[valid], labels[valid])
    with_edges = one_hot(labels, 19, with_edges=True)
    assert with_edges.shape == (2, 20, 8, 12)
    assert torch.equal(with_edges[:, :19], oh)
    flat = torch.zeros(1, 4, 4, dtype=torch.long)
    assert one_hot(flat, 19, with_edges=True)[:, 19].sum() == 0


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.full((1, 2, 2), 200), r"id 200 at \(batch 0, row 0, col 0\) is out of range: ids must be 0..18"),
        (torch.zeros(2, 2), r"must have shape \(B, H, W\)"),
        (torch.zeros(1, 2, 2), r"must hold integer class ids, got dtype torch.float32"),
    ],
)
def test_encoders_reject_bad_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        one_hot(labels, 19)


def test_class_embedding_hint_samples_at_stride_then_looks_up():
    labels = _labels()
    table = torch.randn(20, 6)
    hint = class_embedding_hint(labels, table, stride=4)
    assert hint.shape == (2, 6, 2, 3)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                lab = int(labels[b, 4 * i, 4 * j])
                row = 19 if lab == 255 else lab
                assert torch.equal(hint[b, :, i, j], table[row])
    assert torch.equal(hint[0, :, 0, 0], table[19])  # ignore -> null row
    # equals full-resolution lookup followed by nearest downsampling by 4 (taking the top-left pixel)
    full = class_embedding_hint(labels, table, stride=1)
    assert torch.equal(full[:, :, ::4, ::4], hint)
    with pytest.raises(ValueError, match=r"table must have shape \(N \+ 1, D\)"):
        class_embedding_hint(labels, torch.randn(20))
    with pytest.raises(ValueError, match="id 19 at"):
        class_embedding_hint(torch.full((1, 4, 4), 19), torch.randn(19, 3))


def test_null_layout_is_zeros_like():
    hint = torch.randn(2, 3, 4, 4)
    null = null_layout_like(hint)
    assert null.shape == hint.shape and null.dtype == hint.dtype and null.abs().sum() == 0


class CountingEncoder:
    """A deterministic stand-in encode function: a vector from the text's characters, counting its calls."""

    def __init__(self, dim=5):
        self.dim, self.calls = dim, 0

    def __call__(self, texts):
        self.calls += 1
        return torch.stack(
            [torch.tensor([float(len(t) + k * sum(map(ord, t)) % 7) for k in range(self.dim)]) for t in texts]
        )


def test_table_builder_rows_prompts_and_null_row():
    enc = CountingEncoder()
    table = build_class_embedding_table(CS, enc, batch_size=8)
    assert table.shape == (20, 5) and table.dtype == torch.float32
    prompts = class_prompts(CS)
    assert prompts[6] == "a photo of traffic light"
    assert torch.equal(table[:19], enc(prompts))
    assert torch.equal(table[19], enc([""])[0])
    zeros = build_class_embedding_table(CS, enc, null_text=None)
    assert zeros[19].abs().sum() == 0 and torch.equal(zeros[:19], table[:19])
    with pytest.raises(ValueError, match="must contain '\\{name\\}'"):
        class_prompts(CS, "a photo")
    with pytest.raises(ValueError, match=r"encode_fn returned shape \(3,\) for 20 texts"):
        build_class_embedding_table(CS, lambda texts: torch.zeros(3))


def test_table_builder_caches_by_encoder_id_in_memory_and_on_disk(tmp_path):
    enc = CountingEncoder()
    a = build_class_embedding_table(CS, enc, encoder_id="enc-A", cache_dir=tmp_path)
    calls = enc.calls
    b = build_class_embedding_table(CS, enc, encoder_id="enc-A", cache_dir=tmp_path)
    assert enc.calls == calls and torch.equal(a, b)
    build_class_embedding_table(CS, enc, encoder_id="enc-A", template="{name}", cache_dir=tmp_path)
    assert enc.calls > calls  # another template is another table
    files = list(tmp_path.glob("class_embeddings_*.safetensors"))
    assert len(files) == 2
    # a fresh process (empty memory cache) reads the disk cache
    from layout2image.core.hints import class_embeddings

    class_embeddings._memory_cache.clear()
    calls = enc.calls
    c = build_class_embedding_table(CS, enc, encoder_id="enc-A", cache_dir=tmp_path)
    assert enc.calls == calls and torch.equal(a, c)


@pytest.fixture
def tiny_clip(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = build_tiny_clip(tmp_path)
    return model.eval(), tokenizer


def test_clip_encode_fn_eos_and_mean_pooling(tiny_clip):
    model, tokenizer = tiny_clip
    eos = clip_text_encode_fn(model, tokenizer)
    mean = clip_text_encode_fn(model, tokenizer, pooling="mean")
    out = eos(["a photo of road", "a photo of sky"])
    assert out.shape == (2, 16)
    assert not torch.allclose(out[0], out[1])
    # eos pooling = the final-layer-normed hidden state at the first EOS token
    tokens = tokenizer(["a photo of road"], padding="max_length", max_length=16, return_tensors="pt")
    hidden = model(input_ids=tokens.input_ids).last_hidden_state[0]
    eos_pos = int((tokens.input_ids[0] == 1).nonzero()[0])
    assert torch.allclose(out[0], hidden[eos_pos], atol=1e-5)
    m = mean(["a photo of road"])
    n_tokens = int(tokens.attention_mask.sum())
    assert torch.allclose(
        m[0],
        model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        .last_hidden_state[0, :n_tokens]
        .mean(0),
        atol=1e-5,
    )
    table = build_class_embedding_table(CS, eos)
    assert table.shape == (20, 16)
    with pytest.raises(ValueError, match="pooling='max' is not valid"):
        clip_text_encode_fn(model, tokenizer, pooling="max")
