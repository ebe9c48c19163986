"""Hugging Face transformers integration (the ``transformers`` extra): the library's model as a
``PreTrainedModel`` + ``GenerationMixin`` with its decode state as the generation cache, a byte-level tokenizer,
and the conversion of a brt checkpoint to a folder the Auto classes load (docs/huggingface.md).

Importing this package registers the model type ``block_recurrent`` with ``AutoConfig`` and
``AutoModelForCausalLM``, so no remote code is needed.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import MODEL_TYPE, BlockRecurrentHFConfig
from .convert import convert_checkpoint
from .modeling import BlockRecurrentCache, BlockRecurrentCausalLMOutput, BlockRecurrentForCausalLM
from .tokenization import byte_tokenizer, file_tokenizer

AutoConfig.register(MODEL_TYPE, BlockRecurrentHFConfig, exist_ok=True)
AutoModelForCausalLM.register(BlockRecurrentHFConfig, BlockRecurrentForCausalLM, exist_ok=True)

__all__ = ["BlockRecurrentCache", "BlockRecurrentCausalLMOutput", "BlockRecurrentForCausalLM", "BlockRecurrentHFConfig",
           "byte_tokenizer", "convert_checkpoint", "file_tokenizer"]
