"""Training throughput and peak memory: block-recurrent vs the reference package, side by side in one run.

    python benchmarks/bench_train.py                  # full table (a few minutes on a 2-core CPU)
    python benchmarks/bench_train.py --quick          # fewer steps, no 32-segment run

The reference (`block-recurrent-transformer-pytorch==0.4.4`) runs from its own virtual environment
(`.venv-ref`, created here if missing, with the same torch). Every measurement runs in a fresh process so
that peak memory is its own: "peak MB" is the process's peak resident memory minus its resident memory
before the model was built (parameters, gradients, optimiser state and activations). One training step
is forward + backward + AdamW step over ``segments`` windows of ``max_seq_len`` tokens: the reference
back-propagates the summed loss once (its wrapper's forward), ours back-propagates every segment as it
goes (``RecurrentTrainerWrapper.forward_backward``), which gives the same gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from reference_env import reference_python

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "small": dict(
        model=dict(num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, block_width=128, max_seq_len=256,
                   num_state_vectors=128, recurrent_layers=(2,)),
        batch=4, segments=4,
    ),
    "medium": dict(
        model=dict(num_tokens=256, dim=512, depth=6, heads=8, dim_head=64, block_width=256, max_seq_len=512,
                   num_state_vectors=256, recurrent_layers=(4,)),
        batch=2, segments=2,
    ),
}


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(impl: str, config_name: str, segments: int, steps: int, flash: bool, bf16: bool = False) -> dict:
    """Build one model, train ``steps`` timed steps after one warm-up step, report tokens/s and memory."""
    import torch

    torch.manual_seed(0)
    start_rss = rss_mb()
    spec = CONFIGS[config_name]
    kwargs = dict(spec["model"])
    if impl == "reference":
        from block_recurrent_transformer_pytorch import BlockRecurrentTransformer, RecurrentTrainerWrapper

        model = BlockRecurrentTransformer(**kwargs, use_flash_attn=flash)
    else:
        sys.path.insert(0, str(ROOT))
        from block_recurrent import BlockRecurrentTransformer, RecurrentTrainerWrapper

        model = BlockRecurrentTransformer(**kwargs, gate_projection=True)  # the reference's architecture
    wrapper = RecurrentTrainerWrapper(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # both sides: as brt train
    seq_len = kwargs["max_seq_len"]
    data = torch.randint(0, kwargs["num_tokens"], (spec["batch"], segments * seq_len + 1))

    def step():
        if impl == "reference":
            wrapper(data).backward()
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                wrapper.forward_backward(data)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, optimiser state
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    tokens = spec["batch"] * segments * seq_len
    best = min(times)
    return dict(tokens_per_s=tokens / best, step_s=best, peak_mb=peak - start_rss,
                params=sum(p.numel() for p in model.parameters()))


def measure(impl: str, config: str, segments: int, steps: int, flash: bool = False, bf16: bool = False) -> dict:
    python = reference_python() if impl == "reference" else Path(sys.executable)
    cmd = [str(python), __file__, "--worker", impl, "--config", config, "--segments", str(segments),
           "--steps", str(steps)] + (["--flash"] if flash else []) + (["--bf16"] if bf16 else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["ours", "reference"])
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--flash", action="store_true", help="reference: use_flash_attn=True (SDPA)")
    parser.add_argument("--bf16", action="store_true", help="ours: bfloat16 autocast (worker)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-memory", action="store_true", help="only the throughput table")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of the four throughput measurements, alternating sides; each keeps its best "
                             "(this VM's speed drifts by up to 1.5x within minutes)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.config, args.segments, args.steps, args.flash, args.bf16)))
        return

    import torch

    steps = 2 if args.quick else args.steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {os.cpu_count()} cores, float32\n")
    print("## Training throughput (forward + backward + AdamW step; best of", steps, "steps,",
          "best of", 1 if args.quick else args.repeats, "alternating rounds)\n")
    print("| config | batch x segments x tokens | reference tok/s | reference (use_flash_attn) tok/s | ours tok/s | "
          "speed-up | ours bf16 autocast tok/s | bf16 speed-up | reference peak MB | ours peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, spec in CONFIGS.items():
        best: dict[str, dict] = {}
        for _ in range(1 if args.quick else args.repeats):  # alternating, so that a slow minute hits every side
            for label, impl, flash, bf16 in (("ref", "reference", False, False), ("ref_flash", "reference", True, False),
                                             ("ours", "ours", False, False), ("ours_bf16", "ours", False, True)):
                result = measure(impl, name, spec["segments"], steps, flash=flash, bf16=bf16)
                if label not in best or result["tokens_per_s"] > best[label]["tokens_per_s"]:
                    best[label] = result
        ref, ref_flash, ours, ours_bf16 = best["ref"], best["ref_flash"], best["ours"], best["ours_bf16"]
        best_ref = max(ref["tokens_per_s"], ref_flash["tokens_per_s"])  # the reference in float32
        print(f"| {name} | {spec['batch']} x {spec['segments']} x {spec['model']['max_seq_len']} "
              f"| {ref['tokens_per_s']:.0f} | {ref_flash['tokens_per_s']:.0f} | {ours['tokens_per_s']:.0f} "
              f"| {ours['tokens_per_s'] / best_ref:.2f}x | {ours_bf16['tokens_per_s']:.0f} "
              f"| {ours_bf16['tokens_per_s'] / best_ref:.2f}x | {ref['peak_mb']:.0f} | {ours['peak_mb']:.0f} |", flush=True)

    if args.skip_memory:
        return
    segment_counts = (2, 8) if args.quick else (2, 8, 32)
    print("\n## Peak memory vs number of segments (small config, batch 4, one step)\n")
    print("| segments | reference peak MB | ours peak MB |")
    print("|---|---|---|")
    rows = {}
    for segments in segment_counts:
        ref = measure("reference", "small", segments, 1)
        ours = measure("ours", "small", segments, 1)
        rows[segments] = (ref["peak_mb"], ours["peak_mb"])
        print(f"| {segments} | {ref['peak_mb']:.0f} | {ours['peak_mb']:.0f} |", flush=True)
    last = segment_counts[-1]
    print(f"\nours at {last} segments / at 2 segments: {rows[last][1] / rows[2][1]:.2f}x; "
          f"reference: {rows[last][0] / rows[2][0]:.2f}x")


if __name__ == "__main__":
    main()
