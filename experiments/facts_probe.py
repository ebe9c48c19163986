"""Where a qa1 model loses who went where: in the tokens its state is written from, in the state, or in the read.

Linear probes (logistic regression on standardised features, its L2 strength chosen by 3-fold cross-validation on
the fitting stories, scored on other stories):

- *token* probes, from the input of the first recurrent layer (what its state write attends to: the keys and
  values are projections of it) at each fact's full stop: that fact's person and its place. A person read here
  means the write could store the pair as one vector. The same from the values the write reads there (the
  layer's attention values: one head of ``dim_head`` with ``kv_heads=1``);
- *state* probes, from the state the answer is read with (the state after every whole block before the one
  that predicts the answer): each person's last place (one probe per person, over the stories where they moved),
  the story's last place, and whether each place is in the story.

    python experiments/facts_probe.py --checkpoint runs/qa1 --distance 1024 --fit 2000 --test 500

The model's own exact match on the same test stories (one question each, teacher-forced as ``brt eval`` scores)
is printed beside the probe of the asked person's place, over the same questions. Stories are drawn as
``brt eval --task qa1`` draws them: the test stories are its examples for ``--seed``, the fitting ones come from
``--seed`` + 1.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from block_recurrent.tasks.facts import PEOPLE, PLACES  # noqa: E402
from block_recurrent.tasks.scoring import draw_examples  # noqa: E402
import facts_answers  # noqa: E402
from harness import add_tuned_task_arguments, load_recurrent_model  # noqa: E402


@dataclass
class Story:
    moves: list[tuple[str, str]]  # (person, place) per fact, in order
    asked: str  # the person the question asks about
    exact: bool  # the model wrote the answer (teacher-forced exact match, as brt eval)
    loss: float  # the answer's loss, nats per token
    state: np.ndarray  # the state the answer's block reads, flattened
    stops: np.ndarray  # (facts, dim): the first recurrent layer's input at each fact's full stop
    values: np.ndarray  # (facts, kv_dim): the values the state write reads there (the layer's attention values)


def read_story(model, task, example) -> Story:
    """Run one example in two pieces, cut at the start of the block that predicts the answer's first token (so the
    blocks are those of one pass): the state between them is what that block reads."""
    decode, width = task.tokenizer.decode, model.config.block_width
    answer = example.answers[0]
    layer = model.layers[model.config.recurrent_layers[0] - 1]
    inputs = []  # the layer's input per call: (rows, W, dim) side by side or (1, N, dim), one batch row
    hook = layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        tokens = torch.from_numpy(example.tokens)[None]
        cut = (answer.start - 1) // width * width  # token answer.start - 1 predicts the answer's first token
        with torch.no_grad():
            state = model.run(tokens[:, :cut])[1] if cut else model.empty_state()
            logits, _ = model.run(tokens[:, cut:], state)
            hidden = torch.cat(inputs)  # (T, dim)
            values = layer.project(hidden[None])[2][0]  # (T, kv_dim)
    finally:
        hook.remove()
    scored = logits[0, answer.start - cut - 1 : answer.start - cut - 1 + answer.length]
    truth = tokens[0, answer.start : answer.start + answer.length]
    moves, asked = facts_answers.story_moves(example, decode)
    stops = [max(i for i in range(s, e) if "." in decode([int(example.tokens[i])])) for s, e in example.needles]
    states = [s[0] if s is not None else initial for s, initial in zip(state.states, model.initial_states())]
    return Story(
        moves=moves,
        asked=asked,
        exact=bool(torch.equal(scored.argmax(-1), truth)),
        loss=float(torch.nn.functional.cross_entropy(scored.double(), truth)),
        state=torch.cat([s.reshape(-1) for s in states]).float().numpy(),
        stops=hidden[stops].float().numpy(),
        values=values[stops].float().numpy(),
    )


def fit_probe(x: np.ndarray, y) -> object:
    """A linear probe fitted on (x, y); one that always answers the label when y has only one."""
    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return DummyClassifier(strategy="most_frequent").fit(x, y)
    classifier = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0], cv=3,
                                                                      scoring="accuracy", max_iter=2000))
    with warnings.catch_warnings():  # scikit-learn 1.9 announces changes of defaults this script does not rely on
        warnings.simplefilter("ignore", FutureWarning)
        return classifier.fit(x, y)


def chance(fit_y, test_y) -> float:
    """The share of the fitting labels' most common label among the test labels."""
    values, counts = np.unique(np.asarray(fit_y), return_counts=True)
    return float(np.mean(np.asarray(test_y) == values[counts.argmax()]))


def probe(fit_x: np.ndarray, fit_y, test_x: np.ndarray, test_y) -> tuple[float, float]:
    """(test accuracy, :func:`chance`) of a linear probe fitted on (fit_x, fit_y)."""
    return float(fit_probe(fit_x, fit_y).score(test_x, np.asarray(test_y))), chance(fit_y, test_y)


