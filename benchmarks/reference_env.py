"""The reference package's own environment, for the benchmarks that run it side by side with ours.

``block-recurrent-transformer-pytorch==0.4.4`` with the same torch, in ``.venv-ref`` at the repository root, created
on first use. The scripts import it as a sibling: ``from reference_env import reference_python``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_VENV = ROOT / ".venv-ref"
REFERENCE_PACKAGES = ("torch==2.13.0", "block-recurrent-transformer-pytorch==0.4.4")


def reference_python(path: str | Path | None = None, *, create: bool = True) -> Path | None:
    """The interpreter that has the reference package: ``path`` when given, else ``.venv-ref``'s, created with
    ``REFERENCE_PACKAGES`` if missing (``create=False``: None if missing)."""
    if path:
        return Path(path)
    python = REFERENCE_VENV / "bin" / "python"
    if not python.exists():
        if not create:
            return None
        print(f"creating {REFERENCE_VENV} with {' '.join(REFERENCE_PACKAGES)} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(REFERENCE_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *REFERENCE_PACKAGES], check=True)
    return python
