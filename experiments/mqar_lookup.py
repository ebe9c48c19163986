"""Can attention of this size learn MQAR's key lookup in a CPU budget? Ours against a plain transformer.

    python experiments/mqar_lookup.py ours 4000 1e-3                   # our attention, MQAR text, hidden answers
    python experiments/mqar_lookup.py plain 4000 1e-3                  # torch's pre-LN TransformerEncoder
    python experiments/mqar_lookup.py ours 4000 1e-3 format=compact    # the same text without the "=" separator
    python experiments/mqar_lookup.py ours 4000 1e-3 format=zoology    # Zoology's layout in bytes

Both models see the same batches (seeded): 32 examples per step of 8 pairs, every key queried, no answer in the
input. ``text``: ``MQARTask(num_pairs=8, num_queries=8, key_len=1, hidden_answers=True)`` with 0-16 bytes of filler
(``max_filler=N``: 0-N)
(" k=7 " pairs, then "\\n a=? b=? ..."); ``compact``: the same text without the "=" (" k7 ", "\\n a? b? ...");
``zoology``: Zoology's layout ("a3b5c1...|cadb", each query key labelled with its value). Ours: the ``mini`` preset
without recurrence and with one block of 128 (plain causal attention over the whole example); plain:
``nn.TransformerEncoder``, 4 pre-LN layers of width 128 and 4 heads, learned positions. AdamW (betas 0.9/0.95, no
weight decay, constant lr), clipping at 1, one thread. Further ``FIELD=JSON`` arguments override our config. Prints
the answers' loss and accuracy every 250 steps; 8 pairs of one digit give the "bag of values" (knowing the values,
not which key holds which) 0.30 accuracy.
"""

import json
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from block_recurrent import BlockRecurrentConfig, BlockRecurrentModel
from block_recurrent.tasks import MQARTask, collate

T = 128  # tokens per example: every example fits


class Plain(nn.Module):
    def __init__(self, dim: int = 128, layers: int = 4, heads: int = 4):
        super().__init__()
        self.embed, self.positions = nn.Embedding(256, dim), nn.Parameter(torch.randn(T, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(dim, 256)

    def forward(self, x):
        n = x.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool).triu(1)
        return self.out(self.body(self.embed(x) + self.positions[:n], mask=mask, is_causal=True))


def zoology(batch_size: int, rng: np.random.Generator, pairs: int = 8):
    """Zoology's layout in bytes: "a3b5c1...|cadb", each query key labelled with its value, no answer in the input."""
    x = np.zeros((batch_size, T), dtype=np.int64)
    y = np.full((batch_size, T), -100, dtype=np.int64)
    for row in range(batch_size):
        keys = rng.choice(26, pairs, replace=False) + ord("a")
        values = rng.integers(0, 10, pairs) + ord("0")
        order = rng.permutation(pairs)
        seq = [t for k, v in zip(keys, values) for t in (k, v)] + [ord("|")] + [keys[i] for i in order]
        x[row, : len(seq)] = seq
        start = 2 * pairs + 1
        y[row, start : start + pairs] = values[order]
    return torch.from_numpy(x), torch.from_numpy(y)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    which, steps, lr = argv[0], int(argv[1]), float(argv[2])
    overrides = dict(a.split("=") for a in argv[3:])
    layout = overrides.pop("format", "text")
    max_filler = int(overrides.pop("max_filler", 16))  # haystack bytes per example: uniform in [0, max_filler]
    torch.manual_seed(0)
    if which == "plain":
        model = Plain()
        run = model
    else:
        extra = {k: json.loads(v) for k, v in overrides.items()}
        config = BlockRecurrentConfig.from_name("mini", block_width=T, max_seq_len=T, recurrent_layers=(),
                                                read_recurrent_layers=None, **extra)
        model = BlockRecurrentModel(config)
        run = lambda x: model.run(x)[0]
    task = MQARTask(num_pairs=8, num_queries=8, key_len=1, hidden_answers=True,
                    separator="" if layout == "compact" else "=")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(0)
    began, hits, total, losses = time.time(), 0, 0, []
    for step in range(1, steps + 1):
        if layout == "zoology":
            x, y = zoology(32, rng)
        else:
            batch = collate(task.examples(32, int(rng.integers(0, max_filler + 1)), rng), multiple=T)
            x, y = batch.inputs[:, :T], batch.labels[:, :T]
        logits = run(x)
        loss = F.cross_entropy(logits.reshape(-1, 256).float(), y.reshape(-1), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scored = y != -100
        hits += int((logits.detach().argmax(-1)[scored] == y[scored]).sum())
        total += int(scored.sum())
        losses.append(loss.item())
        if step % 250 == 0 or step == steps:
            print(f"{which} step {step} loss {np.mean(losses):.3f} acc {hits / total:.3f} "
                  f"{time.time() - began:.0f}s", flush=True)
            hits, total, losses = 0, 0, []


if __name__ == "__main__":
    main()
