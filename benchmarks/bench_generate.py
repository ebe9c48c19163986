"""Generation speed: block_recurrent's cached decoding against the reference port, side by side in one run.

    python benchmarks/bench_generate.py [--lengths 256 1024 4096] [--reference-cap 1024] [--threads 1] [--repeats 3]

Both sides build the "small" configuration with random weights and continue a 16-token prompt, batch 1,
sampling from the 26 most likely ids (the reference's filter_thres=0.9). Ours streams tokens from
``block_recurrent.inference.generation.stream``, eager and compiled (``compile=True``); the reference
(block-recurrent-transformer-pytorch 0.4.4) runs in its own virtual environment (created on first use) through
``RecurrentTrainerWrapper.generate``, the only way it can go past max_seq_len, and its per-token latency is read
off the end of each forward call. The reference re-runs its whole window for every token, so its runs are capped
(``--reference-cap``); its per-token cost repeats with every window of max_seq_len tokens, so a capped run still
gives its rate. Each side's batch-1 figure is the fastest of ``--repeats`` alternating runs. Prints markdown
tables.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from reference_env import reference_python

ROOT = Path(__file__).resolve().parents[1]

SMALL = dict(num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, block_width=128, max_seq_len=256,
             num_state_vectors=128, recurrent_layers=(2,))
PROMPT_LEN = 16
FILTER_THRES = 0.9  # the reference's top-k: keep ceil((1 - 0.9) * 256) = 26 ids
WARMUP_TOKENS = 32
# output positions (1-based, inclusive) over which per-token latency is averaged
BUCKETS = ((1, 64), (65, 128), (129, 192), (193, 256), (257, 512), (513, 1024), (1025, 2048), (2049, 4096))


# the two sides: each returns (wall, CPU) seconds between consecutive new tokens


COMPILE_SECONDS: dict[str, float] = {}  # what a first compiled call took, per table (see time_ours)


def time_ours(new_tokens: int, seed: int, compile: bool = False) -> list[tuple[float, float]]:
    """``compile``: decode through torch.compile (``generate(..., compile=True)``); the warm-up compiles, and its
    seconds (cold, or seconds when inductor's on-disk cache already holds the graph) go to COMPILE_SECONDS."""
    import torch

    sys.path.insert(0, str(ROOT))
    from block_recurrent import BlockRecurrentTransformer
    from block_recurrent.inference.generation import stream

    torch.manual_seed(seed)
    model = BlockRecurrentTransformer(**SMALL, gate_projection=True).eval()  # the reference's architecture
    prompt = torch.randint(0, SMALL["num_tokens"], (1, PROMPT_LEN))
    top_k = math.ceil((1 - FILTER_THRES) * SMALL["num_tokens"])
    generator = torch.Generator().manual_seed(seed)
    began = time.perf_counter()
    for _ in stream(model, prompt, WARMUP_TOKENS, top_k=top_k, generator=generator, compile=compile):
        pass
    if compile:
        COMPILE_SECONDS.setdefault("batch 1", time.perf_counter() - began)

    latencies, last = [], clocks()
    for _ in stream(model, prompt, new_tokens, top_k=top_k, generator=generator, compile=compile):
        now = clocks()
        latencies.append((now[0] - last[0], now[1] - last[1]))
        last = now
    return latencies


def batch_rates(batches: list[int], new_tokens: int, seed: int, compile: bool = False) -> dict[int, float]:
    """Ours: tokens/s (all rows) decoding ``new_tokens`` greedily after equal-length prompts, per batch size
    (``compile``: through torch.compile, one compilation per batch size, in the warm-up)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from block_recurrent import BlockRecurrentTransformer
    from block_recurrent.inference.generation import generate

    torch.manual_seed(seed)
    model = BlockRecurrentTransformer(**SMALL, gate_projection=True).eval()
    rates = {}
    for batch in batches:
        prompt = torch.randint(0, SMALL["num_tokens"], (batch, PROMPT_LEN))
        began = time.perf_counter()
        generate(model, prompt, WARMUP_TOKENS, temperature=0, compile=compile)
        if compile:
            COMPILE_SECONDS.setdefault(f"batch {batch}", time.perf_counter() - began)
        start = time.perf_counter()
        generate(model, prompt, new_tokens, temperature=0, compile=compile)
        rates[batch] = batch * new_tokens / (time.perf_counter() - start)
    return rates


def ragged_rates(prompts: int, longest: int, new_tokens: int, seed: int) -> tuple[float, float]:
    """Ours: tokens/s generating ``new_tokens`` greedily for ``prompts`` prompts of random lengths 1..longest,
    (side by side as one list, one by one). Prefill included in both."""
    import torch

    sys.path.insert(0, str(ROOT))
    from block_recurrent import BlockRecurrentTransformer
    from block_recurrent.inference.generation import generate

    torch.manual_seed(seed)
    model = BlockRecurrentTransformer(**SMALL, gate_projection=True).eval()
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (prompts,), generator=generator).tolist()
    texts = [torch.randint(0, SMALL["num_tokens"], (n,), generator=generator) for n in lengths]
    generate(model, texts[:2], WARMUP_TOKENS, temperature=0)
    start = time.perf_counter()
    together = generate(model, texts, new_tokens, temperature=0)
    batched = prompts * new_tokens / (time.perf_counter() - start)
    start = time.perf_counter()
    alone = [generate(model, text, new_tokens, temperature=0)[0] for text in texts]
    one_by_one = prompts * new_tokens / (time.perf_counter() - start)
    if not all(torch.equal(a, b) for a, b in zip(together, alone)):
        raise RuntimeError("side-by-side generation differs from one by one")
    return batched, one_by_one


def time_reference(new_tokens: int, seed: int) -> list[tuple[float, float]]:
    """Runs inside the reference's virtual environment (see ``--reference-worker``)."""
    import torch
    from block_recurrent_transformer_pytorch import BlockRecurrentTransformer, RecurrentTrainerWrapper

    torch.manual_seed(seed)
    model = BlockRecurrentTransformer(**SMALL)
    wrapper = RecurrentTrainerWrapper(model)
    prompt = torch.randint(0, SMALL["num_tokens"], (1, PROMPT_LEN))
    wrapper.generate(prompt, PROMPT_LEN + WARMUP_TOKENS, filter_thres=FILTER_THRES)

    # one forward call per new token: the end of each call is when its token is known
    stamps = []
    forward = model.forward

    def timed_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        stamps.append(clocks())
        return out

    model.forward = timed_forward
    start = clocks()
    out = wrapper.generate(prompt, PROMPT_LEN + new_tokens, filter_thres=FILTER_THRES)
    if out.shape[-1] != new_tokens or len(stamps) != new_tokens:
        raise RuntimeError(f"reference produced {out.shape[-1]} tokens in {len(stamps)} forward calls")
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip([start] + stamps[:-1], stamps)]


