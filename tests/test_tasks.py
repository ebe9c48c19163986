"""The long-context task suite: generators (seeded, labelled, needles whole), chance levels, scoring, the commands."""

import builtins
import copy
import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch

from block_recurrent import BlockRecurrentConfig, BlockRecurrentModel, save_pretrained
from block_recurrent.cli import main
from block_recurrent.inference.diagnostics import drop_carried
from block_recurrent.inference.generation import generate
from block_recurrent.tasks import (
    TASKS, FactsTask, MQARTask, PasskeyTask, TuneConfig, collate, make_task, plot_heatmap, score, tune,
)
from block_recurrent.tasks.commands import write_tune_summary
from block_recurrent.tasks.scoring import predict
from block_recurrent.tasks.text import FILLER, TextHaystack, place_needles
from block_recurrent.training.data import ByteTokenizer

TEXT = ByteTokenizer()


def decode(tokens) -> str:
    return TEXT.decode(np.asarray(tokens).tolist())


def answer_text(example, i=0) -> str:
    a = example.answers[i]
    return decode(example.tokens[a.start : a.start + a.length])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return BlockRecurrentModel(BlockRecurrentConfig.from_name("tiny")).eval()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_examples_are_deterministic_by_seed(name):
    task = make_task(name, haystack="filler")
    first, again = task.examples(4, 300, 7), task.examples(4, 300, 7)
    other = task.examples(4, 300, 8)
    for a, b in zip(first, again):
        assert np.array_equal(a.tokens, b.tokens) and a.answers == b.answers and a.needles == b.needles
    assert any(not np.array_equal(a.tokens, c.tokens) for a, c in zip(first, other))


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("distance", [0, 37, 400])
def test_the_haystack_has_distance_tokens_and_labels_sit_on_the_answers(name, distance):
    task = make_task(name, haystack="filler")
    examples = task.examples(3, distance, 1, segment_len=None)
    for e in examples:
        needles = sum(end - start for start, end in e.needles)
        assert e.distance == distance
        assert e.answers[-1].start + e.answers[-1].length == len(e.tokens)  # the text ends with the last answer
        # the haystack is what is left before the first question: no prefix, no needle
        prefix = len(getattr(task, "prefix", []))
        assert e.answers[0].start - _question_length(task, e) - prefix - needles == distance
        for a in e.answers:
            assert a.gap >= distance * (1 - a.depth) - 1 and 0 <= a.depth <= 1
    batch = collate(examples, multiple=16)
    assert batch.inputs.shape[1] % 16 == 0 and batch.labels.shape == batch.inputs.shape
    for row, e in enumerate(examples):
        labelled = (batch.labels[row] != -100).nonzero().flatten().tolist()
        expected = [p for a in e.answers for p in range(a.start - 1, a.start - 1 + a.length)]
        assert labelled == expected
        assert batch.labels[row, labelled].tolist() == [int(e.tokens[p + 1]) for p in labelled]
        assert batch.inputs[row, : len(e.tokens) - 1].tolist() == e.tokens[:-1].tolist()
    lm = collate(examples, lm_loss=True)
    assert (lm.labels[0, : len(examples[0].tokens) - 1] != -100).all()


def _question_length(task, example) -> int:
    """Tokens of the question before the first answer."""
    first = example.answers[0]
    if isinstance(task, PasskeyTask):
        return len(task.question)
    text = decode(example.tokens[: first.start])
    marker = "\nQuestion:" if isinstance(task, FactsTask) else "\n"
    return len(text) - text.rindex(marker)


def test_answers_are_right():
    for e in PasskeyTask().examples(5, 500, 3):
        key = answer_text(e).strip()
        assert re.fullmatch(r"\d{5}", key)
        needle = decode(e.tokens[slice(*e.needles[0])])
        assert needle == f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
        assert decode(e.tokens).startswith("There is an important info hidden")
        assert decode(e.tokens).endswith(f"\nWhat is the pass key? The pass key is{answer_text(e)}")
    assert all(len(e.answers) == 1 for e in MQARTask().examples(3, 100, 0))  # one query: no answer by elimination
    for e in MQARTask(num_pairs=6, num_queries=6, key_len=1, value_len=2, separator="=").examples(5, 500, 3):
        pairs = dict(re.fullmatch(r" (\w)=(\d\d) ", decode(e.tokens[s:t])).groups() for s, t in e.needles)
        assert len(pairs) == 6 and len(e.answers) == 6
        for a in e.answers:
            key = decode(e.tokens[a.start - 2 : a.start - 1])
            assert pairs[key] == answer_text(e, e.answers.index(a))
    for kind in ("qa1", "qa2"):
        for e in FactsTask(kind=kind, haystack="filler", num_facts=8).examples(20, 300, 3):
            facts = [decode(e.tokens[s:t]).strip() for s, t in e.needles]
            question = re.search(r"Question: Where is (?:the )?(\w+)\?", decode(e.tokens)).group(1)
            assert _babi_answer(facts, question) == answer_text(e).strip()


