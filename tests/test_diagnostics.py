"""Diagnostics: ablations that change exactly what they say, the log-spaced per-position curve, the gates' keep
values, the gradient reaching the state across blocks, and `brt eval --ablate --positions` / `brt inspect` on a
tiny checkpoint."""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from block_recurrent import from_pretrained, save_pretrained
from block_recurrent.cli import main
from block_recurrent.inference.diagnostics import (
    _windows, drop_carried, evaluate_ablated, format_curves, format_keep, format_state_gradients, keep_values,
    log_curve, log_edges, state_gradients, whole,
)
from block_recurrent.inference.evaluation import evaluate_documents
from block_recurrent.model.state import ModelState, XLMemory
from conftest import TINY, make_model, random_tokens

W = TINY["block_width"]


def by_hand(model, document, drop):
    """The summed loss of ``document`` run one block per call, with the state after every block changed by hand:
    the initial state (None) for "state", every memory slot invalid for "memory"."""
    inputs, labels = document[None, :-1], document[None, 1:]
    state, total = None, 0.0
    with torch.no_grad():
        for begin in range(0, inputs.shape[1], W):
            logits, state = model.run(inputs[:, begin : begin + W], state)
            total += model.loss(logits, labels[:, begin : begin + W], reduction="sum").item()
            memories, states = state.memories, state.states
            if drop in ("state", "both"):
                states = (None,) * len(states)
            if drop in ("memory", "both"):
                memories = tuple(XLMemory(m.keys, m.values, torch.zeros(m.keys.shape[:2], dtype=torch.bool))
                                 for m in memories)
            state = ModelState(memories, states)
    return total


@pytest.mark.parametrize("drop", ["state", "memory", "both"])
def test_dropping_what_is_carried_equals_doing_it_by_hand_every_block(model, drop):
    documents = [random_tokens(1, n, seed=n)[0] for n in (5 * W + 3, 2 * W + 1, 9)]
    results = evaluate_ablated(model, documents, drop, batch_size=2)
    for document, result in zip(documents, results):
        assert math.isclose(result.loss_sum, by_hand(model, document, drop), rel_tol=1e-12)
    carried = evaluate_documents(model, documents)
    assert not math.isclose(results[0].loss_sum, carried[0].loss_sum, rel_tol=1e-6)  # it changes something
    assert [r.tokens for r in results] == [r.tokens for r in carried]


def test_dropping_the_state_is_the_initial_state_every_block_and_the_memory_invalid_slots(model):
    """The same as the test above, from the other side: the state handed to every block is exactly the initial
    one (None), and a memory whose slots are all invalid is seen by no token (the block alone)."""
    tokens = random_tokens(1, 3 * W)
    _, state = model.run(tokens)
    dropped = drop_carried(state, "both")
    assert dropped.states == (None,) and all(not m.valid.any() for m in dropped.memories)
    block = random_tokens(1, W, seed=7)
    alone, _ = model.run(block, ModelState(tuple([None] * len(state.memories)), (None,)))
    after, _ = model.run(block, dropped)
    torch.testing.assert_close(after, alone, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="drop must be one of"):
        drop_carried(state, "gate")


def test_log_curve_pools_buckets_into_log_spaced_ranges(model):
    assert log_edges(1024, 1 << 20)[:4] == [0, 1024, 2048, 4096] and log_edges()[-1] == 1 << 20
    documents = [random_tokens(1, n, seed=n)[0] for n in (40, 17)]
    results = evaluate_documents(model, documents, bucket_size=4)
    curve = log_curve(results, [0, 8, 16, 32])
    assert [(b, e, n) for b, e, _, n in curve] == [(0, 8, 16), (8, 16, 16), (16, 32, 16), (32, None, 7)]
    losses = [evaluate_documents(model, [d], bucket_size=1)[0].bucket_losses for d in documents]
    first = sum(loss for doc in losses for start, loss, _ in doc if start < 8) / 16 / math.log(2)
    assert math.isclose(curve[0][2], first, rel_tol=1e-9)
    assert math.isclose(whole(results), sum(r.loss_sum for r in results) / 55 / math.log(2), rel_tol=1e-12)
    table = format_curves({"carried": (whole(results), curve)})
    assert "| carried |" in table and "32+" in table and "8-16" in table
    with pytest.raises(ValueError, match="multiples"):
        log_curve(results, [0, 6])


