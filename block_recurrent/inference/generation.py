"""Sampling and the generation loop, over the exact cached decoding of :mod:`block_recurrent.inference.decoding`.

Entry points: :func:`generate` (tokens at once), :func:`stream` (tokens as they come) and :func:`sample`
(one token per row from logits), with their options in one :class:`SamplingOptions`. The building blocks
:func:`prefill`, :func:`decode_step`, :func:`commit_partial` and :class:`DecodeState` are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from ..model.checks import check_float, check_int
from ..model.model import BlockRecurrentModel
from ..model.state import ModelState
from .decoding import DecodeState, as_decode_state, commit_partial, decode_step, eval_no_grad, prefill, step
from .inputs import as_batch, check_model, check_prompts

__all__ = ["DecodeState", "SamplingOptions", "TokenStream", "commit_partial", "decode_step", "generate", "prefill",
           "sample", "stream"]


# sampling


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token id per row from logits (B, V): greedy when temperature is 0, else softmax(logits / T)
    restricted to the ``top_k`` most likely ids and then to the smallest set of mass >= ``top_p``."""
    logits = logits.float()  # sample in float32 whatever autocast produced
    if temperature == 0:
        return logits.argmax(dim=-1)
    if top_k is not None and top_k < logits.shape[-1] and (top_p is None or top_p >= 1.0):
        # draw among the k largest directly, half the operators of masking the vocabulary (decoding's hot loop);
        # with the noise of the whole vocabulary gathered at the k ids, it is the same draw as masking
        values, ids = logits.topk(top_k, dim=-1)  # (B, k)
        noise = torch.empty_like(logits).exponential_(generator=generator).gather(-1, ids)
        return ids.gather(-1, _race((values / temperature).softmax(dim=-1), noise))[:, 0]
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1), the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = _nucleus(logits, top_p)
    return _draw(logits.softmax(dim=-1), generator)[:, 0]


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One index per row (B, 1) with probabilities ``probs`` (B, n): the draw ``torch.multinomial(probs, 1)``
    makes from the same generator (its own algorithm, without its checks)."""
    return _race(probs, torch.empty_like(probs).exponential_(generator=generator))


def _race(probs: Tensor, noise: Tensor) -> Tensor:
    """The row's argmax of p / E (B, 1) for exponential noise E: index i wins with probability p_i."""
    return (probs / noise).argmax(dim=-1, keepdim=True)


def _nucleus(logits: Tensor, top_p: float) -> Tensor:
    """Keep the most likely ids until their mass reaches top_p (always at least the most likely one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)  # (B, V), most likely first
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p  # an id is kept while the mass of the ids before it is < top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


@dataclass(frozen=True)
class SamplingOptions:
    """How each new token is chosen (see :func:`sample`), and when a row ends.

    temperature: 0 is greedy (argmax); otherwise sample from softmax(logits / temperature), optionally
        restricted to the ``top_k`` most likely ids and then to the nucleus of mass ``top_p``.
    eos_token: a row that produces it is finished and padded with it.
    generator: a torch.Generator (on the model's device) for reproducible sampling.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token: int | None = None
    generator: torch.Generator | None = None

    def __post_init__(self):
        check_float("temperature", self.temperature, 0.0)
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1)
        if self.top_p is not None:
            check_float("top_p", self.top_p, 0.0, 1.0)
            if self.top_p == 0:
                raise ValueError("top_p must be in (0, 1], got 0")
        if self.eos_token is not None:
            check_int("eos_token", self.eos_token, 0)
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(self.generator).__name__}")

    def check_vocabulary(self, num_tokens: int) -> None:
        if self.eos_token is not None and self.eos_token >= num_tokens:
            raise ValueError(f"eos_token must be in [0, {num_tokens - 1}], got {self.eos_token}")

    def sample(self, logits: Tensor) -> Tensor:
        return sample(logits, self.temperature, self.top_k, self.top_p, self.generator)


# the loop


def _decode_loop(
    model: BlockRecurrentModel, prompt: Tensor | list[Tensor], max_new_tokens: int, options: SamplingOptions,
    state: ModelState | DecodeState | None, final: list, compile: bool,
) -> Iterator[Tensor]:
    """Yield (B,) tokens; ``final`` receives the decode state covering everything fed (all but the last token).

    Rows that produced ``eos_token`` keep yielding it; the loop stops once every row has. A compiled decode keeps
    each row at its own position, in buffers of one shape for the whole decode.
    """
    eos = options.eos_token
    with eval_no_grad(model):
        logits, ds = prefill(model, prompt, state, rows_own=compile)
    final[:] = [ds]
    done = None
    for index in range(max_new_tokens):
        token = options.sample(logits)  # (B,)
        if eos is not None:
            if done is not None:
                token = torch.where(done, eos, token)  # finished rows are padded with the end token
            done = token == eos if done is None else done | (token == eos)
        final[:] = [ds]
        yield token
        if index + 1 == max_new_tokens or (done is not None and bool(done.all())):
            return
        with eval_no_grad(model):  # sampled ids need no range check
            logits, ds = step(model, token, ds, compiled=compile)
    final[:] = [ds]


