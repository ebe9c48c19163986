"""Cached generation: teacher-forced decoding equals the plain forward pass, greedy equals recompute, and
the public entry points keep their shapes, their reproducibility and their input checks."""

import dataclasses

import pytest
import torch

from block_recurrent import ModelState, RecurrentTrainerWrapper
from block_recurrent.inference.generation import DecodeState, commit_partial, decode_step, generate, prefill, sample, stream

from conftest import TINY, make_model, random_tokens

W, N = TINY["block_width"], TINY["max_seq_len"]  # 4, 16


CONFIGS = {
    "default": {},
    "compressed": dict(use_compressed_mem=True),
    "read_below_write": dict(recurrent_layers=(3,), read_recurrent_layers=(1,), gate_projection=True),
    "two_states": dict(depth=4, recurrent_layers=(2, 4), read_recurrent_layers=(1, 4), all_layers_qk_rmsnorm=True),
    "sliding_t5_feedback": dict(attention_window="sliding", position_encoding="t5", state_feedback=True,
                                gate="lstm", state_update="dual"),
    "t5_compressed": dict(position_encoding="t5", use_compressed_mem=True),
    "meliad": dict(kv_heads=2, ff_activation="relu", qk_norm_gains=False, all_layers_qk_rmsnorm=True,
                   gate_projection=False, attention_window="sliding", position_encoding="t5"),
    "grouped_query": dict(heads=4, kv_heads=2, use_compressed_mem=True, state_feedback=True, gate="lstm",
                          gate_projection=False),
    "slot_write": dict(state_write="slots", heads=4, kv_heads=2),
    "delta_write_feedback": dict(state_write="delta", heads=4, kv_heads=2, state_feedback=True),
}


def eval_model(dtype=torch.float64, **overrides):
    """A tiny model in eval mode, dropout-free, so that every pass is deterministic."""
    model = make_model(dtype, **overrides).eval()
    assert not model.training and model.config.attn_dropout == 0 and model.config.ff_dropout == 0
    return model


def teacher_forced(model, text, prompt_len):
    """Logits (B, T - prompt_len + 1, V) at positions prompt_len - 1 .. T - 1: prefill, then one token at a time."""
    with torch.no_grad():
        logits, ds = prefill(model, text[:, :prompt_len])
        out = [logits]
        for t in range(prompt_len, text.shape[1]):
            logits, ds = decode_step(model, text[:, t], ds)
            out.append(logits)
    return torch.stack(out, dim=1), ds


def full_logits(model, text):
    with torch.no_grad():
        return model.run(text)[0]


def greedy_by_recompute(model, prompt, steps):
    """The specification of greedy decoding: rerun the whole text for every token."""
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):
            nxt = model.run(seq)[0][:, -1].argmax(dim=-1)
            seq = torch.cat((seq, nxt[:, None]), dim=1)
    return seq[:, prompt.shape[1]:]


# exactness


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("prompt_len", [1, 3, W, 2 * N + 5])  # < block, = block, several segments
def test_teacher_forced_equals_forward_float64(config, prompt_len):
    model = eval_model(**CONFIGS[config])
    text = random_tokens(2, 2 * N + 13)  # crosses block and segment boundaries after any prompt
    cached, _ = teacher_forced(model, text, prompt_len)
    expected = full_logits(model, text)[:, prompt_len - 1:]
    assert cached.shape == expected.shape
    torch.testing.assert_close(cached, expected, rtol=0, atol=1e-10)


def test_teacher_forced_equals_forward_float32():
    model = eval_model(torch.float32, use_compressed_mem=True)
    text = random_tokens(3, 3 * N + 2)
    cached, _ = teacher_forced(model, text, 5)
    torch.testing.assert_close(cached, full_logits(model, text)[:, 4:], rtol=0, atol=1e-4)


def test_decoding_detects_a_wrong_commit():
    """The equivalence above can fail: a decoder that forgets the state write at block ends is caught."""
    model = eval_model()
    text = random_tokens(1, 3 * W + 1)
    expected = full_logits(model, text)
    commit = model.commit_block

    def commit_without_state_write(state, views, caches):
        return ModelState(commit(state, views, caches).memories, state.states)

    model.commit_block = commit_without_state_write  # an instance attribute, removed below
    try:
        cached, _ = teacher_forced(model, text, 1)
    finally:
        del model.commit_block
    assert (cached - expected[:, :]).abs().max() > 1e-6


def test_prefill_in_pieces_equals_one_prefill():
    model = eval_model(use_compressed_mem=True)
    text = random_tokens(2, 2 * N + 3)
    with torch.no_grad():
        whole_logits, whole = prefill(model, text)
        logits, ds = prefill(model, text[:, :6])  # ends mid-block
        logits, ds = prefill(model, text[:, 6:23], state=ds)  # continues that block
        logits, ds = prefill(model, text[:, 23:], state=ds)
    torch.testing.assert_close(logits, whole_logits, rtol=0, atol=1e-12)
    assert ds.position == whole.position == text.shape[1] % W
    for a, b in zip(ds.committed.memories, whole.committed.memories):
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=1e-12)


