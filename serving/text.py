"""Tokenizing request texts at a bounded cost, with the tokens open_clip's tokenizer gives.

open_clip's ``SimpleTokenizer`` byte-pair-encodes every word of the whole text, in time quadratic in a
word's length, and then keeps the first ``context_length`` tokens; it caches every word it has seen,
forever. A client's 2000 random letters cost seconds of CPU for tokens the model never sees, and a
stream of new words grows the cache without bound. ``BoundedTokenizer`` gives the same token ids,
at a cost bounded per text:

- it stops encoding words once it has more tokens than fit (the model sees the first
  ``context_length - 2`` of them, then the end token), so the cost does not grow with the text;
- it encodes a run of more than ``MAX_WORD`` bytes without a space or a change of character class
  (a run of letters, or of symbols) in pieces of ``MAX_WORD`` bytes: that caps the quadratic term.
  Only such runs tokenize differently from open_clip (no English word is that long; it is about
  40 CJK characters written without spaces);
- its word cache holds at most ``CACHE_WORDS`` entries.

Other tokenizers (Hugging Face's, SigLIP's: compiled, linear, truncating) are called unchanged.
"""

from __future__ import annotations

import copy
import threading
from typing import Callable

import torch
from open_clip.tokenizer import SimpleTokenizer

MAX_WORD = 128  # bytes; encoding one costs ~2 ms, and it gives ~70 tokens when its letters are random
CACHE_WORDS = 20_000  # words of at most MAX_WORD bytes: tens of MB at worst


class WordCache(dict):
    """``SimpleTokenizer.cache`` with at most ``size`` entries: the oldest goes first; special tokens stay."""

    def __init__(self, pinned: dict[str, str], size: int) -> None:
        super().__init__(pinned)
        self.pinned, self.size = set(pinned), size

    def __setitem__(self, word: str, tokens: str) -> None:
        if len(self) >= self.size:
            oldest = next((w for w in self if w not in self.pinned), None)
            if oldest is not None:
                del self[oldest]
        super().__setitem__(word, tokens)


class BoundedTokenizer:
    """``texts -> [B, context_length]`` token ids, as ``tokenizer(texts)``; thread-safe."""

    def __init__(self, tokenizer: Callable, cache_words: int = CACHE_WORDS) -> None:
        self.exact = isinstance(tokenizer, SimpleTokenizer) and tokenizer.reduction_fn is None
        if self.exact:
            # a copy whose cache is ours: the tables it shares with the original are only read
            tokenizer = copy.copy(tokenizer)
            specials = [tokenizer.decoder[i] for i in tokenizer.all_special_ids]
            tokenizer.cache = WordCache({t: t for t in specials}, cache_words)
        self.tokenizer = tokenizer
        self.context_length = int(getattr(tokenizer, "context_length", 0) or 77)
        # Pure-Python encoding holds the GIL anyway, so one lock costs no parallelism; it keeps the
        # cache's evictions and lookups from interleaving.
        self._lock = threading.Lock()

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if not self.exact:
            return self.tokenizer(texts)
        tok, length = self.tokenizer, self.context_length
        result = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            # length - 1 content tokens decide the row: the first length - 2 and that there are more
            tokens = [tok.sot_token_id, *self.encode(text, limit=length - 1), tok.eot_token_id]
            if len(tokens) > length:
                tokens = tokens[:length]
                tokens[-1] = tok.eot_token_id
            result[row, : len(tokens)] = torch.tensor(tokens)
        return result

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """``SimpleTokenizer.encode(text)``, stopped once it holds ``limit`` tokens or more."""
        tok, ids = self.tokenizer, []
        with self._lock:
            for match in tok.pat.finditer(tok.clean_fn(text)):
                word = "".join(tok.byte_encoder[b] for b in match.group().encode("utf-8"))
                for start in range(0, len(word), MAX_WORD):
                    ids.extend(tok.encoder[t] for t in tok.bpe(word[start : start + MAX_WORD]).split(" "))
                    if limit is not None and len(ids) >= limit:
                        return ids
        return ids
