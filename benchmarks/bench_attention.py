"""Which attention path is faster where: torch's fused SDPA kernel or two matrix products and a softmax.

    python benchmarks/bench_attention.py            # 2 threads, a table of the shapes the presets produce

``attend(..., implementation="auto")`` takes the matmul path on the CPU under autograd in bf16 for logits of at
most ``MATMUL_MAX_LOGITS`` elements, and SDPA otherwise; this script is the measurement behind that rule. Each
cell is the mean of several calls after warm-up: forward and backward (a training step's attention), and forward
only without autograd (evaluation, prefill, decoding). One key/value head (multi-query), query heads folded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from block_recurrent.model.attention import attend  # noqa: E402

# (rows, heads, queries, keys, dim_head, where it occurs)
SHAPES = [
    (128, 4, 16, 32, 32, "mini: 128 rows, blocks of 16"),
    (16, 4, 64, 128, 32, "16 rows, blocks of 64"),
    (4, 4, 128, 256, 64, "small: 4 rows, blocks of 128"),
    (16, 4, 128, 256, 64, "small, 16 rows"),
    (1, 8, 512, 1024, 64, "enwik8: 1 row, blocks of 512"),
    (8, 8, 512, 1024, 64, "enwik8, 8 rows"),
    (1, 4, 1, 256, 64, "decoding one token, batch 1"),
    (32, 4, 1, 256, 64, "decoding one token, batch 32"),
]


def _mean_ms(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - began) / calls * 1e3


def measure(B: int, H: int, N: int, J: int, D: int, bf16: bool, implementation: str) -> tuple[float, float]:
    q = torch.randn(B, H, N, D, requires_grad=True)
    k = torch.randn(B, 1, J, D, requires_grad=True)
    v = torch.randn(B, 1, J, D, requires_grad=True)
    mask = torch.ones(N, J, dtype=torch.bool).tril(J - N)  # causal after J - N memory slots
    calls = max(3, min(200, int(2e7 // (B * H * N * J))))

    def train() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = attend(q, k, v, mask, scale=D**-0.5, implementation=implementation)
        out.float().sum().backward()

    def infer() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            attend(q, k, v, mask, scale=D**-0.5, implementation=implementation)

    return _mean_ms(train, calls), _mean_ms(infer, calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; ms per call (forward+backward | forward only)\n")
    print("| shape (rows, heads, queries, keys, dim_head) | where | dtype | sdpa fwd+bwd | matmul fwd+bwd | "
          "sdpa fwd | matmul fwd |")
    print("|---|---|---|---:|---:|---:|---:|")
    for B, H, N, J, D, where in SHAPES:
        for bf16 in (True, False):
            sdpa = measure(B, H, N, J, D, bf16, "sdpa")
            matmul = measure(B, H, N, J, D, bf16, "matmul")
            print(f"| {B}, {H}, {N}, {J}, {D} | {where} | {'bf16' if bf16 else 'fp32'} | {sdpa[0]:.2f} | "
                  f"{matmul[0]:.2f} | {sdpa[1]:.3f} | {matmul[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