def test_facts_ask_several_questions_each_about_someone_else():
    """num_questions asks about different people (qa1) or objects (qa2), each answered from the facts; one question
    by default, and never more than the story can answer."""
    for kind in ("qa1", "qa2"):
        task = FactsTask(kind=kind, haystack="filler", num_facts=6, num_questions=3)
        counts = []
        for e in task.examples(30, 200, 4):
            text = decode(e.tokens)
            asked = re.findall(r"\nQuestion: Where is (?:the )?(\w+)\? Answer:", text)
            assert len(asked) == len(e.answers) and len(set(asked)) == len(asked)
            facts = [decode(e.tokens[s:t]).strip() for s, t in e.needles]
            for i, name in enumerate(asked):
                assert _babi_answer(facts, name) == answer_text(e, i).strip()
            counts.append(len(asked))
        assert max(counts) == 3 and 1 <= min(counts)
        assert task.describe()["num_questions"] == 3
        assert all(len(e.answers) == 1 for e in FactsTask(kind=kind, haystack="filler", num_facts=6).examples(10, 200, 4))
    with pytest.raises(ValueError, match="num_questions"):
        FactsTask(kind="qa2", haystack="filler", num_questions=4)  # three objects


def test_facts_with_fewer_people_draw_a_cast_per_story():
    """num_people draws that many of the four for each story (every name in some story, never more in one), the
    answers still from the facts; the default draws nothing more, so a seed gives the stories it always gave."""
    for kind in ("qa1", "qa2"):
        task = FactsTask(kind=kind, haystack="filler", num_facts=6, num_questions=2, num_people=2)
        seen = set()
        for e in task.examples(40, 200, 4):
            facts = [decode(e.tokens[s:t]).strip() for s, t in e.needles]
            cast = {fact.split()[0] for fact in facts}
            assert 1 <= len(cast) <= 2
            seen |= cast
            asked = re.findall(r"\nQuestion: Where is (?:the )?(\w+)\? Answer:", decode(e.tokens))
            for i, name in enumerate(asked):
                assert _babi_answer(facts, name) == answer_text(e, i).strip()
        assert seen == {"Mary", "John", "Daniel", "Sandra"}
        assert task.describe()["num_people"] == 2
        default = FactsTask(kind=kind, haystack="filler", num_facts=6)
        assert "num_people" not in default.describe()
        four = FactsTask(kind=kind, haystack="filler", num_facts=6, num_people=4)
        assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(default.examples(5, 200, 4),
                                                                       four.examples(5, 200, 4)))
    with pytest.raises(ValueError, match="num_people"):
        FactsTask(haystack="filler", num_people=5)


def test_hidden_answers_never_reach_the_input():
    """MQAR with hidden answers: every answer digit is labelled and shown as "?" in the input, so no query reads an
    earlier answer (no elimination); the rest of the input is the text as it is."""
    task = MQARTask(num_pairs=5, num_queries=5, key_len=1, value_len=2, hidden_answers=True, separator="=")
    examples = task.examples(4, 300, 3)
    for lm_loss in (False, True):
        batch = collate(examples, multiple=16, lm_loss=lm_loss)
        for row, e in enumerate(examples):
            # input position p shows token p; the text's last token is never an input
            answered = [p for a in e.answers for p in range(a.start, a.start + a.length) if p < len(e.tokens) - 1]
            inputs = batch.inputs[row]
            assert decode(inputs[answered]) == "?" * len(answered)
            kept = [p for p in range(len(e.tokens) - 1) if p not in answered]
            assert inputs[kept].tolist() == e.tokens[kept].tolist()
            queries = decode(inputs[e.answers[0].start - 4 : len(e.tokens) - 1])
            assert re.fullmatch(r"\n( \w=\?\?){4} \w=\?", queries)  # no digit after the haystack
            for a in e.answers:  # labels: the true digits at the positions that predict them
                span = slice(a.start - 1, a.start - 1 + a.length)
                assert batch.labels[row, span].tolist() == e.tokens[a.start : a.start + a.length].tolist()
                assert re.fullmatch(r"\d\d", answer_text(e, e.answers.index(a)))
    visible = MQARTask(num_pairs=5, num_queries=5, key_len=1, value_len=2, separator="=").examples(4, 300, 3)
    assert [e.tokens.tolist() for e in visible] == [e.tokens.tolist() for e in examples]  # the same text
    assert task.describe()["hidden_answers"] and not MQARTask().describe()["hidden_answers"]
    with pytest.raises(TypeError, match="hidden_answers"):
        MQARTask(hidden_answers=1)


