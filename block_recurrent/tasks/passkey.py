"""Passkey retrieval in Landmark Attention's format (Mohtashami and Jaggi 2023, arXiv 2305.16300).

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz
    you about the important information there.
    <haystack ...>
    The pass key is 71432. Remember it. 71432 is the pass key.
    <... haystack>
    What is the pass key? The pass key is 71432

The lines are joined by newlines, as there. The answer (" 71432") is scored by exact match of all its tokens;
the key is ``digits`` uniform decimal digits (leading zeros allowed), so chance is 10 ** -digits.
"""

from __future__ import annotations

from ..model.checks import check_int
from .text import Example, Query, TextTask, compose

TASK_DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                    "I will quiz you about the important information there.")
QUESTION = "What is the pass key? The pass key is"


class PasskeyTask(TextTask):
    """One needle holding a ``digits``-digit key at a chosen depth; the question at the end asks for it."""

    name = "passkey"
    fixed_depth = True

    def __init__(self, tokenizer=None, haystack=None, split: str = "validation", *, digits: int = 5,
                 preamble: bool = True):
        check_int("digits", digits, 1, 32)
        if not isinstance(preamble, bool):
            raise TypeError(f"preamble must be a bool, got {type(preamble).__name__}")
        super().__init__(tokenizer, haystack, split)
        self.digits, self.preamble = digits, preamble
        self.prefix = self.encode(TASK_DESCRIPTION + "\n" if preamble else "")
        self.question = self.encode("\n" + QUESTION)

    @property
    def chance(self) -> float:
        return 10.0 ** -self.digits

    def _example(self, distance, rng, depth, segment_len) -> Example:
        # uniform digits, leading zeros included, so that chance is exactly 10 ** -digits
        key = "".join(str(d) for d in rng.integers(0, 10, size=self.digits))
        needle = self.encode(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n")
        if depth is None:  # training: anywhere in the haystack
            depth = float(rng.random())
        haystack = self.haystack.take(distance, rng)
        # the answer starts with the space, as a subword tokenizer would encode " 71432" after "is"
        query = Query(self.question, self.encode(" " + key), supports=(0,))
        return compose(self.prefix, haystack, [needle], [round(depth * distance)], [query], segment_len)

    def describe(self) -> dict:
        return {**super().describe(), "digits": self.digits, "preamble": self.preamble}

