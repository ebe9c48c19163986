"""transformers' ``PreTrainedModel`` + ``GenerationMixin`` around the library's model, the way transformers' Mamba
and xLSTM carry their recurrent state: the generation cache is the library's own decode state.

- ``model(input_ids, labels=...)`` runs :meth:`BlockRecurrentModel.run` over the whole sequence (any length, block
  by block) and returns transformers' shifted next-token loss: the loss ``block_recurrent.evaluate`` gives on the
  same tokens.
- ``model.generate(...)``: the first call prefills the prompt (:func:`~block_recurrent.inference.decoding.prefill`)
  into a :class:`BlockRecurrentCache`; each later call feeds the sampled token (``decode_step``). transformers
  chooses the tokens (greedy, sampling, its logits processors); the model only scores, exactly as the library's
  own ``generate`` does, with no limit on the length (the cost per token does not grow).
- A left-padded batch (``attention_mask``): each row starts its document at its first real token, exactly as it
  would alone (the library's ragged decoding: a list of prompts of different lengths, side by side).

The decode state is used through the library's public decoding API only (``prefill``, ``decode_step``), as an
opaque value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from ..inference.decoding import decode_step, prefill
from ..model.model import BlockRecurrentModel
from .configuration import BlockRecurrentHFConfig


class BlockRecurrentCache:
    """Generation cache: the library's DecodeState of every row (rows of different prompt lengths each at their own
    position, as ``prefill`` gives them for a list of prompts), and the input positions consumed, padding included
    (what transformers' ``get_seq_length`` asks for)."""

    is_compileable = False

    def __init__(self, decode_state: Any, batch_size: int, seen: int):
        self.decode_state, self.batch_size, self.seen = decode_state, batch_size, seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def feed(self, model: BlockRecurrentModel, tokens: Tensor, keep_all: bool) -> Tensor:
        """Feed tokens (B, n), one position at a time; the logits (B, n or 1, V) after each (or after the last)."""
        B, n = tokens.shape
        if B != self.batch_size:
            raise ValueError(f"the cache holds {self.batch_size} rows, the input has {B}")
        out = []
        for t in range(n):
            logits, self.decode_state = decode_step(model, tokens[:, t], self.decode_state)  # (B, V)
            out.append(logits)
        self.seen += n
        return torch.stack(out if keep_all else out[-1:], dim=1)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: row i continues the beam ``beam_idx[i]`` (DecodeState.select_rows)."""
        self.decode_state = self.decode_state.select_rows(beam_idx.to(torch.long))
        self.batch_size = beam_idx.shape[0]


@dataclass
class BlockRecurrentCausalLMOutput(ModelOutput):
    """loss: transformers' next-token loss when labels are given; logits (B, T or 1, V); cache: for generation."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: BlockRecurrentCache | None = None


def _real_spans(attention_mask: Tensor | None, B: int, T: int) -> list[tuple[int, int]]:
    """Per row, [start, end) of its real tokens: one contiguous run of ones in ``attention_mask`` (padding on
    either side), or the whole row without a mask."""
    if attention_mask is None:
        return [(0, T)] * B
    if attention_mask.shape != (B, T):
        raise ValueError(f"attention_mask must be (batch, length) = ({B}, {T}), got {tuple(attention_mask.shape)}")
    spans = []
    for b, row in enumerate(attention_mask.bool().tolist()):
        ones = [t for t, real in enumerate(row) if real]
        if not ones or ones[-1] - ones[0] + 1 != len(ones):
            raise ValueError(f"attention_mask row {b} must hold one run of ones (padding before or after it), "
                             f"got {row}")
        spans.append((ones[0], ones[-1] + 1))
    return spans


class BlockRecurrentPreTrainedModel(PreTrainedModel):
    config_class = BlockRecurrentHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["TransformerLayer"]

    def _init_weights(self, module):
        # the library's modules initialise themselves when built; every weight then comes from the checkpoint
        pass

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model._compute_buffers()
        return model

    def _compute_buffers(self) -> None:
        """Recompute the tables the library keeps as non-persistent buffers (rotary positions): transformers builds
        the model on the meta device and loads only what the checkpoint holds, leaving them empty."""
        with torch.device("cpu"):
            fresh = dict(BlockRecurrentModel(self.config.library_config()).named_buffers())
        for name, buffer in self.model.named_buffers():
            with torch.no_grad():
                buffer.copy_(fresh[name])


class BlockRecurrentForCausalLM(BlockRecurrentPreTrainedModel, GenerationMixin):
    """A :class:`BlockRecurrentModel` (``.model``) as a transformers causal language model."""

    def __init__(self, config: BlockRecurrentHFConfig, model: BlockRecurrentModel | None = None):
        super().__init__(config)
        self.model = BlockRecurrentModel(config.library_config()) if model is None else model
        self.post_init()

    @classmethod
    def from_library(cls, model: BlockRecurrentModel, **config_kwargs: Any) -> "BlockRecurrentForCausalLM":
        """Wrap a library model (its weights are shared, not copied)."""
        return cls(BlockRecurrentHFConfig.from_library(model.config, **config_kwargs), model=model)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the library's decode state, made by forward (as Mamba's and xLSTM's are)

    def get_input_embeddings(self):
        return self.model.token_emb

    def set_input_embeddings(self, embeddings):
        self.model.token_emb = embeddings

    def get_output_embeddings(self):
        return self.model.to_logits

    def set_output_embeddings(self, embeddings):
        self.model.to_logits = embeddings

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: BlockRecurrentCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BlockRecurrentCausalLMOutput:
        """Logits for ``input_ids`` (B, T); with ``labels`` the next-token loss; with ``use_cache`` (as ``generate``
        asks) a cache to continue from, and with ``cache`` the continuation of the rows it holds.

        logits_to_keep: 1 keeps only the last position's logits (``generate`` asks for that); 0 keeps all.
        """
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("give input_ids (token ids); inputs_embeds are not supported")
        keep_all = logits_to_keep != 1
        # 1. continuing a generation: new tokens for every row, fed one by one
        if cache is not None:
            logits = cache.feed(self.model, input_ids, keep_all)
            return BlockRecurrentCausalLMOutput(logits=logits, cache=cache)
        B, T = input_ids.shape
        spans = _real_spans(attention_mask, B, T)
        # 2. the first call of a generation: prefill the prompts, each row from its first real token
        if use_cache and labels is None:
            cache, last = self._prefill_rows(input_ids, spans)
            logits = last[:, None] if not keep_all else self._row_logits(input_ids, spans)
            return BlockRecurrentCausalLMOutput(logits=logits, cache=cache)
        # 3. a whole sequence, as in training and scoring
        logits = self._row_logits(input_ids, spans)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return BlockRecurrentCausalLMOutput(loss=loss, logits=logits)

    def _row_logits(self, input_ids: Tensor, spans: list[tuple[int, int]]) -> Tensor:
        """Logits (B, T, V) of every position, each row run from its first real token (0 at padding)."""
        B, T = input_ids.shape
        if all(span == (0, T) for span in spans):
            return self.model.run(input_ids)[0]
        logits = None
        for b, (begin, end) in enumerate(spans):
            row = self.model.run(input_ids[b : b + 1, begin:end])[0]  # (1, end - begin, V)
            if logits is None:
                logits = row.new_zeros(B, T, row.shape[-1])
            logits[b, begin:end] = row[0]
        return logits

    def _prefill_rows(self, input_ids: Tensor, spans: list[tuple[int, int]]) -> tuple[BlockRecurrentCache, Tensor]:
        """A cache for the rows' prompts and the logits (B, V) after each prompt. Prompts of different lengths
        (left padding) go to the library's ragged prefill, each row exactly as alone; padding after a prompt (right
        padding) cannot be continued from and is refused."""
        B, T = input_ids.shape
        if any(end != T for _, end in spans):
            raise ValueError("generation needs left padding (tokenizer.padding_side = 'left'): a row's prompt must "
                             "end at the last position")
        if all(begin == 0 for begin, _ in spans):
            logits, state = prefill(self.model, input_ids)
        else:
            logits, state = prefill(self.model, [row[begin:] for row, (begin, _) in zip(input_ids, spans)])
        return BlockRecurrentCache(state, B, T), logits

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, cache=cache, attention_mask=attention_mask,
                                                       **kwargs)
        if cache is not None:
            inputs.pop("attention_mask", None)  # new tokens are real; each row's start is in the cache
        return inputs