def test_mqar_separator_stands_between_key_and_value():
    """separator="" (the default) writes the value right after its key (" k7 ", asked " k"), as Zoology lays its
    pairs out; another separator stands between them."""
    for separator in ("", "=", ":"):
        task = MQARTask(num_pairs=4, num_queries=4, key_len=1, separator=separator)
        for e in task.examples(3, 100, 5):
            pairs = dict(re.fullmatch(rf" (\w){re.escape(separator)}(\d) ", decode(e.tokens[s:t])).groups()
                         for s, t in e.needles)
            for i, a in enumerate(e.answers):
                key = decode(e.tokens[a.start - 1 - len(separator) : a.start - len(separator)])
                assert decode(e.tokens[a.start - len(separator) : a.start]) == separator
                assert pairs[key] == answer_text(e, i)
        assert task.describe()["separator"] == separator
    assert MQARTask().separator == ""
    for bad in ("a", " ", "\n"):
        with pytest.raises(ValueError, match="separator"):
            MQARTask(separator=bad)


def _babi_answer(facts, asked):
    """Where ``asked`` (a person or an object) is after ``facts``, by a reading independent of the generator."""
    place, holder, left = {}, {}, {}
    for fact in facts:
        words = fact.rstrip(".").split()
        person, thing = words[0], words[-1]
        if words[-1] == "there":
            holder[words[-2]] = person
            left.pop(words[-2], None)
        elif words[-2] == "the" and thing in ("football", "apple", "milk"):
            left[thing] = place[person]
            holder.pop(thing, None)
        else:
            place[person] = thing
    if asked in holder:
        return place[holder[asked]]
    return left.get(asked, place.get(asked))


def _crossing(e, segment_len) -> int:
    """Needles of e that a multiple of segment_len cuts (one longer than a segment: not starting at one)."""
    return sum(s // segment_len != (t - 1) // segment_len if t - s <= segment_len else s % segment_len != 0
               for s, t in e.needles)


def test_a_needle_is_never_cut_by_a_segment_boundary_unless_asked():
    for name in sorted(TASKS):
        task = make_task(name, haystack="filler")
        for segment_len in (8, 16, 64):
            for e in task.examples(30, 300, 5, segment_len=segment_len):
                assert _crossing(e, segment_len) == e.cut  # every needle whole, but those the example reports
                assert e.cut == 0 or name != "passkey"
        cut = [_crossing(e, 16) for e in task.examples(30, 300, 5, segment_len=None)]
        assert sum(cut) > 0  # without a segment length, needles land anywhere
    # a haystack too short to move a needle clear of a boundary leaves it cut, and says so
    assert place_needles([0], [10], 3, 4, segment_len=8) == ([0], 1)  # a long needle: the next boundary is too far
    assert place_needles([0], [10], 3, 5, segment_len=8) == ([5], 0)
    assert place_needles([2], [4], 0, 9, segment_len=8) == ([2], 0)  # inside a segment: left where it is
    assert place_needles([6], [4], 0, 9, segment_len=8) == ([4], 0)  # across one: moved back, ending at it


def test_depth_places_the_passkey():
    task = PasskeyTask(preamble=False)
    for depth in (0.0, 0.3, 1.0):
        e = task.example(1000, 0, depth=depth, segment_len=None)
        assert e.answers[0].depth == depth and e.needles[0][0] == round(depth * 1000)
        aligned = task.example(1000, 0, depth=depth, segment_len=16)
        assert abs(aligned.answers[0].depth - depth) <= 16 / 1000
    with pytest.raises(ValueError, match="depth"):
        task.example(100, 0, depth=1.5)
    with pytest.raises(ValueError, match="spreads its needles"):
        MQARTask().example(100, 0, depth=0.5)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="num_pairs"):
        MQARTask(num_pairs=27, key_len=1)
    with pytest.raises(ValueError, match="digits"):
        PasskeyTask(digits=0)
    with pytest.raises(ValueError, match="kind"):
        FactsTask(kind="qa9", haystack="filler")
    with pytest.raises(ValueError, match="distance"):
        PasskeyTask().example(-1, 0)
    with pytest.raises(ValueError, match="haystack"):
        PasskeyTask(haystack="news")
    with pytest.raises(ValueError, match="task must be one of"):
        make_task("needle")
    with pytest.raises(ValueError, match="segment_len"):
        PasskeyTask().example(10, 0, segment_len=0)
    with pytest.raises(ValueError, match="max_distance"):
        TuneConfig(min_distance=10, max_distance=5)
    with pytest.raises(ValueError, match="curriculum_loss=0.5 paces a curriculum; set curriculum_steps"):
        TuneConfig(curriculum_loss=0.5)
    with pytest.raises(ValueError, match="curriculum_loss"):
        TuneConfig(curriculum_loss=-1.0, curriculum_steps=10)