def test_keep_values_of_both_gates():
    fixed = make_model(gate="fixed")
    summary = keep_values(fixed)[0]
    torch.testing.assert_close(summary.keep, torch.sigmoid(fixed.cells[0].gate.keep_bias.double()))
    assert (summary.layer, summary.kind, summary.blocks) == (2, "fixed", 0)
    torch.testing.assert_close(summary.write, 1 - summary.keep)
    assert summary.keep_range is None
    torch.testing.assert_close(summary.half_lives(), math.log(0.5) / torch.log(summary.keep))

    lstm = make_model(gate="lstm", gate_keep_init=3.0, state_update="dual")
    gate = lstm.cells[0].gate
    zero = keep_values(lstm)
    assert [(s.gate, s.kind) for s in zero] == [("gate", "lstm"), ("ff_gate", "lstm")]
    torch.testing.assert_close(zero[0].keep, torch.sigmoid(gate.to_gates.bias[TINY["dim"]:] + 3.0))
    torch.testing.assert_close(zero[0].write, torch.sigmoid(gate.to_gates.bias[: TINY["dim"]] - 1.0))

    # with documents: the forget gate sigmoid(W_f h + b_f + 3) of every update written, averaged
    updates = []
    hook = gate.register_forward_hook(lambda module, inputs, output: updates.append(inputs[1].detach()))
    documents = [random_tokens(1, n, seed=n)[0] for n in (3 * W + 1, W + 2)]
    evaluate_documents(lstm, documents, segment_len=W)
    hook.remove()
    with torch.no_grad():
        W_f, b_f = gate.to_gates.weight[TINY["dim"]:], gate.to_gates.bias[TINY["dim"]:]
        forget = torch.cat([torch.sigmoid(u.clone() @ W_f.T + b_f + 3.0).reshape(-1, TINY["dim"]) for u in updates])
        W_i, b_i = gate.to_gates.weight[: TINY["dim"]], gate.to_gates.bias[: TINY["dim"]]
        written = torch.cat([torch.sigmoid(u.clone() @ W_i.T + b_i - 1.0).reshape(-1, TINY["dim"]) for u in updates])
    measured = keep_values(lstm, documents)[0]
    assert measured.blocks == forget.shape[0] == 5 * TINY["num_state_vectors"]  # 3 + 2 blocks
    torch.testing.assert_close(measured.keep, forget.mean(dim=0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(measured.write, written.mean(dim=0), rtol=1e-12, atol=1e-12)
    low, high = torch.quantile(forget.mean(dim=1), torch.tensor([0.1, 0.9], dtype=torch.float64)).tolist()
    assert measured.keep_range == pytest.approx((low, high), rel=1e-12) and low < high  # it moves with the update
    assert "| 2 | gate (lstm) |" in format_keep([measured]) and "ff_gate" in format_keep(zero)


def test_state_gradients_equal_a_segment_run_in_one_call():
    """The gradient at the farthest distance is the one a segment of ``span`` blocks run in one call (blocks side
    by side, another code path) sends to the state it starts from; the state alone (memory detached) gets the
    same gradient at d = 0, where no memory lies between, and less of it further back."""
    model = make_model(gate="lstm")
    span, warmup = 4, 2
    documents = [random_tokens(1, n, seed=n)[0] for n in (40 * W, 13 * W + 1, 5 * W)]  # the last holds no window
    # an even number of windows: the median is the mean of the middle two
    every_path = state_gradients(model, documents, span=span, warmup=warmup, max_windows=4, batch_size=3)[0]
    state_alone = state_gradients(model, documents, span=span, warmup=warmup, max_windows=4, batch_size=3,
                                  through_memory=False)[0]
    windows = _windows(documents, (warmup + span) * W + 1, 4)
    assert len(windows) == every_path.windows == 4
    norms, nearest = [], []  # per window: the gradient on the state the span starts from, and on the last block's
    for window in windows:
        tokens = window[None]
        with torch.no_grad():
            _, carried = model.run(tokens[:, : warmup * W])
        start = carried.states[0].detach().requires_grad_()
        logits, _ = model.run(tokens[:, warmup * W : -1], ModelState(carried.memories, (start,)))
        loss = F.cross_entropy(logits[0, -W:], tokens[0, -W:])
        norms.append(torch.autograd.grad(loss, start)[0].norm().item())
        with torch.no_grad():
            _, before = model.run(tokens[:, : (warmup + span - 1) * W])
        last = before.states[0].detach().requires_grad_()
        logits, _ = model.run(tokens[:, (warmup + span - 1) * W : -1], ModelState(before.memories, (last,)))
        loss = F.cross_entropy(logits[0], tokens[0, -W:])
        nearest.append(torch.autograd.grad(loss, last)[0].norm().item())
    assert every_path.norms[-1].item() == pytest.approx(sum(norms) / len(norms), rel=1e-12)
    assert every_path.norms[0].item() == pytest.approx(sum(nearest) / len(nearest), rel=1e-12)
    shares = torch.tensor(norms, dtype=torch.float64) / torch.tensor(nearest, dtype=torch.float64)
    assert every_path.median_shares[-1].item() == pytest.approx(statistics.median(shares.tolist()), rel=1e-12)
    assert every_path.median_shares[0] == 1
    assert every_path.norms[0].item() == pytest.approx(state_alone.norms[0].item(), rel=1e-12)
    assert not torch.allclose(every_path.norms[1:], state_alone.norms[1:], rtol=1e-6)
    assert every_path.relative()[0] == 1 and (every_path.norms > 0).all()
    table = format_state_gradients([every_path, state_alone])
    assert "| 3 |" in table and "every path: layer 2" in table and "norm at 0" in table
    assert f"({every_path.median_shares[3].item():.3f})" in table
    with pytest.raises(ValueError, match="recurrent layer"):
        state_gradients(make_model(recurrent_layers=()), documents)
    with pytest.raises(ValueError, match="no document holds a window"):
        state_gradients(model, documents[2:], span=span, warmup=warmup)
    with pytest.raises(ValueError, match="span must be"):
        state_gradients(model, documents, span=0)


def test_brt_eval_ablate_positions_and_inspect(tmp_path, capsys):
    data = tmp_path / "data"
    for package in ("alpha", "beta"):
        (data / package).mkdir(parents=True)
        for i in range(2):
            (data / package / f"m{i}.py").write_text(f"def {package}_{i}(x):\n    return x * {i}\n" * 20)
    checkpoint = tmp_path / "model"
    save_pretrained(make_model(dtype=torch.float32, num_tokens=256, gate="lstm"), checkpoint)
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--documents", "package",
                 "--ablate", "state", "memory", "--positions"]) == 0
    out = capsys.readouterr().out
    assert "of 2 documents" in out and "| carried (as trained) |" in out
    assert "| memory dropped after every block |" in out
    assert "| 0-1 K |" in out
    assert main(["inspect", "--checkpoint", str(checkpoint), "--data", str(data), "--max-tokens", "500"]) == 0
    out = capsys.readouterr().out
    assert "recurrent layers [2]" in out and "| 2 | gate (lstm) |" in out and "slot updates" in out
    assert main(["inspect", "--checkpoint", str(checkpoint), "--data", str(data), "--state-gradient", "3",
                 "--gradient-windows", "4"]) == 0
    out = capsys.readouterr().out
    assert "4 windows of 8 + 3 blocks" in out and "| 0 | 1.000 (1.000) | 1.000 (1.000) |" in out and "| 2 |" in out
    with pytest.raises(SystemExit) as exit:
        main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--ablate", "gates"])
    assert exit.value.code == 2 and "invalid choice: 'gates'" in capsys.readouterr().err