def test_decode_from_a_committed_model_state():
    """A ModelState from model.run over whole blocks continues the document exactly."""
    model = eval_model()
    text = random_tokens(2, N + 2 * W + 3)
    with torch.no_grad():
        _, state = model.run(text[:, : N + W])
        logits, ds = prefill(model, text[:, N + W:], state=state)
    torch.testing.assert_close(logits, full_logits(model, text)[:, -1], rtol=0, atol=1e-10)


def test_decode_state_stays_bounded():
    model = eval_model(use_compressed_mem=True)
    _, ds = generate(model, random_tokens(1, 3), 10 * N, temperature=0, return_state=True)
    assert ds.position < W and (ds.partial is None or ds.partial[0][0].shape[1] == ds.position)
    assert all(m.length <= model.config.max_memory_len for m in ds.committed.memories)


def test_commit_partial_equals_run_of_the_text_so_far():
    model = eval_model()
    text = random_tokens(2, N + 3)
    with torch.no_grad():
        _, ds = prefill(model, text)
        committed = commit_partial(model, ds)
        _, expected = model.run(text)
    for a, b in zip(committed.memories, expected.memories):
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=1e-12)
    torch.testing.assert_close(committed.states[0], expected.states[0], rtol=0, atol=1e-12)


# generation


@pytest.mark.parametrize("config", ["default", "read_below_write", "sliding_t5_feedback"])
def test_greedy_equals_argmax_by_recompute(config):
    model = eval_model(**CONFIGS[config])
    prompt = random_tokens(2, 5)
    steps = 2 * N + 3  # past two segments
    tokens = generate(model, prompt, steps, temperature=0)
    assert torch.equal(tokens, greedy_by_recompute(model, prompt, steps))


def test_reference_generate_greedy_and_shapes():
    model = eval_model()
    prime = random_tokens(2, 5)
    out = model.generate(prime)  # default length: max_seq_len + 1, counting the prime
    assert out.shape == (2, N + 1 - 5)
    greedy = model.generate(prime, 3 * N, temperature=0.0)  # beyond max_seq_len + 1: not possible in the reference
    assert greedy.shape == (2, 3 * N - 5)
    assert torch.equal(greedy, greedy_by_recompute(model, prime, 3 * N - 5))
    long_prime = model.generate(random_tokens(1, 2 * N + 1), 2 * N + 4)
    assert long_prime.shape == (1, 3)


def test_reference_generate_memories_and_states():
    model = eval_model()
    prime = random_tokens(2, 5)
    out, memories, states = model.generate(prime, N + 1, temperature=0.0, return_memories_and_states=True)
    assert out.shape == (2, N + 1 - 5)
    assert len(memories) == model.config.depth and len(states) == len(model.config.recurrent_layers)
    assert all(m.keys.shape == (2, W, model.config.dim_head) for m in memories)
    assert states[0].shape == (2, model.config.num_state_vectors, model.config.dim)
    # as the reference: the state after the whole window, i.e. all tokens but the last generated one
    window = torch.cat((prime, out), dim=1)[:, :-1]
    with torch.no_grad():
        _, ref_memories, ref_states = model(window, return_memories_and_states=True)
    torch.testing.assert_close(memories[1].values, ref_memories[1].values, rtol=0, atol=1e-12)
    torch.testing.assert_close(states[0], ref_states[0], rtol=0, atol=1e-12)


def test_wrapper_generate_shapes_and_starting_state():
    model = eval_model()
    wrapper = RecurrentTrainerWrapper(model).eval()
    prime = random_tokens(2, 3)
    assert wrapper.generate(prime, 3 * N + 7).shape == (2, 3 * N + 4)
    # starting from given memories/states = continuing the text that produced them
    history = random_tokens(2, N, seed=5)
    with torch.no_grad():
        _, memories, states = model(history, return_memories_and_states=True)
    continued = wrapper.generate(prime, 12, xl_memories=memories, states=states, temperature=0.0)
    assert torch.equal(continued, greedy_by_recompute(model, torch.cat((history, prime), 1), 9))
    fresh = wrapper.generate(prime, 12, temperature=0.0)
    assert not torch.equal(continued, fresh)


def test_continue_from_returned_decode_state():
    model = eval_model()
    prompt = random_tokens(2, 6)
    first, ds = generate(model, prompt, 7, temperature=0, return_state=True)
    # the returned state has seen all but the last generated token: that token is the next prompt
    second = generate(model, first[:, -1:], 9, temperature=0, state=ds)
    assert torch.equal(torch.cat((first, second), 1), greedy_by_recompute(model, prompt, 16))