def clocks() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time is what contention on a shared machine
    disturbs least, wall time is what a user waits."""
    return time.perf_counter(), time.process_time()


# the reference's side


def run_reference(python: Path, lengths: list[int], threads: int, seed: int) -> dict[int, list[float]]:
    command = [str(python), str(Path(__file__).resolve()), "--reference-worker", "--threads", str(threads), "--seed", str(seed),
               "--lengths", *map(str, lengths)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd="/")
    return {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


# tables


def rate(latencies: list, clock: int) -> float:
    """Tokens per second on one clock (0: wall, 1: CPU)."""
    return len(latencies) / sum(pair[clock] for pair in latencies)


def bucket_ms(latencies: list, first: int, last: int, clock: int) -> float | None:
    if len(latencies) < last:
        return None
    chunk = [pair[clock] for pair in latencies[first - 1 : last]]
    return 1000 * sum(chunk) / len(chunk)


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def throughput_table(ours: dict, compiled: dict, ref: dict, cap: int) -> str:
    rows = [
        "| new tokens | reference, tokens/s (wall) | ours, tokens/s (wall) | speed-up (wall) | speed-up (CPU time) "
        "| ours compiled, tokens/s (wall) | speed-up (wall) | speed-up (CPU time) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for length, latencies in ours.items():
        measured = min(length, cap)
        note = "" if measured == length else f" (capped: first {measured} tokens)"
        cells = [f"{rate(ref[measured], 0):.2f}{note}"]
        for side in (latencies, compiled[length]):
            wall = rate(side, 0) / rate(ref[measured], 0)
            cpu = rate(side, 1) / rate(ref[measured], 1)
            cells += [f"{rate(side, 0):.1f}", f"{wall:.1f}x", f"{cpu:.1f}x"]
        rows.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def latency_table(ours: list, compiled: list, ref: list) -> str:
    rows = [
        "| output positions | ours, ms/token (wall) | ours (CPU) | ours compiled (wall) | ours compiled (CPU) "
        "| reference, ms/token (wall) | reference (CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for first, last in BUCKETS:
        if len(ours) < last:
            break
        cells = [fmt(bucket_ms(side, first, last, c), 2) for side in (ours, compiled) for c in (0, 1)]
        cells += [fmt(bucket_ms(ref, first, last, c)) for c in (0, 1)]
        rows.append(f"| {first}-{last} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--reference-cap", type=int, default=1024, help="most new tokens per reference run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same on both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-python", help="python of an environment with the reference installed")
    parser.add_argument("--reference-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32], help="batch sizes of the batched table")
    parser.add_argument("--ragged", type=int, default=32, help="prompts of random lengths in the ragged table (0: skip)")
    parser.add_argument("--skip-reference", action="store_true", help="only our tables (no reference run)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="batch-1 runs per side and length, alternating; each side's fastest is reported")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    import torch

    torch.set_num_threads(args.threads)
    if args.reference_worker:
        print(json.dumps({n: time_reference(n, args.seed) for n in args.lengths}))
        return

    lengths = sorted(args.lengths)
    ref_lengths = sorted({min(n, args.reference_cap) for n in lengths})
    started = time.perf_counter()
    if not args.skip_reference:
        # best of --repeats runs per side and length: this VM's speed drifts by up to 1.5x within minutes, and
        # interference only ever slows a run down
        ref = {n: [] for n in ref_lengths}
        ours, compiled = {n: [] for n in lengths}, {n: [] for n in lengths}
        for _ in range(args.repeats):
            for n, latencies in run_reference(reference_python(args.reference_python), ref_lengths, args.threads,
                                              args.seed).items():
                ref[n].append(latencies)
            for n in lengths:
                ours[n].append(time_ours(n, args.seed))
                compiled[n].append(time_ours(n, args.seed, compile=True))
        ref, ours, compiled = ({n: max(runs, key=lambda r: rate(r, 0)) for n, runs in side.items()}
                               for side in (ref, ours, compiled))
    batched = batch_rates(args.batches, 256, args.seed) if args.batches else {}
    batched_compiled = batch_rates(args.batches, 256, args.seed, compile=True) if args.batches else {}
    ragged = ragged_rates(args.ragged, 600, 256, args.seed) if args.ragged else None
    elapsed = time.perf_counter() - started

    print(f"small configuration, torch {torch.__version__}, {args.threads} thread(s), CPU; {elapsed:.0f} s in all\n")
    if not args.skip_reference:
        print(f"batch 1, {PROMPT_LEN}-token prompt, top-26 sampling, the fastest of {args.repeats} runs per side\n")
        print(throughput_table(ours, compiled, ref, args.reference_cap))
        print(f"\nper-token latency as the output grows (ours: the {lengths[-1]}-token runs; "
              f"reference: its {ref_lengths[-1]}-token run)\n")
        print(latency_table(ours[lengths[-1]], compiled[lengths[-1]], ref[ref_lengths[-1]]))
    if batched:
        print(f"\nbatched decoding, ours: 256 new tokens after {PROMPT_LEN}-token prompts, greedy\n")
        print("| batch | tokens/s (all rows) | per row | compiled, tokens/s (all rows) | per row |\n|---:|---:|---:|---:|---:|")
        for batch, value in batched.items():
            fast = batched_compiled[batch]
            print(f"| {batch} | {value:.0f} | {value / batch:.0f} | {fast:.0f} | {fast / batch:.0f} |")
    if COMPILE_SECONDS:
        print("\nfirst compiled call (compiles; inductor's on-disk cache may already hold the graph), seconds: "
              + ", ".join(f"{k} {v:.1f}" for k, v in COMPILE_SECONDS.items()))
    if ragged:
        print(f"\n{args.ragged} prompts of random lengths 1-600, 256 new tokens each, greedy, ours\n")
        print("| side by side (one list), tokens/s | one by one, tokens/s | ratio |\n|---:|---:|---:|")
        print(f"| {ragged[0]:.0f} | {ragged[1]:.0f} | {ragged[0] / ragged[1]:.1f}x |")


if __name__ == "__main__":
    main()
