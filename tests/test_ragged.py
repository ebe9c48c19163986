"""Prompts of different lengths side by side: every row is decoded exactly as it would be alone."""

import pytest
import torch

from block_recurrent.inference.generation import decode_step, generate, prefill, stream

from conftest import TINY, make_model, needs_cpp_compiler, random_tokens
from test_generation import CONFIGS

W, N = TINY["block_width"], TINY["max_seq_len"]  # 4, 16
# shorter than, equal to and longer than a block and than max_seq_len; two of equal tail length
LENGTHS = [1, 3, W, W + 1, 2 * W + 1, N, N + 3, 3 * N + 2]


def prompts_of(lengths, seed=0):
    return [random_tokens(1, n, seed=seed + i)[0] for i, n in enumerate(lengths)]


@pytest.mark.parametrize("config", CONFIGS)
def test_teacher_forced_ragged_logits_equal_each_rows_forward_pass(config):
    model = make_model(**CONFIGS[config])
    steps = 2 * W + 3  # crosses block ends at a different step in every row
    texts = prompts_of([n + steps for n in LENGTHS])
    with torch.no_grad():
        logits, rs = prefill(model, [t[:n] for t, n in zip(texts, LENGTHS)])
        got = [logits]
        for k in range(steps):
            logits, rs = decode_step(model, torch.stack([t[n + k] for t, n in zip(texts, LENGTHS)]), rs)
            got.append(logits)
    got = torch.stack(got, dim=1)  # (B, steps + 1, V)
    for row, (text, n) in enumerate(zip(texts, LENGTHS)):
        with torch.no_grad():
            expected = model.run(text[None])[0][0, n - 1 : n + steps]
        torch.testing.assert_close(got[row], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("config", ["default", "compressed", "sliding_t5_feedback", "meliad", "grouped_query"])
def test_ragged_greedy_equals_each_prompt_alone(config):
    model = make_model(**CONFIGS[config])
    prompts = prompts_of(LENGTHS, seed=5)
    together = generate(model, prompts, 3 * W + 1, temperature=0)
    assert isinstance(together, list) and len(together) == len(prompts)
    for prompt, row in zip(prompts, together):
        assert torch.equal(row, generate(model, prompt, 3 * W + 1, temperature=0)[0])


def test_each_row_stops_at_its_own_end_token_and_stream_yields_rows():
    model = make_model()
    prompts = prompts_of(LENGTHS, seed=2)
    free = generate(model, prompts, 12, temperature=0)
    eos = int(free[0][3])  # a token row 0 produces at step 3
    ended = generate(model, prompts, 12, temperature=0, eos_token=eos)
    for row, full in zip(ended, free):
        hits = (full == eos).nonzero()
        expected = full if hits.numel() == 0 else full[: int(hits[0, 0]) + 1]
        assert torch.equal(row, expected)
    assert len(ended[0]) <= 4
    steps = list(stream(model, prompts, 5, temperature=0))
    assert len(steps) == 5 and all(t.shape == (len(prompts),) for t in steps)
    assert torch.equal(torch.stack(steps, dim=1), torch.stack([row[:5] for row in free]))


def test_padding_instead_would_change_the_answer():
    """Why the ragged decoder exists: left-padding a short prompt to a batch moves its blocks."""
    model = make_model()
    short, long = prompts_of([W + 1, 2 * W + 3], seed=3)
    padded = torch.cat((torch.zeros(W + 2, dtype=torch.long), short))[None]  # as long as `long`
    alone = generate(model, short, 8, temperature=0)[0]
    assert not torch.equal(generate(model, padded, 8, temperature=0)[0], alone)
    assert torch.equal(generate(model, [short, long], 8, temperature=0)[0], alone)


def test_ragged_input_checks():
    model = make_model()
    with pytest.raises(TypeError, match="prompts must be a non-empty list"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a 1-D tensor"):
        generate(model, [random_tokens(1, 3)[0], random_tokens(2, 3)], 3)
    with pytest.raises(ValueError, match=r"prompts\[0\] holds token ids"):
        generate(model, [torch.tensor([0, TINY["num_tokens"]])], 3)
    with pytest.raises(ValueError, match="state must be None"):
        _, ds = generate(model, random_tokens(1, 3), 2, return_state=True)
        generate(model, [random_tokens(1, 3)[0]], 3, state=ds)


# compiled decoding: the same token pass under torch.compile, on the ragged decoder's fixed-shape buffers


@needs_cpp_compiler
def test_compiled_token_pass_equals_eager_and_compiles_once_for_every_position_and_block():
    """Teacher-forced through two block ends, each row at its own position: the compiled pass's logits equal
    the eager pass's within rounding, and after the first call no position, commit or new block recompiles."""
    from torch._dynamo.utils import counters

    model = make_model()  # float64: the two passes differ only by the order of rounding
    lengths = [3, W + 2]
    steps = 2 * W + 1
    texts = prompts_of([n + steps for n in lengths])
    with torch.no_grad():
        _, eager = prefill(model, [t[:n] for t, n in zip(texts, lengths)])
        _, fast = prefill(model, [t[:n] for t, n in zip(texts, lengths)])
        graphs = None
        for k in range(steps):
            token = torch.stack([t[n + k] for t, n in zip(texts, lengths)])
            expected, eager = decode_step(model, token, eager)
            got, fast = decode_step(model, token, fast, compiled=True)
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
            if k == 0:
                graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs


@needs_cpp_compiler
def test_compiled_generation_continues_a_model_state_as_eager_generation_does():
    model = make_model()
    text = random_tokens(2, 2 * W + 1)
    _, state = model.run(text)  # a committed state: the prompt starts a new block
    prompt = random_tokens(2, 3, seed=5)
    expected = generate(model, prompt, 2 * W, temperature=0, state=state)
    got = generate(model, prompt, 2 * W, temperature=0, state=state, compile=True)
    assert torch.equal(got, expected)
    streamed = torch.stack(list(stream(model, prompt[0], 3, temperature=0, compile=True)), dim=1)
    assert torch.equal(streamed, generate(model, prompt[:1], 3, temperature=0))


@needs_cpp_compiler
def test_compiled_generation_continues_a_decode_state_and_returns_one():
    """One decoder: an eager decode state continues compiled, and a compiled decode's state continues eagerly."""
    model = make_model()
    prompt = random_tokens(1, 3)
    expected = generate(model, prompt, 3 * W + 3, temperature=0)
    first, ds = generate(model, prompt, W + 1, temperature=0, return_state=True)
    rest, ds = generate(model, first[:, -1:], 2 * W, temperature=0, state=ds, compile=True, return_state=True)
    assert ds.per_row
    assert torch.equal(torch.cat((first, rest), dim=1), expected[:, : 3 * W + 1])
    again = generate(model, rest[:, -1:], 2, temperature=0, state=ds)  # eager, from the compiled decode's state
    assert torch.equal(again, expected[:, 3 * W + 1 :])


def test_compile_must_be_a_bool():
    model = make_model()
    with pytest.raises(TypeError, match="compile must be a bool"):
        generate(model, random_tokens(1, 3), 2, compile="yes")


def test_a_decode_state_continued_twice_is_exact_both_times():
    """Rows at their own positions too: a second continuation copies the buffers the first one wrote into."""
    model = make_model()
    prompts = prompts_of([2, W + 3])

    def continue_with(ds, token):
        out = []
        for _ in range(W + 1):  # crosses both rows' block ends
            logits, ds = decode_step(model, torch.tensor([token, token]), ds)
            out.append(logits)
        return torch.stack(out)

    with torch.no_grad():
        expected = continue_with(prefill(model, prompts)[1], 7)
        _, ds = prefill(model, prompts)
        continue_with(ds, 3)
        got = continue_with(ds, 7)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("own_positions", [False, True])
def test_reordered_rows_continue_as_the_rows_they_came_from(own_positions):
    """Beam search reorders its beams: ds.select_rows([1, 1, 0]) continues rows 1, 1 and 0 exactly."""
    model = make_model(**CONFIGS["grouped_query"])
    texts = random_tokens(2, W + 2 + 2 * W)
    prompt, rest = texts[:, : W + 2], texts[:, W + 2 :]
    with torch.no_grad():
        _, ds = prefill(model, prompt, rows_own=own_positions)
        expected = []
        for t in range(rest.shape[1]):
            logits, ds = decode_step(model, rest[:, t], ds)
            expected.append(logits)
        expected = torch.stack(expected, dim=1)
        _, ds = prefill(model, prompt, rows_own=own_positions)
        order = torch.tensor([1, 1, 0])
        ds = ds.select_rows(order)
        got = []
        for t in range(rest.shape[1]):
            logits, ds = decode_step(model, rest[order, t], ds)
            got.append(logits)
    torch.testing.assert_close(torch.stack(got, dim=1), expected[order], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"rows must be in \[0, 2\]"):
        ds.select_rows(torch.tensor([3]))
