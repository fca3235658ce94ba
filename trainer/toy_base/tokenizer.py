"""Part 2: the toy CLIP BPE tokenizer, whose vocabulary holds every toy caption word as one token."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ...core.toy import DOMAIN_PHRASES, DOMAINS, TOY_CLASSES

__all__ = ["EXTRA_VOCABULARY", "build_toy_tokenizer", "caption_vocabulary", "learn_word_merges"]


#: Words the tokenizer knows beyond those of generated captions: class names, counts, and the words of the
#: trainer's fallback captions (``"a photo with road, car and sky"``).
EXTRA_VOCABULARY = (
    *TOY_CLASSES,
    *("skies", "roads", "sidewalks", "buildings", "trees", "cars", "people", "persons", "grass"),
    *("one", "two", "three", "four", "five", "six", "many", "a", "an", "the", "of", "with", "and", "in", "at"),
    *("on", "photo", "picture", "image", "street", "lamp", "lamps", "pole", "poles", "city", "town", "urban"),
    *DOMAINS,
)
#: Characters with a token of their own (and a word-final ``</w>`` form): the fallback for unknown words.
_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()/&+"
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
#: Split of a lower-cased text into CLIP's pre-tokens (letters, single digits, other symbols).
_PRE_TOKENS = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def _pre_tokens(text: str) -> list[str]:
    return _PRE_TOKENS.findall(text.lower())


def caption_vocabulary(captions: Iterable[str] = ()) -> list[str]:
    """The toy vocabulary: every word of `captions`, of the domain phrases and `EXTRA_VOCABULARY`, sorted."""
    words: set[str] = set(EXTRA_VOCABULARY)
    for text in (*captions, *(p for phrases in DOMAIN_PHRASES.values() for p in phrases)):
        words.update(t for t in _pre_tokens(text) if t.isalpha())
    return sorted(words)


# Why a hand-written merge learner and not the `tokenizers` library's BPE trainer (installed with transformers)?
# It was tried (tokenizers 0.23.3) with the settings that mirror this learner: `BpeTrainer(end_of_word_suffix="</w>",
# initial_alphabet=_CHARACTERS, min_frequency=0, vocab_size=270)` over each vocabulary word once, on the shipped
# recipe's 61 words. It also learns 168 merges and also makes every word one token, but it writes neither file of
# weights/toy/tokenizer byte for byte, nor the same content:
# - merges.txt: the order first differs at merge 15 ("a r" before our "a n</w>"), 100 of the 168 merges are shared.
#   On equal counts it breaks ties by token id (the order symbols entered its vocabulary: "n</w>" after every plain
#   letter), we break them alphabetically; and it counts a pair once per occurrence, not once per word that still
#   needs it (for ["aaaa", "aaa", "aa", ...] its first merge is "a a", ours "a a</w>").
# - vocab.json: the special tokens come first (ids 0 and 1; CLIP has them last, as we do), only word-final characters
#   seen in the words get a "</w>" form (236 entries; ours 270: every fallback character has one), and it is written
#   on one line (ours: one entry per line).
# Other merges or ids would change the token ids the shipped text encoder (and every toy figure) was trained with.


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair (all its occurrences) until none is left."""
    word = list(symbols)
    while len(word) > 1:
        pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, math.inf))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def learn_word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges under which CLIP's tokenizer turns each of `words` into one token (``word</w>``).

    Each new merge has the lowest priority so far, so it never changes how a word that is already whole splits;
    the words' splits are recomputed with the real BPE rule (`_bpe`) after each merge, so the result holds by
    construction. Merges are picked by how many words still need them (ties broken alphabetically): deterministic.
    """
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    splits = {w: [*w[:-1], w[-1] + "</w>"] for w in words if w}
    while True:
        open_words = [s for s in splits.values() if len(s) > 1]
        if not open_words:
            return merges
        counts: dict[tuple[str, str], int] = {}
        for s in open_words:
            for pair in {(s[i], s[i + 1]) for i in range(len(s) - 1)}:
                counts[pair] = counts.get(pair, 0) + 1
        pair = min(counts, key=lambda p: (-counts[p], p))
        ranks[pair] = len(merges)
        merges.append(pair)
        splits = {w: _bpe(s, ranks) for w, s in splits.items()}


def build_toy_tokenizer(folder: str | os.PathLike, words: Sequence[str], max_tokens: int = 32):
    """Write a CLIP tokenizer for `words` into `folder` (vocab.json, merges.txt, tokenizer files) and load it.

    Vocabulary: single characters (``a``, ``a</w>``, ... for `_CHARACTERS`), the merge results (every caption word
    as ``word</w>`` among them), then ``<|startoftext|>`` and ``<|endoftext|>`` last (as in CLIP; the end token is
    also the padding and unknown token).

    Returns:
        `transformers.CLIPTokenizer` with ``model_max_length = max_tokens``.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_word_merges(words)
    vocab: dict[str, int] = {}
    for ch in _CHARACTERS:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[_BOS] = len(vocab)
    vocab[_EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0, ensure_ascii=False) + "\n", encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=max_tokens,
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_EOS,
        unk_token=_EOS,
    )
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def _tokenize(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    return tokenizer(
        list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
