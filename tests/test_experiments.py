"""Every research script in experiments/ and the benchmarks' reference environment helper run end to end on tiny
settings, a few seconds each: the commands in docs/experiments/ keep working. What the scripts measured is in the
record, not checked here."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(folder: str, name: str):
    """A script as a module, its folder on sys.path first (the scripts import their siblings: harness,
    reference_env), as when it runs as ``python FOLDER/NAME.py``."""
    if str(ROOT / folder) not in sys.path:
        sys.path.insert(0, str(ROOT / folder))
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def experiment(name: str):
    return load_script("experiments", name)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Six small Python files instead of the built-in corpus (loading the standard library takes seconds)."""
    data = tmp_path_factory.mktemp("data")
    for i in range(6):
        (data / f"doc{i}.py").write_text("".join(f"def f{j}(x):\n    return x + {i * j}\n" for j in range(40)))
    return data


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]


def test_recall_distance(capsys):
    experiment("recall_distance").main(["--distances", "2", "3", "--seeds", "1", "--first-seed", "4", "--steps", "2",
                                        "--jobs", "1", "--set", 'gate="lstm"', "--set", "gate_keep_init=3.0",
                                        "--cell-lr-scale", "0.1", "--cell-parts", "gate", "to_update"])
    out = capsys.readouterr().out
    assert "gate=lstm, gate_keep_init=3.0, state cells (gate, to_update only) at 0.1x" in out
    assert [row.split(" | ")[0] for row in table_rows(out)[1:]] == ["| 2", "| 3"]


def test_gate_projection(capsys):
    experiment("gate_projection").main(["--seeds", "1", "--steps", "2", "--jobs", "1"])
    rows = table_rows(capsys.readouterr().out)[1:]
    assert len(rows) == 2 and "gate_projection=True" in rows[0] and "gate_projection=False" in rows[1]


def test_gate_init(capsys):
    experiment("gate_init").main(["--inits", "default", "2.0", "--seeds", "1", "--steps", "2"])
    rows = table_rows(capsys.readouterr().out)[1:]
    assert len(rows) == 2 and "keep 0.88" in rows[1]


def test_qk_temperature(capsys):
    experiment("qk_temperature").main(["--steps", "2", "--seeds", "1", "--distance", "2", "--batch", "4"])
    assert len(table_rows(capsys.readouterr().out)) == 1 + 3  # header, three initial temperatures


def test_compare_variants(corpus, tmp_path, capsys):
    cv = experiment("compare_variants")
    cv.main(["--quick", "--data", str(corpus), "--jobs", "1", "--models", "Rec:fixed:skip", "XL",
             "--set", "all_layers_qk_rmsnorm=true", "--plot", str(tmp_path / "plot.png"),
             "--json", str(tmp_path / "results.json")])
    out = capsys.readouterr().out
    assert "every model also gets: all_layers_qk_rmsnorm=true" in out
    assert "| Rec:fixed:skip | " in out and "| XL | " in out
    assert [r["name"] for r in json.loads((tmp_path / "results.json").read_text())] == ["Rec:fixed:skip", "XL"]
    cv.main(["--params-only"])
    assert "| Rec:fixed:skip | 160,461,944 | 160,461,944 |" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:every backward pass covers one block")  # the candidates as they were measured
def test_default_recipe_then_position_curve_then_state_ablation(corpus, tmp_path, capsys):
    # the chain of the record: train and score candidates, tabulate them by position, ablate a checkpoint's state
    experiment("default_recipe").main(["--only", "mini", "xl20", "--max-steps", "2", "--data", str(corpus),
                                       "--out", str(tmp_path), "--jobs", "1"])
    out = capsys.readouterr().out
    assert "gzip -9 per file" in out and "| mini | 0 | 2 |" in out and "| xl20 | 0 | 2 |" in out
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in results] == ["mini", "xl20"] and all(r["positions"] for r in results)

    experiment("position_curve").main(["mini", "xl20", "--results", str(tmp_path / "results.jsonl"),
                                       "--plot", str(tmp_path / "curve.png")])
    out = capsys.readouterr().out
    assert "| mini | 0 | 2 |" in out and "bytes scored" in out and (tmp_path / "curve.png").exists()

    experiment("state_ablation").main(["--checkpoint", str(tmp_path / "mini-seed0"), "--data", str(corpus),
                                       "--threads", "1"])
    rows = table_rows(capsys.readouterr().out)
    assert rows[1].startswith("| carried (as trained) |") and rows[2].startswith("| reset after every block |")


