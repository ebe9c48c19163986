"""Trainer: a resumed run equals the uninterrupted one, accumulation equals a bigger batch, faults, outputs."""

import importlib.util
import json
import math
import os
import signal
import warnings

import pytest
import torch

from block_recurrent import BlockRecurrentConfig
from block_recurrent.persistence.checkpoint import latest_checkpoint, load_training_checkpoint
from block_recurrent.persistence.storage import write_manifest
from block_recurrent.training.trainer import TrainConfig, Trainer, TrainingDiverged, lr_at, train


TEXT = (
    "def add(a, b):\n    return a + b\n\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n" * 3,
    "# a comment line\n" * 7,
    "import os\nprint(os.getcwd())\n" * 5,
    "x = [i * i for i in range(10)]\n" * 11,
    "while True:\n    break\n",
)


def write_corpus(folder, copies=2):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        for j, text in enumerate(TEXT):
            (folder / f"file{i}_{j}.py").write_text(text * (1 + i))
    return folder


def tiny():
    return BlockRecurrentConfig.from_name("tiny")


def settings(tmp_path, **changes):
    data = write_corpus(tmp_path / "data")
    base = dict(data=str(data), out_dir=str(tmp_path / "run"), batch_size=2, segments=2, max_steps=6,
                warmup_steps=2, eval_every=0, checkpoint_every=0, log_every=1, progress=False, lr=3e-3,
                final_eval=False, bf16=False)
    return TrainConfig(**{**base, **changes})


def losses_of(trainer, steps):
    return [trainer.train_step()["loss"] for _ in range(steps)]


@pytest.mark.parametrize("mode", ["stream", "crop"])
def test_resumed_run_equals_the_uninterrupted_run(tmp_path, mode):
    # memory and state dropout use the global RNG: restoring it is part of the test
    config = settings(tmp_path, mode=mode, grad_accum=2, state_dropout=0.3, xl_memories_dropout=0.3)
    whole = Trainer(tiny(), config.replace(out_dir=str(tmp_path / "whole")))
    expected = losses_of(whole, 6)

    first = Trainer(tiny(), config)
    head = losses_of(first, 3)
    first.save()
    del first
    torch.manual_seed(1234)  # whatever happened in between must not matter
    resumed = Trainer(tiny(), config, resume=True)
    assert resumed.step == 3
    tail = losses_of(resumed, 3)
    assert head + tail == expected
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_micro_batches_with_and_without_a_validity_mask_are_saved_and_restored_as_they_were(tmp_path):
    # one micro-batch's memories carry a validity mask (a row started a new document), the other's do not:
    # the checkpoint must hold both (this once failed with a KeyError, depending on the random stream)
    from block_recurrent.model.state import XLMemory

    config = settings(tmp_path, grad_accum=2)
    first = Trainer(tiny(), config)
    losses_of(first, 1)
    masked = first.carry[0].reset_rows(torch.tensor([True, False]), first.model.initial_states())
    first.carry = [masked, first.carry[1].__class__(
        tuple(XLMemory(m.keys, m.values, None) for m in first.carry[1].memories), first.carry[1].states)]
    assert all(m.valid is not None for m in first.carry[0].memories)
    first.save()
    resumed = Trainer(tiny(), config, resume=True)
    for saved, restored in zip(first.carry, resumed.carry):
        for a, b in zip(saved.memories, restored.memories):
            assert (a.valid is None) == (b.valid is None)
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            if a.valid is not None:
                assert torch.equal(a.valid, b.valid)
        for a, b in zip(saved.states, restored.states):
            assert torch.equal(a, b)


def test_grad_accumulation_equals_one_bigger_batch(tmp_path):
    big = Trainer(tiny(), settings(tmp_path, batch_size=4, out_dir=str(tmp_path / "big")))
    accumulated = Trainer(tiny(), settings(tmp_path, batch_size=2, grad_accum=2, out_dir=str(tmp_path / "acc")))
    for _ in range(2):  # the second step also checks the carried states of each micro-batch
        a, b = big.train_step(), accumulated.train_step()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["tokens"] == b["tokens"]
        for p, q in zip(big.model.parameters(), accumulated.model.parameters()):  # the step's gradients
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7)