def _checked(model, prompt, max_new_tokens, options: SamplingOptions, state, compile):
    """The checked prompt ((B, T) token ids, or a list of 1-D prompts of different lengths) and state (a
    DecodeState for a (B, T) prompt, checked now rather than at the first token)."""
    check_model(model)
    check_int("max_new_tokens", max_new_tokens, 0)
    options.check_vocabulary(model.config.num_tokens)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {type(compile).__name__}")
    if isinstance(prompt, (list, tuple)):
        if state is not None:
            raise ValueError("a list of prompts starts fresh documents: state must be None")
        return check_prompts(list(prompt), model.config.num_tokens), None
    prompt = as_batch(prompt, model.config.num_tokens, "prompt")
    return prompt, as_decode_state(model, state, prompt.shape[0])


def stream(
    model: BlockRecurrentModel,
    prompt: Tensor | Sequence[Tensor],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token: int | None = None,
    generator: torch.Generator | None = None,
    state: ModelState | DecodeState | None = None,
    compile: bool = False,
) -> Iterator[Tensor]:
    """Like :func:`generate`, but yields each new token (B,) as soon as it is sampled (with a list of prompts,
    row b is prompt b; rows that ended are padded with ``eos_token``).

    Arguments are checked when this is called, before the first token is asked for. The returned
    :class:`TokenStream`'s ``state`` is the decode state after everything fed so far.
    """
    options = SamplingOptions(temperature, top_k, top_p, eos_token, generator)
    prompt, state = _checked(model, prompt, max_new_tokens, options, state, compile)
    final: list = []
    return TokenStream(_decode_loop(model, prompt, max_new_tokens, options, state, final, compile), final)


class TokenStream:
    """The tokens (B,) of :func:`stream`, as they come; ``state``: the DecodeState covering everything fed so far
    (the prompt and every token yielded but the last, which is fed only when the next one is asked for)."""

    def __init__(self, tokens: Iterator[Tensor], final: list):
        self._tokens, self._final = tokens, final

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> Tensor:
        return next(self._tokens)

    @property
    def state(self) -> DecodeState | None:
        """None until the prompt has been fed (at the first token asked for)."""
        return self._final[0] if self._final else None


def generate(
    model: BlockRecurrentModel,
    prompt: Tensor | Sequence[Tensor],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token: int | None = None,
    generator: torch.Generator | None = None,
    state: ModelState | DecodeState | None = None,
    return_state: bool = False,
    compile: bool = False,
):
    """Continue ``prompt`` (B, T) by up to ``max_new_tokens`` tokens: returns (B, new) token ids.

    prompt: token ids, (B, T) or (T,) for one row, T >= 1 and of any length (consumed block by block); or a
        list of 1-D prompts of different lengths, generated side by side, each exactly as it would be alone:
        then the result is a list of 1-D tensors of new tokens, each ending at its own ``eos_token``
        (included) or after ``max_new_tokens``; ``state`` does not apply.
    temperature, top_k, top_p, eos_token, generator: see :class:`SamplingOptions`. Generation stops early once
        every row is finished, so ``new`` may be < max_new_tokens.
    state: continue a document: a ModelState (the prompt starts a new block) or the DecodeState a previous
        call returned (exact continuation; pass the last token it generated as the next prompt).
    return_state: also return the DecodeState after all tokens but the last generated one (which has not
        been fed to the model yet), i.e. ``(tokens, decode_state)``.
    compile: run each token's pass through ``torch.compile``
        (:func:`~block_recurrent.inference.decoding.compiled_token_pass`): faster per token on the CPU at batch 1,
        after a first call that compiles (tens of seconds on a small CPU, seconds once inductor's on-disk cache
        has it). Equal to eager decoding within rounding, not bit for bit.

    Runs in eval mode without autograd (the caller's mode is restored); works under
    ``torch.inference_mode`` and CUDA autocast. The cost per new token is one token's pass against at most
    the memory plus one block, so it does not grow with the output's length.
    """
    tokens = stream(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    eos_token=eos_token, generator=generator, state=state, compile=compile)
    new = list(tokens)
    ragged = isinstance(prompt, (list, tuple))
    first = prompt[0] if ragged else prompt
    B = len(prompt) if ragged else (1 if first.ndim == 1 else first.shape[0])
    out = torch.stack(new, dim=1) if new else first.new_empty((B, 0))  # (B, new)
    if ragged:
        out = [_until_end(row, eos_token) for row in out]
    return (out, tokens.state) if return_state else out


def _until_end(tokens: Tensor, eos_token: int | None) -> Tensor:
    """A row's new tokens up to and including its first ``eos_token``."""
    if eos_token is None:
        return tokens
    ends = (tokens == eos_token).nonzero()
    return tokens if ends.numel() == 0 else tokens[: int(ends[0, 0]) + 1]
