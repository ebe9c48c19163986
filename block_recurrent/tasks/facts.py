"""bAbI facts hidden in long text, as BABILong does it (Kuratov et al. 2024, arXiv 2406.10149), from templates.

- ``qa1`` (single supporting fact): people move between places ("Mary went to the kitchen."); the question asks
  where one of them is; the answer is the place of their last move.
- ``qa2`` (two supporting facts): people also pick up and drop objects ("John got the football there."); the
  question asks where an object is: the place of its holder's last move (or where it was dropped), so the
  answer needs both the pick-up (or drop) and the move.

The facts are spread over the haystack (by default the built-in corpus's text) at uniform depths; the question
follows it ("\\nQuestion: Where is Mary? Answer:") and the answer is one word (" kitchen"), scored by exact match of
its tokens. Chance is one in the number of places. Each answer reports the depth of the earliest fact it needs.

One question per example, as in bAbI and BABILong. ``num_questions`` asks up to that many, each about a different
person (qa1) or object (qa2) whose place is known, one after the other ("... Answer: kitchen\\nQuestion: Where is
John? Answer: garden"): more answers to learn from per example, and answering with the place of the story's last
fact (recency, 0.49 exact match on qa1 with four facts) is right for at most one of them.
"""

from __future__ import annotations

import numpy as np

from ..model.checks import check_choice, check_int
from .text import Example, Query, TextTask, compose, spread_offsets

PEOPLE = ("Mary", "John", "Daniel", "Sandra")
PLACES = ("bathroom", "hallway", "garden", "office", "kitchen", "bedroom")
OBJECTS = ("football", "apple", "milk")
MOVES = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
PICKS = ("picked up", "grabbed", "got", "took")
DROPS = ("dropped", "discarded", "put down", "left")
NO_PREFIX = np.zeros(0, dtype=np.int64)


# a story: its facts, and per question that can be asked (question, answer, indices of the facts the answer needs)
Story = tuple[list[str], list[tuple[str, str, tuple[int, ...]]]]


def single_fact_story(num_facts: int, rng: np.random.Generator, people: tuple[str, ...] = PEOPLE) -> Story:
    """qa1: every person who moved can be asked where they are."""
    facts, last_move = [], {}
    for i in range(num_facts):
        person, place = people[rng.integers(len(people))], PLACES[rng.integers(len(PLACES))]
        facts.append(f"{person} {MOVES[rng.integers(len(MOVES))]} the {place}.")
        last_move[person] = (i, place)
    return facts, [(f"Where is {person}?", place, (index,)) for person, (index, place) in sorted(last_move.items())]


def two_fact_story(num_facts: int, rng: np.random.Generator, people: tuple[str, ...] = PEOPLE) -> Story:
    """qa2: every object whose place is known can be asked about. Draws stories until there is one (at least one
    pick-up happened)."""
    while True:
        # moved: person -> (fact, place); holder: object -> (person, fact); dropped: object -> (fact, move, place)
        facts, moved, holder, dropped = [], {}, {}, {}
        for i in range(num_facts):
            free = [o for o in OBJECTS if o not in holder]
            placed = [p for p in people if p in moved]
            # a pick-up needs a placed person and a free object; where none is possible the fact is a move
            kind = rng.choice(["move", "pick", "drop"], p=[0.5, 0.3, 0.2])
            if kind == "pick" and free and placed:
                person, thing = placed[rng.integers(len(placed))], free[rng.integers(len(free))]
                facts.append(f"{person} {PICKS[rng.integers(len(PICKS))]} the {thing} there.")
                holder[thing] = (person, i)
                dropped.pop(thing, None)
            elif kind == "drop" and holder:
                thing = sorted(holder)[rng.integers(len(holder))]
                person, _ = holder.pop(thing)
                facts.append(f"{person} {DROPS[rng.integers(len(DROPS))]} the {thing}.")
                dropped[thing] = (i, *moved[person])  # (drop fact, the move that placed the person, place)
            else:
                person, place = people[rng.integers(len(people))], PLACES[rng.integers(len(PLACES))]
                facts.append(f"{person} {MOVES[rng.integers(len(MOVES))]} the {place}.")
                moved[person] = (i, place)
        # an object's place: its holder's latest move, or where it was dropped (the holder's place then)
        known = {thing: (moved[person][1], (fact, moved[person][0])) for thing, (person, fact) in holder.items()}
        known.update({thing: (place, (drop, move)) for thing, (drop, move, place) in dropped.items()})
        if known:
            return facts, [(f"Where is the {thing}?", place, tuple(sorted(supports)))
                           for thing, (place, supports) in sorted(known.items())]


STORIES = {"qa1": single_fact_story, "qa2": two_fact_story}


class FactsTask(TextTask):
    """``num_facts`` bAbI statements of ``kind`` (qa1 or qa2) hidden in the haystack, then ``num_questions`` questions
    (fewer where fewer can be asked: a story where only two people moved has two). ``num_people`` below the four of
    bAbI draws that many of them for each story (an easier story: fewer pairs to keep apart)."""

    default_haystack = "corpus"

    def __init__(self, tokenizer=None, haystack=None, split: str = "validation", *, kind: str = "qa1",
                 num_facts: int = 4, num_questions: int = 1, num_people: int = len(PEOPLE)):
        check_choice("kind", kind, STORIES)
        check_int("num_facts", num_facts, 1 if kind == "qa1" else 2, 64)
        check_int("num_questions", num_questions, 1, len(PEOPLE) if kind == "qa1" else len(OBJECTS))
        check_int("num_people", num_people, 1, len(PEOPLE))
        super().__init__(tokenizer, haystack, split)
        self.kind, self.num_facts, self.num_questions, self.num_people = kind, num_facts, num_questions, num_people
        self.name = kind

    @property
    def chance(self) -> float:
        return 1.0 / len(PLACES)

    def _example(self, distance, rng, depth, segment_len) -> Example:
        people = PEOPLE
        if self.num_people < len(PEOPLE):  # (with all four no draw: a seed gives the stories it always gave)
            people = tuple(PEOPLE[i] for i in sorted(rng.choice(len(PEOPLE), self.num_people, replace=False)))
        facts, askable = STORIES[self.kind](self.num_facts, rng, people)
        # one question: the draw the generator has always made, so that a seed gives the examples it always gave
        if self.num_questions == 1:
            asked = [int(rng.integers(len(askable)))]
        else:
            asked = rng.permutation(len(askable))[: self.num_questions]
        # spaces around each fact: it never fuses with the haystack's words
        needles = [self.encode(f" {fact} ") for fact in facts]
        offsets = spread_offsets(len(needles), distance, rng)
        haystack = self.haystack.take(distance, rng)
        queries = [Query(self.encode(f"\nQuestion: {question} Answer:"), self.encode(" " + answer), supports)
                   for question, answer, supports in (askable[i] for i in asked)]
        return compose(NO_PREFIX, haystack, needles, offsets, queries, segment_len)

    def describe(self) -> dict:
        described = {**super().describe(), "num_facts": self.num_facts, "num_questions": self.num_questions}
        if self.num_people < len(PEOPLE):  # (absent at the default: the records of earlier runs stay as they were)
            described["num_people"] = self.num_people
        return described
