"""Equivalences and invariants of the model: block-by-block equals one pass, causality, the state matters,
fused attention equals the plain path, per-row reset equals a fresh row."""

import pytest
import torch

from block_recurrent import BlockRecurrentTransformer, ModelState, RecurrentTrainerWrapper
from block_recurrent.model import recurrent
from block_recurrent.model.recurrent import FixedGate, LSTMGate
from block_recurrent.reference import memory_to_reference

from conftest import TINY, make_model, random_tokens

VARIANTS = {
    "plain": {},
    # the paper's and the reference's cell: the fixed gate at its N(0, 0.1) init, parameters stored unscaled
    "fixed_gate": dict(gate="fixed", gate_keep_init="paper", state_cell_scale=1.0),
    "compressed": dict(use_compressed_mem=True, compressed_mem_factor=2),
    "read_below_write": dict(recurrent_layers=(3,), read_recurrent_layers=(1,)),
    "two_recurrent_all_qknorm": dict(recurrent_layers=(1, 3), read_recurrent_layers=(1, 2), all_layers_qk_rmsnorm=True),
    "lstm_dual": dict(gate="lstm", state_update="dual"),
    "slots": dict(state_write="slots"),
    "slots_grouped_fixed_dual": dict(state_write="slots", heads=4, kv_heads=2, gate="fixed", state_update="dual"),
    "delta": dict(state_write="delta", heads=4),
    "delta_grouped_two_recurrent": dict(state_write="delta", heads=4, kv_heads=2, num_state_vectors=6,
                                        recurrent_layers=(1, 3)),
    "xl_baseline": dict(recurrent_layers=()),
    "sliding_t5": dict(attention_window="sliding", position_encoding="t5", t5_num_buckets=8, t5_max_distance=16),
    "sliding_baseline": dict(attention_window="sliding", recurrent_layers=()),
    "feedback": dict(state_feedback=True, gate="lstm"),
    # meliad's architecture: multi-head keys/values, ReLU MLP, no qk gains, every layer L2-normalised, the
    # output projection as the gate's W_z
    "meliad": dict(kv_heads=2, ff_activation="relu", qk_norm_gains=False, all_layers_qk_rmsnorm=True,
                   gate_projection=False, attention_window="sliding", position_encoding="t5"),
    "grouped_query_compressed": dict(heads=4, kv_heads=2, use_compressed_mem=True, compressed_mem_factor=2,
                                     gate="lstm", gate_projection=False, state_update="dual"),
}


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def assert_states_close(a: ModelState, b: ModelState, tol=1e-10):
    assert len(a.memories) == len(b.memories) and len(a.states) == len(b.states)
    for m1, m2 in zip(a.memories, b.memories):
        assert_close(m1.keys, m2.keys, tol)
        assert_close(m1.values, m2.values, tol)
    for s1, s2 in zip(a.states, b.states):
        assert_close(s1, s2, tol)


# an independent formulation of the whole model: plain per-block loops written from the paper and the config,
# reading the modules' weights directly; only the gates (formula-tested below), the T5 buckets (tested by hand)
# and the compressed memory's convolution come from the library


