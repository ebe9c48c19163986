"""Block-Recurrent Transformer (Hutchins et al., NeurIPS 2022) in PyTorch."""

from .host_memory import keep_freed_memory
from .persistence.checkpoint import from_pretrained, save_pretrained
from .model.config import PRESETS, BlockRecurrentConfig
from .inference.evaluation import EvalResult, evaluate
from .inference.generation import generate, stream
from .model.model import BlockRecurrentModel
from .model.state import ModelState, XLMemory
from .training.segments import SegmentResult, SegmentRunner
from .reference import BlockRecurrentTransformer, RecurrentTrainerWrapper

__version__ = "0.1.0"


def __getattr__(name: str):
    # the trainer (and what it imports: data streams, the run loop) loads only when asked for, so that
    # `brt eval` and `brt generate` never import it
    if name in ("TrainConfig", "train"):
        from .training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'block_recurrent' has no attribute {name!r}")

__all__ = [
    "PRESETS",
    "BlockRecurrentConfig",
    "BlockRecurrentModel",
    "BlockRecurrentTransformer",
    "EvalResult",
    "ModelState",
    "RecurrentTrainerWrapper",
    "SegmentResult",
    "SegmentRunner",
    "TrainConfig",
    "XLMemory",
    "__version__",
    "evaluate",
    "from_pretrained",
    "generate",
    "keep_freed_memory",
    "save_pretrained",
    "stream",
    "train",
]
