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


def write_weights(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The first recurrent layer's write attention at the end of each block of one example, in order: per block
    (state vectors, heads, block tokens), each row summing to 1."""
    cell = model.cells[0]
    found = []
    attend_state = recurrent.attend_state

    def recording(attn, queries, keys, values):
        if attn is cell.write_attn:
            q = attn.prepare_laid_out_queries(queries)  # (B, S, H, dh), at scale 1
            B, S, H, dh = q.shape
            K = keys.shape[1]
            grouped = q.view(B, S, K, H // K, dh)  # each key/value head serves H / K query heads, in order
            logits = torch.einsum("bskgd,bkjd->bskgj", grouped, keys)
            found.append(logits.softmax(-1).reshape(B, S, H, -1)[0])
        return attend_state(attn, queries, keys, values)

    recurrent.attend_state = recording
    try:
        with torch.no_grad():
            model.run(tokens[None])
    finally:
        recurrent.attend_state = attend_state
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
    fact_entropy, text_entropy, lift, masses, people, places = [], [], [], [], [], []
    for example in draw_examples(task, args.distance, args.stories, args.seed):
        weights = write_weights(model, torch.from_numpy(example.tokens))
        moves, _ = facts_answers.story_moves(example, task.tokenizer.decode)
        holding = {start // width for start, _ in example.needles}
        for block, w in enumerate(weights):
            entropy = -(w * w.clamp_min(1e-12).log()).sum(-1).mean() / np.log(w.shape[-1])
            (fact_entropy if block in holding else text_entropy).append(float(entropy))
        for (start, end), (person, place) in zip(example.needles, moves):
            w = weights[start // width]
            mass = w[..., start % width : start % width + end - start].sum(-1)  # (S, H)
            lift.append(float(mass.mean()) / ((end - start) / w.shape[-1]))
            masses.append(mass.reshape(-1).numpy())
            people.append(person)
            places.append(place)
    masses = np.stack(masses)
    shuffled = list(np.random.default_rng(0).permutation(people))
    print(f"{args.checkpoint}: qa1 {task.describe()} at {args.distance} haystack tokens, {args.stories} stories "
          f"(seed {args.seed}), {len(people)} facts, {masses.shape[1]} (state vector, head) pairs")
    print("| measure | value |\n|---|---:|")
    print(f"| entropy / uniform's, blocks holding a fact | {np.mean(fact_entropy):.3f} |")
    print(f"| entropy / uniform's, haystack blocks | {np.mean(text_entropy):.3f} |")
    print(f"| mass on a fact's tokens / their share of the block | {np.mean(lift):.2f} |")
    for name, labels in (("the fact's person", people), ("the fact's place", places), ("a shuffled person", shuffled)):
        eta = eta_squared(masses, labels)
        print(f"| share of a pair's mass on a fact explained by {name}: mean; largest | {eta.mean():.3f}; "
              f"{eta.max():.3f} |")


if __name__ == "__main__":
    main()
