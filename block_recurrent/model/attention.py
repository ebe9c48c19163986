"""Attention and feed-forward parts shared by the token and state paths.

Queries have ``heads`` heads; keys and values have ``kv_heads`` heads, each shared by ``heads // kv_heads``
query heads: one (the reference's multi-query attention, the default), all (meliad's multi-head), or a
group size in between.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .positions import RotaryTables, rotate


# "auto" takes the matmul path where it measured faster: on the CPU, for logits of at most this many elements,
# under autograd in bfloat16 or under torch.compile. In bf16 training torch's fused CPU kernel is slow backwards
# at small sizes, and faster past this threshold; in float32 and without autograd it is as fast or faster, except
# under torch.compile (see attend). Measurements: docs/experiments/training-speed.md (benchmarks/bench_attention.py)
MATMUL_MAX_LOGITS = 1 << 23


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    scale: float,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    implementation: str = "auto",
) -> Tensor:
    """softmax(q k^T * scale + bias) v.

    q: (B, H, N, D). k, v: (B, K, J, D) with K key/value heads; query head h uses key/value head
    h // (H // K). mask: bool, True where a query may attend: (N, J) or (B, 1, N, J). No row may be fully
    masked (callers that can produce such rows unmask them and zero their output). bias: additive logits
    (H, N, J), or (B, H, N, J) when rows differ (ragged decoding).
    implementation: "sdpa" (torch's fused kernels), "matmul" (two matrix products and a softmax), "auto"
    (the faster of those two, see MATMUL_MAX_LOGITS), or "math" (the plain specification the others are
    tested against).
    """
    if implementation == "auto":
        implementation = "sdpa"
        small = q.numel() // q.shape[-1] * k.shape[-2] <= MATMUL_MAX_LOGITS
        if q.device.type == "cpu" and small and (
            (torch.is_grad_enabled() and q.requires_grad and _compute_dtype(q) == torch.bfloat16)
            # under torch.compile inductor fuses the mask and softmax between two products, where the fused
            # kernel stays one opaque call (faster compiled decoding: docs/experiments/decoding-speed.md)
            or torch.compiler.is_compiling()
        ):
            implementation = "matmul"
    B, H, N, D = q.shape
    K = k.shape[1]
    G = H // K  # query heads per key/value head
    if implementation in ("sdpa", "matmul"):
        # fold each key/value head's G query heads into the query axis, (B, K, G * N, D), so one attention runs
        # per key/value head and per-query-head copies of keys/values are never materialised (faster than
        # expanding k and v over heads: docs/experiments/training-speed.md)
        if mask is not None and G > 1:
            mask = mask.repeat(G, 1) if mask.ndim == 2 else mask.repeat(1, 1, G, 1)  # (G * N, J) / (B, 1, G * N, J)
        if bias is not None:
            bias = bias.reshape(*bias.shape[:-3], K, G * N, bias.shape[-1])  # ([B,] K, G * N, J)
        q = q.reshape(B, K, G * N, D)
        if implementation == "matmul":
            return _attend_matmul(q, k, v, mask, scale, bias, dropout_p).view(B, H, N, D)
        if bias is not None:
            bias = bias.to(q.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))  # additive float mask
        # SDPA picks flash / memory-efficient / math kernels itself; a boolean mask rules out the
        # flash-only kernels on CUDA, and we never force one, so there is no invalid combination
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        return out.view(B, H, N, D)

    # the plain path: the specification the fused kernels are tested against
    k = k.repeat_interleave(G, dim=1)  # (B, H, J, D)
    v = v.repeat_interleave(G, dim=1)
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if bias is not None:
        sim = sim + bias
    if mask is not None:
        sim = sim.masked_fill(~mask, torch.finfo(sim.dtype).min)
    weights = sim.softmax(dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.einsum("bhij,bhjd->bhid", weights, v)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype a matrix product of ``t`` runs in: the autocast dtype where autocast is on."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _attend_matmul(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, bias: Tensor | None,
                   dropout_p: float) -> Tensor:
    """Folded attention, q (B, K, G * N, D) over k, v (B, K, J, D), as two matrix products; the softmax is taken
    in float32 at least (as the fused kernels accumulate) and its weights cast back for the second product."""
    sim = q @ k.transpose(-1, -2)  # (B, K, G * N, J)
    if scale != 1.0:  # (L2-normalised attention has its temperature in the queries)
        sim = sim * scale
    if mask is not None:
        # the mask as an additive bias of the mask's small shape: an add's backward passes the gradient through,
        # where masked_fill's is a second masked pass over the logits
        fill = torch.zeros(mask.shape, dtype=sim.dtype, device=sim.device)
        fill.masked_fill_(~mask, torch.finfo(sim.dtype).min)
        bias = fill if bias is None else bias + fill
    if bias is not None:
        sim = sim + bias
    weights = sim.softmax(dim=-1, dtype=torch.promote_types(sim.dtype, torch.float32))
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights.to(v.dtype) @ v


class Attention(nn.Module):
    """Dot-product attention with optional L2-normalised queries and keys.

    With ``qk_norm`` the logits are cosine similarities (times learned per-dimension gains with ``gains``, as
    in the reference) multiplied by a learned per-head temperature initialised at ``temperature``. The reference
    port meant a fixed 8 here but never applied it, so it ran at 1/sqrt(dim_head); docs/experiments/qk-temperature.md
    has why the default initial temperature is 1. Without ``qk_norm`` the scale is the usual 1/sqrt(dim_head).
    """

    def __init__(
        self,
        dim_head: int,
        heads: int,
        *,
        kv_heads: int = 1,
        qk_norm: bool,
        gains: bool = True,
        temperature: float = 1.0,
        dropout: float = 0.0,
        implementation: str = "auto",
    ):
        super().__init__()
        self.kv_heads = kv_heads
        self.qk_norm = qk_norm
        self.dropout = dropout
        self.implementation = implementation
        self.scale = dim_head**-0.5
        self.q_gain = self.k_gain = None
        if qk_norm and gains:
            self.q_gain = nn.Parameter(torch.ones(dim_head))
            self.k_gain = nn.Parameter(torch.ones(dim_head))
        if qk_norm:
            self.temperature = nn.Parameter(torch.full((heads,), float(temperature)))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attention without positions: q (B, H, N, D); k, v raw (B, J, kv_heads * D)."""
        q, scale = self.prepare_queries(q, None)
        k = self.prepare_keys(k, None)
        dropout_p = self.dropout if self.training else 0.0
        v = split_kv_heads(v, self.kv_heads)
        return attend(q, k, v, mask, scale=scale, dropout_p=dropout_p, implementation=self.implementation)

    # the two halves of the preparation, called separately by the token attention, which prepares each key
    # once (the memory's when its block starts, each token's when it arrives) and keeps it for the block

    def prepare_queries(self, q: Tensor, tables: RotaryTables | None) -> tuple[Tensor, float]:
        """Queries (B, H, N, D) as the dot product sees them, and the scale to apply to the logits.
        ``tables``: the queries' rotary tables (None: no rotation)."""
        if self.qk_norm:
            q = F.normalize(q, dim=-1)
            if self.q_gain is not None:
                q = q * self.q_gain
        if tables is not None:
            q = rotate(q, tables)
        if self.qk_norm:
            return q * self.temperature.to(q.dtype)[:, None, None], 1.0  # (H, 1, 1): per-head temperature
        return q, self.scale

    def prepare_laid_out_queries(self, q: Tensor) -> Tensor:
        """Queries without positions as projected, (B, N, H, D), as the dot product sees them at scale 1: with
        qk_norm normalised and multiplied by the gains and the per-head temperature in one product (H, D)."""
        if not self.qk_norm:
            return q * self.scale
        factor = self.temperature[:, None] if self.q_gain is None else self.temperature[:, None] * self.q_gain
        # in the queries' precision: under bf16 autocast they stay bf16 for the product that follows
        return F.normalize(q, dim=-1) * factor.to(q.dtype)  # (H, D) or (H, 1)

    def prepare_keys(self, k: Tensor, tables: RotaryTables | None) -> Tensor:
        """Raw keys (B, J, kv_heads * D) as the dot product sees them, (B, kv_heads, J, D): split into heads,
        normalised (with qk_norm), then rotated by the keys' rotary ``tables`` (None: no rotation)."""
        k = split_kv_heads(k, self.kv_heads)
        if self.qk_norm:
            k = F.normalize(k, dim=-1)
            if self.k_gain is not None:
                k = k * self.k_gain
        if tables is not None:
            k = rotate(k, tables)
        return k


def split_heads(t: Tensor, heads: int) -> Tensor:
    return rearrange(t, "b n (h d) -> b h n d", h=heads)


def merge_heads(t: Tensor) -> Tensor:
    return rearrange(t, "b h n d -> b n (h d)")


def split_kv_heads(t: Tensor, kv_heads: int) -> Tensor:
    """Raw keys or values (B, J, kv_heads * D) -> (B, kv_heads, J, D); a view."""
    B, J, _ = t.shape
    return t.view(B, J, kv_heads, -1).transpose(1, 2)


class FeedForward(nn.Module):
    """Pre-norm feed-forward: GEGLU (the reference) or a ReLU MLP (meliad), no biases."""

    def __init__(self, dim: int, inner_dim: int, dropout: float = 0.0, activation: str = "geglu"):
        super().__init__()
        self.activation = activation
        self.norm = nn.LayerNorm(dim, bias=False)
        self.proj_in = nn.Linear(dim, inner_dim * (2 if activation == "geglu" else 1), bias=False)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, x: Tensor, proj_in_t: Tensor | None = None) -> Tensor:
        """x (B, N, D) -> (B, N, D). ``proj_in_t``: ``proj_in``'s weight transposed, (D, outputs), as the layer's
        cache keeps it (a contiguous copy when decoding); None uses the weight itself."""
        normed = F.layer_norm(x, x.shape[-1:], self.norm.weight, None, self.norm.eps)
        projected = normed @ (self.proj_in.weight.t() if proj_in_t is None else proj_in_t)
        if self.activation == "geglu":
            hidden, gate = projected.chunk(2, dim=-1)
            # GELU of a strided half is slower than a copy and GELU (docs/experiments/evaluation-speed.md)
            hidden = F.gelu(gate.contiguous()) * hidden
        else:
            hidden = F.relu(projected)
        return F.linear(self.dropout(hidden), self.proj_out.weight)
