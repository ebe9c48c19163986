"""Truncated back-propagation over segments: same loss and gradients as the plain loop where they agree."""

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