@pytest.mark.filterwarnings("ignore:data. left out")
def test_long_documents_measure_train_diagnose_report_and_lengths(tmp_path, capsys):
    data = tmp_path / "packages"
    for package in "abcdef":
        (data / package).mkdir(parents=True)
        for i in range(2):
            (data / package / f"m{i}.py").write_text("".join(f"def {package}{j}(x):\n    return x + {i}\n" for j in range(40)))
    ld, out = experiment("long_documents"), tmp_path / "out"
    common = ["--data", str(data), "--out", str(out)]
    ld.main(["measure", "--runs", "rec-8blocks", "xl-8blocks", "--rounds", "4", *common])
    assert "| rec-8blocks | 0.90 M |" in capsys.readouterr().out
    ld.main(["train", "--runs", "rec-8blocks", "xl-8blocks", "--max-steps", "2", *common])
    ld.main(["diagnose", "--runs", "rec-8blocks", "--drop", "state", *common])
    with pytest.raises(SystemExit):  # a run not trained is named before any run is scored
        ld.main(["documents", "--runs", "rec-8blocks", "slide-8blocks", *common])
    error = capsys.readouterr().err
    assert "no saved model" in error and "slide-8blocks-seed0" in error and "rec-8blocks-seed0" not in error
    ld.main(["documents", "--runs", "rec-8blocks", "xl-8blocks", *common])
    table = capsys.readouterr().out
    assert "| package | bytes | rec-8blocks s0 | xl-8blocks s0 | xl-8blocks s0 - rec-8blocks s0 |" in table
    assert len([line for line in table.splitlines() if line.startswith("| ") and "package" not in line]) == 1
    ld.main(["stream", "--runs", "rec-8blocks", "xl-8blocks", *common])
    assert "seed 0, equal shares of the budget:\n\n| share | rec-8blocks | xl-8blocks |" in capsys.readouterr().out
    ld.main(["report", "--plot", str(tmp_path / "positions.png"), *common])
    out_text = capsys.readouterr().out
    assert "| rec-8blocks | 0 | 0.90 M | 2 |" in out_text and "| state dropped after every block |" in out_text
    assert "| 2 | gate (lstm) |" in out_text and (tmp_path / "positions.png").exists()
    assert "reaching the state d blocks back" in out_text and "| 15 |" in out_text
    assert "| blocks back | every path: layer 2 | state alone: layer 2 |" in out_text
    assert "| 0 | 1.000 (1.000) | 1.000 (1.000) |" in out_text  # the windows' median shares, recorded
    # a run with the state cells at another rate, in its own folder, reported beside the others under its own name
    faster = tmp_path / "faster"
    ld.main(["train", "--runs", "rec-8blocks", "--max-steps", "2", "--state-lr-scale", "3", "--data", str(data),
             "--out", str(faster)])
    capsys.readouterr()
    ld.main(["report", "--also", str(faster), "--plot", str(tmp_path / "both.png"), *common])
    out_text = capsys.readouterr().out
    assert "| rec-8blocks | 0 |" in out_text and "| rec@cells3-8blocks | 0 | 0.90 M | 2 |" in out_text
    assert "| rec@cells3-8blocks seed 0 |" in out_text and (tmp_path / "both_against_xl.png").exists()
    ld.main(["report", "--runs", "xl-8blocks", "--also", str(faster), *common])  # only the runs named
    out_text = capsys.readouterr().out
    assert "| xl-8blocks | 0 |" in out_text and "| rec-8blocks | 0 |" not in out_text and "rec@cells3" not in out_text
    # --set changes a model field of every run; the run is saved with it and named by it in the report
    fewer = tmp_path / "fewer"
    ld.main(["train", "--runs", "rec-8blocks", "--max-steps", "2", "--set", "num_state_vectors=8", "--set",
             "gate_keep_init=-1.0", "--data", str(data), "--out", str(fewer)])
    from block_recurrent.persistence.checkpoint import from_pretrained

    saved = from_pretrained(fewer / "rec-8blocks-seed0").config
    assert (saved.num_state_vectors, saved.gate_keep_init) == (8, -1.0)
    capsys.readouterr()
    ld.main(["report", "--also", str(fewer), "--plot", str(tmp_path / "fewer.png"), *common])
    out_text = capsys.readouterr().out
    assert "| rec@num_state_vectors=8,gate_keep_init=-1.0-8blocks | 0 |" in out_text and "| rec-8blocks | 0 |" in out_text
    experiment("document_lengths").main(["--data", str(data)])
    assert "| held out | 1 |" in capsys.readouterr().out
    # --preset hour: the hour recipe's width and blocks with mini's cell; XL without the recurrence
    sixteen, rows = ld.configs("rec-16blocks", 1, 10, out, None)
    assert (sixteen.max_seq_len, rows.batch_size) == (256, 8)  # the same 2,048 bytes a step
    rec, train = ld.configs("rec-8blocks", 1, 10, out, None, "hour")
    xl, _ = ld.configs("xl-8blocks", 1, 10, out, None, "hour")
    assert (rec.dim, rec.block_width, rec.max_seq_len, rec.gate, rec.state_cell_scale) == (192, 32, 256, "lstm", 0.1)
    assert xl.recurrent_layers == () and xl.dim == 192 and train.batch_size == 16
    # --state-lr-scale overrides brt train's rate for the state cells and leaves the rest as it was
    _, faster = ld.configs("rec-1block", 0, 10, out, None, "mini", state_lr_scale=3.0)
    _, default = ld.configs("rec-1block", 0, 10, out, None, "mini")
    assert faster.state_lr_scale == 3.0 and default.state_lr_scale == 1.0
    assert dataclasses.replace(faster, state_lr_scale=1.0) == default


