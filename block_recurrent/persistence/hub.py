"""Hugging Face Hub integration (the ``[hf]`` extra): the model with ``PyTorchModelHubMixin``.

``BlockRecurrentHubModel.from_pretrained("owner/name")`` / ``.save_pretrained(folder)`` /
``.push_to_hub("owner/name")`` use the same folder layout as :func:`block_recurrent.persistence.checkpoint.save_pretrained`
(``config.json`` holding the model config's fields, ``model.safetensors``, ``checksums.json``), so either side reads
the other's folders, and a local folder never touches the network.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import PyTorchModelHubMixin

from ..model.config import BlockRecurrentConfig
from ..model.model import BlockRecurrentModel
from .checkpoint import write_model_files


class BlockRecurrentHubModel(
    BlockRecurrentModel,
    PyTorchModelHubMixin,
    library_name="block-recurrent",
    tags=["block-recurrent-transformer", "text-generation"],
    coders={BlockRecurrentConfig: (BlockRecurrentConfig.to_dict, BlockRecurrentConfig.from_saved)},
):
    """A :class:`BlockRecurrentModel` that can be loaded from and pushed to the Hugging Face Hub."""

    def __init__(self, config: BlockRecurrentConfig | dict):
        # the mixin hands a folder's config.json over as a plain dict
        super().__init__(BlockRecurrentConfig.from_saved(config) if isinstance(config, dict) else config)

    def _save_pretrained(self, save_directory: Path) -> None:
        # our own writer: the same files as save_pretrained, checksums included (the mixin then keeps our
        # config.json and adds only its model card)
        write_model_files(self, Path(save_directory))
