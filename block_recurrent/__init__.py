"""Block-Recurrent Transformer (Hutchins et al., NeurIPS 2022) in PyTorch."""

from .checkpoint import from_pretrained, save_pretrained
from .config import PRESETS, BlockRecurrentConfig
from .evaluation import EvalResult, evaluate
from .generation import generate, stream
from .model import BlockRecurrentTransformer
from .state import ModelState, XLMemory
from .segments import RecurrentTrainerWrapper, SegmentResult

__version__ = "0.1.0"


def __getattr__(name: str):
    # the trainer (and what it imports: data streams, the run loop) loads only when asked for, so that
    # `brt eval` and `brt generate` never import it
    if name in ("TrainConfig", "train"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'block_recurrent' has no attribute {name!r}")

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