def test_streaming_carries_state_between_steps(tmp_path):
    trainer = Trainer(tiny(), settings(tmp_path))
    trainer.train_step()
    carried = trainer.carry[0]
    assert carried is not None and carried.states[0].shape[0] == 2
    assert not carried.states[0].requires_grad  # detached between steps


def test_fit_writes_metrics_curve_samples_and_checkpoints(tmp_path):
    config = settings(tmp_path, max_steps=4, eval_every=2, eval_tokens=300, sample_tokens=8, checkpoint_every=2,
                      keep_last=1)
    result = train(tiny(), config)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    validations = [r for r in records if "val_bpb" in r]
    assert [r["step"] for r in validations] == [2, 4]
    assert 0 < validations[-1]["val_bpb"] < 9 and validations[-1]["val_tokens"] > 0
    assert isinstance(validations[-1]["sample"]["continuation"], str)
    assert result["step"] == 4 and math.isfinite(result["val_bpb"])
    assert [p.name for p in run.iterdir() if p.name.startswith("step-")] == ["step-00000004"]
    if importlib.util.find_spec("matplotlib") is not None:  # the [plot] extra
        assert (run / "loss_curve.png").stat().st_size > 1000


def test_nan_loss_stops_without_touching_the_last_checkpoint(tmp_path):
    config = settings(tmp_path, max_steps=5, checkpoint_every=1)
    trainer = Trainer(tiny(), config)
    trainer.train_step()
    trainer.save()
    good = latest_checkpoint(tmp_path / "run")
    before = (good / "model.safetensors").read_bytes()
    with torch.no_grad():
        trainer.model.to_logits.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="loss is nan at step 2"):
        trainer.fit()
    assert latest_checkpoint(tmp_path / "run") == good
    assert (good / "model.safetensors").read_bytes() == before


def test_ctrl_c_saves_the_finished_step_and_stops(tmp_path, sigint_handled):
    trainer = Trainer(tiny(), settings(tmp_path, max_steps=50))
    step = trainer.train_step

    def interrupted_step():
        metrics = step()
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled between steps: the step in flight finishes
        return metrics

    trainer.train_step = interrupted_step
    result = trainer.fit()
    assert result["interrupted"] and trainer.step == 2
    assert load_training_checkpoint(tmp_path / "run").trainer["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_resume_refuses_other_settings_and_other_models(tmp_path):
    config = settings(tmp_path)
    trainer = Trainer(tiny(), config)
    trainer.train_step()
    trainer.save()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(tiny(), config)
    with pytest.raises(ValueError, match="lr: checkpoint 0.003, now 0.01"):
        Trainer(tiny(), config.replace(lr=1e-2), resume=True)
    with pytest.raises(ValueError, match="another model config.*dim"):
        Trainer(BlockRecurrentConfig.from_name("tiny", dim=32), config, resume=True)
    with pytest.raises(ValueError, match="rows"):
        Trainer(tiny(), config.replace(batch_size=3), resume=True)
    resumed = Trainer(tiny(), config.replace(max_steps=9, eval_every=5), resume=True)  # schedule-only changes
    assert resumed.step == 1
    with pytest.raises(ValueError, match="no checkpoint to resume"):
        Trainer(tiny(), config.replace(out_dir=str(tmp_path / "fresh")), resume=True)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(batch_size=0), "batch_size must be an int >= 1"),
        (dict(lr=-1.0), "lr must be a finite number >= 0"),
        (dict(mode="shuffle"), "mode must be one of"),
        (dict(segments=2, backward_every=3), "backward_every"),
        (dict(data="x", hf_dataset="y"), "give one training source"),
        (dict(state_dropout=1.5), "state_dropout"),
        (dict(bf16="yes"), "bf16 must be a bool"),
    ],
)
def test_bad_settings_name_the_field(changes, message):
    with pytest.raises((ValueError, TypeError), match=message):
        TrainConfig(**changes)


