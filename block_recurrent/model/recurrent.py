"""The recurrent state cell: how tokens read the state and how the state is rewritten after a block.

Per block, with incoming state ``c`` (B, S, D) and the block's tokens:
1. ``view``: pre-norm the state, add learned state IDs, project keys/values once. The same
   view serves every read of this state in the block and the write at its end (meliad's layout).
2. read (:class:`StateRead`, owned by each reading layer): its tokens cross-attend to the view.
3. ``write``: the state self-attends and cross-attends to the writing layer's block keys/values; the two
   outputs are concatenated per head, projected, and a gate combines them with ``c`` ("skip"); with
   "dual", a feed-forward on the result is combined with it by a second gate. With ``state_write="slots"``
   the cross-attention is Slot Attention's instead (:func:`attend_slots`), and each vector takes its gates'
   step only in proportion to the tokens it won.

With ``state_write="delta"`` the state is an associative memory instead (:class:`DeltaStateCell`): per head, the S
state vectors' dim_head channels form an (S, dim_head) matrix, the block's tokens write values under keys of their
own by the delta rule, and the reading tokens look values up with keys of theirs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .attention import Attention, FeedForward, attend, split_kv_heads
from .config import BlockRecurrentConfig


# "spread" keep biases: channel half-lives (blocks until half of a written value is left) from 1 to this many
# blocks, geometrically spaced, so that some channels can carry a value far from the start while others
# are rewritten at every block (the idea of "chrono" initialisation of LSTM forget gates)
SPREAD_MAX_HALF_LIFE = 256


def spread_keep_bias(dim: int, max_half_life: float = SPREAD_MAX_HALF_LIFE) -> Tensor:
    """Keep biases b (dim,) with sigmoid(b) ** h = 1/2 for half-lives h geometric from 1 to ``max_half_life``."""
    exponents = torch.linspace(0.0, math.log2(max_half_life), dim, dtype=torch.float64)
    keep = torch.exp2(-1.0 / torch.exp2(exponents))
    return (torch.log(keep) - torch.log1p(-keep)).to(torch.get_default_dtype())  # computed in float64: keep ~ 1


class FixedGate(nn.Module):
    """The paper's fixed gate, a learned per-channel EMA: c' = c * g + z * (1 - g).

    z = W_z h + b_z and g = sigmoid(b_g), b_g initialised N(0, 0.1) with ``keep_init="paper"`` (paper and
    reference 0.4.4), to a constant ``keep_init``, or with "spread" to half-lives from 1 to 256 blocks across
    channels. With ``projection=False`` z = h: the caller's output projection that made h serves as W_z (meliad).
    The reference writes the same gate with beta = -b_g: sigmoid(beta) * z + (1 - sigmoid(beta)) * c.
    """

    def __init__(self, dim: int, keep_init: float | str = "paper", projection: bool = True):
        super().__init__()
        self.to_candidate = nn.Linear(dim, dim) if projection else None
        if keep_init == "paper":
            keep_bias = torch.randn(dim) * 0.1
        elif keep_init == "spread":
            keep_bias = spread_keep_bias(dim)
        else:
            keep_bias = torch.full((dim,), float(keep_init))
        self.keep_bias = nn.Parameter(keep_bias)

    def keep(self, update: Tensor, dtype: torch.dtype, rewrite: Tensor | None = None) -> Tensor:
        """The share of the old state kept: per channel (dim,), the same for every row and slot; with ``rewrite``
        (B, S, 1), the share of its step each state vector takes, 1 - (1 - g) * rewrite (B, S, dim)."""
        keep = torch.sigmoid(self.keep_bias.to(dtype))
        return keep if rewrite is None else 1 - (1 - keep) * rewrite

    def forward(self, state: Tensor, update: Tensor, rewrite: Tensor | None = None) -> Tensor:
        candidate = update if self.to_candidate is None else self.to_candidate(update)
        # in the state's precision (float32 under bf16 autocast): a keep of 0.99 is 0.98828 in bf16, which
        # would shorten the memory the gate was trained to hold. c * g + z * (1 - g) as one op: z + g * (c - z)
        return torch.lerp(candidate.to(state.dtype), state, self.keep(update, state.dtype, rewrite))


class LSTMGate(nn.Module):
    """The paper's LSTM gate: c' = c * f + z * i with
    z = tanh(W_z h + b_z), i = sigmoid(W_i h + b_i - 1), f = sigmoid(W_f h + b_f + 1).

    The -1/+1 offsets start it remembering (forget gate mostly open, input gate mostly shut); ``keep_init``
    replaces the forget gate's +1 (3.0: f starts at 0.95, a value kept 8 blocks is still 0.68 of itself, against
    0.08 at +1). meliad omits the tanh in its skip/dual configurations; we follow the paper's equations. With
    ``projection=False`` z = tanh(h): the caller's output projection serves as W_z, and only i and f have their
    own weights.
    """

    def __init__(self, dim: int, keep_init: float | str = "paper", projection: bool = True):
        super().__init__()
        self.projection = projection
        self.forget_offset = 1.0 if keep_init == "paper" else float(keep_init)
        self.to_gates = nn.Linear(dim, dim * (3 if projection else 2))  # [z,] i, f in one projection
        # added to the input and forget gates' logits: -1, then the forget offset (a constant, not a parameter)
        self.register_buffer("offsets", torch.tensor([-1.0, self.forget_offset]).repeat_interleave(dim),
                             persistent=False)

    def gates(self, update: Tensor, dtype: torch.dtype, rewrite: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(candidate z before its tanh, input gate i, forget gate f), in ``dtype``. With ``rewrite`` (B, S, 1), the
        share of its step each state vector takes: i * rewrite and 1 - (1 - f) * rewrite."""
        gates = self.to_gates(update)
        if self.projection:
            candidate, gates = gates.split((gates.shape[-1] // 3, gates.shape[-1] * 2 // 3), dim=-1)
        else:
            candidate = update
        # the gates in the state's precision (as FixedGate): the offsets' add casts them, then one sigmoid for both
        input_gate, keep = torch.sigmoid((gates + self.offsets.to(dtype)).to(dtype)).chunk(2, dim=-1)
        if rewrite is not None:
            input_gate, keep = input_gate * rewrite, 1 - (1 - keep) * rewrite
        return candidate.to(dtype), input_gate, keep

    def keep(self, update: Tensor, dtype: torch.dtype, rewrite: Tensor | None = None) -> Tensor:
        """The share of the old state kept, per row, slot and channel: the forget gate."""
        return self.gates(update, dtype, rewrite)[2]

    def forward(self, state: Tensor, update: Tensor, rewrite: Tensor | None = None) -> Tensor:
        candidate, input_gate, keep = self.gates(update, state.dtype, rewrite)
        return state * keep + torch.tanh(candidate) * input_gate


GATES: dict[str, type[nn.Module]] = {"fixed": FixedGate, "lstm": LSTMGate}


class Scaled(nn.Module):
    """A parametrisation w = scale * stored. Adam-type optimisers step ``stored`` by about the learning rate
    whatever its gradient's size, so they move w at ``scale`` times the learning rate (with plain SGD, scale**2)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, stored: Tensor) -> Tensor:
        return stored * self.scale

    def right_inverse(self, value: Tensor) -> Tensor:
        return value / self.scale


def scale_parameters(cell: nn.Module, scale: float) -> None:
    """Store every parameter of ``cell`` as :class:`Scaled` by ``scale`` (after its initialisation: the effective
    initial values are unchanged); nothing at 1."""
    if scale == 1.0:
        return
    for module in list(cell.modules()):
        for name, _ in list(module.named_parameters(recurse=False)):
            parametrize.register_parametrization(module, name, Scaled(scale))


class StateView(NamedTuple):
    """A recurrent state as seen during one block: computed once at the block's start."""

    state: Tensor  # (B, S, D), the incoming state the gate starts from
    normed: Tensor  # (B, S, D), pre-normed state plus state IDs
    keys: Tensor  # (B, S, kv_heads * dim_head), raw
    values: Tensor  # (B, S, kv_heads * dim_head)


def attend_state(attn: Attention, queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """Attention without mask or positions, queries laid out as projected: (B, N, H, dh) raw queries over keys
    prepared by ``attn.prepare_keys`` (B, K, J, dh) and raw values (B, J, K * dh) -> (B, N, H, dh).

    With one key/value head the N * H queries are one axis as they lie in memory (no transpose either way; with
    no mask the order of the queries is free); with K heads each takes its own H / K query heads."""
    B, N, H, dh = queries.shape
    K = attn.kv_heads
    q = attn.prepare_laid_out_queries(queries)  # (B, N, H, dh)
    v = split_kv_heads(values, K)  # (B, K, J, dh)
    if K == 1:
        out = attend(q.reshape(B, 1, N * H, dh), keys, v, scale=1.0, implementation=attn.implementation)
        return out.view(B, N, H, dh)
    out = attend(q.transpose(1, 2), keys, v, scale=1.0, implementation=attn.implementation)  # (B, H, N, dh)
    return out.transpose(1, 2)


def attend_slots(attn: Attention, queries: Tensor, null_query: Tensor, null_logit: Tensor, keys: Tensor,
                 values: Tensor) -> tuple[Tensor, Tensor]:
    """Slot Attention's step: the state vectors compete for the block's tokens.

    queries: raw (B, S, H, dh), one per state vector; null_query (H, dh) and null_logit (H,): a learned null slot
    that takes what no vector should; keys: prepared by ``attn.prepare_keys`` (B, K, N, dh); values raw
    (B, N, K * dh). Each token's softmax runs over the S vectors and the null slot, per head; each vector takes
    the mean of the values it won. Returns that mean (B, S, H, dh) and the mass won (B, S, H), the sum over
    tokens of the vector's shares (0 where no token chose it)."""
    B, S, H, dh = queries.shape
    K = attn.kv_heads
    q = attn.prepare_laid_out_queries(torch.cat((queries, null_query.expand(B, 1, H, dh)), dim=1))
    q = q.permute(0, 2, 1, 3).reshape(B, K, H // K, S + 1, dh)  # query head h uses key/value head h // (H / K)
    logits = torch.einsum("bkgsd,bknd->bkgsn", q, keys)
    logits = torch.cat((logits[..., :S, :], logits[..., S:, :] + null_logit.view(K, H // K, 1, 1)), dim=-2)
    shares = logits.softmax(dim=-2)[..., :S, :]  # (B, K, G, S, N): the null slot's share is dropped
    mass = shares.sum(dim=-1)  # (B, K, G, S)
    v = split_kv_heads(values, K)  # (B, K, N, dh)
    # a vector that won (almost) nothing gets the mean of what little it won; it takes ~none of its step anyway
    mean = torch.einsum("bkgsn,bknd->bkgsd", shares, v) / (mass[..., None] + 1e-6)
    return mean.reshape(B, H, S, dh).transpose(1, 2), mass.reshape(B, H, S).transpose(1, 2)


def state_attention(config: BlockRecurrentConfig) -> dict:
    """Attention arguments shared by every attention to or from a recurrent state (always L2-normalised)."""
    return dict(
        kv_heads=config.kv_heads, qk_norm=True, gains=config.qk_norm_gains, temperature=config.qk_rmsnorm_scale,
        implementation=config.attn_implementation,
    )


class StateRead(nn.Module):
    """A reading layer's cross-attention from its (normed) tokens to a recurrent state: no mask, no
    positions. Owned by the reading layer, so that layers reading the same state have their own queries.
    The layer projects the queries (``to_queries``, side by side with its own projections).

    With ``state_write="delta"`` a read is a lookup instead: each head's query is mapped to a unit key over the S
    rows of its memory matrix (``to_address``) and reads the row mix that key addresses, as the write stored it."""

    def __init__(self, config: BlockRecurrentConfig):
        super().__init__()
        self.heads = config.heads
        self.to_queries = nn.Linear(config.dim, config.heads * config.dim_head, bias=False)
        self.attn = self.to_address = None
        if config.state_write == "delta":
            self.to_address = nn.Linear(config.dim_head, config.num_state_vectors, bias=False)
        else:
            self.attn = Attention(config.dim_head, config.heads, **state_attention(config))

    def prepare_keys(self, view: StateView) -> Tensor:
        """The state's keys as this read sees them, (B, kv_heads, S, dh): once per block. For a delta-rule state,
        its memory matrices (B, heads, S, dh)."""
        if self.to_address is not None:
            return memory_matrices(view.state, self.heads).contiguous()  # once: every token of the block reads it
        return self.attn.prepare_keys(view.keys, None)

    def forward(self, queries: Tensor, keys: Tensor, view: StateView) -> Tensor:
        """queries: projected (B, N, heads * dim_head); keys: from :meth:`prepare_keys`. -> (B, N, heads * dim_head)."""
        B, N, _ = queries.shape
        queries = queries.view(B, N, self.heads, -1)
        if self.to_address is not None:
            address = F.normalize(self.to_address(queries), dim=-1)  # (B, N, H, S)
            return torch.einsum("bnhs,bhsd->bnhd", address, keys.to(address.dtype)).reshape(B, N, -1)
        out = attend_state(self.attn, queries, keys, view.values)  # (B, N, H, dh)
        return out.reshape(B, N, -1)


class RecurrentStateCell(nn.Module):
    def __init__(self, config: BlockRecurrentConfig):
        super().__init__()
        dim, heads, dim_head = config.dim, config.heads, config.dim_head
        inner = heads * dim_head
        self.heads = heads

        # learned initial state and per-slot IDs (inits as the paper and reference 0.4.4)
        self.initial_state = nn.Parameter(torch.randn(config.num_state_vectors, dim) * 0.1)
        self.state_ids = nn.Parameter(torch.randn(config.num_state_vectors, dim))
        self.norm = nn.LayerNorm(dim, bias=False)

        # state keys/values, shared by the tokens' reads and the state's self-attention
        self.to_state_kv = nn.Linear(dim, config.kv_dim * 2, bias=False)
        self.to_self_queries = nn.Linear(dim, inner, bias=False)  # state -> state
        self.to_cross_queries = nn.Linear(dim, inner, bias=False)  # state -> tokens (write)

        self.self_attn = Attention(dim_head, heads, **state_attention(config))
        self.write_attn = Attention(dim_head, heads, **state_attention(config))

        # "slots": a null slot for the tokens no vector claims; its logit starts at log(S), so that at the start it
        # takes about half of each token (as much as all the vectors together)
        self.null_query = self.null_logit = None
        if config.state_write == "slots":
            self.null_query = nn.Parameter(torch.randn(heads, dim_head))
            self.null_logit = nn.Parameter(torch.full((heads,), math.log(config.num_state_vectors)))

        self.to_update = nn.Linear(inner * 2, dim, bias=False)
        self.gate = GATES[config.gate](dim, config.gate_keep_init, config.gate_projection)
        # "dual": a feed-forward on the gated state, combined by a second gate of the same kind
        self.state_ff = self.ff_gate = None
        if config.state_update == "dual":
            self.state_ff = FeedForward(dim, config.ff_inner_dim, activation=config.ff_activation)
            self.ff_gate = GATES[config.gate](dim, config.gate_keep_init, config.gate_projection)
        scale_parameters(self, config.state_cell_scale)

    def view(self, state: Tensor | None, batch_size: int) -> StateView:
        """Prepare ``state`` (B, S, D), or the learned initial state when None, for one block."""
        if state is None:
            # computed once and broadcast: every row starts from the same state
            state = self.initial_state[None]
        normed = self.norm(state) + self.state_ids.to(state.dtype)
        keys, values = self.to_state_kv(normed).chunk(2, dim=-1)
        view = StateView(state, normed, keys, values)
        if state.shape[0] != batch_size:
            view = StateView(*(t.expand(batch_size, *t.shape[1:]) for t in view))
        return view

    def prepare_block_keys(self, block_keys: Tensor) -> Tensor:
        """Raw keys (B, J, kv_heads * dim_head) of the writing layer as the write's attention sees them,
        (B, kv_heads, J, dh): for several blocks at once when they run side by side."""
        return self.write_attn.prepare_keys(block_keys, None)

    def write(self, view: StateView, block_keys: Tensor, block_values: Tensor, prepared_keys: Tensor | None = None
              ) -> Tensor:
        """The next state (B, S, D), from the block's raw keys/values (B, N, kv_heads * dim_head) of the
        writing layer (``prepared_keys``: :meth:`prepare_block_keys` of them, when the caller has it)."""
        B, S, _ = view.state.shape
        if prepared_keys is None:
            prepared_keys = self.prepare_block_keys(block_keys)
        # both query sets in one product (not with the view's keys and values: a write that no loss reaches must
        # leave its parameters without a gradient, which AdamW then skips)
        weight = torch.cat((self.to_self_queries.weight, self.to_cross_queries.weight))
        queries = F.linear(view.normed, weight).view(B, S, 2, self.heads, -1)  # (B, S, [self, cross], H, dh)
        from_state = attend_state(self.self_attn, queries[:, :, 0], self.self_attn.prepare_keys(view.keys, None),
                                  view.values)  # (B, S, H, dh)
        rewrite = None  # (B, S, 1): each vector's share of its gates' step ("slots")
        if self.null_query is None:
            from_tokens = attend_state(self.write_attn, queries[:, :, 1], prepared_keys, block_values)
        else:
            from_tokens, mass = attend_slots(self.write_attn, queries[:, :, 1], self.null_query, self.null_logit,
                                             prepared_keys, block_values)
            rewrite = -torch.expm1(-mass.mean(dim=-1, keepdim=True)).to(view.state.dtype)  # 1 - exp(-mass)
        update = torch.cat((from_state, from_tokens), dim=-1).view(B, S, -1)  # (B, S, H * 2 dh), per head [self, cross]
        # the gates take the rewrite as a positional input, so that a forward hook (brt inspect) sees it
        state = self.gate(view.state, self.to_update(update), rewrite)
        if self.state_ff is not None:
            state = self.ff_gate(state, self.state_ff(state), rewrite)
        return state


def memory_matrices(state: Tensor, heads: int) -> Tensor:
    """A delta-rule state (B, S, heads * dh) as its per-head memory matrices (B, heads, S, dh), a view: row s of
    head h is state vector s's channels of head h."""
    B, S, _ = state.shape
    return state.view(B, S, heads, -1).transpose(1, 2)


def delta_rule(memory: Tensor, keys: Tensor, values: Tensor, strengths: Tensor) -> Tensor:
    """The memories (..., S, dh) after writing N (key, value) pairs one after another by the delta rule,
    M <- M + b k (v - M^T k)^T: the value stored under k moves a share b (the strength) of the way to v.

    keys (..., N, S), unit length; values (..., N, dh); strengths (..., N) in (0, 1). In closed form (DeltaNet's
    chunked form): M_N = M_0 + K^T U, where the corrections U solve the unit lower-triangular system
    u_t + b_t sum_{j<t} (k_t . k_j) u_j = b_t (v_t - M_0^T k_t)."""
    strengths = strengths[..., None]
    overlaps = (keys @ keys.transpose(-1, -2)).tril(-1) * strengths  # (..., N, N): row t, b_t k_t . k_j for j < t
    targets = strengths * (values - keys @ memory)  # (..., N, dh)
    corrections = torch.linalg.solve_triangular(overlaps, targets, upper=False, unitriangular=True)
    return memory + keys.transpose(-1, -2) @ corrections


class DeltaStateCell(nn.Module):
    """A recurrent state written as an associative memory (``state_write="delta"``; not in the paper).

    Per head, the S state vectors' dim_head channels form a matrix M (S, dh) that maps keys over its S rows to
    values. After each block, every token of the writing layer writes a value under a key by the delta rule, with
    a strength of its own: what the key held is replaced, not added to, so a later fact about the same key (the
    same person) overwrites the earlier one. Keys (unit length), values and strengths are projected from the
    writing layer's raw keys and values of the token. No gate: a strength near 0 leaves the memory as it was.
    Reads: :class:`StateRead`'s lookup."""

    def __init__(self, config: BlockRecurrentConfig):
        super().__init__()
        self.heads, self.dim_head = config.heads, config.dim_head
        self.num_state_vectors = config.num_state_vectors
        self.initial_state = nn.Parameter(torch.randn(config.num_state_vectors, config.dim) * 0.1)
        # per head: a key over the S rows, a value, a strength
        self.to_write = nn.Linear(config.kv_dim * 2, config.heads * (config.num_state_vectors + config.dim_head + 1))
        scale_parameters(self, config.state_cell_scale)

    def view(self, state: Tensor | None, batch_size: int) -> StateView:
        """``state`` (B, S, D), or the learned initial state when None, for one block: the reads take the matrices
        as they are (no norm, no projection), so every field of the view is the state."""
        if state is None:
            state = self.initial_state[None]
        if state.shape[0] != batch_size:
            state = state.expand(batch_size, *state.shape[1:])
        return StateView(state, state, state, state)

    def prepare_block_keys(self, block_keys: Tensor) -> Tensor:
        """Nothing to prepare: the raw keys (B, J, C) as (B, 1, J, C), sliced by blocks as the attention cell's."""
        return block_keys[:, None]

    def split_writes(self, written: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``to_write``'s output (B, N, heads * (S + dh + 1)) as the writes: unit keys (B, H, N, S), values
        (B, H, N, dh) and strengths (B, H, N) in (0, 1)."""
        B, N, _ = written.shape
        keys, values, strengths = written.view(B, N, self.heads, -1).transpose(1, 2).split(
            (self.num_state_vectors, self.dim_head, 1), dim=-1)
        return F.normalize(keys, dim=-1), values, torch.sigmoid(strengths[..., 0])

    def write(self, view: StateView, block_keys: Tensor, block_values: Tensor, prepared_keys: Tensor | None = None
              ) -> Tensor:
        """The next state (B, S, D) after the block whose raw keys/values (B, N, kv_heads * dim_head) of the writing
        layer are given (``prepared_keys`` is not needed)."""
        B, S, D = view.state.shape
        written = self.to_write(torch.cat((block_keys, block_values), dim=-1)).to(view.state.dtype)
        # in the state's precision (float32 under bf16 autocast, which would cast the products back to bf16): the
        # memory is a running sum over every block of the document
        with torch.autocast(view.state.device.type, enabled=False):
            memory = delta_rule(memory_matrices(view.state, self.heads), *self.split_writes(written))  # (B, H, S, dh)
        return memory.transpose(1, 2).reshape(B, S, D)
