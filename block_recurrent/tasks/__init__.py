"""Long-context tasks generated from a seed, no download: the state's reach measured the way users measure it.

- :class:`RecallTask`: one value token ``distance`` blocks back (synthetic ids, trained from scratch).
- :class:`PasskeyTask`: Landmark Attention's passkey in filler or corpus text.
- :class:`MQARTask`: multi-query associative recall, key-value pairs spread over the haystack.
- :class:`FactsTask`: bAbI qa1 / qa2 facts hidden in corpus text.

:func:`score` measures exact match by distance and depth (:func:`plot_heatmap` draws it), :func:`tune` fine-tunes a
model on a task; ``brt tune`` and ``brt eval --task`` run them on a checkpoint (:mod:`.commands`).
"""

from .facts import FactsTask
from .mqar import MQARTask
from .passkey import PasskeyTask
from .recall import RecallTask
from .scoring import TaskScores, plot_heatmap, score
from .text import Answer, Example, TaskBatch, TextTask, collate
from .tuning import TuneConfig, tune

# the text tasks by name: (class, fixed options)
TASKS = {
    "passkey": (PasskeyTask, {}),
    "mqar": (MQARTask, {}),
    "qa1": (FactsTask, {"kind": "qa1"}),
    "qa2": (FactsTask, {"kind": "qa2"}),
}


def make_task(name: str, tokenizer=None, haystack=None, split: str = "validation", **options) -> TextTask:
    """A text task by name (see :data:`TASKS`) with its options (e.g. ``digits=5``, ``num_pairs=8``)."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
    cls, fixed = TASKS[name]
    try:
        return cls(tokenizer, haystack, split, **fixed, **options)
    except TypeError as error:
        if "unexpected keyword" in str(error):
            raise ValueError(f"task {name}: {error}") from None
        raise


__all__ = ["TASKS", "Answer", "Example", "FactsTask", "MQARTask", "PasskeyTask", "RecallTask", "TaskBatch",
           "TaskScores", "TextTask", "TuneConfig", "collate", "make_task", "plot_heatmap", "score", "tune"]
