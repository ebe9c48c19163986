"""Truncated back-propagation over segments: same loss and gradients as the plain loop where they agree."""

import sys

import pytest
import torch

from block_recurrent import RecurrentTrainerWrapper

from conftest import TINY, make_model, random_tokens


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, tol=1e-10):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("overrides", [{}, dict(use_compressed_mem=True, compressed_mem_factor=2)])
def test_per_segment_backward_equals_plain_loop(overrides):
    model = make_model(**overrides).train()
    wrapper = RecurrentTrainerWrapper(model)
    seq = random_tokens(2, 4 * TINY["max_seq_len"] + 1)

    loss = wrapper(seq)
    loss.backward()
    plain = grads(model)
    model.zero_grad()

    result = wrapper.forward_backward(seq, backward_every=1)
    torch.testing.assert_close(result.loss, loss.detach(), rtol=1e-12, atol=1e-12)
    assert result.tokens == 2 * 4 * TINY["max_seq_len"]
    assert_grads_close(grads(model), plain)


def test_backward_every_k_lets_gradients_cross_segments():
    model = make_model().train()
    wrapper = RecurrentTrainerWrapper(model)
    seq = random_tokens(1, 4 * TINY["max_seq_len"] + 1)

    # by hand: two chunks of two segments, the state kept in the graph inside a chunk
    state, total = None, 0.0
    labels = seq[:, 1:]
    for chunk in range(2):
        chunk_loss = 0.0
        for segment in range(2):
            start = (2 * chunk + segment) * TINY["max_seq_len"]
            logits, state = model.run(seq[:, start : start + TINY["max_seq_len"]], state)
            chunk_loss = chunk_loss + model.loss(logits, labels[:, start : start + TINY["max_seq_len"]], "sum")
        (chunk_loss / labels.numel()).backward()
        total += chunk_loss.item()
        state = state.detach()
    by_hand = grads(model)
    model.zero_grad()

    result = wrapper.forward_backward(seq, backward_every=2)
    assert_grads_close(grads(model), by_hand)
    assert abs(result.loss.item() - total / labels.numel()) < 1e-12
    model.zero_grad()

    # and it differs from per-segment truncation: gradient really crosses the segment boundary
    wrapper.forward_backward(seq, backward_every=1)
    per_segment = grads(model)
    assert not torch.allclose(per_segment["token_emb.weight"], by_hand["token_emb.weight"])


def test_loss_scale_and_ignore_index_weighting():
    model = make_model().train()
    wrapper = RecurrentTrainerWrapper(model)
    x = random_tokens(2, 2 * TINY["max_seq_len"])
    labels = random_tokens(2, 2 * TINY["max_seq_len"], seed=7)
    labels[0, 20:] = -100  # padding in the second segment of row 0

    loss = wrapper(x, labels=labels)
    logits, _ = model.run(x)
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, TINY["num_tokens"]), labels.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    (loss * 0.25).backward()
    reference = grads(model)
    model.zero_grad()
    result = wrapper.forward_backward(x, labels=labels, loss_scale=0.25)
    assert result.tokens == 2 * 2 * TINY["max_seq_len"] - 12
    assert_grads_close(grads(model), reference)


