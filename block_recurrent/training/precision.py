"""The bf16 policy: where bfloat16 autocast is on when a setting says "auto" (None).

Training and scoring decide differently: training gains wherever bf16 matrix products are native, while scoring
without gradients on the CPU gains only when each call is large enough for the products to outweigh autocast's
casts. The measurements behind both rules are in docs/training.md (the ``--bf16`` option) and the README's
evaluation benchmark (benchmarks/bench_eval.py).
"""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run natively here: a CUDA device that supports bf16, or an x86 CPU
    with AVX-512 BF16 or AMX (elsewhere bf16 on the CPU is emulated, and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_bf16(setting: bool | None, device: torch.device) -> bool:
    """bf16 autocast for training: the setting, or with None ("auto") on exactly where bf16 is native."""
    return native_bf16(device) if setting is None else setting


# On the CPU a scoring call of one narrow block is too small for bf16's faster products to pay for autocast's
# casts; blocks of this width or more (or a segment's blocks side by side, which make every call large) are not
CPU_EVAL_BF16_MIN_BLOCK = 64


def resolve_eval_bf16(setting: bool | None, device: torch.device, block_width: int,
                      blocks_side_by_side: bool = False) -> bool:
    """bf16 autocast for evaluation: the setting, or with None ("auto") on where bf16 is native, except on the CPU
    for blocks narrower than CPU_EVAL_BF16_MIN_BLOCK run one per call (not ``blocks_side_by_side``)."""
    if setting is not None:
        return setting
    return native_bf16(device) and (device.type != "cpu" or block_width >= CPU_EVAL_BF16_MIN_BLOCK or blocks_side_by_side)
