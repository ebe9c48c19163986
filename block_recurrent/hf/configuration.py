"""The transformers config of a Block-Recurrent Transformer: the library's :class:`BlockRecurrentConfig`, whole,
under ``block_recurrent``, beside the names transformers' tools read (``vocab_size``, ``hidden_size``, ...)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ..model.config import BlockRecurrentConfig

MODEL_TYPE = "block_recurrent"


class BlockRecurrentHFConfig(PreTrainedConfig):
    """``block_recurrent``: :meth:`BlockRecurrentConfig.to_dict` (None: the ``tiny`` preset). The other fields are
    derived from it for transformers' tools, and ignored when read back."""

    model_type = MODEL_TYPE

    block_recurrent: dict[str, Any] | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        library = self.library_config()  # checked here: a bad config fails when it is read, naming the field
        self.block_recurrent = library.to_dict()
        self.vocab_size = library.num_tokens
        self.hidden_size = library.dim
        self.num_hidden_layers = library.depth
        self.num_attention_heads = library.heads
        super().__post_init__(**kwargs)

    def library_config(self) -> BlockRecurrentConfig:
        if self.block_recurrent is None:
            return BlockRecurrentConfig.from_name("tiny")
        return BlockRecurrentConfig.from_saved(dict(self.block_recurrent))

    @classmethod
    def from_library(cls, config: BlockRecurrentConfig, **kwargs: Any) -> "BlockRecurrentHFConfig":
        return cls(block_recurrent=config.to_dict(), **kwargs)
