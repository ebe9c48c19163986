"""Block-Recurrent Transformer (Hutchins et al., NeurIPS 2022) in PyTorch."""

from .config import PRESETS, BlockRecurrentConfig
from .model import BlockRecurrentTransformer
from .state import ModelState, XLMemory
from .training import RecurrentTrainerWrapper, SegmentResult

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "BlockRecurrentConfig",
    "BlockRecurrentTransformer",
    "ModelState",
    "RecurrentTrainerWrapper",
    "SegmentResult",
    "XLMemory",
    "__version__",
]
