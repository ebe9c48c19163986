"""A trained model with more key/value heads that computes exactly what it computed: each key/value head is copied
to every query head that shared it. Fine-tuning then pulls the copies apart (each copy's gradient comes from its own
query heads only). It tests the keys and values as a bottleneck on a trained model without training from scratch:
with ``kv_heads=1`` the state's write reads one value head of ``dim_head`` per token.

    python experiments/widen_kv_heads.py --checkpoint runs/qa1 --kv-heads 4 --out runs/qa1-kv4

The new folder keeps the checkpoint's tokenizer and ``tune.json``, so ``brt tune`` and ``brt eval --task`` read the
task it was tuned on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from block_recurrent import BlockRecurrentModel  # noqa: E402
from block_recurrent.tasks.commands import load_model  # noqa: E402
from harness import save_edited_checkpoint  # noqa: E402


def widen(model: BlockRecurrentModel, kv_heads: int) -> BlockRecurrentModel:
    """``model`` with ``kv_heads`` key/value heads (a multiple of its own that divides ``heads``), same function."""
    config = model.config
    if config.use_compressed_mem:
        raise ValueError("widen_kv_heads does not handle the compressed memory's parameters")
    if kv_heads % config.kv_heads or config.heads % kv_heads:
        raise ValueError(f"kv_heads must be a multiple of the model's {config.kv_heads} that divides heads="
                         f"{config.heads}, got {kv_heads}")
    copies = kv_heads // config.kv_heads
    wide = BlockRecurrentModel(config.replace(kv_heads=kv_heads)).to(model.device, model.dtype)
    old = model.state_dict()
    tensors = {}
    for name, target in wide.state_dict().items():
        tensor = old[name]
        if tensor.shape != target.shape:
            # a keys-then-values projection (2 * kv_dim, dim): query head h reads kv head h // (heads / kv_heads),
            # so new head j is old head j // copies
            heads = tensor.view(2, config.kv_heads, config.dim_head, -1)
            tensor = heads.repeat_interleave(copies, dim=1).reshape(target.shape)
        tensors[name] = tensor
    wide.load_state_dict(tensors)
    return wide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--kv-heads", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, _, tokenizer_file, folder = load_model(args.checkpoint, "cpu")
    with torch.no_grad():
        wide = widen(model, args.kv_heads)
    save_edited_checkpoint(wide, args.out, tokenizer_file, folder)
    print(f"{folder}: kv_heads {model.config.kv_heads} -> {args.kv_heads}, {model.num_parameters():,} -> "
          f"{wide.num_parameters():,} parameters, written to {args.out}")


if __name__ == "__main__":
    main()