def test_tokenizer_aware(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([FILLER * 20, "The pass key is 12345. Remember it."], trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    from block_recurrent.training.data import load_tokenizer

    subword = load_tokenizer(path)
    task = PasskeyTask(subword)
    e = task.example(200, 0, segment_len=16)
    assert len(task.haystack.take(200, np.random.default_rng(0))) == 200  # distance counts tokens, not bytes
    key = re.search(r"pass key is (\d+)\.", subword.decode(e.tokens.tolist())).group(1)
    a = e.answers[0]
    assert subword.decode(e.tokens[a.start : a.start + a.length].tolist()).strip() == key


def test_corpus_haystack_is_text_windows():
    task = FactsTask(kind="qa1", haystack=TextHaystack(TEXT, ["alpha beta gamma " * 50, "delta " * 80]))
    e = task.example(120, 0)
    assert e.distance == 120 and "Question: Where is" in decode(e.tokens)
    with pytest.raises(ValueError, match="longer than the haystack"):
        task.example(10_000, 0)


@pytest.mark.parametrize("name", ["mqar", "qa1", "qa2"])
def test_chance_is_what_a_guesser_gets(name):
    """The computed chance equals the rate at which an answer from another example (a uniform guess of the
    format's answers) matches."""
    task = make_task(name, haystack="filler", **({"key_len": 1, "num_pairs": 2} if name == "mqar" else {}))
    a, b = task.examples(1500, 0, 1), task.examples(1500, 0, 2)
    hits = [answer_text(x, i) == answer_text(y, i) for x, y in zip(a, b) for i in range(len(x.answers))]
    n = len(hits)
    assert abs(np.mean(hits) - task.chance) < 4 * math.sqrt(task.chance * (1 - task.chance) / n)
    assert PasskeyTask(digits=3).chance == 1e-3


@pytest.mark.parametrize("name", sorted(TASKS))
def test_an_untrained_model_scores_at_most_chance(tiny, name):
    task = make_task(name, haystack="filler")
    scores = score(tiny, task, [0, 100], samples=24, batch_size=12)
    n = scores.total.sum()
    assert n == 24 * 2 * len(task.examples(1, 0, 0)[0].answers)
    bound = task.chance + 3 * math.sqrt(task.chance * (1 - task.chance) / n) + 1 / n
    assert scores.correct.sum() / n <= bound
    assert all(loss > 0 for *_, loss in scores.by_distance())
    # a passkey example sits at each depth in turn; a spread task's answers fall in the nearest depth's row
    if task.fixed_depth:
        assert (scores.total == 24 // 5 + (np.arange(5) < 24 % 5)[:, None]).all()


def test_teacher_forced_exact_match_is_greedy_decoding(tiny):
    task = MQARTask(num_pairs=1, value_len=3)
    examples = task.examples(4, 40, 0)
    batch = collate(examples)
    ids, _ = predict(tiny, batch)
    for row, e in enumerate(examples):
        a = e.answers[0]
        prompt = torch.from_numpy(e.tokens[: a.start])[None]
        greedy = generate(tiny, prompt, a.length, temperature=0)[0]
        forced = ids[row, a.start - 1 : a.start - 1 + a.length]
        truth = torch.from_numpy(e.tokens[a.start : a.start + a.length])
        assert greedy[0] == forced[0]
        assert torch.equal(greedy, truth) == torch.equal(forced, truth)


def test_scoring_is_the_same_in_any_chunks_and_batches(tiny):
    task = PasskeyTask(digits=2)
    one = score(tiny, task, [50, 200], samples=6, batch_size=6, chunk_tokens=1024)
    other = score(tiny, task, [50, 200], samples=6, batch_size=4, chunk_tokens=32)
    assert (one.correct == other.correct).all() and np.allclose(one.loss_sum, other.loss_sum, rtol=1e-4)


@pytest.mark.parametrize("drop", ["state", "memory", "both"])
def test_scoring_with_what_is_carried_dropped_equals_dropping_it_by_hand(tiny, drop):
    """score(drop=...) runs one block at a time and hands the next block the state with ``drop`` removed: the
    same as doing it by hand (float64, so no rounding can hide a difference); and dropping changes the answers'
    losses, so the carried state and memory do reach them."""
    model = copy.deepcopy(tiny).double()
    W = model.config.block_width
    batch = collate(MQARTask(num_pairs=2, value_len=2).examples(3, 5 * W, 4))
    ids, losses = predict(model, batch, drop=drop)
    state, by_hand = None, []
    with torch.inference_mode():
        for begin in range(0, batch.inputs.shape[1], W):
            logits, state = model.run(batch.inputs[:, begin : begin + W], state)
            by_hand.append(model.loss(logits, batch.labels[:, begin : begin + W], reduction="none")
                           .view(logits.shape[:2]))
            state = drop_carried(state, drop)
    scored = batch.labels != model.config.ignore_index
    torch.testing.assert_close(losses, torch.cat(by_hand, dim=1).where(scored, 0.0).float(), rtol=0, atol=0)
    _, carried = predict(model, batch)
    assert not torch.allclose(losses, carried)
    ablated = score(model, PasskeyTask(digits=2), [40], samples=2, drop=drop)
    assert ablated.drop == drop and ablated.to_dict()["drop"] == drop
    with pytest.raises(ValueError, match="drop must be one of"):
        score(model, PasskeyTask(digits=2), [40], samples=2, drop="gate")


def test_dropping_the_state_of_a_model_without_one_changes_nothing():
    """XL (no recurrent layer) carries only its memory: dropping the state is exactly the carried score."""
    torch.manual_seed(0)
    xl = BlockRecurrentModel(BlockRecurrentConfig.from_name("tiny", recurrent_layers=())).double().eval()
    batch = collate(PasskeyTask(digits=2).examples(2, 60, 3))
    ids, losses = predict(xl, batch, drop="state")
    carried_ids, carried = predict(xl, batch)
    assert torch.equal(ids, carried_ids) and torch.equal(losses, carried)


def test_tune_lowers_the_answer_loss(tiny):
    torch.manual_seed(1)
    model = BlockRecurrentModel(BlockRecurrentConfig.from_name("tiny"))
    task = MQARTask(num_pairs=1, key_len=1)
    config = TuneConfig(max_steps=30, batch_size=8, lr=3e-3, warmup_steps=2, max_distance=0, log_every=10)
    records = tune(model, task, config)
    assert [r["step"] for r in records] == [10, 20, 30]
    assert records[-1]["loss"] < records[0]["loss"] and not model.training
    # segments of one block, back-propagated one at a time: the write is replayed so that it trains (as brt train's
    # mini preset does); it runs, and the state cells get a gradient
    one_block = BlockRecurrentModel(BlockRecurrentConfig.from_name("tiny", max_seq_len=32))
    before = [p.detach().clone() for p in one_block.cells[0].parameters()]
    tune(one_block, task, TuneConfig(max_steps=2, batch_size=2, max_distance=80, backward_every=1, warmup_steps=0))
    assert any(not torch.equal(a, b) for a, b in zip(before, one_block.cells[0].parameters()))


def test_curriculum_paced_by_the_loss_waits_for_it():
    """With curriculum_loss the largest distance moves only on steps whose recent mean loss is low enough: never
    for a bar no loss meets, every step after the first window for a bar every loss meets, as the plain schedule."""
    task = MQARTask(num_pairs=1, key_len=1)
    settings = dict(max_steps=30, batch_size=2, warmup_steps=0, min_distance=4, max_distance=100, curriculum_steps=25,
                    log_every=1)

    def largest(**changes):
        torch.manual_seed(0)
        model = BlockRecurrentModel(BlockRecurrentConfig.from_name("tiny"))
        return [r["largest"] for r in tune(model, task, TuneConfig(**settings, **changes))]

    assert largest(curriculum_loss=1e-9) == [4] * 30  # the loss of an untrained model is far above
    scheduled = largest()
    assert scheduled == [TuneConfig(**settings).largest_distance(step) for step in range(30)]
    # a bar every loss meets: the curriculum starts once 20 losses are in, then moves every step
    assert largest(curriculum_loss=1e9) == [4] * 20 + scheduled[1:11]


def test_a_resumed_tune_equals_an_unbroken_one(monkeypatch):
    """tune stopped after a save and resumed from it (weights, optimiser state and progress through their files'
    forms: safetensors-able tensors and JSON) ends with the unbroken run's weights and records, with a curriculum
    paced by the loss and a log window open at the save, so that every part of the progress matters."""
    from block_recurrent.persistence.optimizer_state import optimizer_to_tensors
    from block_recurrent.tasks.tuning import TuneProgress

    from block_recurrent.tasks import tuning

    monkeypatch.setattr(tuning, "CURRICULUM_WINDOW", 2)  # so that the paced curriculum moves within the run
    task = MQARTask(num_pairs=1, key_len=1)
    config = TuneConfig(max_steps=7, batch_size=2, warmup_steps=2, min_distance=4, max_distance=90,
                        curriculum_steps=6, curriculum_loss=1e9, log_every=3, lr=3e-3)
    saves = {}

    def save(progress, optimizer):
        tensors, info = optimizer_to_tensors(optimizer)
        saves[progress.step] = (json.loads(json.dumps(progress.to_dict())), copy.deepcopy(model.state_dict()),
                                {"tensors": copy.deepcopy(tensors), "json": json.loads(json.dumps(info))})

    torch.manual_seed(0)
    model = BlockRecurrentModel(BlockRecurrentConfig.from_name("tiny"))
    start = copy.deepcopy(model.state_dict())
    unbroken = tune(model, task, config, save=save, save_every=2)
    assert sorted(saves) == [2, 4, 6]  # never after the last step: the caller saves the tuned model
    final = copy.deepcopy(model.state_dict())
    progress, weights, optimizer = saves[4]
    assert progress["window"] and progress["records"] and progress["step"] == 4 and progress["paced"] == 3
    model.load_state_dict(weights)
    resumed = tune(model, task, config, resume=TuneProgress.from_dict(progress), optimizer_state=optimizer)
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in unbroken]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed] == strip
    assert any(not torch.equal(start[k], v) for k, v in final.items())
    # from the start instead, or with the progress of another step than the weights': not the same run
    model.load_state_dict(weights)
    tune(model, task, config, resume=TuneProgress.from_dict(saves[2][0]), optimizer_state=optimizer)
    assert any(not torch.equal(final[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="resume and optimizer_state go together"):
        tune(model, task, config, resume=TuneProgress.from_dict(progress))
    with pytest.raises(ValueError, match=r"progress is at step 4; a run of max_steps=4"):
        tune(model, task, dataclasses.replace(config, max_steps=4), resume=TuneProgress.from_dict(progress),
             optimizer_state=optimizer)
    with pytest.raises(ValueError, match="save_every=2 needs a save function"):
        tune(model, task, config, save_every=2)
    with pytest.raises(ValueError, match="progress record is malformed"):
        TuneProgress.from_dict({**progress, "window": [[1.0]]})


def test_brt_tune_stopped_and_resumed(tiny, tmp_path, monkeypatch, capsys):
    """brt tune --save-every leaves checkpoints that a stopped run goes on from with --resume: the same tuned model
    and log as the run that never stopped; a changed setting, a missing --resume or a --resume with nothing to
    resume from is a one-line error; the finished folder holds the tuned model only."""
    import block_recurrent.persistence.checkpoint as checkpoint

    init = tmp_path / "init"
    save_pretrained(tiny, init)
    args = ["tune", "--task", "mqar", "--checkpoint", str(init), "--max-steps", "5", "--batch-size", "2",
            "--max-distance", "40", "--curriculum-steps", "4", "--log-every", "2", "--save-every", "2",
            "--task-option", "num_pairs=1"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main([*args, "--out-dir", str(whole)]) == 0
    assert sorted(p.name for p in whole.iterdir() if p.is_dir()) == []  # the checkpoints replaced by the model

    class Stop(Exception):
        pass

    def stop(*_, **__):
        raise Stop

    with monkeypatch.context() as patch:  # killed after the last step, before the tuned model is written
        patch.setattr(checkpoint, "save_pretrained", stop)
        with pytest.raises(Stop):
            main([*args, "--out-dir", str(stopped)])
    assert [p.name for p in stopped.iterdir()] == ["step-00000004"]
    assert checkpoint.from_pretrained(stopped).config == tiny.config  # brt eval reads a stopped run's newest
    capsys.readouterr()
    assert main([*args, "--out-dir", str(stopped)]) == 2
    assert main([*args, "--out-dir", str(stopped), "--resume", "--lr", "2e-3"]) == 2
    assert main([*args, "--out-dir", str(stopped), "--resume", "--task-option", "num_pairs=2"]) == 2
    assert main([*args, "--out-dir", str(tmp_path / "new"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds a stopped brt tune (newest checkpoint: step-00000004): add --resume" in err
    assert "not the stopped run's settings (lr)" in err and "not the stopped run's task (num_pairs)" in err
    assert "holds no checkpoint of a stopped brt tune" in err
    assert main([*args, "--out-dir", str(stopped), "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out and not (stopped / "step-00000004").exists()
    a, b = checkpoint.from_pretrained(whole), checkpoint.from_pretrained(stopped)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    logs = [json.loads((folder / "tune.json").read_text())["log"] for folder in (whole, stopped)]
    assert [[r["loss"] for r in log] for log in logs[1:]] == [[r["loss"] for r in logs[0]]]
    assert [r["step"] for r in logs[1]] == [2, 4, 5]


def test_heatmap_without_matplotlib(tiny, tmp_path, monkeypatch):
    scores = score(tiny, PasskeyTask(digits=1), [10, 20], depths=[0, 1], samples=2)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.warns(UserWarning, match="matplotlib"):
        assert plot_heatmap(scores, tmp_path / "h.png") is None
    assert not (tmp_path / "h.png").exists()


def test_commands_end_to_end(tiny, tmp_path, capsys):
    init, tuned = tmp_path / "init", tmp_path / "tuned"
    save_pretrained(tiny, init)
    assert main(["tune", "--task", "passkey", "--checkpoint", str(init), "--out-dir", str(tuned), "--max-steps", "2",
                 "--batch-size", "2", "--max-distance", "40", "--log-every", "1", "--task-option", "digits=3"]) == 0
    out = capsys.readouterr().out
    assert "step 2: loss" in out and json.loads((tuned / "tune.json").read_text())["task"]["digits"] == 3
    heatmap, scores = tmp_path / "passkey.png", tmp_path / "scores.json"
    assert main(["eval", "--task", "passkey", "--checkpoint", str(tuned), "--distances", "0", "100", "--samples", "4",
                 "--depths", "0", "1", "--heatmap", str(heatmap), "--json", str(scores)]) == 0
    out = capsys.readouterr().out
    assert "| distance | exact match |" in out and "| 100 |" in out
    assert "passkey as tuned" in out and "digits=3" in out
    result = json.loads(scores.read_text())
    assert result["distances"] == [0, 100] and result["task"]["digits"] == 3  # scored on the text it was tuned on
    assert main(["eval", "--task", "passkey", "--checkpoint", str(tuned), "--distances", "0", "--samples", "1",
                 "--task-option", "digits=4", "--haystack", "corpus", "--json", str(scores)]) == 0
    assert json.loads(scores.read_text())["task"] == {"task": "passkey", "haystack": "corpus", "digits": 4,
                                                      "preamble": True}
    capsys.readouterr()
    assert main(["eval", "--task", "mqar", "--checkpoint", str(tuned), "--distances", "0", "--samples", "1",
                 "--json", str(scores)]) == 0  # another task: its own defaults
    assert json.loads(scores.read_text())["task"]["separator"] == ""
    assert "as tuned" not in capsys.readouterr().out
    # tuning a tuned model again goes on with the task as it was tuned
    again = tmp_path / "again"
    assert main(["tune", "--task", "passkey", "--checkpoint", str(tuned), "--out-dir", str(again), "--max-steps", "1",
                 "--batch-size", "2", "--max-distance", "40"]) == 0
    assert "passkey as tuned" in capsys.readouterr().out
    assert json.loads((again / "tune.json").read_text())["task"]["digits"] == 3
    # a summary whose task scored differs from the one trained on (experiments/long_context_tasks.py --save): brt tune
    # goes on with the trained one, brt eval scores the other
    write_tune_summary(again, PasskeyTask(digits=3).describe(), train_task=PasskeyTask(digits=4).describe())
    assert main(["tune", "--task", "passkey", "--checkpoint", str(again), "--out-dir", str(tmp_path / "third"),
                 "--max-steps", "1", "--batch-size", "2", "--max-distance", "40"]) == 0
    assert json.loads((tmp_path / "third" / "tune.json").read_text())["task"]["digits"] == 4
    assert main(["eval", "--task", "passkey", "--checkpoint", str(again), "--distances", "0", "--samples", "1",
                 "--json", str(scores)]) == 0
    assert json.loads(scores.read_text())["task"]["digits"] == 3
    capsys.readouterr()
    (tuned / "tune.json").write_text("{not json")
    assert main(["eval", "--task", "passkey", "--checkpoint", str(tuned), "--distances", "0", "--samples", "1"]) == 2
    assert "is not a brt tune summary" in capsys.readouterr().err
    pytest.importorskip("matplotlib")
    assert heatmap.read_bytes()[:4] == b"\x89PNG"
    # a folder holding something else is never overwritten; a bad option is one line
    assert main(["tune", "--task", "mqar", "--checkpoint", str(init), "--out-dir", str(init)]) == 2
    assert main(["eval", "--task", "mqar", "--checkpoint", str(init), "--task-option", "pairs=3"]) == 2
    err = capsys.readouterr().err
    assert "holds something other than" in err and "unexpected keyword argument 'pairs'" in err


def test_eval_task_ablations(tiny, tmp_path, capsys):
    """brt eval --task --ablate: the carried scores, then each drop's on the same examples, side by side; the JSON
    keeps the carried scores and adds the ablations'."""
    save_pretrained(tiny, tmp_path / "model")
    scores = tmp_path / "scores.json"
    args = ["eval", "--task", "passkey", "--checkpoint", str(tmp_path / "model"), "--distances", "0", "60",
            "--samples", "2", "--json", str(scores)]
    assert main([*args, "--ablate", "state", "both"]) == 0
    out = capsys.readouterr().out
    assert "state dropped after every block:" in out and "both dropped after every block:" in out
    assert "| distance | carried | state dropped | both dropped |" in out and "| 60 |" in out
    result = json.loads(scores.read_text())
    assert result["drop"] is None and sorted(result["ablations"]) == ["both", "state"]
    assert result["ablations"]["state"]["drop"] == "state" and result["ablations"]["both"]["distances"] == [0, 60]
    assert main(args) == 0 and "ablations" not in json.loads(scores.read_text())
    capsys.readouterr()
    assert main([*args, "--positions"]) == 2
    assert "--positions scores documents" in capsys.readouterr().err


def test_tune_trains_a_fresh_preset_from_scratch(tmp_path, capsys):
    """brt tune --preset: the model a recipe starts from is the preset with --model-option changes, seeded."""
    from block_recurrent.persistence.checkpoint import from_pretrained

    args = ["tune", "--task", "passkey", "--preset", "tiny", "--model-option", "block_width=16",
            "--model-option", "max_seq_len=32", "--max-steps", "1", "--batch-size", "2", "--max-distance", "20",
            "--task-option", "digits=2", "--task-option", "preamble=false"]
    assert main([*args, "--out-dir", str(tmp_path / "a")]) == 0
    assert main([*args, "--out-dir", str(tmp_path / "b")]) == 0
    a, b = from_pretrained(tmp_path / "a"), from_pretrained(tmp_path / "b")
    assert a.config == BlockRecurrentConfig.from_name("tiny", block_width=16, max_seq_len=32)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    summary = json.loads((tmp_path / "a" / "tune.json").read_text())
    assert summary["preset"] == "tiny" and summary["model_options"] == {"block_width": 16, "max_seq_len": 32}
    capsys.readouterr()
    assert main(["tune", "--task", "passkey", "--checkpoint", str(tmp_path / "a"), "--model-option", "dim=8",
                 "--out-dir", str(tmp_path / "c")]) == 2
    assert main(["tune", "--task", "passkey", "--preset", "tiny", "--model-option", "block_width=5",
                 "--out-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "give it with --preset" in err and "max_seq_len (64) must be a multiple of block_width (5)" in err


def test_the_experiment_script_runs_on_tiny_settings(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "long_context_tasks.py"
    out = subprocess.run(
        [sys.executable, str(script), "--preset", "tiny", "--task", "passkey", "--task-option", "digits=2",
         "--seeds", "1", "--steps", "2", "--batch-size", "2", "--train-distances", "0", "20", "--distances", "10",
         "--samples", "2", "--jobs", "1", "--out", str(tmp_path), "--save"],
        capture_output=True, text=True, check=True, timeout=120).stdout
    assert "rec seed 0" in out and "xl seed 0" in out and (tmp_path / "results.json").exists()
    from block_recurrent.persistence.checkpoint import load_pretrained

    xl, _ = load_pretrained(tmp_path / "models" / "xl-seed0")  # --save keeps each model, to score again later
    assert xl.config.recurrent_layers == () and xl.config.dim == BlockRecurrentConfig.from_name("tiny").dim
    from block_recurrent.tasks.commands import tuned_task

    assert tuned_task(tmp_path / "models" / "xl-seed0", "passkey") == {"haystack": "filler", "digits": 2,
                                                                        "preamble": True}  # brt eval scores it so
    assert "rec seed 0: step 2 loss" in out  # progress while it trains
    # --train-task-option reaches the training task only
    failed = subprocess.run(
        [sys.executable, str(script), "--preset", "tiny", "--task", "passkey", "--train-task-option", "digits=0",
         "--models", "rec", "--seeds", "1", "--steps", "1", "--jobs", "1", "--out", str(tmp_path / "bad")],
        capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and "digits" in failed.stderr


def test_task_seeds_take_the_range_every_command_takes():
    from block_recurrent.tasks.tuning import TuneConfig

    TuneConfig(seed=2**63 - 1)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 9223372036854775807\]"):
        TuneConfig(seed=2**63)
