"""A real CLIP BPE tokenizer for the shapes world, built offline.

CLIP's byte-level alphabet (so any text tokenizes) plus BPE merges under which each caption word becomes a
single token: the vocabulary stays tiny (about 650 tokens) and captions fit in 16 positions.
"""

from __future__ import annotations

import itertools

from .world import ShapesWorld

MAX_LENGTH = 16


def clip_byte_vocabulary() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, each symbol alone and word-final, plus the two special tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges under which every word becomes one token (the last symbol carries CLIP's end-of-word marker).

    Each word is tokenized as BPE will (always the lowest-ranked known pair first); where no known pair
    applies, a new merge of the leftmost pair is appended. A new merge ranks last, so the words already
    covered keep their single token.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            rank, i = min((ranks.get(pair, len(ranks) + 1), i) for i, pair in enumerate(itertools.pairwise(symbols)))
            if rank > len(ranks):
                i = 0
                ranks[(symbols[0], symbols[1])] = len(merges)
                merges.append((symbols[0], symbols[1]))
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return merges


def world_tokenizer(world: ShapesWorld | None = None):
    """A `transformers.CLIPTokenizer` whose vocabulary covers the world's words as single tokens."""
    from transformers import CLIPTokenizer

    vocabulary = clip_byte_vocabulary()
    specials = ["<|startoftext|>", "<|endoftext|>"]
    for name in specials:
        vocabulary.pop(name)
    merges = word_merges((world or ShapesWorld()).words())
    for left, right in merges:
        vocabulary.setdefault(left + right, len(vocabulary))
    for name in specials:  # last, so that the end-of-text token has the largest id (CLIP's argmax pooling)
        vocabulary[name] = len(vocabulary)
    return CLIPTokenizer(vocab=vocabulary, merges=merges, model_max_length=MAX_LENGTH)
