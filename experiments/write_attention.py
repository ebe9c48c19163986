"""Whom a qa1 model's state write looks at: the write's attention over each block, on facts and on haystack text.

At the end of every block each state vector's write heads attend over the block's tokens (queries from the state
alone, keys and values from the block). For a state to keep "who went where", some (state vector, head) pairs
would have to look at the facts of one person and not of the others. Over the stories drawn as ``brt eval --task
qa1`` draws them, this prints:

- the attention's entropy as a share of a uniform one's (1: uniform over the block), on blocks holding a fact and
  on haystack blocks;
- how much more than uniform attention a fact's tokens get (mass on the fact / the fact's share of the block);
- how much of a (state vector, head)'s mass on a fact the fact's person explains (eta squared over the facts:
  near 0 when every slot looks at every person alike; one number per pair, their mean and largest), and the same
  for the fact's place, with the shares a label drawn at random would explain as the floor.

With the slot write (``state_write="slots"``) each token's shares run over the state vectors and the null slot
instead, so the entropy and lift lines give way to: the null slot's share of a fact's tokens and of haystack
tokens, and how much of its new value a state vector takes (1 - exp(-mass won)) after a block holding a fact and
after a haystack block; the eta squared lines are over the mass each (state vector, head) wins from the fact.

With the delta-rule memory (``state_write="delta"``) every token writes a value under a key of its own with a
strength, so the lines are: the mean strength on a fact's tokens and on haystack tokens, and the eta squared lines
are over each (head, key row) entry of the fact's key (its tokens' keys averaged with their strengths as weights):
a memory that files each fact under its person needs keys that the person explains.

    python experiments/write_attention.py --checkpoint runs/qa1 --distance 1024 --stories 300
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from block_recurrent.model import recurrent  # noqa: E402
from block_recurrent.tasks.scoring import draw_examples  # noqa: E402
import facts_answers  # noqa: E402
from harness import add_tuned_task_arguments, load_recurrent_model  # noqa: E402


def write_logits(attn, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Logits (B, S, H, N) at scale 1 of raw queries (B, S, H, dh) over keys prepared by ``attn`` (B, K, N, dh)."""
    q = attn.prepare_laid_out_queries(queries)
    B, S, H, dh = q.shape
    K = keys.shape[1]
    grouped = q.view(B, S, K, H // K, dh)  # each key/value head serves H / K query heads, in order
    return torch.einsum("bskgd,bknd->bskgn", grouped, keys).reshape(B, S, H, -1)


def recorded_run(model, tokens: torch.Tensor, name: str, record) -> None:
    """Run one example (T,) with ``recurrent.<name>`` calling ``record`` with its arguments first."""
    original = getattr(recurrent, name)

    def recording(*args):
        record(*args)
        return original(*args)

    setattr(recurrent, name, recording)
    try:
        with torch.no_grad():
            model.run(tokens[None])
    finally:
        setattr(recurrent, name, original)


def slot_shares(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The first recurrent layer's slot write shares at the end of each block of one example, in order: per block
    (state vectors and the null slot last, heads, block tokens), each token's shares over the S + 1 slots summing
    to 1 per head."""
    cell = model.cells[0]
    found = []

    def record(attn, queries, null_query, null_logit, keys, values):
        if attn is not cell.write_attn:
            return
        B, S, H, dh = queries.shape
        logits = write_logits(attn, torch.cat((queries, null_query.expand(B, 1, H, dh)), dim=1), keys)
        logits[:, S] += null_logit[:, None]
        found.append(logits.softmax(dim=1)[0])

    recorded_run(model, tokens, "attend_slots", record)
    return found


def delta_writes(model, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first recurrent layer's delta-rule writes at the end of each block of one example, in order: per block,
    each token's strength (N, H) and unit key over the memory's rows (N, H, S)."""
    cell = model.cells[0]
    found = []

    def record(module, inputs, output):
        keys, _, strengths = cell.split_writes(output)  # (1, H, N, S), (1, H, N)
        found.append((strengths[0].transpose(0, 1), keys[0].transpose(0, 1)))

    hook = cell.to_write.register_forward_hook(record)
    try:
        with torch.no_grad():
            model.run(tokens[None])
    finally:
        hook.remove()
    return found


def fact_tokens(example, block: int, width: int, length: int) -> torch.Tensor:
    """(length,) bool: which of the tokens of ``block`` belong to a fact of ``example``."""
    in_fact = torch.zeros(length, dtype=torch.bool)
    for start, end in example.needles:
        if start // width == block:
            in_fact[start % width : start % width + end - start] = True
    return in_fact


def write_weights(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The first recurrent layer's write attention at the end of each block of one example, in order: per block
    (state vectors, heads, block tokens), each row summing to 1."""
    cell = model.cells[0]
    found = []

    def record(attn, queries, keys, values):
        if attn is cell.write_attn:
            found.append(write_logits(attn, queries, keys).softmax(-1)[0])

    recorded_run(model, tokens, "attend_state", record)
    return found


def eta_squared(mass: np.ndarray, labels: list[str]) -> np.ndarray:
    """Per column of ``mass`` (facts, pairs): the share of its variance over the facts that the labels explain."""
    labels = np.asarray(labels)
    total = ((mass - mass.mean(0)) ** 2).sum(0)
    between = sum((labels == v).sum() * (mass[labels == v].mean(0) - mass.mean(0)) ** 2 for v in np.unique(labels))
    return between / np.maximum(total, 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_tuned_task_arguments(parser, task="qa1")
    parser.add_argument("--distance", type=int, default=1024, help="haystack tokens")
    parser.add_argument("--stories", type=int, default=300)
    parser.add_argument("--seed", type=int, default=10000)
    args = parser.parse_args()
    model, task = load_recurrent_model(args, num_questions=1)
    width = model.config.block_width
    delta = isinstance(model.cells[0], recurrent.DeltaStateCell)
    slots = not delta and model.cells[0].null_query is not None
    # per block kind (True: holding a fact): entropy (attention) or the rewrite taken (slots); per token kind
    # (True: a fact's): the null slot's share (slots) or the write strength (delta)
    by_block, by_token = {True: [], False: []}, {True: [], False: []}
    lift, masses, people, places = [], [], [], []
    for example in draw_examples(task, args.distance, args.stories, args.seed):
        tokens = torch.from_numpy(example.tokens)
        if delta:
            weights = delta_writes(model, tokens)
        else:
            weights = slot_shares(model, tokens) if slots else write_weights(model, tokens)
        moves, _ = facts_answers.story_moves(example, task.tokenizer.decode)
        holding = {start // width for start, _ in example.needles}
        for block, w in enumerate(weights):
            if delta:
                in_fact = fact_tokens(example, block, width, w[0].shape[0])
                for kind in (True, False):
                    if in_fact.eq(kind).any():
                        by_token[kind].append(float(w[0][in_fact.eq(kind)].mean()))
            elif slots:
                in_fact = fact_tokens(example, block, width, w.shape[-1])
                for kind in (True, False):
                    if in_fact.eq(kind).any():
                        by_token[kind].append(float(w[-1][:, in_fact.eq(kind)].mean()))
                rewrite = 1 - torch.exp(-w[:-1].sum(-1).mean(-1))  # (S,), as the cell computes it
                by_block[block in holding].append(float(rewrite.mean()))
            else:
                entropy = -(w * w.clamp_min(1e-12).log()).sum(-1).mean() / np.log(w.shape[-1])
                by_block[block in holding].append(float(entropy))
        for (start, end), (person, place) in zip(example.needles, moves):
            begin, stop = start % width, start % width + end - start
            if delta:
                strengths, keys = (t[begin:stop] for t in weights[start // width])  # (n, H), (n, H, S)
                key = (strengths[..., None] * keys).sum(0) / strengths.sum(0)[..., None]  # (H, S)
                masses.append(key.reshape(-1).numpy())
            else:
                w = weights[start // width][:-1] if slots else weights[start // width]
                mass = w[..., begin:stop].sum(-1)  # (S, H)
                lift.append(float(mass.mean()) / ((end - start) / w.shape[-1]))
                masses.append(mass.reshape(-1).numpy())
            people.append(person)
            places.append(place)
    masses = np.stack(masses)
    shuffled = list(np.random.default_rng(0).permutation(people))
    kind = ", delta-rule memory" if delta else ", slot write" if slots else ""
    pairs = "(head, key row) entries of a fact's key" if delta else "(state vector, head) pairs"
    print(f"{args.checkpoint}: qa1 {task.describe()} at {args.distance} haystack tokens, {args.stories} stories "
          f"(seed {args.seed}), {len(people)} facts, {masses.shape[1]} {pairs}{kind}")
    print("| measure | value |\n|---|---:|")
    if delta:
        print(f"| write strength on a fact's tokens | {np.mean(by_token[True]):.3f} |")
        print(f"| write strength on haystack tokens | {np.mean(by_token[False]):.3f} |")
    elif slots:
        print(f"| the null slot's share of a fact's tokens | {np.mean(by_token[True]):.3f} |")
        print(f"| the null slot's share of haystack tokens | {np.mean(by_token[False]):.3f} |")
        print(f"| rewrite taken per state vector, after a block holding a fact | {np.mean(by_block[True]):.3f} |")
        print(f"| rewrite taken per state vector, after a haystack block | {np.mean(by_block[False]):.3f} |")
    else:
        print(f"| entropy / uniform's, blocks holding a fact | {np.mean(by_block[True]):.3f} |")
        print(f"| entropy / uniform's, haystack blocks | {np.mean(by_block[False]):.3f} |")
        print(f"| mass on a fact's tokens / their share of the block | {np.mean(lift):.2f} |")
    for name, labels in (("the fact's person", people), ("the fact's place", places), ("a shuffled person", shuffled)):
        eta = eta_squared(masses, labels)
        what = "an entry of a fact's key" if delta else "a pair's mass on a fact"
        print(f"| share of {what} explained by {name}: mean; largest | {eta.mean():.3f}; {eta.max():.3f} |")


if __name__ == "__main__":
    main()
