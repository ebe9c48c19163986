"""Hugging Face Hub integration (the ``[hf]`` extra): the model with ``PyTorchModelHubMixin``.

``BlockRecurrentHubModel.from_pretrained("owner/name")`` / ``.save_pretrained(folder)`` /
``.push_to_hub("owner/name")`` use the same folder layout as :func:`block_recurrent.persistence.checkpoint.save_pretrained`
(``config.json`` holding the model config's fields, ``model.safetensors``), so either side reads the other's
folders, and a local folder never touches the network.
"""

from __future__ import annotations

from huggingface_hub import PyTorchModelHubMixin

from ..model.config import BlockRecurrentConfig
from ..model.model import BlockRecurrentModel


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