def test_mqar_lookup_runs_both_models_and_both_layouts(capsys):
    lookup = experiment("mqar_lookup")
    lookup.main(["ours", "2", "1e-3"])
    lookup.main(["plain", "2", "1e-3"])
    lookup.main(["ours", "2", "1e-3", "format=zoology", "qk_rmsnorm_scale=8"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines] == [["ours", "step", "2"], ["plain", "step", "2"], ["ours", "step", "2"]]
    x, y = lookup.zoology(3, np.random.default_rng(0))
    for row in range(3):  # each query key's label is the value that followed that key
        pairs = {int(x[row, i]): int(x[row, i + 1]) for i in range(0, 16, 2)}
        assert [pairs[int(x[row, p])] for p in range(17, 25)] == y[row, 17:25].tolist()


def test_harness_optimizer_takes_the_trainers_groups_and_the_recall_levers():
    import torch

    from block_recurrent import BlockRecurrentTransformer

    harness = experiment("harness")
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(num_tokens=32, dim=32, depth=2, heads=2, dim_head=16, block_width=4,
                                      max_seq_len=8, num_state_vectors=4, recurrent_layers=(1,))
    names = {id(p): name for name, p in model.named_parameters()}
    lr_of = lambda optimizer: {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    optimizer = harness.adamw(model, 1.0, state_lr_scale=0.1, keep_bias_lr_scale=10.0, cell_parts=("gate", "to_update"))
    assert all(group["weight_decay"] == 0.0 for group in optimizer.param_groups)
    lrs = lr_of(optimizer)
    assert len(lrs) == len(names)
    for name, lr in lrs.items():
        if name.endswith("keep_bias"):
            assert lr == 10.0
        elif ".cell.gate" in name or ".cell.to_update" in name:
            assert lr == pytest.approx(0.1)
        else:
            assert lr == 1.0, name


def test_reference_env_names_the_interpreter_without_creating_one(tmp_path, monkeypatch):
    reference_env = load_script("benchmarks", "reference_env")
    assert reference_env.reference_python(tmp_path / "python") == tmp_path / "python"
    monkeypatch.setattr(reference_env, "REFERENCE_VENV", tmp_path / "missing")
    assert reference_env.reference_python(create=False) is None
    for name in ("bench_train", "bench_generate", "bench_eval"):  # they import it as a sibling
        assert load_script("benchmarks", name).reference_python is reference_env.reference_python


def test_gate_by_block_splits_every_block_into_needle_or_haystack(tmp_path, capsys, monkeypatch):
    import torch

    from block_recurrent import BlockRecurrentConfig, BlockRecurrentModel, save_pretrained
    from block_recurrent.tasks import PasskeyTask

    script = experiment("gate_by_block")
    torch.manual_seed(0)
    model = BlockRecurrentModel(BlockRecurrentConfig.from_name("tiny", gate="lstm", gate_keep_init=3.0)).eval()
    W = model.config.block_width
    rows = script.gate_by_block(model, PasskeyTask(), 100, examples=2, seed=0)
    examples = PasskeyTask().examples(2, 100, 0)  # the same lengths: the haystack is exactly `distance` tokens
    assert sum(len(v) for v in rows.values()) == sum(len(e.tokens) // W for e in examples)
    assert len(rows["needle"]) >= 2 and ((rows["haystack"] > 0) & (rows["haystack"] < 1)).all()
    save_pretrained(model, tmp_path / "model")
    monkeypatch.setattr(sys, "argv", ["gate_by_block.py", "--checkpoint", str(tmp_path / "model"), "--task", "passkey",
                                      "--distance", "60", "--examples", "2"])
    script.main()
    assert "| needle |" in capsys.readouterr().out


def test_gate_shift_freezing_the_state_equals_dropping_it_and_restores_the_gates(tmp_path, capsys, monkeypatch):
    import torch

    from block_recurrent import BlockRecurrentConfig, BlockRecurrentModel, save_pretrained
    from block_recurrent.tasks import PasskeyTask
    from block_recurrent.tasks.scoring import predict
    from block_recurrent.tasks.text import collate

    script = experiment("gate_shift")
    torch.manual_seed(0)
    config = BlockRecurrentConfig.from_name("tiny", gate="lstm", gate_keep_init=3.0)
    model = BlockRecurrentModel(config).double().eval()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = collate(PasskeyTask().examples(3, 100, 0), ignore_index=config.ignore_index)
    scored = batch.labels != config.ignore_index
    _, dropped = predict(model, batch, drop="state")
    _, carried = predict(model, batch)
    with script.shifted_gates(model, forget=40.0, input=-40.0):  # keep 1, write 0: the state stays the initial one
        _, frozen = predict(model, batch)
    torch.testing.assert_close(frozen[scored], dropped[scored], rtol=0, atol=1e-12)
    assert (carried[scored] - dropped[scored]).abs().max() > 1e-6  # the state matters here: the check can fail
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    with pytest.raises(ValueError, match="no LSTM gate"):
        with script.shifted_gates(BlockRecurrentModel(BlockRecurrentConfig.from_name("tiny", gate="fixed"))):
            pass

    save_pretrained(model.float(), tmp_path / "model")
    monkeypatch.setattr(sys, "argv", ["gate_shift.py", "--checkpoint", str(tmp_path / "model"), "--task", "passkey",
                                      "--forget-shift", "0", "2", "--distances", "40", "--samples", "2"])
    script.main()
    assert len(table_rows(capsys.readouterr().out)) == 3  # the header and a row per shift


def test_facts_answers_sorts_wrong_answers_and_reads_the_story(tmp_path, capsys, monkeypatch):
    import re

    import torch

    from block_recurrent import BlockRecurrentConfig, BlockRecurrentModel, save_pretrained
    from block_recurrent.tasks import FactsTask
    from block_recurrent.tasks.facts import PLACES

    script = experiment("facts_answers")
    moves = [script.FACT.fullmatch(fact).groups() for fact in
             ["Mary went to the kitchen.", "John moved to the garden.", "Mary went back to the office."]]
    assert moves == [("Mary", "kitchen"), ("John", "garden"), ("Mary", "office")]
    assert script.classify("office", moves, "Mary", exact=True) == "right"
    assert script.classify("kitchen", moves, "Mary", exact=False) == "the person's earlier place"
    assert script.classify("garden", moves, "Mary", exact=False) == "another fact's place"
    assert script.classify("bedroom", moves, "Mary", exact=False) == "a place not in the story"
    assert script.classify("def", moves, "Mary", exact=False) == "no place"

    def reader(model, prompts, max_new_tokens, temperature):
        """A model that reads the story from the prompt's text: right in even rows, "nowhere" in odd ones."""
        assert temperature == 0.0
        out = []
        for row, prompt in enumerate(prompts):
            text = bytes(prompt.tolist()).decode()
            asked = re.findall(r"Where is (\w+)\?", text)[-1]
            places = [p for person, p in re.findall(r"(Mary|John|Daniel|Sandra) [a-z ]+ the (\w+)\.", text)
                      if person == asked]
            # what follows the place is never trained: the answer is the place the text starts with
            out.append(torch.tensor(list(f" {places[-1] if row % 2 == 0 else 'nowhere'}Qu".encode())))
        return out

    monkeypatch.setattr(script, "generate", reader)
    rows = script.answers(None, FactsTask(haystack="filler"), 300, samples=6, seed=3, batch_size=4)
    assert [r["exact"] for r in rows] == [True, False] * 3
    assert all(r["answer"] in PLACES for r in rows[::2]) and all(r["answer"] == "nowhereQu" for r in rows[1::2])
    assert all(len(r["moves"]) == 4 and r["asked"] in [person for person, _ in r["moves"]] for r in rows)
    assert [script.classify(r["answer"], r["moves"], r["asked"], r["exact"]) for r in rows] == ["right",
                                                                                               "no place"] * 3
    monkeypatch.undo()

    torch.manual_seed(0)
    save_pretrained(BlockRecurrentModel(BlockRecurrentConfig.from_name("tiny")), tmp_path / "model")
    monkeypatch.setattr(sys, "argv", ["facts_answers.py", "--checkpoint", str(tmp_path / "model"), "--haystack",
                                      "filler", "--distances", "40", "--samples", "3"])
    script.main()
    assert len(table_rows(capsys.readouterr().out)) == 2  # the header and a row per distance


def test_facts_probe_reads_the_recurrent_layer_input_and_the_answer_as_one_pass(tmp_path, capsys, monkeypatch):
    import torch

    from block_recurrent import BlockRecurrentConfig, BlockRecurrentModel, save_pretrained
    from block_recurrent.tasks import FactsTask
    from block_recurrent.tasks.scoring import draw_examples, predict
    from block_recurrent.tasks.text import collate

    script = experiment("facts_probe")
    # a linear probe finds a label written linearly into the features, and stays near chance on noise
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=400)
    features = rng.normal(size=(400, 32))
    features[:, 0] += 6.0 * labels  # classes six standard deviations apart
    assert script.probe(features[:300], labels[:300], features[300:], labels[300:])[0] > 0.9
    accuracy, chance = script.probe(rng.normal(size=(300, 32)), labels[:300], rng.normal(size=(100, 32)), labels[300:])
    assert accuracy < 0.5 and 0.1 < chance < 0.45

    torch.manual_seed(0)
    # the tiny preset's state is written in layer 1: the layer's input is the token embedding
    model = BlockRecurrentModel(BlockRecurrentConfig.from_name("tiny")).double().eval()
    task = FactsTask(haystack="filler")
    examples = draw_examples(task, 90, 4, seed=5)
    ids, losses = predict(model, collate(examples, ignore_index=model.config.ignore_index))
    for row, example in enumerate(examples):
        story = script.read_story(model, task, example)
        answer = example.answers[0]
        span = slice(answer.start - 1, answer.start - 1 + answer.length)  # labels are the next tokens
        truth = torch.from_numpy(example.tokens[span.start + 1 : span.stop + 1])
        assert story.exact == bool((ids[row, span] == truth).all())
        assert story.loss == pytest.approx(losses[row, span].mean().item(), rel=1e-6)  # predict keeps float32
        assert len(story.moves) == 4 and story.asked in [person for person, _ in story.moves]
        stops = [end - 2 for _, end in example.needles]  # " Mary went to the kitchen. ": the full stop
        assert all(example.tokens[i] == ord(".") for i in stops)
        embedded = model.token_emb(torch.from_numpy(example.tokens[stops])).detach().float().numpy()
        np.testing.assert_allclose(story.stops, embedded, rtol=0, atol=1e-6)
        values = model.layers[0].project(torch.from_numpy(embedded).double()[None])[2][0].detach().float().numpy()
        np.testing.assert_allclose(story.values, values, rtol=0, atol=1e-5)
        assert story.values.shape == (4, model.config.kv_dim)
        assert story.state.shape == (16 * 64,)

    save_pretrained(model.float(), tmp_path / "model")
    monkeypatch.setattr(sys, "argv", ["facts_probe.py", "--checkpoint", str(tmp_path / "model"), "--haystack",
                                      "filler", "--distance", "60", "--fit", "24", "--test", "8"])
    script.main()
    assert len(table_rows(capsys.readouterr().out)) == 11  # two headers, seven probes, two rows on the questions


def assert_same_function(model, other) -> None:
    """``model`` and ``other`` (float64) give the same logits and final state on tokens of three whole blocks of 16
    and a part, to 1e-10."""
    import torch

    tokens = torch.randint(0, 256, (2, 56))
    with torch.no_grad():
        logits, state = model.run(tokens)
        other_logits, other_state = other.run(tokens)
    torch.testing.assert_close(logits, other_logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(state.states[0], other_state.states[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("narrow, kv_heads", [(1, 2), (1, 4), (2, 4)])  # from 2, the order of the copies matters
def test_widen_kv_heads_computes_the_same_function(tmp_path, narrow, kv_heads, monkeypatch, capsys):
    import torch

    from block_recurrent import BlockRecurrentConfig, BlockRecurrentModel, from_pretrained, save_pretrained

    script = experiment("widen_kv_heads")
    torch.manual_seed(0)
    # the LSTM gate and scaled (parametrised) state cells, a state read above its writer, rotary positions
    config = BlockRecurrentConfig.from_name("tiny", depth=3, recurrent_layers=(1,), gate="lstm", gate_keep_init=3.0,
                                            state_cell_scale=0.1, max_seq_len=16, block_width=16, kv_heads=narrow)
    model = BlockRecurrentModel(config).double()
    for p in model.parameters():  # away from the initial values, so that every head differs from the others
        p.data += 0.05 * torch.randn_like(p)
    wide = script.widen(model, kv_heads)
    assert wide.config.kv_heads == kv_heads and wide.config.replace(kv_heads=narrow) == config
    assert wide.num_parameters() > model.num_parameters()
    assert_same_function(wide, model)
    with pytest.raises(ValueError, match="kv_heads must be a multiple"):
        script.widen(model, 3)

    save_pretrained(model.float(), tmp_path / "model")
    (tmp_path / "model" / "tune.json").write_text('{"task": {"task": "qa1"}}\n')
    monkeypatch.setattr(sys, "argv", ["widen_kv_heads.py", "--checkpoint", str(tmp_path / "model"), "--kv-heads",
                                      str(kv_heads), "--out", str(tmp_path / "wide")])
    script.main()
    loaded = from_pretrained(tmp_path / "wide")
    assert loaded.config.kv_heads == kv_heads and (tmp_path / "wide" / "tune.json").exists()


@pytest.mark.parametrize("cell_scale", [0.1, 1.0])  # the state cells parametrised (stored / 0.1) and plain
@pytest.mark.parametrize("kind", ["write", "self", "reads"])
def test_set_state_temperature_sets_only_the_named_attentions(tmp_path, cell_scale, kind, monkeypatch, capsys):
    """Setting a kind's temperature to 16 changes only those temperatures, and computes what the same model at 4
    computes with that attention's query gains four times larger (the logits are the queries' gains times the
    temperature): any other attention set instead would give other outputs."""
    import torch
    from torch.nn.utils import parametrize

    from block_recurrent import BlockRecurrentConfig, BlockRecurrentModel, from_pretrained, save_pretrained

    script = experiment("set_state_temperature")
    torch.manual_seed(0)
    config = BlockRecurrentConfig.from_name("tiny", depth=3, recurrent_layers=(2,), read_recurrent_layers=(1,),
                                            gate="lstm", state_cell_scale=cell_scale, max_seq_len=16, block_width=16)
    model = BlockRecurrentModel(config).double()
    for p in model.parameters():  # away from the initial values: every head and gain differs
        p.data += 0.05 * torch.randn_like(p)
    script.set_temperatures(model, {k: 4.0 for k in ("write", "self", "reads")})
    before = {name: t.clone() for name, t in model.state_dict().items()}
    hot = BlockRecurrentModel(config).double()
    hot.load_state_dict(before)
    script.set_temperatures(hot, {kind: 16.0})
    changed = {name for name, t in hot.state_dict().items() if not torch.equal(t, before[name])}
    attentions = script.state_attentions(hot)[kind]
    assert attentions and all(torch.equal(a.temperature, torch.full_like(a.temperature, 16.0)) for a in attentions)
    assert changed and all(name.endswith(("temperature", "temperature.original")) for name in changed)
    assert len(changed) == len(attentions)
    with torch.no_grad():  # the same logits the other way: gains x 4 at temperature 4
        for attn in script.state_attentions(model)[kind]:
            if parametrize.is_parametrized(attn, "q_gain"):
                attn.q_gain = attn.q_gain * 4
            else:
                attn.q_gain.mul_(4)
    assert_same_function(hot, model)

    with pytest.raises(ValueError, match="must be one of"):
        script.set_temperatures(hot, {"cross": 2.0})
    with pytest.raises(ValueError, match="the write temperature must be positive"):
        script.set_temperatures(hot, {"write": 0.0})

    save_pretrained(hot.float(), tmp_path / "model")
    (tmp_path / "model" / "tune.json").write_text('{"task": {"task": "qa1"}}\n')
    monkeypatch.setattr(sys, "argv", ["set_state_temperature.py", "--checkpoint", str(tmp_path / "model"), f"--{kind}",
                                      "8", "--out", str(tmp_path / "set")])
    script.main()
    loaded = from_pretrained(tmp_path / "set")
    assert all(torch.allclose(a.temperature, torch.full_like(a.temperature, 8.0))
               for a in script.state_attentions(loaded)[kind])
    assert (tmp_path / "set" / "tune.json").exists() and f"{kind}: " in capsys.readouterr().out


def run_write_attention(script, model, tmp_path, monkeypatch, capsys) -> str:
    """``model`` saved, then write_attention's main on three stories with 60 tokens of filler: what it prints."""
    from block_recurrent import save_pretrained

    save_pretrained(model.float(), tmp_path / "model")
    monkeypatch.setattr(sys, "argv", ["write_attention.py", "--checkpoint", str(tmp_path / "model"), "--haystack",
                                      "filler", "--distance", "60", "--stories", "3"])
    script.main()
    return capsys.readouterr().out


@pytest.mark.parametrize("kv_heads", [1, 2])  # with 2, each key/value head serves its own two query heads
def test_write_attention_records_the_weights_the_write_uses(tmp_path, kv_heads, capsys, monkeypatch):
    """The weights the script records, one (state vectors, heads, tokens) array per block, give the write's own
    attention output when they weigh the block's values; the eta squared of a label is 1 where the label sets the
    mass and 0 where it does not; the script prints its table."""
    import torch

    from block_recurrent import BlockRecurrentConfig, BlockRecurrentModel
    from block_recurrent.model import recurrent
    from block_recurrent.model.attention import split_kv_heads
    from block_recurrent.tasks import FactsTask
    from block_recurrent.tasks.scoring import draw_examples

    script = experiment("write_attention")
    torch.manual_seed(0)
    model = BlockRecurrentModel(BlockRecurrentConfig.from_name("tiny", kv_heads=kv_heads)).double().eval()
    example = draw_examples(FactsTask(haystack="filler"), 90, 1, seed=5)[0]
    calls, attend_state = [], recurrent.attend_state

    def outputs(attn, queries, keys, values):
        out = attend_state(attn, queries, keys, values)
        if attn is model.cells[0].write_attn:
            calls.append((values, out))
        return out

    monkeypatch.setattr(recurrent, "attend_state", outputs)
    weights = script.write_weights(model, torch.from_numpy(example.tokens))
    width, heads = model.config.block_width, model.config.heads
    assert len(weights) == len(calls) == -(-len(example.tokens) // width)
    for w, (values, out) in zip(weights, calls):
        assert w.shape == (16, heads, values.shape[1])
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w[..., 0]))
        v = split_kv_heads(values, kv_heads)[0]  # (K, J, dh)
        by_head = v.repeat_interleave(heads // kv_heads, dim=0)  # query head h reads key/value head h // G
        torch.testing.assert_close(torch.einsum("shj,hjd->shd", w, by_head), out[0], rtol=0, atol=1e-10)
    labels = ["a", "b"] * 20
    mass = np.stack([np.where(np.array(labels) == "a", 1.0, 0.0), np.tile([0.0, 0.0, 1.0, 1.0], 10)], axis=1)
    np.testing.assert_allclose(script.eta_squared(mass, labels), [1.0, 0.0], atol=1e-12)

    out = run_write_attention(script, model, tmp_path, monkeypatch, capsys)
    assert len(table_rows(out)) == 7 and "12 facts, 64 (state vector, head) pairs" in out


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_write_attention_records_the_shares_the_slot_write_uses(tmp_path, kv_heads, capsys, monkeypatch):
    """With the slot write, the shares the script records, one (state vectors + null, heads, tokens) array per
    block, sum to 1 over the slots and give the write's own mass and mean; the script prints its slot table."""
    import torch

    from block_recurrent import BlockRecurrentConfig, BlockRecurrentModel
    from block_recurrent.model import recurrent
    from block_recurrent.model.attention import split_kv_heads
    from block_recurrent.tasks import FactsTask
    from block_recurrent.tasks.scoring import draw_examples

    script = experiment("write_attention")
    torch.manual_seed(0)
    model = BlockRecurrentModel(BlockRecurrentConfig.from_name("tiny", kv_heads=kv_heads, state_write="slots"))
    model = model.double().eval()
    example = draw_examples(FactsTask(haystack="filler"), 90, 1, seed=5)[0]
    calls, attend_slots = [], recurrent.attend_slots

    def outputs(attn, queries, null_query, null_logit, keys, values):
        mean, mass = attend_slots(attn, queries, null_query, null_logit, keys, values)
        calls.append((values, mean, mass))
        return mean, mass

    monkeypatch.setattr(recurrent, "attend_slots", outputs)
    shares = script.slot_shares(model, torch.from_numpy(example.tokens))
    heads = model.config.heads
    assert len(shares) == len(calls) == -(-len(example.tokens) // model.config.block_width)
    for w, (values, mean, mass) in zip(shares, calls):
        assert w.shape == (17, heads, values.shape[1])
        torch.testing.assert_close(w.sum(0), torch.ones_like(w[0]))
        torch.testing.assert_close(w[:-1].sum(-1), mass[0], rtol=0, atol=1e-10)
        by_head = split_kv_heads(values, kv_heads)[0].repeat_interleave(heads // kv_heads, dim=0)  # (H, J, dh)
        torch.testing.assert_close(torch.einsum("shj,hjd->shd", w[:-1], by_head) / (mass[0][..., None] + 1e-6),
                                   mean[0], rtol=0, atol=1e-10)

    out = run_write_attention(script, model, tmp_path, monkeypatch, capsys)
    assert len(table_rows(out)) == 8 and "null slot's share of a fact's tokens" in out and "slot write" in out


def test_write_attention_records_the_keys_and_strengths_the_delta_write_uses(tmp_path, capsys, monkeypatch):
    """With the delta-rule memory, the strengths and keys the script records per block are those the cell's delta
    rule is given; the script prints its strength table."""
    import torch

    from block_recurrent import BlockRecurrentConfig, BlockRecurrentModel
    from block_recurrent.model import recurrent
    from block_recurrent.tasks import FactsTask
    from block_recurrent.tasks.scoring import draw_examples

    script = experiment("write_attention")
    torch.manual_seed(0)
    model = BlockRecurrentModel(BlockRecurrentConfig.from_name("tiny", state_write="delta")).double().eval()
    example = draw_examples(FactsTask(haystack="filler"), 90, 1, seed=5)[0]
    calls, delta_rule = [], recurrent.delta_rule

    def recording(memory, keys, values, strengths):
        calls.append((keys[0], strengths[0]))  # (H, N, S), (H, N)
        return delta_rule(memory, keys, values, strengths)

    monkeypatch.setattr(recurrent, "delta_rule", recording)
    writes = script.delta_writes(model, torch.from_numpy(example.tokens))
    assert len(writes) == len(calls) == -(-len(example.tokens) // model.config.block_width)
    for (strengths, keys), (given_keys, given_strengths) in zip(writes, calls):
        torch.testing.assert_close(keys, given_keys.transpose(0, 1), rtol=0, atol=1e-12)
        torch.testing.assert_close(strengths, given_strengths.transpose(0, 1), rtol=0, atol=1e-12)

    out = run_write_attention(script, model, tmp_path, monkeypatch, capsys)
    assert len(table_rows(out)) == 6 and "write strength on a fact's tokens" in out and "delta-rule memory" in out
    assert "(head, key row) entries of a fact's key" in out


@pytest.mark.parametrize("name, arguments, needs", [
    ("gate_by_block", ["--task", "passkey", "--distance", "60", "--examples", "2"], "gates"),
    ("gate_shift", ["--task", "passkey", "--distances", "40", "--samples", "2"], "gates"),
    ("set_state_temperature", ["--write", "8", "--out", "unused"], "state attentions"),
])
def test_scripts_on_gates_or_state_attentions_refuse_a_delta_rule_memory(name, arguments, needs, tmp_path,
                                                                         monkeypatch):
    from block_recurrent import BlockRecurrentConfig, BlockRecurrentModel, save_pretrained

    save_pretrained(BlockRecurrentModel(BlockRecurrentConfig.from_name("tiny", state_write="delta")),
                    tmp_path / "model")
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--checkpoint", str(tmp_path / "model"), *arguments])
    with pytest.raises(ValueError, match=f"delta-rule memory \\(state_write='delta'\\), which has no {needs}"):
        experiment(name).main()
