"""The kill-and-corrupt soak (benchmarks/soak_resume.py) on a small budget: SIGKILLs at random moments and damage
to the newest checkpoint in between, every resume ending at the unbroken run's weights (issue 25)."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "soak_resume.py"


def test_kills_and_damages_across_a_run_end_at_the_weights_of_the_unbroken_run(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--kills", "3", "--damages", "3", "--steps", "8", "--seed",
                           "1", "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "final weights equal the unbroken run's; metrics.jsonl logs every step once" in done.stdout
