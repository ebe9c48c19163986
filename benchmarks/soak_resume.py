"""Kill-and-corrupt soak of `brt train --resume`: a run killed with SIGKILL at random moments (mid-step, mid-
checkpoint, mid-rotation) and its newest checkpoint damaged at random in between (a file deleted, bytes flipped, a
file cut short, checksums.json deleted, the folder emptied, an empty newer step folder), resumed after each kill,
must end with exactly the weights of the same run left alone, and a metrics.jsonl that logs every step once.

    python benchmarks/soak_resume.py                          # 20 kills, 10 damages, 60 steps (a few minutes)
    python benchmarks/soak_resume.py --kills 3 --damages 3 --steps 8   # what tests/test_soak.py runs

Prints one line per kill and damage, and a summary; exit status 0 when every check holds, 1 otherwise.
The tiny preset on the CPU in float32 with one thread: steps are bit-for-bit reproducible there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
DAMAGES = ("delete a file", "flip bytes", "truncate a file", "delete checksums.json", "empty the folder",
           "an empty newer folder")
FILES = ("model.safetensors", "optimizer.safetensors", "trainer.safetensors", "trainer.json", "config.json")


def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        (folder / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (3 + i))
    return folder


def command(data: Path, run: Path, steps: int, resume: bool) -> list[str]:
    base = [sys.executable, "-m", "block_recurrent", "train"]
    if resume:  # everything else comes from the checkpoint
        return base + ["--resume", "--out-dir", str(run), "--max-steps", str(steps)]
    return base + ["--preset", "tiny", "--data", str(data), "--out-dir", str(run), "--max-steps", str(steps),
                   "--batch-size", "2", "--warmup-steps", "1", "--log-every", "1", "--no-progress", "--eval-every",
                   "0", "--checkpoint-every", "1", "--keep-last", "3", "--no-final-eval", "--no-bf16"]


def step_folders(run: Path) -> list[Path]:
    return sorted(p for p in run.glob("step-*") if p.is_dir() and len(p.name) == 13)


def log_state(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


def run_until_killed(cmd: list[str], metrics: Path, rng: random.Random, max_lines: int) -> tuple[int, str]:
    """Start ``cmd`` and SIGKILL it after it has changed metrics.jsonl 1..max_lines times (plus a random few ms, so
    that kills land mid-step and mid-checkpoint); the exit status (or -9) and its stderr."""
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    wanted, seen, last = rng.randint(1, max_lines), 0, log_state(metrics)
    while process.poll() is None and seen < wanted:
        time.sleep(0.002)
        now = log_state(metrics)
        if now != last:
            seen, last = seen + 1, now
    if process.poll() is None:
        time.sleep(rng.uniform(0, 0.03))
        process.send_signal(signal.SIGKILL)
    _, err = process.communicate()
    return process.returncode, err


def damage(run: Path, kind: str, rng: random.Random) -> str:
    """Damage the newest step folder (or add an empty newer one); what was done, in words."""
    newest = step_folders(run)[-1]
    if kind == "an empty newer folder":
        folder = newest.with_name(f"step-{int(newest.name[5:]) + rng.randint(1, 50):08d}")
        folder.mkdir()
        return f"created an empty {folder.name}"
    if kind == "delete checksums.json":
        (newest / "checksums.json").unlink()
        return f"deleted {newest.name}/checksums.json"
    if kind == "empty the folder":
        for file in newest.iterdir():
            file.unlink()
        return f"emptied {newest.name}"
    target = newest / rng.choice(FILES)
    raw = bytearray(target.read_bytes())
    if kind == "delete a file":
        target.unlink()
    elif kind == "truncate a file":
        target.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        for _ in range(4):
            raw[rng.randrange(len(raw))] ^= 0xFF
        target.write_bytes(bytes(raw))
    return f"{kind}: {newest.name}/{target.name}"


def trained_steps(metrics: Path) -> list[int]:
    steps = []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            steps.append(record["step"])
    return steps


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def soak(workdir: Path, kills: int, damages: int, steps: int, seed: int) -> bool:
    rng = random.Random(seed)
    data = write_corpus(workdir / "data")
    start = time.perf_counter()
    reference = workdir / "reference"
    done = subprocess.run(command(data, reference, steps, resume=False), capture_output=True, text=True, env=ENV)
    if done.returncode != 0:
        print(f"the unbroken run failed: {done.stderr[-2000:]}")
        return False
    print(f"unbroken run: {steps} steps in {time.perf_counter() - start:.1f} s")

    run = workdir / "soak"
    damage_after = set(rng.sample(range(kills), min(damages, kills)))
    kinds = [DAMAGES[i % len(DAMAGES)] for i in range(damages)]
    rng.shuffle(kinds)
    stepped_back, resumes, start = 0, 0, time.perf_counter()
    for attempt in range(kills):
        resume = bool(step_folders(run))
        resumes += resume
        # kills spread over the run: up to twice a fair share of its steps between two kills
        status, err = run_until_killed(command(data, run, steps, resume), run / "metrics.jsonl", rng,
                                       max_lines=max(2, 2 * steps // kills))
        stepped_back += "the newest complete checkpoint" in err and "resuming from" in err
        if status not in (0, -signal.SIGKILL) or "Traceback" in err:
            print(f"attempt {attempt + 1} failed (exit {status}): {err[-2000:]}")
            return False
        folders = step_folders(run)
        line = f"kill {attempt + 1}: " + ("finished before the kill" if status == 0 else
                                          f"killed, newest step folder {folders[-1].name if folders else 'none'}")
        if attempt in damage_after and len(folders) >= 2 and kinds:
            line += "; " + damage(run, kinds.pop(), rng)
        print(line, flush=True)
    done = subprocess.run(command(data, run, steps, resume=bool(step_folders(run))), capture_output=True, text=True,
                          env=ENV)
    resumes += 1
    stepped_back += "the newest complete checkpoint" in done.stderr
    if done.returncode != 0:
        print(f"the last resume failed: {done.stderr[-2000:]}")
        return False

    final, expected = weights(step_folders(run)[-1]), weights(step_folders(reference)[-1])
    same = final.keys() == expected.keys() and all(bool((final[k] == expected[k]).all()) for k in final)
    logged = trained_steps(run / "metrics.jsonl") == list(range(1, steps + 1))
    print(f"{kills} kills, {damages - len(kinds)} damages, {resumes} resumes ({stepped_back} stepped back past a "
          f"damaged checkpoint) in {time.perf_counter() - start:.1f} s: final weights "
          f"{'equal' if same else 'DIFFER from'} the unbroken run's; metrics.jsonl "
          f"{'logs every step once' if logged else 'is INCONSISTENT'}")
    return same and logged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--damages", type=int, default=10, help="at most one per kill")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards (default: a temporary folder)")
    args = parser.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return 0 if soak(args.workdir, args.kills, args.damages, args.steps, args.seed) else 1
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        return 0 if soak(workdir, args.kills, args.damages, args.steps, args.seed) else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
