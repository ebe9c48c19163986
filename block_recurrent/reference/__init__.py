"""The reference port's interface and weights, as an adapter over the core (which never imports it)."""

from .adapter import (
    BlockRecurrentTransformer, RecurrentTrainerWrapper, memory_from_reference, memory_to_reference,
    state_from_reference,
)
from .convert import from_reference_state_dict

__all__ = ["BlockRecurrentTransformer", "RecurrentTrainerWrapper", "from_reference_state_dict",
           "memory_from_reference", "memory_to_reference", "state_from_reference"]
