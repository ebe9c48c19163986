"""What ``torch.compile`` saves on the state cell's work in a training step, on the CPU: the view and write of one
recurrent state (forward and backward, bf16 autocast where it is native), eager against compiled, at ``mini``'s
shape (128 rows, 16 state vectors, a block of 16 tokens) or another preset's.

    python benchmarks/bench_state_cell.py                    # mini, one thread, 30 rounds
    python benchmarks/bench_state_cell.py --preset hour --rows 128 --threads 2

The replayed write of ``brt train`` is this work once per step (the view's keys and values also serve the reads,
which stay eager here). Eager and compiled steps alternate in rounds, and the median of each is reported. The
first compiled calls (compiling the forward and the backward) are timed apart. The record:
docs/experiments/2026-12-05-long-documents.md (2026-12-06, torch.compile of the state cell).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from block_recurrent.host_memory import keep_freed_memory  # noqa: E402
from block_recurrent.model.config import BlockRecurrentConfig  # noqa: E402
from block_recurrent.model.recurrent import RecurrentStateCell  # noqa: E402
from block_recurrent.training.precision import native_bf16  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    torch.manual_seed(0)
    config = BlockRecurrentConfig.from_name(args.preset)
    cell = RecurrentStateCell(config)
    B, S, N, D = args.rows, config.num_state_vectors, config.block_width, config.dim
    state = torch.randn(B, S, D, requires_grad=True)
    block_keys = torch.randn(B, N, config.kv_dim, requires_grad=True)
    block_values = torch.randn(B, N, config.kv_dim, requires_grad=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if native_bf16(torch.device("cpu")) else nullcontext()

    def view_and_write(state, keys, values):
        return cell.write(cell.view(state, B), keys, values)

    compiled_write = torch.compile(cell.write)
    setups = {
        "eager": view_and_write,
        "compiled write": lambda s, k, v: compiled_write(cell.view(s, B), k, v),
        "compiled view and write": torch.compile(view_and_write),  # one graph
    }

    def step(fn) -> float:
        began = time.perf_counter()
        with autocast:
            out = fn(state, block_keys, block_values)
        out.float().square().mean().backward()
        return time.perf_counter() - began

    for name, fn in setups.items():
        if name != "eager":
            seconds = step(fn) + step(fn)
            print(f"{name}: first two steps (compiling) {seconds:.1f} s", flush=True)
    times = {name: [] for name in setups}
    for _ in range(3):
        for fn in setups.values():
            step(fn)
    for _ in range(args.rounds):
        for name, fn in setups.items():
            times[name].append(step(fn))
    eager = statistics.median(times["eager"])
    print(f"\n{args.preset}: {B} rows x {S} state vectors, block of {N}, {args.threads} thread(s), "
          f"median of {args.rounds} rounds")
    print("| set-up | ms | of eager |\n|---|---:|---:|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {1000 * median:.2f} | {median / eager:.3f} |")


if __name__ == "__main__":
    main()