def plain_rotary(t, slots, config, queries):
    """t (..., n, dh) at frame slots ``slots`` (n,): rotary angles and xPos scale from scratch, rotate_half form."""
    dh, width = config.dim_head, config.max_memory_len + config.block_width
    half = torch.arange(0, dh, 2, dtype=torch.float64)
    angles = slots.double()[:, None] / config.rotary_theta ** (half / dh)  # (n, dh / 2)
    angles = torch.cat((angles, angles), dim=-1)
    scale = ((half + 0.4 * dh) / (1.4 * dh))[None, :] ** ((slots.double()[:, None] - width // 2) / config.xpos_scale_base)
    scale = torch.cat((scale, scale), dim=-1)
    if not queries:
        scale = 1 / scale
    t1, t2 = t.chunk(2, dim=-1)
    return t * angles.cos() * scale + torch.cat((-t2, t1), dim=-1) * angles.sin() * scale


def plain_attention(q, k, v, attn, visible=None, bias=None):
    """q (B, H, N, dh); k, v (B, KV, J, dh); attn: the Attention module holding gains and temperature."""
    H, KV = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
    if attn.qk_norm:
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        if attn.q_gain is not None:
            q, k = q * attn.q_gain, k * attn.k_gain
    return q, k, v


def plain_softmax_attention(q, k, v, scale, visible=None, bias=None):
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if bias is not None:
        logits = logits + bias
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    weights = logits.softmax(dim=-1).nan_to_num(0.0)  # a row that sees nothing reads nothing
    return torch.einsum("bhij,bhjd->bhid", weights, v)


def heads(t, n):
    return t.view(*t.shape[:2], n, -1).transpose(1, 2)  # (B, J, n * dh) -> (B, n, J, dh)


def merged(t):
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def plain_layer_norm(x, weight):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, None, 1e-5)


def plain_feed_forward(ff, x):
    projected = plain_layer_norm(x, ff.norm.weight) @ ff.proj_in.weight.T
    if ff.activation == "geglu":
        hidden, gate = projected.chunk(2, dim=-1)
        hidden = torch.nn.functional.gelu(gate) * hidden
    else:
        hidden = projected.relu()
    return hidden @ ff.proj_out.weight.T


def plain_scale(attn, dim_head):
    return attn.temperature[:, None, None] if attn.qk_norm else dim_head**-0.5


def plain_slot_write(cell, q, k, v):
    """Slot Attention's write from normalised queries q (B, H, S, dh) and keys/values k, v (B, H, N, dh): a
    softmax over the vectors and the null slot for each token, each vector the mean of what it won; and how much
    of its new value each vector takes, 1 - exp(-mass), the mass averaged over heads. -> (B, H, S, dh), (B, S, 1)."""
    attn = cell.write_attn
    null = cell.null_query / cell.null_query.norm(dim=-1, keepdim=True)
    if attn.q_gain is not None:
        null = null * attn.q_gain
    B, H, S, dh = q.shape
    logits = torch.einsum("bhsd,bhnd->bhsn", torch.cat((q, null[None, :, None].expand(B, H, 1, dh)), dim=2), k)
    logits = logits * attn.temperature[:, None, None]
    logits[:, :, S] += cell.null_logit[:, None]
    shares = logits.softmax(dim=2)[:, :, :S]
    mass = shares.sum(dim=-1)  # (B, H, S)
    mean = torch.einsum("bhsn,bhnd->bhsd", shares, v) / (mass[..., None] + 1e-6)
    return mean, 1 - torch.exp(-mass.mean(dim=1))[..., None]


def plain_delta_write(cell, state, k, v):
    """The delta rule token after token: state (B, S, D) as per-head matrices, written by the block's raw keys and
    values (B, N, C) of the writing layer. -> (B, S, D)."""
    B, S, D = state.shape
    H = cell.heads
    memory = state.view(B, S, H, -1).transpose(1, 2)  # (B, H, S, dh)
    written = (torch.cat((k, v), dim=-1) @ cell.to_write.weight.T + cell.to_write.bias).view(B, k.shape[1], H, -1)
    for t in range(k.shape[1]):
        key, value, strength = written[:, t].split((S, cell.dim_head, 1), dim=-1)  # (B, H, ...)
        key = key / key.norm(dim=-1, keepdim=True)
        stored = torch.einsum("bhs,bhsd->bhd", key, memory)
        memory = memory + torch.sigmoid(strength)[..., None] * key[..., None] * (value - stored)[:, :, None]
    return memory.transpose(1, 2).reshape(B, S, D)


def plain_run(model, tokens):
    """Logits of ``tokens`` (B, T) from a fresh state, one block at a time, written without the library's layers."""
    config = model.config
    B, T = tokens.shape
    W, H, KV, dh = config.block_width, config.heads, config.kv_heads, config.dim_head
    memories = [None] * config.depth  # per layer (keys, values) raw, (B, M, KV * dh)
    states = [cell.initial_state.expand(B, -1, -1) for cell in model.cells]
    outputs = []
    for start in range(0, T, W):
        x = model.token_emb.weight[tokens[:, start : start + W]]  # (B, N, D)
        N = x.shape[1]
        # 1. each state's view: normed state plus IDs, keys and values
        views = []
        for cell, state in zip(model.cells, states):
            if config.state_write == "delta":
                views.append(state.view(B, state.shape[1], H, dh).transpose(1, 2))  # per-head matrices
                continue
            normed_state = plain_layer_norm(state, cell.norm.weight) + cell.state_ids
            views.append((normed_state, *(normed_state @ cell.to_state_kv.weight.T).chunk(2, dim=-1)))
        block_kv = []
        for index, layer in enumerate(model.layers):
            a = layer.attn
            normed = plain_layer_norm(x, a.norm.weight)
            q = heads(normed @ a.to_q.weight.T, H)
            k, v = (normed @ a.to_kv.weight.T).chunk(2, dim=-1)
            block_kv.append((k, v))
            memory = memories[index]
            M = 0 if memory is None else memory[0].shape[1]
            keys = k if memory is None else torch.cat((memory[0], k), dim=1)
            values = v if memory is None else torch.cat((memory[1], v), dim=1)
            qn, kn, vn = plain_attention(q, heads(keys, KV), heads(values, KV), a.attn)
            query_pos, key_pos = torch.arange(N), torch.arange(-M, N)
            if config.position_encoding == "rotary_xpos":
                qn = plain_rotary(qn, query_pos + config.max_memory_len, config, queries=True)
                kn = plain_rotary(kn, key_pos + config.max_memory_len, config, queries=False)
            distance = query_pos[:, None] - key_pos[None, :]  # (N, M + N)
            if config.attention_window == "sliding":
                visible = (distance >= 1) & (distance <= W)
            else:
                visible = distance >= 0
            bias = None
            if config.position_encoding == "t5":
                from block_recurrent.model.positions import t5_relative_bucket

                bias = a.position_bias.bias[:, t5_relative_bucket(distance, config.t5_num_buckets, config.t5_max_distance)]
            outs = [merged(plain_softmax_attention(qn, kn, vn, plain_scale(a.attn, dh), visible, bias))]
            for read, i in zip(a.state_reads, a.reads):
                if config.state_write == "delta":
                    address = heads(normed @ read.to_queries.weight.T, H) @ read.to_address.weight.T  # (B, H, N, S)
                    address = address / address.norm(dim=-1, keepdim=True)
                    outs.append(merged(address @ views[i]))
                    continue
                rq, rk, rv = plain_attention(heads(normed @ read.to_queries.weight.T, H), heads(views[i][1], KV),
                                             heads(views[i][2], KV), read.attn)
                outs.append(merged(plain_softmax_attention(rq, rk, rv, plain_scale(read.attn, dh))))
            x = x + torch.cat(outs, dim=-1) @ a.to_out.weight.T
            x = x + plain_feed_forward(layer.ff, x)
        outputs.append(plain_layer_norm(x, model.norm_out.weight) @ model.to_logits.weight.T)
        # 2. commit: memories keep the last block (compressed memory: the library's update), states are rewritten
        for index, layer in enumerate(model.layers):
            k, v = block_kv[index]
            if config.use_compressed_mem:
                from block_recurrent.model.state import XLMemory

                old = None if memories[index] is None else XLMemory(*memories[index])
                new = layer.attn.memory.update(old, k, v)
                memories[index] = (new.keys, new.values)
            else:
                memories[index] = (k, v) if memories[index] is None else (
                    torch.cat((memories[index][0], k), dim=1)[:, -W:], torch.cat((memories[index][1], v), dim=1)[:, -W:])
        for i, (cell, layer_number) in enumerate(zip(model.cells, config.recurrent_layers)):
            k, v = block_kv[layer_number - 1]
            if config.state_write == "delta":
                states[i] = plain_delta_write(cell, states[i], k, v)
                continue
            normed_state, state_keys, state_values = views[i]
            sq, sk, sv = plain_attention(heads(normed_state @ cell.to_self_queries.weight.T, H), heads(state_keys, KV),
                                         heads(state_values, KV), cell.self_attn)
            from_state = plain_softmax_attention(sq, sk, sv, plain_scale(cell.self_attn, dh))
            cq, ck, cv = plain_attention(heads(normed_state @ cell.to_cross_queries.weight.T, H), heads(k, KV),
                                         heads(v, KV), cell.write_attn)
            if config.state_write == "slots":
                from_tokens, rewrite = plain_slot_write(cell, cq, ck, cv)
            else:
                from_tokens = plain_softmax_attention(cq, ck, cv, plain_scale(cell.write_attn, dh))
            update = merged(torch.cat((from_state, from_tokens), dim=-1)) @ cell.to_update.weight.T
            state = cell.gate(states[i], update)
            if config.state_write == "slots":
                state = states[i] + rewrite * (state - states[i])
            if cell.state_ff is not None:
                fed = cell.ff_gate(state, plain_feed_forward(cell.state_ff, state))
                state = state + rewrite * (fed - state) if config.state_write == "slots" else fed
            states[i] = state
    return torch.cat(outputs, dim=1), states


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_call_equals_a_plain_per_block_formulation(variant):
    model = make_model(**VARIANTS[variant])
    tokens = random_tokens(2, 18)  # four whole blocks and a partial one
    logits, state = model.run(tokens)
    with torch.no_grad():
        expected_logits, expected_states = plain_run(model, tokens)
    assert_close(logits, expected_logits)
    for got, expected in zip(state.states, expected_states):
        assert_close(got, expected)

    pieces, block_state = [], None  # and block-by-block calls give the same
    for block in tokens.split(TINY["block_width"], dim=1):
        block_logits, block_state = model.run(block, block_state)
        pieces.append(block_logits)
    assert_close(torch.cat(pieces, dim=1), logits)
    assert_states_close(block_state, state)


@pytest.mark.parametrize("variant", VARIANTS)
def test_segments_equal_wrapper_and_long_run(variant):
    model = make_model(**VARIANTS[variant])
    seq = random_tokens(2, 3 * TINY["max_seq_len"] + 1)
    wrapper = RecurrentTrainerWrapper(model)
    wrapper_loss, memories, states = wrapper(seq, return_memories_and_states=True)

    # the reference's usage: thread memories and states through forward, one window at a time
    losses, mems, sts = [], [], []
    for start in range(0, seq.shape[1] - 1, TINY["max_seq_len"]):
        window = seq[:, start : start + TINY["max_seq_len"] + 1]
        loss, mems, sts = model(window, return_loss=True, xl_memories=mems, states=sts)
        losses.append(loss)
    assert_close(wrapper_loss, torch.stack(losses).mean())

    # one run over the whole sequence: the same computation, since blocks never straddle segments
    logits, long_state = model.run(seq[:, :-1])
    assert_close(model.loss(logits, seq[:, 1:]), wrapper_loss)
    assert_states_close(long_state, ModelState(tuple(memories), tuple(states)))


@pytest.mark.parametrize("variant", ["plain", "compressed", "read_below_write"])
def test_causality_across_blocks_and_segments(variant):
    model = make_model(**VARIANTS[variant])
    tokens = random_tokens(1, 40)
    logits, _ = model.run(tokens)
    for t in (0, 3, 4, 17, 33):
        changed = tokens.clone()
        changed[0, t] = (changed[0, t] + 1) % TINY["num_tokens"]
        changed_logits, _ = model.run(changed)
        assert_close(changed_logits[:, :t], logits[:, :t], tol=1e-12)
        assert not torch.allclose(changed_logits[:, t], logits[:, t])
        # the change must reach beyond the attention window through the state (block width 4, memory 4)
        assert not torch.allclose(changed_logits[:, -1], logits[:, -1])


def test_state_changes_logits():
    model = make_model()
    tokens = random_tokens(2, 8)
    _, state = model.run(tokens)
    logits, _ = model.run(tokens, state)
    perturbed = ModelState(state.memories, tuple(s + torch.randn_like(s) for s in state.states))
    perturbed_logits, _ = model.run(tokens, perturbed)
    assert (perturbed_logits - logits).abs().max() > 1e-3


def test_every_recurrent_parameter_gets_gradient():
    model = make_model(dtype=torch.float32).train()
    wrapper = RecurrentTrainerWrapper(model)
    wrapper(random_tokens(2, 2 * TINY["max_seq_len"] + 1)).backward()
    cell = model.layers[1].attn.cell
    # the cell's parameters are stored scaled (state_cell_scale): parametrizations.NAME.original
    recurrent_params = {name.replace("parametrizations.", "").replace(".original", ""): p
                        for name, p in cell.named_parameters()}
    assert {"initial_state", "state_ids", "gate.to_gates.weight", "gate.to_gates.bias", "to_update.weight",
            "to_self_queries.weight", "to_cross_queries.weight",
            "to_state_kv.weight", "self_attn.temperature", "write_attn.temperature"} <= set(recurrent_params)
    read = dict(model.layers[1].attn.state_reads[0].named_parameters())
    assert {"to_queries.weight", "attn.temperature"} <= set(read)
    for name, param in recurrent_params.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for name, param in model.named_parameters():
        if "compress" not in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("implementation", ["sdpa", "matmul"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_attention_equals_plain_attention(variant, implementation):
    sdpa = make_model(**VARIANTS[variant], attn_implementation=implementation)
    plain = make_model(**VARIANTS[variant], attn_implementation="math")
    plain.load_state_dict(sdpa.state_dict())
    tokens = random_tokens(3, 24)
    reset = torch.tensor([False, True, False])
    _, state = sdpa.run(tokens)
    a, state_a = sdpa.run(tokens, state, reset=reset)
    b, state_b = plain.run(tokens, state, reset=reset)
    assert_close(a, b)
    assert_states_close(state_a, state_b)


@pytest.mark.parametrize("variant", ["plain", "compressed", "read_below_write"])
def test_reset_row_equals_fresh_row(variant):
    model = make_model(**VARIANTS[variant])
    history = random_tokens(3, 24, seed=2)
    tokens = random_tokens(3, 12, seed=3)
    _, state = model.run(history)
    reset = torch.tensor([False, True, False])
    logits, next_state = model.run(tokens, state, reset=reset)

    fresh_logits, fresh_state = model.run(tokens[1:2])
    assert_close(logits[1:2], fresh_logits)
    assert_close(next_state.states[0][1:2], fresh_state.states[0])
    # rows that were not reset carry on exactly as without a reset
    carried_logits, _ = model.run(tokens, state)
    assert_close(logits[[0, 2]], carried_logits[[0, 2]])


def test_reset_with_compressed_memory_masks_the_old_document_until_it_leaves():
    model = make_model(**VARIANTS["compressed"])
    history, tokens = random_tokens(2, 16, seed=4), random_tokens(2, 16, seed=5)
    _, state = model.run(history)
    logits, _ = model.run(tokens, state, reset=torch.tensor([True, True]))
    fresh, _ = model.run(tokens)
    assert_close(logits, fresh)


def test_fixed_gate_formula():
    gate = FixedGate(4).double()
    state, update = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    keep = torch.sigmoid(gate.keep_bias)
    expected = state * keep + (update @ gate.to_candidate.weight.T + gate.to_candidate.bias) * (1 - keep)
    assert_close(gate(state, update), expected)


def test_lstm_gate_formula():
    gate = LSTMGate(4).double()
    state, update = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    W, b = gate.to_gates.weight, gate.to_gates.bias
    z = torch.tanh(update @ W[:4].T + b[:4])
    i = torch.sigmoid(update @ W[4:8].T + b[4:8] - 1)
    f = torch.sigmoid(update @ W[8:].T + b[8:] + 1)
    assert_close(gate(state, update), state * f + z * i)


def test_gates_without_their_own_projection():
    """gate_projection=False (meliad): the update itself is the candidate z; the LSTM still squashes it."""
    state, update = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    fixed = FixedGate(4, projection=False).double()
    keep = torch.sigmoid(fixed.keep_bias)
    assert_close(fixed(state, update), state * keep + update * (1 - keep))
    assert [name for name, _ in fixed.named_parameters()] == ["keep_bias"]
    lstm = LSTMGate(4, projection=False).double()
    W, b = lstm.to_gates.weight, lstm.to_gates.bias
    i = torch.sigmoid(update @ W[:4].T + b[:4] - 1)
    f = torch.sigmoid(update @ W[4:].T + b[4:] + 1)
    assert_close(lstm(state, update), state * f + torch.tanh(update) * i)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_key_value_heads_match_a_per_head_loop(kv_heads):
    """Query head h attends with key/value head h // (heads // kv_heads), on both attention paths."""
    from block_recurrent.model.attention import attend

    g = torch.Generator().manual_seed(0)
    B, H, N, J, D = 2, 4, 3, 5, 8
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, kv_heads, J, D, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(N, J, generator=g) < 0.7
    mask[:, 0] = True  # no empty row
    bias = torch.randn(H, N, J, generator=g, dtype=torch.float64)
    expected = torch.empty(B, H, N, D, dtype=torch.float64)
    for h in range(H):
        kh, vh = k[:, h // (H // kv_heads)], v[:, h // (H // kv_heads)]
        logits = (q[:, h] @ kh.transpose(-1, -2)) * 0.5 + bias[h]
        expected[:, h] = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ vh
    for implementation in ("sdpa", "matmul", "math", "auto"):
        out = attend(q, k, v, mask, scale=0.5, bias=bias, implementation=implementation)
        assert_close(out, expected)
    # batched masks and biases (ragged decoding), and gradients, on the two fast paths
    batched_mask = torch.rand(B, 1, N, J, generator=g) < 0.7
    batched_mask[..., 0] = True
    batched_bias = torch.randn(B, H, N, J, generator=g, dtype=torch.float64)
    grads = {}
    for implementation in ("sdpa", "matmul", "math"):
        qg = q.clone().requires_grad_()
        out = attend(qg, k, v, batched_mask, scale=0.5, bias=batched_bias, implementation=implementation)
        out.square().sum().backward()
        grads[implementation] = (out.detach(), qg.grad)
    for implementation in ("sdpa", "matmul"):
        assert_close(grads[implementation][0], grads["math"][0])
        assert_close(grads[implementation][1], grads["math"][1])


@pytest.mark.parametrize("variant", ["lstm_dual", "slots", "delta"])
def test_variant_recurrent_parameters_get_gradient(variant):
    model = make_model(dtype=torch.float32, **VARIANTS[variant]).train()
    RecurrentTrainerWrapper(model)(random_tokens(2, 2 * TINY["max_seq_len"] + 1)).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_xl_baseline_has_no_state_and_a_receptive_field_of_depth_blocks():
    model = make_model(**VARIANTS["xl_baseline"])
    tokens = random_tokens(1, 24)
    logits, state = model.run(tokens)
    assert state.states == () and model.cells == []
    # without recurrence, the receptive field is one block per layer: block 0 reaches blocks 1..depth only
    changed = tokens.clone()
    changed[0, 0] += 1
    changed_logits = model.run(changed)[0]
    block = TINY["block_width"]
    assert not torch.allclose(changed_logits[:, 3 * block : 4 * block], logits[:, 3 * block : 4 * block])
    assert_close(changed_logits[:, 4 * block :], logits[:, 4 * block :], tol=1e-12)


def test_partial_last_block_commits_state_and_memory():
    model = make_model()
    tokens = random_tokens(1, 6)
    _, state = model.run(tokens)
    assert state.memories[0].length == TINY["block_width"]
    # the committed state is what the 2-token block wrote: running the blocks separately agrees
    _, first = model.run(tokens[:, :4])
    _, second = model.run(tokens[:, 4:], first)
    assert_states_close(state, second)


@pytest.mark.parametrize("length", [12, 10, 4])  # whole blocks side by side, a partial last block, one block
def test_run_without_the_last_write_leaves_the_states_that_block_read(length):
    """``write_last=False`` changes only the state: the logits and memories are those of a full run, and the states
    are those after all blocks but the last (the learned initial state's for one block)."""
    model = make_model()
    tokens = random_tokens(2, length)
    logits, state = model.run(tokens)
    unwritten_logits, unwritten = model.run(tokens, write_last=False)
    assert torch.equal(unwritten_logits, logits)
    for a, b in zip(unwritten.memories, state.memories):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    last_start = (length - 1) // TINY["block_width"] * TINY["block_width"]
    if last_start:
        expected = model.run(tokens[:, :last_start])[1].states
    else:
        expected = (model.cells[0].initial_state.expand(2, -1, -1),)
    assert_close(unwritten.states[0], expected[0], tol=1e-12)
    assert not torch.allclose(unwritten.states[0], state.states[0])

def test_reference_usage_example_runs():
    # the reference README's example, unchanged
    model = BlockRecurrentTransformer(
        num_tokens=2000, dim=64, depth=2, dim_head=16, heads=2, max_seq_len=32, block_width=16,
        num_state_vectors=16, recurrent_layers=(2,), use_compressed_mem=False, compressed_mem_factor=4,
        use_flash_attn=True,
    )
    seq = torch.randint(0, 2000, (1, 32))
    out, mems1, states1 = model(seq)
    out, mems2, states2 = model(seq, xl_memories=mems1, states=states1)
    out, mems3, states3 = model(seq, xl_memories=mems2, states=states2)
    assert out.shape == (1, 32, 2000) and len(mems3) == 2 and states3[0].shape == (1, 16, 64)

    wrapper = RecurrentTrainerWrapper(model, xl_memories_dropout=0.1, state_dropout=0.1)
    loss = wrapper(torch.randint(0, 2000, (1, 32 * 4 + 1)))
    loss.backward()
    assert loss.ndim == 0
    # the reference's (2, B, M, dh) memory tensors are accepted too
    out_ref, _, _ = model(seq, xl_memories=[memory_to_reference(m) for m in mems1], states=states1)
    assert out_ref.shape == out.shape


def test_short_call_returns_no_state_by_default():
    model = make_model()
    logits, mems, states = model(random_tokens(1, 5))
    assert logits.shape == (1, 5, TINY["num_tokens"]) and mems is None and states is None
    _, mems, states = model(random_tokens(1, 5), return_memories_and_states=True)
    assert len(mems) == TINY["depth"] and not mems[0].keys.requires_grad


def test_labels_with_ignore_index():
    model = make_model()
    x = random_tokens(2, 16)
    labels = random_tokens(2, 16, seed=9)
    labels[:, 10:] = -100
    loss, _, _ = model(x, labels=labels)
    logits, _ = model.run(x)
    expected = torch.nn.functional.cross_entropy(logits[:, :10].reshape(-1, 32), labels[:, :10].reshape(-1))
    assert_close(loss, expected)


def test_dropout_options_and_no_dropout_by_default():
    model = make_model(attn_dropout=0.5, ff_dropout=0.5).train()
    tokens = random_tokens(1, 8)
    assert not torch.equal(model.run(tokens)[0], model.run(tokens)[0])
    model.eval()
    assert torch.equal(model.run(tokens)[0], model.run(tokens)[0])
    default = make_model().train()
    assert torch.equal(default.run(tokens)[0], default.run(tokens)[0])


@pytest.mark.parametrize("eval_target", ["wrapper", "inner"])
def test_memory_and_state_dropout_never_in_eval(eval_target):
    model = make_model()
    wrapper = RecurrentTrainerWrapper(model, xl_memories_dropout=1.0, state_dropout=1.0)
    seq = random_tokens(1, 2 * TINY["max_seq_len"] + 1)
    wrapper.train()
    (wrapper if eval_target == "wrapper" else model).eval()
    plain = RecurrentTrainerWrapper(model)
    assert_close(wrapper(seq), plain(seq))
    # and in training mode, dropout 1.0 really drops: each segment starts fresh
    wrapper.train()
    fresh = torch.stack([model(seq[:, s : s + 17], return_loss=True)[0] for s in (0, 16)]).mean()
    assert_close(wrapper(seq), fresh)


@pytest.mark.parametrize("variant", ["compressed", "delta"])
def test_bf16_autocast_trains_and_stays_close_to_float32(variant):
    model = make_model(dtype=torch.float32, **VARIANTS[variant]).train()
    wrapper = RecurrentTrainerWrapper(model)
    seq = random_tokens(2, 2 * TINY["max_seq_len"] + 1)
    full = wrapper(seq).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = wrapper.forward_backward(seq)
    assert torch.isfinite(result.loss) and abs(result.loss.item() - full) < 0.05
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_sliding_window_mask_matches_a_per_token_loop():
    model = make_model(**VARIANTS["sliding_t5"])
    attn = model.layers[0].attn
    W = TINY["block_width"]
    for M, P, N in [(0, 0, 4), (4, 0, 4), (4, 2, 2), (4, 3, 1), (2, 1, 3)]:
        mask, _, empty = attn.visibility(M, P, N, None, torch.device("cpu"))
        for i in range(N):
            query = P + i  # block position; memory slots are -M .. -1
            for j, key in enumerate(range(-M, P + N)):
                expected = 1 <= query - key <= W
                if empty[i, 0]:
                    assert not any(1 <= query - k <= W for k in range(-M, P + N))
                    continue
                assert bool(mask[i, j]) == expected, (M, P, N, i, j)
    # the first token of a document sees nothing, and its attention output is zero
    _, _, empty = attn.visibility(0, 0, 4, None, torch.device("cpu"))
    assert empty[:, 0].tolist() == [True, False, False, False]


def test_block_window_mask_is_memory_plus_causal_prefix():
    attn = make_model().layers[0].attn
    mask, bias, empty = attn.visibility(4, 1, 2, torch.tensor([[True, False, True, True]]), torch.device("cpu"))
    expected = torch.tensor([[1, 0, 1, 1, 1, 1, 0], [1, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected) and bias is None and empty is None


def test_t5_buckets_by_hand():
    from block_recurrent.model.positions import t5_relative_bucket

    distance = torch.tensor([-3, 0, 1, 15, 16, 17, 31, 32, 63, 64, 127, 128, 5000])
    # exact below 16; above, 16 + floor(log(n / 16) / log(8) * 16), capped at 31
    expected = [0, 0, 1, 15, 16, 16, 21, 21, 26, 26, 31, 31, 31]
    assert t5_relative_bucket(distance, 32, 128).tolist() == expected


def test_t5_bias_reaches_the_logits_and_sliding_excludes_self():
    model = make_model(**VARIANTS["sliding_t5"])
    attn = model.layers[0].attn
    _, bias, _ = attn.visibility(4, 0, 4, None, torch.device("cpu"))
    assert bias.shape == (TINY["heads"], 4, 8)
    assert torch.equal(bias[:, 0, 3], attn.position_bias.bias[:, 1])  # distance 1 -> bucket 1
    tokens = random_tokens(1, 8)
    logits, _ = model.run(tokens)
    with torch.no_grad():
        attn.position_bias.bias.add_(1.0 * torch.arange(8.0))
    assert not torch.allclose(model.run(tokens)[0], logits)


def test_feedback_every_layer_reads_the_state_with_its_own_queries():
    model = make_model(**VARIANTS["feedback"])
    assert [layer.attn.to_out.in_features for layer in model.layers] == [2 * 16] * 3
    assert [len(layer.attn.state_reads) for layer in model.layers] == [1, 1, 1]


def test_gate_keep_init_sets_the_fixed_gates_bias():
    model = make_model(gate="fixed", gate_keep_init=2.0, state_update="dual", state_cell_scale=1.0)
    cell = model.layers[1].attn.cell
    assert torch.equal(cell.gate.keep_bias, torch.full((TINY["dim"],), 2.0, dtype=torch.float64))
    assert torch.equal(cell.ff_gate.keep_bias, cell.gate.keep_bias)
    default = make_model(gate="fixed", gate_keep_init="paper").layers[1].attn.cell.gate.keep_bias
    assert 0.0 < default.std() < 0.3 and not torch.all(default == default[0])


def test_gate_keep_init_sets_the_lstm_forget_offset():
    """With gate="lstm" the number replaces the forget gate's +1: f = sigmoid(W_f h + b_f + keep_init)."""
    default = make_model(gate="lstm", gate_projection=True, gate_keep_init="paper")
    held = make_model(gate="lstm", gate_projection=True, gate_keep_init=3.0)  # the same seed: the same weights
    gate = held.layers[1].attn.cell.gate
    state, update = (torch.randn(2, 3, TINY["dim"], dtype=torch.float64) for _ in range(2))
    candidate, input_gate, forget_gate = gate.to_gates(update).chunk(3, dim=-1)
    expected = state * torch.sigmoid(forget_gate + 3.0) + torch.tanh(candidate) * torch.sigmoid(input_gate - 1)
    torch.testing.assert_close(gate(state, update), expected, rtol=0, atol=0)
    assert default.layers[1].attn.cell.gate.forget_offset == 1.0
    assert not torch.equal(default.layers[1].attn.cell.gate(state, update), gate(state, update))


def test_spread_keep_init_gives_half_lives_from_one_block_to_the_maximum():
    from block_recurrent.model.recurrent import SPREAD_MAX_HALF_LIFE

    bias = make_model(gate="fixed", gate_keep_init="spread").layers[1].attn.cell.gate.keep_bias.detach()
    half_lives = -1.0 / torch.log2(torch.sigmoid(bias))  # keep ** h = 1/2
    assert half_lives[0].item() == pytest.approx(1.0) and half_lives[-1].item() == pytest.approx(SPREAD_MAX_HALF_LIFE)
    ratios = half_lives[1:] / half_lives[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios)) and ratios[0] > 1  # geometric, increasing


def test_auto_attention_takes_the_matmul_path_only_for_bf16_training_and_compiled_calls_on_the_cpu(monkeypatch):
    """The choice measured in benchmarks/bench_attention.py and bench_generate.py: matmul under autograd in bf16
    and under torch.compile (where inductor fuses around it), sdpa otherwise."""
    from block_recurrent.model import attention

    taken = []
    real = attention._attend_matmul
    monkeypatch.setattr(attention, "_attend_matmul", lambda *a: taken.append("matmul") or real(*a))
    q = torch.randn(2, 4, 8, 16, requires_grad=True)
    k = v = torch.randn(2, 1, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attention.attend(q, k, v, scale=0.25)
        assert taken == ["matmul"]
        with torch.no_grad():
            attention.attend(q, k, v, scale=0.25)  # inference: the fused kernel
        assert taken == ["matmul"]
    attention.attend(q, k, v, scale=0.25)  # float32 training: the fused kernel
    assert taken == ["matmul"]
    monkeypatch.setattr(attention, "MATMUL_MAX_LOGITS", 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attention.attend(q, k, v, scale=0.25)  # past the size threshold: the fused kernel
    assert taken == ["matmul"]
    monkeypatch.setattr(attention, "MATMUL_MAX_LOGITS", 1 << 23)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        attention.attend(q, k, v, scale=0.25)  # traced by torch.compile: matmul, in float32 and without autograd
    assert taken == ["matmul", "matmul"]


def test_state_cell_scale_changes_how_fast_adam_moves_the_cell_not_what_the_model_computes():
    """The cell's parameters are stored divided by state_cell_scale: the same seed builds the same function, and one
    AdamW step (about lr per stored element) moves the cell's effective weights by scale * lr, the rest by lr."""
    slow, plain = make_model(state_cell_scale=0.1), make_model(state_cell_scale=1.0)
    tokens = random_tokens(2, 3 * TINY["max_seq_len"] // 2)
    # (to float32's rounding: the models are built in float32, where w / 0.1 is stored, then cast to float64)
    torch.testing.assert_close(slow.run(tokens)[0], plain.run(tokens)[0], rtol=1e-6, atol=1e-6)

    def largest_moves(model):
        cell = model.layers[1].attn.cell
        before = {name: value.detach().clone() for name, value in _effective(model).items()}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        model.loss(model.run(tokens[:, :-1])[0], tokens[:, 1:]).backward()
        optimizer.step()
        moves = {name: (value - before[name]).abs().max().item() for name, value in _effective(model).items()}
        in_cell = {name for name in moves if ".cell." in name}
        assert {"layers.1.attn.cell.to_update.weight", "layers.1.attn.cell.initial_state"} <= in_cell
        return max(moves[n] for n in in_cell), max(moves[n] for n in moves if n not in in_cell), cell

    slow_cell, slow_rest, cell = largest_moves(slow.train())
    plain_cell, plain_rest, _ = largest_moves(plain.train())
    # Adam's first step is lr * g / (|g| + eps): lr for every element with a gradient
    assert slow_rest == pytest.approx(1e-2, rel=1e-3) and plain_rest == pytest.approx(1e-2, rel=1e-3)
    assert plain_cell == pytest.approx(1e-2, rel=1e-3)
    assert slow_cell == pytest.approx(1e-3, rel=1e-3)
    stored = dict(cell.named_parameters())["to_update.parametrizations.weight.original"]
    torch.testing.assert_close(stored * 0.1, cell.to_update.weight, rtol=0, atol=0)



def test_a_run_scales_each_cell_parameter_once_whatever_the_number_of_blocks(monkeypatch):
    """The scaled parameters are computed once per call (parametrize.cached), not once per block and use: a run of
    four blocks costs as many products by the scale as a run of one."""
    from block_recurrent.model.recurrent import Scaled

    model = make_model(state_cell_scale=0.1)
    calls = []
    forward = Scaled.forward
    monkeypatch.setattr(Scaled, "forward", lambda self, stored: calls.append(1) or forward(self, stored))
    W = TINY["block_width"]
    counts = []
    for blocks in (1, 4):
        calls.clear()
        model.run(random_tokens(2, blocks * W))
        counts.append(len(calls))
    scaled = sum(len(m.parametrizations) for m in model.modules() if hasattr(m, "parametrizations"))
    assert counts[1] == counts[0] <= scaled

def _effective(model) -> dict[str, torch.Tensor]:
    """Every parameter as the model uses it, by its plain name (a scaled one's value, not what is stored)."""
    values = {}
    for module_name, module in model.named_modules():
        if "parametrizations" in module_name:  # what is stored, not what is used
            continue
        for name in [*dict(module.named_parameters(recurse=False)), *getattr(module, "parametrizations", {})]:
            values[f"{module_name}.{name}"] = getattr(module, name)
    return values


def slot_write_of_one_block(model, tokens):
    """(incoming state, next state, mass won per head (B, S, H)) of the slot write after one block of ``tokens``."""
    cell = model.cells[0]
    captured = {}
    attend = recurrent.attend_slots

    def spy(*args):
        mean, captured["mass"] = attend(*args)
        return mean, captured["mass"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recurrent, "attend_slots", spy)
        _, state = model.run(tokens)
    return cell.initial_state.expand(tokens.shape[0], -1, -1), state.states[0], captured["mass"]


def test_slot_write_shares_out_every_token_and_a_token_no_vector_claims_changes_nothing():
    model = make_model(state_write="slots")
    W = model.config.block_width
    tokens = random_tokens(2, W)
    with torch.no_grad():
        # no null slot: every token goes to the vectors in full, per head
        cell = model.cells[0]  # (its parameters are parametrised: assigning goes through the parametrisation)
        cell.null_logit = torch.full_like(cell.null_logit, float("-inf"))
        before, after, mass = slot_write_of_one_block(model, tokens)
        assert_close(mass.sum(dim=1), torch.full_like(mass.sum(dim=1), float(W)))
        assert (after - before).abs().amax() > 1e-3
        # the null slot takes every token: no vector is rewritten
        cell.null_logit = torch.full_like(cell.null_logit, 1e4)
        before, after, mass = slot_write_of_one_block(model, tokens)
        assert mass.abs().amax() < 1e-100
        assert_close(after, before)



def test_delta_rule_replaces_what_a_key_held_and_leaves_other_keys():
    """At strength 1 a write makes the key's lookup exactly the new value (an overwrite, not a sum); a memory
    looked up by a key orthogonal to every written key is unchanged; at strength 0 nothing changes."""
    S, dh = 4, 3
    memory = torch.randn(2, S, dh, dtype=torch.float64)
    keys = torch.eye(S, dtype=torch.float64)[[0, 1, 0]]  # key 0 written twice: the second replaces the first
    values = torch.randn(3, dh, dtype=torch.float64)
    written = recurrent.delta_rule(memory, keys.expand(2, 3, S), values.expand(2, 3, dh), torch.ones(2, 3, dtype=torch.float64))
    assert_close(written[:, 0], values[2].expand(2, dh))
    assert_close(written[:, 1], values[1].expand(2, dh))
    assert_close(written[:, 2:], memory[:, 2:])
    unchanged = recurrent.delta_rule(memory, keys.expand(2, 3, S), values.expand(2, 3, dh), torch.zeros(2, 3, dtype=torch.float64))
    assert_close(unchanged, memory)