def test_cpu_only_options_and_vocabulary_checks(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            Trainer(tiny(), settings(tmp_path, compile=True))
    with pytest.raises(ValueError, match="num_tokens"):
        Trainer(BlockRecurrentConfig.from_name("tiny", num_tokens=100), settings(tmp_path))


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = TrainConfig(lr=1.0, warmup_steps=4, max_steps=20, min_lr_ratio=0.1)
    assert [lr_at(config, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(config, 4) == pytest.approx(1.0)
    assert lr_at(config, 12) == pytest.approx(0.55)
    assert lr_at(config, 20) == pytest.approx(0.1)
    assert lr_at(config, 99) == pytest.approx(0.1)


def test_resume_names_weights_that_do_not_fit_and_survives_a_cut_metrics_line(tmp_path):
    from safetensors.torch import load_file, save_file

    config = settings(tmp_path, max_steps=2)
    train(tiny(), config)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "lo')  # a crash mid-line
    resumed = Trainer(tiny(), config.replace(max_steps=3), resume=True)
    resumed.fit()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]

    weights = latest_checkpoint(tmp_path / "run") / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["renamed.weight"] = tensors.pop("to_logits.weight")
    save_file(tensors, str(weights))
    write_manifest(weights.parent)  # a checkpoint written so, not damaged afterwards (that is checksummed)
    with pytest.raises(ValueError, match=r"does not fit this model: missing \['to_logits.weight'\]"):
        Trainer(tiny(), config.replace(max_steps=4), resume=True)


def test_bf16_training_on_the_cpu_follows_float32(tmp_path):
    """bf16 autocast on the CPU: the same steps, losses within a few percent of float32, the state in float32."""
    full = Trainer(tiny(), settings(tmp_path, out_dir=str(tmp_path / "fp32")))
    half = Trainer(tiny(), settings(tmp_path, out_dir=str(tmp_path / "bf16"), bf16=True))
    expected, got = losses_of(full, 6), losses_of(half, 6)
    assert all(math.isfinite(loss) for loss in got)
    assert max(abs(a - b) / a for a, b in zip(expected, got)) < 0.03, (expected, got)
    assert all(s is None or s.dtype == torch.float32 for s in half.carry[0].states)
    full.close(), half.close()


def test_validation_samples_every_file_and_the_run_ends_with_the_whole_split_beside_gzip(tmp_path):
    from block_recurrent.training.validation import evaluate_corpus

    many = write_corpus(tmp_path / "many", copies=8)  # enough files for several to be held out
    trainer = Trainer(tiny(), settings(tmp_path, data=str(many), eval_every=3, eval_tokens=40, final_eval=True, max_steps=3))
    corpus = trainer.val_corpus
    spread = evaluate_corpus(trainer.model, corpus, max_tokens=40, spread=True)
    assert spread["documents"] == len(corpus) > 1  # every held-out file gives its first 40 // files tokens
    assert spread["tokens"] == sum(min(len(corpus.document(i)), max(2, 40 // len(corpus))) - 1 for i in range(len(corpus)))
    result = trainer.fit()
    trainer.close()
    whole = evaluate_corpus(trainer.model, corpus)
    assert result["held_out_tokens"] == whole["tokens"] == corpus.token_count - len(corpus)
    assert result["held_out_bpb"] == pytest.approx(whole["bpb"], rel=1e-6)
    texts = [corpus.document(i).astype("uint8").tobytes() for i in range(len(corpus))]
    import gzip

    expected = 8 * sum(len(gzip.compress(t, 9)) for t in texts) / sum(len(t) for t in texts)
    assert result["held_out_gzip_bpb"] == pytest.approx(expected)


def test_evaluation_precision_auto_weighs_the_block_width(monkeypatch):
    """bf16 scoring on the CPU only for blocks of 64 or more (float32 measured faster below); explicit wins."""
    from block_recurrent.training import precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.resolve_eval_bf16(None, cpu, 64) is True
    assert precision.resolve_eval_bf16(None, cpu, 16) is False
    assert precision.resolve_eval_bf16(True, cpu, 16) is True
    assert precision.resolve_eval_bf16(False, cpu, 512) is False
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.resolve_eval_bf16(None, cpu, 512) is False


def test_a_backward_pass_of_one_block_leaves_the_state_write_untrained_and_says_so(tmp_path):
    """The state written at a block's end is read in the next block: with one block per backward pass that read
    happens after the carry is detached, so no gradient reaches the write path. Two blocks per pass fix it."""
    from block_recurrent import BlockRecurrentTransformer

    def write_gradient(max_seq_len):
        torch.manual_seed(0)
        model = BlockRecurrentTransformer(tiny().replace(max_seq_len=max_seq_len))
        tokens = torch.randint(0, 256, (2, max_seq_len + 1))
        logits, _ = model.run(tokens[:, :-1])
        model.loss(logits, tokens[:, 1:]).backward()
        return next(model.layers[0].attn.cell.to_update.parameters()).grad  # the stored (scaled) weight's

    assert write_gradient(32) is None  # one block of 32
    assert write_gradient(64).abs().sum() > 0  # two blocks

    one_block = tiny().replace(max_seq_len=32)
    with pytest.warns(UserWarning, match="write path .* gets no gradient"):
        Trainer(one_block, settings(tmp_path / "a", segments=2, backward_every=1, replay_write=False)).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replayed = Trainer(one_block, settings(tmp_path / "d", segments=2, backward_every=1))  # auto: replayed
        assert replayed.replay_write
        replayed.close()
        Trainer(one_block, settings(tmp_path / "b", segments=2, backward_every=2)).close()
        Trainer(tiny(), settings(tmp_path / "c")).close()  # segments of 64 tokens, two blocks
    with pytest.raises(ValueError, match="replay_write is for backward passes of one block"):
        Trainer(tiny(), settings(tmp_path / "e", replay_write=True))


def test_replayed_write_trains_the_write_and_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """With one block per backward pass the trainer replays the write (auto): the write's parameters move, and a
    run resumed from a checkpoint (which holds the states the last writes started from) equals the unbroken run."""
    one_block = tiny().replace(max_seq_len=32)
    # state dropout: some writes start from the learned initial state, which the checkpoint must say
    config = settings(tmp_path, grad_accum=2, state_dropout=0.3)
    whole = Trainer(one_block, config.replace(out_dir=str(tmp_path / "whole")))
    update = whole.model.layers[0].attn.cell.to_update
    initial = update.weight.detach().clone()
    expected = losses_of(whole, 6)
    assert not torch.equal(update.weight, initial)

    first = Trainer(one_block, config)
    head = losses_of(first, 3)
    first.save()
    del first
    resumed = Trainer(one_block, config, resume=True)
    assert all(w is not None for w in resumed.written_from)
    assert head + losses_of(resumed, 3) == expected
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_fused_adamw_steps_as_the_per_parameter_optimiser(tmp_path, monkeypatch):
    """brt train takes AdamW's fused kernel where torch has it; its steps equal the plain implementation's (the
    same param groups, weight decay on matrices only) to rounding."""
    import block_recurrent.training.trainer as trainer_module

    fused = Trainer(tiny(), settings(tmp_path, out_dir=str(tmp_path / "fused"), weight_decay=0.1))
    assert fused.optimizer.defaults["fused"] is trainer_module.fused_adamw_supported(torch.device("cpu"))
    assert trainer_module.fused_adamw_supported(torch.device("cpu")) == (
        torch.torch_version.TorchVersion(torch.__version__) >= "2.4")
    assert not trainer_module.fused_adamw_supported(torch.device("meta"))
    monkeypatch.setattr(trainer_module, "fused_adamw_supported", lambda device: False)
    plain = Trainer(tiny(), settings(tmp_path, out_dir=str(tmp_path / "plain"), weight_decay=0.1))
    assert not plain.optimizer.defaults["fused"]
    for _ in range(3):
        a, b = fused.train_step(), plain.train_step()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for p, q in zip(fused.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_state_lr_scale_moves_the_state_cells_at_that_multiple_of_the_learning_rate(tmp_path):
    """The state cells' parameters get their own AdamW groups at lr * state_lr_scale: at 0 they stay where they
    were while the rest moves; at 1 the optimiser keeps the two groups it always had (older checkpoints fit)."""
    frozen = Trainer(tiny(), settings(tmp_path, out_dir=str(tmp_path / "frozen"), state_lr_scale=0.0))
    cell = frozen.model.layers[0].attn.cell
    before = {n: p.detach().clone() for n, p in frozen.model.named_parameters()}
    losses_of(frozen, 2)
    for name, p in frozen.model.named_parameters():
        assert torch.equal(p, before[name]) == (".cell." in name), name
    assert sorted(g["lr"] for g in frozen.optimizer.param_groups) == [0.0, 0.0, lr_at(frozen.train_config, 1),
                                                                       lr_at(frozen.train_config, 1)]
    assert sum(len(g["params"]) for g in frozen.optimizer.param_groups if g["lr_scale"] == 0.0) == len(
        list(cell.parameters()))
    unscaled = tiny().replace(state_cell_scale=1.0)
    plain = Trainer(unscaled, settings(tmp_path, out_dir=str(tmp_path / "plain"), state_lr_scale=1.0))
    assert [(g["weight_decay"], g["lr_scale"]) for g in plain.optimizer.param_groups] == [(0.1, 1.0), (0.0, 1.0)]
    # cells stored scaled (the default) decay at that fraction too, as they step
    scaled = Trainer(tiny(), settings(tmp_path, out_dir=str(tmp_path / "scaled")))
    decays = {round(g["weight_decay"], 12): len(g["params"]) for g in scaled.optimizer.param_groups}
    assert decays.keys() == {0.1, 0.0, 0.01} and decays[0.01] == sum(
        p.ndim >= 2 for p in scaled.model.layers[0].attn.cell.parameters())


def test_a_run_saved_before_the_newer_settings_resumes_as_it_ran(tmp_path):
    """A checkpoint whose trainer.json predates replay_write and state_lr_scale resumes with what it ran with
    (no replay, every parameter at the same learning rate), not with today's defaults."""
    from block_recurrent.training.trainer import resume_configs

    one_block = tiny().replace(max_seq_len=32)
    config = settings(tmp_path, replay_write=False, state_lr_scale=1.0)  # as every run before these settings
    with pytest.warns(UserWarning, match="gets no gradient"):
        first = Trainer(one_block, config)
    losses_of(first, 1)
    first.save()
    first.close()
    saved = load_training_checkpoint(latest_checkpoint(tmp_path / "run"))
    for name in ("replay_write", "state_lr_scale"):
        del saved.trainer["train_config"][name]
    _, resumed_config = resume_configs(saved)
    assert resumed_config.replay_write is False and resumed_config.state_lr_scale == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that the write stays untrained
        resumed = Trainer(one_block, resumed_config, resume=saved)
    assert not resumed.replay_write and resumed.step == 1


def test_the_run_loop_keeps_its_own_clock_and_a_resumed_run_counts_on_from_the_checkpoint(tmp_path):
    """RunLoop hands the training time to Trainer.save instead of changing the trainer's fields; a resumed run's
    time starts from what its checkpoint recorded."""
    config = settings(tmp_path, max_steps=2, checkpoint_every=2)
    trainer = Trainer(tiny(), config)
    trainer.fit()
    trainer.close()
    assert trainer.elapsed == 0.0  # the loop did not reach into the trainer
    first = load_training_checkpoint(tmp_path / "run").trainer["elapsed_s"]
    assert first > 0
    resumed = Trainer(tiny(), config.replace(max_steps=4), resume=True)
    assert resumed.elapsed == first
    resumed.fit()
    resumed.close()
    assert load_training_checkpoint(tmp_path / "run").trainer["elapsed_s"] > first


def test_the_carried_state_format_round_trips_any_split_of_the_rows():
    """state.carry_to_tensors / carry_from_tensors: the one checkpoint format of a trainer's carry. Rows of any
    micro-batch come back as saved; a memory without a validity mask and a write that started from the learned
    initial state come back as None, so the resumed run takes the same computation path."""
    from block_recurrent import BlockRecurrentTransformer
    from block_recurrent.model.state import ModelState, XLMemory, carry_from_tensors, carry_to_tensors

    torch.manual_seed(0)
    model = BlockRecurrentTransformer(tiny())
    _, state = model.run(torch.randint(0, 256, (4, 40)))
    state = ModelState(tuple(XLMemory(m.keys, m.values, None) for m in state.memories), state.states)
    written = (state.states[0][:2], None)  # two micro-batches of two rows: one written from a state, one initial
    parts = [carry_to_tensors(state.select_rows(torch.arange(2 * m, 2 * m + 2)), (written[m],), model.initial_states())
             for m in range(2)]
    tensors = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    for m in range(2):
        rows = torch.arange(2 * m, 2 * m + 2)
        back, written_from = carry_from_tensors(tensors, model.config, rows, total_rows=4)
        assert all(b.valid is None and torch.equal(b.keys, s.keys[rows]) for b, s in zip(back.memories, state.memories))
        assert torch.equal(back.states[0], state.states[0][rows])
        assert (written_from[0] is None) == (m == 1)
    with pytest.raises(ValueError, match="expected 8 rows"):
        carry_from_tensors(tensors, model.config, torch.arange(2), total_rows=8)