def test_state_carries_across_calls_and_reset():
    model = make_model()
    wrapper = RecurrentTrainerWrapper(model)
    seq = random_tokens(2, 2 * TINY["max_seq_len"] + 1)
    first = wrapper.forward_backward(seq[:, : TINY["max_seq_len"] + 1])
    second = wrapper.forward_backward(seq[:, TINY["max_seq_len"] :], state=first.state)
    whole = wrapper.forward_backward(seq)
    torch.testing.assert_close((first.loss + second.loss) / 2, whole.loss, rtol=1e-12, atol=1e-12)
    # resetting every row equals starting fresh
    fresh = wrapper.forward_backward(seq[:, TINY["max_seq_len"] :])
    reset = wrapper.forward_backward(seq[:, TINY["max_seq_len"] :], state=first.state, reset=torch.tensor([True, True]))
    torch.testing.assert_close(reset.loss, fresh.loss, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(second.loss, fresh.loss)


# the write replayed: backward passes of one block that still train the state's write

WRITE_ONLY = ("to_self_queries", "to_cross_queries", "self_attn", "write_attn", "to_update", "gate", "state_ff",
              "ff_gate")


def is_write_only(name):
    """Parameters that only the state's write uses (the view's norm, IDs and keys/values also serve the reads)."""
    return ".cell." in name and name.split(".cell.")[1].split(".")[0] in WRITE_ONLY


@pytest.mark.parametrize("overrides", [{}, dict(gate="lstm", state_update="dual"), dict(use_compressed_mem=True)])
def test_replayed_write_gets_the_gradient_of_a_two_block_pass(overrides):
    """Two blocks, first fresh: the write at block 1's end is read only by block 2. Backward over both blocks at
    once, or one block per pass with the write replayed: the write's parameters get the same gradient; the loss,
    the states and every other parameter's gradient are those of one block per pass without the replay."""
    W = 4
    model = make_model(max_seq_len=2 * W, block_width=W, **overrides).train()
    seq = random_tokens(3, 2 * W + 1)
    RecurrentTrainerWrapper(model).forward_backward(seq)  # one pass over both blocks
    together = grads(model)
    model.zero_grad(set_to_none=True)

    one_block = make_model(max_seq_len=W, block_width=W, **overrides).train()
    one_block.load_state_dict(model.state_dict())
    wrapper = RecurrentTrainerWrapper(one_block)
    plain = wrapper.forward_backward(seq)
    without = grads(one_block)
    one_block.zero_grad(set_to_none=True)
    replayed = wrapper.forward_backward(seq, replay_write=True)
    with_replay = grads(one_block)

    write_params = [name for name, _ in model.named_parameters() if is_write_only(name)]
    assert write_params and not any(name in without for name in write_params)  # untrained without the replay
    for name in write_params:
        torch.testing.assert_close(with_replay[name], together[name], rtol=1e-10, atol=1e-12, msg=name)
    for name in without:
        if not name.startswith("layers.1.attn.cell."):  # the view's parameters also get the replay's gradient
            torch.testing.assert_close(with_replay[name], without[name], rtol=1e-12, atol=1e-12, msg=name)
    assert replayed.loss == plain.loss
    # the last block's write is left to the next call: the result carries the states it starts from
    assert replayed.state.memories[0].keys.equal(plain.state.memories[0].keys)
    assert not any(torch.equal(a, b) for a, b in zip(replayed.state.states, plain.state.states))
    for a, b in zip(wrapper.written_state(replayed).states, plain.state.states):
        assert torch.equal(a, b)
    assert wrapper.written_state(plain) is plain.state


def test_replayed_write_carries_across_calls():
    """The written_from of one call lets the next call's first block replay the write: two calls of one block
    give the gradients of one call of two; a reset row's replay is discarded with its state."""
    W = 4
    model = make_model(max_seq_len=W, block_width=W).train()
    wrapper = RecurrentTrainerWrapper(model)
    seq = random_tokens(2, 3 * W + 1)
    whole = wrapper.forward_backward(seq, replay_write=True)
    at_once = grads(model)
    model.zero_grad(set_to_none=True)
    # each call weighs its tokens by 1 / (its own tokens): scaled to the whole sequence's 1 / (3 W)
    first = wrapper.forward_backward(seq[:, : W + 1], replay_write=True, loss_scale=1 / 3)
    assert first.written_from == (None,)  # a fresh start: the learned initial state
    second = wrapper.forward_backward(seq[:, W:], state=first.state, replay_write=True,
                                      written_from=first.written_from, loss_scale=2 / 3)
    assert_grads_close(grads(model), at_once)
    torch.testing.assert_close((first.loss + 2 * second.loss) / 3, whole.loss, rtol=1e-12, atol=1e-12)

    # every row reset: the replayed state is replaced by the initial one, so no write gradient at all
    model.zero_grad(set_to_none=True)
    wrapper.forward_backward(seq[:, W : 2 * W + 1], state=first.state, replay_write=True,
                             written_from=first.written_from, reset=torch.tensor([True, True]))
    assert all(p.grad is None or not p.grad.any() for n, p in model.named_parameters() if is_write_only(n))


def test_replayed_write_refuses_what_it_cannot_replay():
    W = 4
    two_blocks = RecurrentTrainerWrapper(make_model(max_seq_len=2 * W, block_width=W))
    with pytest.raises(ValueError, match="replay_write is for backward passes of one block"):
        two_blocks.forward_backward(random_tokens(1, 2 * W + 1), replay_write=True)
    wrapper = RecurrentTrainerWrapper(make_model(max_seq_len=W, block_width=W))
    seq = random_tokens(1, 2 * W + 1)
    with pytest.raises(ValueError, match="replay_write is for backward passes of one block"):
        wrapper.forward_backward(seq, replay_write=True, backward_every=2)
    with pytest.raises(ValueError, match="written_from is given without replay_write"):
        wrapper.forward_backward(seq, written_from=(None,))
    with pytest.raises(ValueError, match="memory does not hold the last block"):
        wrapper.forward_backward(seq, replay_write=True, written_from=(None,))  # no state to go with it
    first = wrapper.forward_backward(seq, replay_write=True)
    with pytest.raises(ValueError, match="written_from must be a tuple of 1"):
        wrapper.forward_backward(seq, state=first.state, replay_write=True, written_from=(None, None))


def test_keep_freed_memory_takes_effect_with_glibc():
    import platform

    from block_recurrent import keep_freed_memory

    took = keep_freed_memory()
    assert isinstance(took, bool)
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert took and keep_freed_memory()  # and again: the same settings