def test_sampling_is_reproducible_with_a_generator():
    model = eval_model()
    prompt = random_tokens(2, 4)
    run = lambda seed: generate(model, prompt, 40, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
    streamed = torch.stack(list(stream(model, prompt, 40, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(3))), 1)
    assert torch.equal(streamed, run(3))


def test_sample_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))
    assert torch.equal(sample(logits, 1.0, top_k=1, generator=g), logits.argmax(-1))
    assert torch.equal(sample(logits, 1.0, top_p=1e-6, generator=g), logits.argmax(-1))
    top3 = logits.topk(3, dim=-1).indices
    draws = torch.stack([sample(logits, 2.0, top_k=3, generator=g) for _ in range(200)], 1)  # (4, 200)
    assert (draws[:, :, None] == top3[:, None, :]).any(-1).all()
    # nucleus: the kept ids are the most likely ones until their mass reaches top_p
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < 0.5
    draws = torch.stack([sample(logits, 1.0, top_p=0.5, generator=g) for _ in range(200)], 1)
    for row in range(4):
        allowed = set(order[row][keep[row]].tolist())
        assert set(draws[row].tolist()) <= allowed and len(set(draws[row].tolist())) >= min(2, len(allowed))


def test_sampling_draws_as_torch_multinomial_does_from_the_same_generator():
    """sample's exponential-race draw is torch.multinomial's own algorithm: the same ids from the same seed, over
    the whole vocabulary and, among the top k, the same as multinomial over the vocabulary with the rest masked
    (how top-k sampling drew before it took the shortcut), and so the same distribution."""
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    ours, theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(100):
        assert torch.equal(sample(logits, 1.3, generator=ours),
                           torch.multinomial((logits / 1.3).softmax(-1), 1, generator=theirs)[:, 0])
        scaled = logits / 0.7
        masked = scaled.masked_fill(scaled < scaled.topk(5, dim=-1).values[:, -1:], float("-inf"))
        assert torch.equal(sample(logits, 0.7, top_k=5, generator=ours),
                           torch.multinomial(masked.softmax(-1), 1, generator=theirs)[:, 0])


def test_eos_stops_and_pads():
    model = eval_model()
    prompt = random_tokens(2, 5)
    greedy = generate(model, prompt, 20, temperature=0)
    eos = int(greedy[0, 3])
    out = generate(model, prompt, 20, temperature=0, eos_token=eos)
    first = [int((row == eos).nonzero()[0]) if (row == eos).any() else None for row in greedy]
    assert out.shape[1] == (max(first) + 1 if None not in first else 20)
    for row, stop in enumerate(first):
        if stop is not None:
            assert torch.equal(out[row, : stop + 1], greedy[row, : stop + 1])
            assert (out[row, stop:] == eos).all()


def test_generate_under_inference_mode_and_restores_training_mode():
    model = make_model(attn_dropout=0.5, ff_dropout=0.5).eval()
    prompt = random_tokens(2, 5)
    expected = greedy_by_recompute(model, prompt, 12)  # eval mode: dropout off
    model.train()
    with torch.inference_mode():
        tokens = generate(model, prompt, 12, temperature=0)
    assert model.training  # the caller's mode is restored
    assert torch.equal(tokens, expected)  # and generation itself ran without dropout


# bad input


