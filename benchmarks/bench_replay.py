"""What replaying the state's write costs: a `mini` training step (128 rows x 16 bytes, bf16 autocast, AdamW)
with and without ``replay_write``, with the fixed and the LSTM gate, the four set-ups alternating step by step in
one process so that the machine's drift hits them alike.

    python benchmarks/bench_replay.py              # two threads, 12 rounds (the first 2 not counted)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from block_recurrent import BlockRecurrentConfig, BlockRecurrentTransformer, RecurrentTrainerWrapper  # noqa: E402
from block_recurrent.training.trainer import fused_adamw_supported, parameter_groups  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setups = {}
    for gate in ("fixed", "lstm"):
        overrides = {} if gate == "lstm" else dict(gate="fixed", gate_keep_init="paper")  # mini's gate is LSTM +3
        for replay in (False, True):
            torch.manual_seed(0)
            model = BlockRecurrentTransformer(BlockRecurrentConfig.from_name("mini", **overrides))
            optimizer = torch.optim.AdamW(parameter_groups(model, 0.1, 0.1), lr=1e-3,
                                          fused=fused_adamw_supported(torch.device("cpu")))
            setups[(gate, replay)] = (RecurrentTrainerWrapper(model), optimizer, replay)
    tokens = torch.randint(0, 256, (128, 17), generator=torch.Generator().manual_seed(0))
    carried = {key: (None, None) for key in setups}
    times = {key: [] for key in setups}
    for round_ in range(args.rounds):
        for key, (wrapper, optimizer, replay) in setups.items():
            state, written = carried[key]
            began = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                result = wrapper.forward_backward(tokens, state=state, replay_write=replay, written_from=written)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_ >= 2:
                times[key].append(time.perf_counter() - began)
            carried[key] = (result.state, result.written_from)
    print(f"`mini` step, 128 rows x 16 bytes, bf16, {args.threads} threads, median of {args.rounds - 2} steps\n")
    print("| gate | write | ms per step | against fixed, plain |")
    print("|---|---|---:|---:|")
    base = sorted(times[("fixed", False)])[len(times[("fixed", False)]) // 2]
    for (gate, replay), spent in times.items():
        median = sorted(spent)[len(spent) // 2]
        print(f"| {gate} | {'replayed' if replay else 'untrained'} | {median * 1e3:.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
