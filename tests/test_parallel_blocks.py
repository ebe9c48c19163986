"""Blocks side by side (``forward_blocks``): the same numbers as one block at a time, forward and backward."""

import pytest
import torch

from block_recurrent.training.precision import resolve_eval_bf16
from block_recurrent.inference.evaluation import EVAL_SEGMENT_TOKENS, default_segment_len, evaluate, evaluate_documents

from conftest import TINY, make_model, random_tokens
from test_model import VARIANTS, assert_close, assert_states_close

W = TINY["block_width"]
SIDE_BY_SIDE_VARIANTS = [name for name in VARIANTS if name not in ("compressed", "read_below_write", "feedback", "two_recurrent_all_qknorm",
                                                          "grouped_query_compressed")]
# two states, each read by its own writing layer
CASES = {**{name: VARIANTS[name] for name in SIDE_BY_SIDE_VARIANTS}, "two_states": dict(recurrent_layers=(1, 3))}


def one_block_at_a_time(model, tokens, state=None, reset=None):
    """model.run's logits and state, computed with forward_block only."""
    state = model.empty_state() if state is None else state
    if reset is not None:
        state = state.reset_rows(reset, model.initial_states())
    hidden = []
    for block in model.embed(tokens).split(W, dim=1):
        block, state = model.forward_block(block, state)
        hidden.append(block)
    return model.logits(torch.cat(hidden, dim=1)), state


def test_which_configs_run_blocks_side_by_side():
    for name, overrides in VARIANTS.items():
        assert make_model(**overrides).blocks_side_by_side == (name in SIDE_BY_SIDE_VARIANTS), name


@pytest.mark.parametrize("variant", CASES)
def test_side_by_side_equals_one_block_at_a_time_with_carried_memory_and_resets(variant):
    model = make_model(**CASES[variant])
    assert model.blocks_side_by_side
    tokens = random_tokens(3, 6 * W + 2)
    # a first call shorter than a block leaves a memory shorter than a block, which the next call pads
    first, expected_first = model.run(tokens[:, :2]), one_block_at_a_time(model, tokens[:, :2])
    assert first[1].memories[0].length == 2
    reset = torch.tensor([True, False, True])
    logits, state = model.run(tokens, first[1], reset=reset)
    expected_logits, expected_state = one_block_at_a_time(model, tokens, expected_first[1], reset)
    assert_close(logits, expected_logits)
    assert_states_close(state, expected_state)
    # and straight from whole blocks of carried memory
    logits, state = model.run(tokens[:, : 4 * W], state)
    expected_logits, expected_state = one_block_at_a_time(model, tokens[:, : 4 * W], expected_state)
    assert_close(logits, expected_logits)
    assert_states_close(state, expected_state)


@pytest.mark.parametrize("variant", ["plain", "lstm_dual", "sliding_t5", "two_states"])
def test_side_by_side_gradients_equal_one_block_at_a_time(variant):
    model = make_model(**CASES[variant])
    tokens = random_tokens(2, 5 * W + 1)
    carried = model.run(tokens[:, :W])[1]  # gradients also reach the carried memory and state
    carried = type(carried)(tuple(m.detach() for m in carried.memories), tuple(s.detach() for s in carried.states))
    leaves = [carried.memories[0].keys, carried.memories[0].values, carried.states[0]]
    for leaf in leaves:
        leaf.requires_grad_(True)

    def gradients(run):
        logits, state = run(model, tokens[:, :-1], carried)
        loss = model.loss(logits, tokens[:, 1:]) + state.states[0].square().mean()
        return torch.autograd.grad(loss, [*model.parameters(), *leaves], allow_unused=True)

    side_by_side = gradients(lambda m, t, s: m.run(t, s))
    one_by_one = gradients(one_block_at_a_time)
    for got, expected in zip(side_by_side, one_by_one):
        assert (got is None) == (expected is None)
        if got is not None:
            assert_close(got, expected)


def test_forward_blocks_rejects_partial_blocks_and_configs_that_chain_layers():
    model = make_model()
    x = model.embed(random_tokens(1, 2 * W + 1))
    with pytest.raises(ValueError, match="whole blocks"):
        model.forward_blocks(x, model.empty_state())
    with pytest.raises(ValueError, match="side by side"):
        make_model(**VARIANTS["feedback"]).forward_blocks(x[:, : 2 * W], model.empty_state())


def test_evaluation_default_segments_equal_one_block_per_call():
    model = make_model()
    documents = [random_tokens(1, n, seed=n)[0] for n in (3, 9 * W + 3, 30 * W)]
    assert default_segment_len(model, 30 * W) == 30 * W  # capped by the longest document
    assert default_segment_len(model, 10**6) == EVAL_SEGMENT_TOKENS // W * W
    assert default_segment_len(make_model(**VARIANTS["compressed"]), 10**6) == TINY["max_seq_len"]
    side_by_side = evaluate_documents(model, documents)
    one_block = evaluate_documents(model, documents, segment_len=W)
    for got, expected in zip(side_by_side, one_block):
        assert got.tokens == expected.tokens
        assert got.loss_sum == pytest.approx(expected.loss_sum, rel=1e-12)
    alone = evaluate(model, documents[1], segment_len=W)
    assert side_by_side[1].loss_sum == pytest.approx(alone.loss_sum, rel=1e-12)


def test_evaluation_takes_bf16_on_the_cpu_when_blocks_run_side_by_side():
    cpu = torch.device("cpu")
    from block_recurrent.training.precision import native_bf16

    assert resolve_eval_bf16(None, cpu, 16, blocks_side_by_side=True) is native_bf16(cpu)
    assert resolve_eval_bf16(None, cpu, 16, blocks_side_by_side=False) is False
    assert resolve_eval_bf16(False, cpu, 16, blocks_side_by_side=True) is False


def test_forward_blocks_rejects_a_memory_longer_than_a_block():
    from block_recurrent.model.state import ModelState, XLMemory

    model = make_model()
    C = model.config.kv_dim
    memory = XLMemory(torch.zeros(2, 2 * W, C, dtype=torch.float64), torch.zeros(2, 2 * W, C, dtype=torch.float64))
    state = ModelState((memory,) * model.config.depth, (None,))
    with pytest.raises(ValueError, match="at most block_width"):
        model.forward_blocks(model.embed(random_tokens(2, 2 * W)), state)