def test_brt_inspect_a_delta_rule_memory_has_no_keep_table_but_its_state_gradient(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("the delta rule replaces what a key held\n" * 40)
    checkpoint = tmp_path / "model"
    save_pretrained(make_model(dtype=torch.float32, num_tokens=256, heads=4, state_write="delta"), checkpoint)
    assert keep_values(from_pretrained(checkpoint)) == []
    assert main(["inspect", "--checkpoint", str(checkpoint), "--data", str(data), "--state-gradient", "3",
                 "--gradient-windows", "2"]) == 0
    out = capsys.readouterr().out
    assert "a delta-rule memory (no gate)" in out and "| gate |" not in out and "| 0 | 1.000 (1.000) |" in out


@pytest.mark.parametrize("gate", ["fixed", "lstm"])
def test_keep_values_of_the_slot_write_include_each_vectors_share_of_the_step(gate):
    """With the slot write a vector keeps 1 - (1 - keep) * rewrite of its state, rewrite = 1 - exp(-mass won): the
    summary averages that over every update of the documents, for the fixed gate too."""
    from block_recurrent.model import recurrent

    model = make_model(gate=gate, state_write="slots")
    cell = model.cells[0]
    calls, attend_slots = [], recurrent.attend_slots
    hook = cell.gate.register_forward_hook(lambda module, inputs, output: calls.append(inputs[1].detach()))

    def recording(*args):
        mean, mass = attend_slots(*args)
        calls.append(-torch.expm1(-mass.mean(dim=-1, keepdim=True)).detach())
        return mean, mass

    documents = [random_tokens(1, n, seed=n)[0] for n in (3 * W + 1, W + 2)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recurrent, "attend_slots", recording)
        evaluate_documents(model, documents, segment_len=W)
    hook.remove()
    rewrites, updates = calls[0::2], calls[1::2]
    with torch.no_grad():
        if gate == "fixed":
            own = [torch.sigmoid(cell.gate.keep_bias).expand(u.shape) for u in updates]
        else:
            own = [torch.sigmoid(u @ cell.gate.to_gates.weight[TINY["dim"]:].T + cell.gate.to_gates.bias[TINY["dim"]:]
                                 + 3.0) for u in updates]
        keep = torch.cat([(1 - (1 - k) * r).reshape(-1, TINY["dim"]) for k, r in zip(own, rewrites)])
    measured = keep_values(model, documents)[0]
    assert measured.blocks == keep.shape[0] == 5 * TINY["num_state_vectors"] and measured.slot_write
    torch.testing.assert_close(measured.keep, keep.mean(dim=0), rtol=1e-12, atol=1e-12)
    own_keep = torch.cat([k.reshape(-1, TINY["dim"]) for k in own]).mean(dim=0)
    assert (measured.keep > own_keep).all()  # a vector takes less than the gate's whole step
    assert "before each vector's share" in format_keep(keep_values(model))
