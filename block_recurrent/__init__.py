"""Block-Recurrent Transformer (Hutchins et al., NeurIPS 2022) in PyTorch."""

from .checkpoint import from_pretrained, save_pretrained
from .config import PRESETS, BlockRecurrentConfig
from .evaluation import EvalResult, evaluate
from .generation import generate, stream
from .model import BlockRecurrentTransformer
from .state import ModelState, XLMemory
from .trainer import TrainConfig, train
from .segments import RecurrentTrainerWrapper, SegmentResult

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "BlockRecurrentConfig",
    "BlockRecurrentTransformer",
    "EvalResult",
    "ModelState",
    "RecurrentTrainerWrapper",
    "SegmentResult",
    "TrainConfig",
    "XLMemory",
    "__version__",
    "evaluate",
    "from_pretrained",
    "generate",
    "save_pretrained",
    "stream",
    "train",
]