def test_bad_inputs_raise_clear_errors():
    model = eval_model()
    prompt = random_tokens(2, 3)
    with pytest.raises(ValueError, match="prompt"):
        generate(model, prompt[:, :0], 4)
    with pytest.raises(ValueError, match=r"allowed range is \[0, 31\]"):
        generate(model, torch.tensor([[1, 32]]), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, -1)
    with pytest.raises(TypeError, match="max_new_tokens"):
        generate(model, prompt, 2.5)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, 4, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, prompt, 4, top_k=0)
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            generate(model, prompt, 4, top_p=top_p)
    with pytest.raises(ValueError, match="eos_token"):
        generate(model, prompt, 4, eos_token=32)
    with pytest.raises(TypeError, match="generator"):
        generate(model, prompt, 4, generator=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        stream(model, prompt, -1)


def test_incompatible_states_raise():
    model = eval_model()
    prompt = random_tokens(2, 3)
    with torch.no_grad():
        _, state3 = model.run(random_tokens(3, W))
        _, ds3 = prefill(model, random_tokens(3, 2))
    with pytest.raises(ValueError, match="batch size"):
        generate(model, prompt, 4, state=state3)
    with pytest.raises(ValueError, match="batch size"):
        generate(model, prompt, 4, state=ds3)
    with pytest.raises(TypeError, match="state"):
        generate(model, prompt, 4, state=[1])
    with pytest.raises(ValueError, match="position"):
        full = tuple(cache._replace(filled=W) for cache in ds3.caches)  # a block that was never committed
        generate(model, random_tokens(3, 2), 4, state=dataclasses.replace(ds3, caches=full))
    with pytest.raises(TypeError, match="decode_state"):
        decode_step(model, prompt[:, 0], state3)
    other = eval_model(dim_head=4)
    with torch.no_grad():
        _, foreign = other.run(random_tokens(2, W))
    with pytest.raises(ValueError, match="dim_head"):
        generate(model, prompt, 4, state=foreign)


def test_reference_signature_bad_inputs():
    model = eval_model()
    prime = random_tokens(2, 5)
    with pytest.raises(ValueError, match="length"):
        model.generate(prime, 5)
    with pytest.raises(ValueError, match="length"):
        model.generate(prime, -3)
    with pytest.raises(ValueError, match="filter_thres"):
        model.generate(prime, 8, filter_thres=1.0)
    with pytest.raises(ValueError, match="states"):
        model.generate(prime, 8, states=[torch.zeros(3, 3, 32, dtype=torch.float64)])
    with pytest.raises(ValueError, match="prime"):
        RecurrentTrainerWrapper(model).generate(prime[:, :0], 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_and_inference_mode(dtype):
    """Mixed precision (CPU autocast here; the code path is dtype-agnostic) runs and stays near float32."""
    model = eval_model(torch.float32, use_compressed_mem=True, all_layers_qk_rmsnorm=True)
    text = random_tokens(2, N + 2 * W + 3)
    expected = full_logits(model, text)[:, 4:]
    with torch.autocast("cpu", dtype=dtype), torch.inference_mode():
        cached, _ = teacher_forced(model, text, 5)
        tokens = generate(model, text[:, :5], 2 * N, top_k=5, generator=torch.Generator().manual_seed(0))
    assert cached.dtype in (torch.float32, dtype)
    torch.testing.assert_close(cached.float(), expected, rtol=0, atol=0.05)
    assert tokens.shape == (2, 2 * N) and 0 <= int(tokens.min()) and int(tokens.max()) < TINY["num_tokens"]


def test_low_precision_model():
    model = eval_model(torch.bfloat16)
    text = random_tokens(2, N + 5)
    with torch.inference_mode():
        cached, _ = teacher_forced(model, text, 3)
    torch.testing.assert_close(cached.float(), full_logits(model, text)[:, 2:].float(), rtol=0, atol=0.05)


@pytest.mark.parametrize("config", ["compressed", "sliding_t5_feedback"])
def test_decode_from_a_state_with_reset_rows(config):
    """Row 0 starts a new document: its memory slots turn invalid and decoding must mask them as run does."""
    model = eval_model(**CONFIGS[config])
    history, text = random_tokens(2, N + W, seed=3), random_tokens(2, N + 3)
    reset = torch.tensor([True, False])
    with torch.no_grad():
        _, state = model.run(history)
        expected, _ = model.run(text, state, reset=reset)
        reset_state = state.reset_rows(reset, model.initial_states())
        logits, ds = prefill(model, text[:, :2], state=reset_state)
        cached = [logits]
        for t in range(2, text.shape[1]):
            logits, ds = decode_step(model, text[:, t], ds)
            cached.append(logits)
    torch.testing.assert_close(torch.stack(cached, 1), expected[:, 1:], rtol=0, atol=1e-10)


def test_stream_checks_its_state_before_the_first_token():
    model = eval_model()
    with torch.no_grad():
        _, state3 = model.run(random_tokens(3, W))
    with pytest.raises(ValueError, match="batch size"):
        stream(model, random_tokens(2, 3), 4, state=state3)  # no next() needed


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_two_continuations_from_one_decode_state_are_both_exact(mode):
    """Decode states are values: continuing one of them twice (beam-search style) must not let the
    second continuation see what the first wrote into shared block buffers."""
    model = eval_model(**CONFIGS["compressed"])
    text_a = random_tokens(2, 3 * W + 2, seed=21)
    text_b = text_a.clone()
    text_b[:, W + 1 :] = random_tokens(2, 2 * W + 1, seed=22)
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with context():
        _, shared = prefill(model, text_a[:, : W + 1])  # mid-block: the buffers hold a partial block
        branches = {}
        for name, text in (("a", text_a), ("b", text_b), ("a_again", text_a)):
            ds, out = shared, []
            for t in range(W + 1, text.shape[1]):
                logits, ds = decode_step(model, text[:, t], ds)
                out.append(logits)
            branches[name] = torch.stack(out, dim=1)
        expected_a = model.run(text_a)[0][:, W + 1 :]
        expected_b = model.run(text_b)[0][:, W + 1 :]
    torch.testing.assert_close(branches["a"], expected_a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(branches["b"], expected_b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(branches["a_again"], expected_a, rtol=1e-10, atol=1e-10)
