"""What the long-context tasks share: haystacks, needles placed in them, examples and batches.

An example is one token sequence, built from text pieces encoded one by one with the task's tokenizer (so the
position of every needle and answer is known in tokens, for bytes and subword vocabularies alike):

    prefix | haystack[:o1] needle1 haystack[o1:o2] needle2 ... haystack[ok:] | question answer [question answer ...]

``distance`` is the number of haystack tokens in the example (the context that memory has to bridge at the
farthest), and a needle's ``depth`` is the share of the haystack before it: 0 puts it at the haystack's start,
``distance`` tokens before the question, 1 right before the question. Answers are scored by exact match of all
their tokens under teacher forcing: every answer token is the argmax given the true tokens before it, which is
exactly when greedy decoding would write the whole answer. A task may hide an answer from the input (a mask token
in its place, :attr:`Answer.mask`): then no later part of the example can read it, and its tokens are predicted
side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from ..model.checks import check_float, check_int

# Landmark Attention's haystack (Mohtashami and Jaggi 2023, arXiv 2305.16300), joined by spaces and repeated
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


class TextTokenizer(Protocol):
    """What a task needs of a tokenizer (:class:`block_recurrent.training.data.ByteTokenizer` or a file's)."""

    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...


# haystacks: ``take(length, rng)`` gives ``length`` tokens of text to hide needles in


class FillerHaystack:
    """Landmark's filler sentences, repeated; every example's haystack starts at the first sentence, as there."""

    name = "filler"

    def __init__(self, tokenizer: TextTokenizer, text: str = FILLER):
        self.unit = encode(tokenizer, text + " ")

    def take(self, length: int, rng: np.random.Generator) -> np.ndarray:
        repeats = -(-length // len(self.unit))
        return np.tile(self.unit, max(repeats, 1))[:length]


class TextHaystack:
    """Windows of a token stream: texts (the built-in corpus's files, or any) encoded once and joined by newlines.
    Each example takes a window at a random place."""

    name = "corpus"

    def __init__(self, tokenizer: TextTokenizer, texts: Sequence[str]):
        if isinstance(texts, str) or not texts:
            raise ValueError("texts must be a non-empty sequence of strings")
        self.tokens = np.concatenate([encode(tokenizer, text + "\n") for text in texts])

    def take(self, length: int, rng: np.random.Generator) -> np.ndarray:
        if length > len(self.tokens):
            raise ValueError(f"distance {length} is longer than the haystack's text ({len(self.tokens)} tokens)")
        start = int(rng.integers(0, len(self.tokens) - length + 1))
        return self.tokens[start : start + length]


# the built-in corpus, read once per (split, tokenizer): about 1.4 MB of held-out text, or up to CORPUS_CHARS
# of the training split
CORPUS_CHARS = 4_000_000
_CORPORA: dict[tuple[str, str], TextHaystack] = {}


def corpus_haystack(tokenizer: TextTokenizer, split: str = "validation") -> TextHaystack:
    """The built-in corpus (the standard library's sources) as a haystack: its held-out files ("validation", for
    scoring) or its training files ("train", for fine-tuning), as :func:`~block_recurrent.training.data.split_documents`
    splits them."""
    from ..training.data import builtin_documents, split_documents

    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    describe = getattr(tokenizer, "describe", None)
    key = (split, repr(describe() if describe else id(tokenizer)))
    if key not in _CORPORA:
        train, held_out = split_documents(builtin_documents())
        texts, size = [], 0
        for document in held_out if split == "validation" else train:
            texts.append(document.text)
            size += len(document.text)
            if size >= CORPUS_CHARS:
                break
        _CORPORA[key] = TextHaystack(tokenizer, texts)
    return _CORPORA[key]


HAYSTACKS = ("filler", "corpus")


def make_haystack(kind: str, tokenizer: TextTokenizer, split: str = "validation"):
    if kind == "filler":
        return FillerHaystack(tokenizer)
    if kind == "corpus":
        return corpus_haystack(tokenizer, split)
    raise ValueError(f"haystack must be one of {', '.join(HAYSTACKS)}, got {kind!r}")


def encode(tokenizer: TextTokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


# examples


@dataclass(frozen=True)
class Answer:
    """One scored answer of an example: its tokens are ``Example.tokens[start : start + length]``."""

    start: int
    length: int
    depth: float  # the depth of the (earliest) needle the answer needs
    gap: int  # tokens from that needle's end to the answer's start
    # a hidden answer: the input shows this token in place of each of the answer's tokens, so no later query can
    # read it (Zoology's MQAR); its tokens are then predicted side by side, not teacher-forced. None: in the input
    mask: int | None = None


@dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # (T,) int64: the whole text, answers included
    answers: tuple[Answer, ...]
    needles: tuple[tuple[int, int], ...]  # (start, end) token span of each needle
    distance: int
    cut: int = 0  # needles left across a segment boundary: the haystack had no room to move them clear


@dataclass(frozen=True)
class Query:
    """The question part: text, the answer's text, and which needles (indices) the answer needs."""

    question: np.ndarray
    answer: np.ndarray
    supports: tuple[int, ...]
    mask: int | None = None  # hide the answer from the input behind this token (see Answer.mask)


def place_needles(
    offsets: Sequence[int], lengths: Sequence[int], base: int, distance: int, segment_len: int | None
) -> tuple[list[int], int]:
    """Haystack offsets (non-decreasing, in [0, distance]) for needles of ``lengths`` tokens, and how many of them
    are cut. Each is moved by less than a segment where needed so that it does not cross a multiple of
    ``segment_len`` counted from the example's start (``base`` tokens come before the haystack); a needle longer
    than a segment starts at a multiple of it. A needle stays cut only when the haystack leaves no room to move it
    (less than its length, or a segment for a long one, between the previous needle and the question).
    ``segment_len=None``: the offsets as given, needles cut wherever they fall."""
    placed, cut, shift, low = [], 0, base, 0  # shift: the tokens before haystack offset 0, growing with needles
    for offset, length in zip(offsets, lengths):
        offset = max(int(offset), low)
        if segment_len is not None:
            start = shift + offset
            first, last = start // segment_len, (start + length - 1) // segment_len
            if length > segment_len and start % segment_len:
                back, forward = first * segment_len - shift, (first + 1) * segment_len - shift
            elif length <= segment_len and first != last:  # it crosses the boundary last * segment_len
                back, forward = last * segment_len - length - shift, last * segment_len - shift
            else:
                back = forward = offset
            fits = [o for o in (back, forward) if low <= o <= distance]
            if fits:
                offset = min(fits, key=lambda o: abs(o - offset))
            else:
                cut += 1
        placed.append(offset)
        low, shift = offset, shift + length
    return placed, cut


def compose(
    prefix: np.ndarray, haystack: np.ndarray, needles: Sequence[np.ndarray], offsets: Sequence[int],
    queries: Sequence[Query], segment_len: int | None,
) -> Example:
    """An example: the prefix, the haystack with each needle inserted at its offset (see :func:`place_needles`),
    then each query's question and answer."""
    distance = len(haystack)
    offsets, cut = place_needles(offsets, [len(n) for n in needles], len(prefix), distance, segment_len)
    pieces, spans, position, last = [prefix], [], len(prefix), 0
    for needle, offset in zip(needles, offsets):
        pieces.append(haystack[last:offset])
        position += offset - last
        spans.append((position, position + len(needle)))
        pieces.append(needle)
        position += len(needle)
        last = offset
    pieces.append(haystack[last:])
    position += distance - last
    depths = [offset / distance if distance else 1.0 for offset in offsets]
    answers = []
    for query in queries:
        pieces += [query.question, query.answer]
        position += len(query.question)
        farthest = min(query.supports, key=lambda i: spans[i][0])
        answers.append(Answer(position, len(query.answer), depths[farthest], position - spans[farthest][1],
                              query.mask))
        position += len(query.answer)
    return Example(np.concatenate(pieces).astype(np.int64), tuple(answers), tuple(spans), distance, cut)


def spread_offsets(count: int, distance: int, rng: np.random.Generator) -> list[int]:
    """``count`` haystack offsets drawn uniformly in [0, distance], in order."""
    return sorted(int(o) for o in rng.integers(0, distance + 1, size=count))


def check_distance(distance: int, depth: float | None) -> None:
    check_int("distance", distance, 0)
    if depth is not None:
        check_float("depth", depth, 0.0, 1.0)


# batches


@dataclass(frozen=True)
class TaskBatch:
    """Examples side by side, right-padded (padding after an example never changes what it scores, as the model is
    causal). Position t of ``inputs`` predicts ``labels[:, t]``; hidden answers show their mask token in
    ``inputs``."""

    inputs: Tensor  # (B, T) long
    labels: Tensor  # (B, T) long: the answers' tokens (every token with ``lm_loss``), else ignore_index
    examples: tuple[Example, ...]


def collate(
    examples: Sequence[Example], *, multiple: int = 1, pad_id: int = 0, ignore_index: int = -100, lm_loss: bool = False
) -> TaskBatch:
    """Inputs and labels of ``examples``, padded to a common length rounded up to a multiple of ``multiple``
    (a model's ``max_seq_len`` for :class:`~block_recurrent.training.segments.SegmentRunner`). ``lm_loss``: label
    every next token (the language-model loss on the whole text), not only the answers."""
    check_int("multiple", multiple, 1)
    longest = max(len(e.tokens) - 1 for e in examples)
    T = -(-longest // multiple) * multiple
    inputs = np.full((len(examples), T), pad_id, dtype=np.int64)
    labels = np.full((len(examples), T), ignore_index, dtype=np.int64)
    for row, example in enumerate(examples):
        n = len(example.tokens) - 1
        inputs[row, :n] = example.tokens[:-1]
        if lm_loss:
            labels[row, :n] = example.tokens[1:]
        for answer in example.answers:  # position start - 1 predicts the answer's first token
            labels[row, answer.start - 1 : answer.start - 1 + answer.length] = example.tokens[
                answer.start : answer.start + answer.length]
            if answer.mask is not None:  # input position p shows token p
                inputs[row, answer.start : min(answer.start + answer.length, n)] = answer.mask
    return TaskBatch(torch.from_numpy(inputs), torch.from_numpy(labels), tuple(examples))


def answer_correct(batch: TaskBatch, predictions: Tensor) -> list[tuple[Example, Answer, bool]]:
    """Per answer of every example: whether all its tokens are predicted (``predictions``: (B, T) argmax ids)."""
    out = []
    for row, example in enumerate(batch.examples):
        for answer in example.answers:
            span = slice(answer.start - 1, answer.start - 1 + answer.length)
            truth = torch.from_numpy(example.tokens[answer.start : answer.start + answer.length])
            out.append((example, answer, bool(torch.equal(predictions[row, span].cpu(), truth))))
    return out


# the tasks' common part


def as_rng(seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    check_int("seed", seed, 0)
    return np.random.default_rng(seed)


class TextTask:
    """A task of text examples: a tokenizer (bytes by default), a haystack ("filler", "corpus" or an object with
    ``take(length, rng)``) and examples by distance and depth. Subclasses set ``name``, ``chance`` and
    ``fixed_depth`` (whether ``depth`` places the needle; tasks that spread their needles take ``depth=None``
    only, and each answer reports the depth of the needle it needs) and build an example in ``_example``."""

    name = "task"
    fixed_depth = False
    default_haystack = "filler"

    def __init__(self, tokenizer: TextTokenizer | None = None, haystack=None, split: str = "validation"):
        if tokenizer is None:
            from ..training.data import ByteTokenizer

            tokenizer = ByteTokenizer()
        if not callable(getattr(tokenizer, "encode", None)):
            raise TypeError(f"tokenizer must have an encode(text) method, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        haystack = self.default_haystack if haystack is None else haystack
        if isinstance(haystack, str):
            haystack = make_haystack(haystack, tokenizer, split)
        elif not callable(getattr(haystack, "take", None)):
            raise TypeError(f"haystack must be one of {', '.join(HAYSTACKS)} or have a take(length, rng) method")
        self.haystack = haystack

    @property
    def chance(self) -> float:
        """Exact-match rate of an answer for a model that knows the format and guesses uniformly."""
        raise NotImplementedError

    def encode(self, text: str) -> np.ndarray:
        return encode(self.tokenizer, text)

    def example(self, distance: int, rng: int | np.random.Generator, depth: float | None = None,
                segment_len: int | None = None) -> Example:
        """One example with ``distance`` haystack tokens; ``depth`` (tasks with ``fixed_depth``) places the
        needle, None draws it; ``segment_len``: no needle crosses a multiple of it where the haystack leaves room
        to move it (``Example.cut`` counts the others; None: needles land where they fall)."""
        check_distance(distance, depth)
        if depth is not None and not self.fixed_depth:
            raise ValueError(f"{self.name} spreads its needles over the haystack; pass depth=None (each answer "
                             "reports the depth of the needle it needs)")
        if segment_len is not None:
            check_int("segment_len", segment_len, 1)
        return self._example(distance, as_rng(rng), depth, segment_len)

    def examples(self, count: int, distance: int, rng: int | np.random.Generator, depth: float | None = None,
                 segment_len: int | None = None) -> list[Example]:
        check_int("count", count, 1)
        rng = as_rng(rng)
        return [self.example(distance, rng, depth, segment_len) for _ in range(count)]

    def _example(self, distance, rng, depth, segment_len) -> Example:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"task": self.name, "haystack": getattr(self.haystack, "name", type(self.haystack).__name__)}
