"""What a model answers on bAbI qa1 when it is wrong: the place of another fact of the story (the binding of person
to place lost, the place kept), the asked person's earlier place (an overwritten fact), a place the story never
named, or no place at all. Answers are decoded greedily, as a user would read them; an answer is the place its
text starts with.

    python experiments/facts_answers.py --checkpoint runs/qa1 --distances 256 1024 4096

The examples are those of ``brt eval --task qa1`` with the same ``--seed`` and ``--samples`` (one question per story),
so the "right" column is its exact match. "story's last place" counts answers equal to the place of the story's
last fact, right or wrong (a model that answers by recency alone scores 1.00 there), and the next column those of
them that are wrong.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from block_recurrent.inference.generation import generate  # noqa: E402
from block_recurrent.tasks.commands import load_scored_task  # noqa: E402
from block_recurrent.tasks.facts import PLACES  # noqa: E402
from block_recurrent.tasks.scoring import draw_examples  # noqa: E402
from harness import add_tuned_task_arguments  # noqa: E402

KINDS = ("right", "another fact's place", "the person's earlier place", "a place not in the story", "no place")
FACT = re.compile(r"(\w+) .* the (\w+)\.")


def classify(answer: str, moves: list[tuple[str, str]], asked: str, exact: bool) -> str:
    """Which of :data:`KINDS` ``answer`` (the place written) is, for a question about ``asked``, given the
    story's ``moves`` (person, place) in order; ``exact``: the answer's tokens were written (the exact match of
    ``brt eval``)."""
    if exact:
        return KINDS[0]
    if answer in [place for person, place in moves if person == asked]:
        return KINDS[2]
    if answer in [place for _, place in moves]:
        return KINDS[1]
    return KINDS[3] if answer in PLACES else KINDS[4]


def story_moves(example, decode) -> tuple[list[tuple[str, str]], str]:
    """(the moves (person, place) of a qa1 example's story, in order; the person its first question asks about)."""
    facts = [decode(example.tokens[s:e].tolist()).strip() for s, e in example.needles]
    question = decode(example.tokens[example.needles[-1][1] : example.answers[0].start].tolist())
    asked = re.findall(r"Question: Where is (\w+)\?", question)[-1]
    return [FACT.fullmatch(fact).groups() for fact in facts], asked


def answers(model, task, distance: int, samples: int, seed: int, batch_size: int) -> list[dict]:
    """Per example (those :func:`~block_recurrent.tasks.scoring.score` scores): the story's moves (person,
    place), the person asked, the place the model's answer starts with (else all it wrote) and whether it wrote the
    answer's tokens."""
    decode = task.tokenizer.decode
    examples = draw_examples(task, distance, samples, seed)
    out = []
    for begin in range(0, samples, batch_size):
        batch = examples[begin : begin + batch_size]
        prompts = [torch.from_numpy(e.tokens[: e.answers[0].start]) for e in batch]
        longest = max(e.answers[0].length for e in batch)
        written = generate(model, prompts, max_new_tokens=longest + 1, temperature=0.0)
        for example, new in zip(batch, written):
            answer = example.answers[0]
            moves, asked = story_moves(example, decode)
            truth = example.tokens[answer.start : answer.start + answer.length]
            # the place the answer starts with: what follows it was never trained (the loss is on the answer only)
            reply = decode(new.tolist()).lstrip()
            place = next((p for p in PLACES if reply.startswith(p)), reply)
            out.append(dict(moves=moves, asked=asked, answer=place,
                            exact=np.array_equal(new[: answer.length].numpy(), truth)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_tuned_task_arguments(parser, task="qa1")
    parser.add_argument("--distances", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    model, task = load_scored_task(args, "cpu", num_questions=1)
    print(f"{args.checkpoint}: qa1 {task.describe()}, {args.samples} stories per distance (seed {args.seed}); "
          "share of answers")
    print("| distance | " + " | ".join(KINDS) + " | story's last place | wrong, the story's last place |")
    print("|---:|" + "---:|" * (len(KINDS) + 2))
    for distance in args.distances:
        rows = answers(model, task, distance, args.samples, args.seed, args.batch_size)
        kinds = [classify(r["answer"], r["moves"], r["asked"], r["exact"]) for r in rows]
        last = [r["answer"] == r["moves"][-1][1] for r in rows]
        wrong_last = [is_last and not r["exact"] for is_last, r in zip(last, rows)]
        cells = [f"{kinds.count(kind) / len(rows):.2f}" for kind in KINDS]
        cells += [f"{np.mean(last):.2f}", f"{np.mean(wrong_last):.2f}"]
        print(f"| {distance} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
