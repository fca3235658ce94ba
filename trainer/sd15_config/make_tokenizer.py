"""Rebuild ``tokenizer/vocab.json`` and ``tokenizer/merges.txt`` from OpenAI CLIP's BPE file.

The source is ``bpe_simple_vocab_16e6.txt.gz`` (MIT License, Copyright (c) 2021 OpenAI), as carried by the
``open-clip-torch`` wheel on PyPI::

    pip download open-clip-torch --no-deps -d /tmp/oc
    unzip -o /tmp/oc/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    python make_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz

The vocabulary is built exactly as OpenAI's ``SimpleTokenizer`` builds it (``clip/simple_tokenizer.py``):

1. the 256 byte-level unicode characters of ``bytes_to_unicode()``, in its order (ids 0-255);
2. the same characters with ``</w>`` appended (ids 256-511);
3. one token per merge, the two halves concatenated, for the first ``49152 - 256 - 2`` lines after the header
   (ids 512-49405);
4. ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49408 tokens in all.

``merges.txt`` is the ``#version: 0.2`` header plus those merges, the layout transformers' ``CLIPTokenizer`` reads.
The script then loads the result with ``transformers.CLIPTokenizer`` and checks the vocabulary size and the ids
of a few strings (values from open_clip's own tokenizer); it exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

#: sha256 of the ``bpe_simple_vocab_16e6.txt.gz`` in open-clip-torch 3.3.0 (identical to OpenAI's CLIP repo).
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408

#: strings -> ids as open_clip's ``SimpleTokenizer`` encodes them (with start/end tokens, no padding).
KNOWN_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "A Photo Of A CAT!": [49406, 320, 1125, 539, 320, 2368, 256, 49407],
    "road, sidewalk and a building": [49406, 1759, 267, 23278, 537, 320, 2307, 49407],
    "naïve café — 東京 🐱 it's 42 dogs": [
        49406,
        1097,
        35689,
        563,
        15304,
        2005,
        48338,
        21078,
        361,
        22979,
        585,
        568,
        275,
        273,
        3255,
        49407,
    ],
    "": [49406, 49407],
}


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable unicode character table (GPT-2's)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """Return ``(vocab, merges)`` built from the gz file as OpenAI's ``SimpleTokenizer`` does."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{bpe_gz} does not hold {NUM_MERGES} two-part merges after its header")
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"built {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def write(vocab: dict[str, int], merges: list[str], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), "utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")


def check(out_dir: Path) -> list[str]:
    """Load ``out_dir`` with transformers' CLIPTokenizer; return a list of problems (empty when all is well)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    problems = []
    if len(tok) != VOCAB_SIZE:
        problems.append(f"vocabulary size {len(tok)} != {VOCAB_SIZE}")
    for text, expected in KNOWN_IDS.items():
        got = tok(text).input_ids
        if got != expected:
            problems.append(f"{text!r}: {got} != {expected}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "tokenizer", help="tokenizer folder to write"
    )
    args = parser.parse_args(argv)
    digest = hashlib.sha256(args.bpe_gz.read_bytes()).hexdigest()
    if digest != BPE_SHA256:
        print(f"warning: {args.bpe_gz} has sha256 {digest}, not the known {BPE_SHA256}", file=sys.stderr)
    vocab, merges = build(args.bpe_gz)
    write(vocab, merges, args.out)
    problems = check(args.out)
    for problem in problems:
        print(f"MISMATCH {problem}", file=sys.stderr)
    print(f"wrote {args.out}/vocab.json ({len(vocab)} tokens) and merges.txt ({len(merges)} merges)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
