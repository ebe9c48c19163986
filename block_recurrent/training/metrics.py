"""A run's record: ``metrics.jsonl`` (one JSON line per logged step and per validation) and its loss curve.

Library code reports through ``warnings``, never ``print``: the command line decides what reaches the user.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from ..persistence.storage import replace_file

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"


class MetricsLog:
    """Append-only JSON lines; on resume, cut back to the checkpoint's step by an atomic rewrite."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate(self, step: int) -> None:
        """Forget records past ``step`` (a crashed run may have logged further).

        The kept lines go to a new file that replaces the old one in one rename: a kill at any moment leaves
        either the old file or the new one, never an empty or half-written log.
        """
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        replace_file(self.path, "".join(line + "\n" for line in kept))

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records


_PLOT_WARNED = False


def plot_metrics(metrics_path: Path, png_path: Path) -> Path | None:
    """Bits per byte (training and validation) against steps; None, with one warning, without matplotlib."""
    global _PLOT_WARNED
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _PLOT_WARNED:
            warnings.warn("loss curve skipped: matplotlib is not installed (pip install 'block-recurrent[plot]')",
                          stacklevel=2)
            _PLOT_WARNED = True
        return None
    records = MetricsLog(Path(metrics_path)).records()
    if not records:
        return None
    train = [(r["step"], r["bpb"]) for r in records if "bpb" in r]
    val = [(r["step"], r["val_bpb"]) for r in records if "val_bpb" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp")  # a hidden .tmp: cleared at start-up if a kill leaves it
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