def last_place(moves, person) -> str | None:
    return next((place for who, place in reversed(moves) if who == person), None)


def in_story(story: Story, place: str) -> bool:
    return any(where == place for _, where in story.moves)


def people_probes(fit: list[Story]) -> dict[str, tuple[object, list[str]]]:
    """Per person who moved in some fitting story: a probe of their last place from the state, and the labels it
    was fitted on."""
    out = {}
    for person in PEOPLE:
        stories = [s for s in fit if last_place(s.moves, person)]
        if stories:
            labels = [last_place(s.moves, person) for s in stories]
            out[person] = fit_probe(np.stack([s.state for s in stories]), labels), labels
    return out


def probe_rows(fit: list[Story], test: list[Story], people: dict) -> list[tuple[str, int, float, float]]:
    """(probe, test items, accuracy, chance) for every probe of the module's docstring; ``people``:
    :func:`people_probes` of ``fit``."""
    rows = []
    for features in ("stops", "values"):
        for target, index in (("person", 0), ("place", 1)):
            xs = [np.concatenate([getattr(s, features) for s in stories]) for stories in (fit, test)]
            ys = [[move[index] for s in stories for move in s.moves] for stories in (fit, test)]
            name = {"stops": "token: the fact's", "values": "token's write values: the fact's"}[features]
            rows.append((f"{name} {target}", len(ys[1]), *probe(xs[0], ys[0], xs[1], ys[1])))
    # each person's last place, pooled over the people (items weighted by their count)
    hits, chances, items = 0.0, 0.0, 0
    for person, (classifier, fit_labels) in people.items():
        stories = [s for s in test if last_place(s.moves, person)]
        if stories:
            labels = [last_place(s.moves, person) for s in stories]
            hits += classifier.score(np.stack([s.state for s in stories]), labels) * len(stories)
            chances += chance(fit_labels, labels) * len(stories)
            items += len(stories)
    rows.append(("state: each person's last place", items, hits / items, chances / items))
    rows.append(("state: the story's last place", len(test),
                 *probe(np.stack([s.state for s in fit]), [s.moves[-1][1] for s in fit],
                        np.stack([s.state for s in test]), [s.moves[-1][1] for s in test])))
    places = [probe(np.stack([s.state for s in fit]), [in_story(s, place) for s in fit],
                    np.stack([s.state for s in test]), [in_story(s, place) for s in test]) for place in PLACES]
    rows.append(("state: each place in the story or not", len(test) * len(PLACES),
                 float(np.mean([accuracy for accuracy, _ in places])), float(np.mean([c for _, c in places]))))
    return rows


def asked_rows(test: list[Story], people: dict) -> list[tuple[str, int, float, float]]:
    """The model's exact match on the test questions beside the state probe of the asked person's place (``people``:
    :func:`people_probes`), over the same questions, and recency's score on them."""
    right = sum(people[s.asked][0].score(s.state[None], [last_place(s.moves, s.asked)]) for s in test)
    recency = float(np.mean([last_place(s.moves, s.asked) == s.moves[-1][1] for s in test]))
    return [("the model's answer (exact match)", len(test), float(np.mean([s.exact for s in test])), recency),
            ("state probe: the asked person's place", len(test), right / len(test), recency)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_tuned_task_arguments(parser, task="qa1")
    parser.add_argument("--distance", type=int, default=1024, help="haystack tokens")
    parser.add_argument("--fit", type=int, default=2000, help="stories to fit the probes on")
    parser.add_argument("--test", type=int, default=500, help="stories to score them on")
    parser.add_argument("--seed", type=int, default=10000)
    args = parser.parse_args()
    model, task = load_recurrent_model(args, num_questions=1)
    test = [read_story(model, task, e) for e in draw_examples(task, args.distance, args.test, args.seed)]
    fit = [read_story(model, task, e) for e in draw_examples(task, args.distance, args.fit, args.seed + 1)]
    print(f"{args.checkpoint}: qa1 {task.describe()} at {args.distance} haystack tokens; probes fitted on {args.fit} "
          f"stories (seed {args.seed + 1}), scored on {args.test} (seed {args.seed})")
    print("| probe | items | accuracy | chance (the most common label) |\n|---|---:|---:|---:|")
    people = people_probes(fit)
    for name, items, accuracy, base in probe_rows(fit, test, people):
        print(f"| {name} | {items} | {accuracy:.3f} | {base:.3f} |")
    print("\n| on the asked questions | questions | accuracy | recency (the story's last place) |")
    print("|---|---:|---:|---:|")
    for name, items, accuracy, recency in asked_rows(test, people):
        print(f"| {name} | {items} | {accuracy:.3f} | {recency:.3f} |")
    print(f"\nthe model's answer loss on them: {np.mean([s.loss for s in test]):.3f} nats per token")


if __name__ == "__main__":
    main()
