"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", arXiv 2312.04927), written as text.

``num_pairs`` key-value pairs (" ab7 ": ``key_len`` lowercase letters, distinct within an example, and ``value_len``
decimal digits) are spread over the haystack at independent uniform depths; after it, a newline and ``num_queries``
of the keys in random order (" ab", answered by its value). Each query's value is scored by exact match of its
tokens; values are uniform and independent of the keys, so chance is 10 ** -value_len. Pairs that land within the
attention window of their query are readable without memory: the depth of each answer's pair says which ones did (a
depth near 1 is close to the queries). ``separator`` goes between a key and its value (" ab=7 ", asked " ab=").
The default, none, is Zoology's layout, where the value follows its key directly: the lookup is then what a
two-layer induction head does, and a small model learns it in the attention window in about a thousand steps; with
"=" neither our attention nor a plain transformer of the same size had learned it after 4,000
(docs/experiments/2026-12-06-mqar-lookup.md).

One query per example by default. Each answer is written into the text before the next query (a multi-token answer
must be teacher-forced), so with every key queried a model that ignores the keys can answer by elimination: the
last query's value is the one not yet given. For four pairs of one digit that shortcut alone scores 0.59 exact match
(docs/experiments/2026-12-05-long-context-tasks.md). ``hidden_answers=True`` closes it as Zoology's MQAR does: the
input shows "?" in place of every answer digit (" ab? cd?"), so any number of queries can be asked, each a test of
its key; the digits of a value are then predicted side by side. With one query, or with hidden answers, the best a
model can do without looking the key up is to know the bag of values: about 1 / num_pairs (0.39 for four pairs of
one digit, with repeats).
"""

from __future__ import annotations

import numpy as np

from ..model.checks import check_int
from .text import Example, Query, TextTask, compose, spread_offsets

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MASK = "?"  # what the input shows in place of each digit of a hidden answer
NO_PREFIX = np.zeros(0, dtype=np.int64)


class MQARTask(TextTask):
    name = "mqar"

    def __init__(self, tokenizer=None, haystack=None, split: str = "validation", *, num_pairs: int = 4,
                 num_queries: int = 1, key_len: int = 2, value_len: int = 1, hidden_answers: bool = False,
                 separator: str = ""):
        check_int("key_len", key_len, 1, 4)
        check_int("value_len", value_len, 1, 8)
        check_int("num_pairs", num_pairs, 1, len(LETTERS) ** key_len)
        check_int("num_queries", num_queries, 1, num_pairs)
        if not isinstance(separator, str) or any(c.isalnum() or c.isspace() for c in separator):
            raise ValueError(f"separator must be a string of punctuation (or empty), got {separator!r}")
        if not isinstance(hidden_answers, bool):
            raise TypeError(f"hidden_answers must be a bool, got {type(hidden_answers).__name__}")
        super().__init__(tokenizer, haystack, split)
        self.num_pairs, self.num_queries, self.key_len, self.value_len = num_pairs, num_queries, key_len, value_len
        self.hidden_answers, self.separator = hidden_answers, separator
        self.mask = None
        if hidden_answers:
            mask = self.encode(MASK)
            if len(mask) != 1:
                raise ValueError(f"hidden_answers needs a tokenizer that writes {MASK!r} as one token")
            self.mask = int(mask[0])

    @property
    def chance(self) -> float:
        return 10.0 ** -self.value_len

    def _key(self, index: int) -> str:
        letters = []
        for _ in range(self.key_len):
            index, letter = divmod(index, len(LETTERS))
            letters.append(LETTERS[letter])
        return "".join(letters)

    def _example(self, distance, rng, depth, segment_len) -> Example:
        # distinct keys (a repeated key would have two answers); values independent of keys: chance 10 ** -value_len
        keys = [self._key(int(i)) for i in rng.choice(len(LETTERS) ** self.key_len, self.num_pairs, replace=False)]
        values = ["".join(str(d) for d in rng.integers(0, 10, size=self.value_len)) for _ in keys]
        needles = [self.encode(f" {k}{self.separator}{v} ") for k, v in zip(keys, values)]
        offsets = spread_offsets(self.num_pairs, distance, rng)
        haystack = self.haystack.take(distance, rng)
        queries = []
        for n, i in enumerate(rng.permutation(self.num_pairs)[: self.num_queries]):
            question = self.encode(("" if n else "\n") + f" {keys[i]}{self.separator}")  # a newline ends the haystack
            queries.append(Query(question, self.encode(values[i]), supports=(int(i),), mask=self.mask))
        return compose(NO_PREFIX, haystack, needles, offsets, queries, segment_len)

    def describe(self) -> dict:
        return {**super().describe(), "num_pairs": self.num_pairs, "num_queries": self.num_queries,
                "key_len": self.key_len, "value_len": self.value_len, "hidden_answers": self.hidden_answers,
                "separator": self.separator}
