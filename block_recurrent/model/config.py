"""The architecture of a Block-Recurrent Transformer, as one validated, JSON-serialisable dataclass.

Field names and defaults follow the reference port (lucidrains/block-recurrent-transformer-pytorch 0.4.4)
so that its constructor arguments mean the same thing here. Layers are numbered from 1, as there.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import check_bool, check_choice, check_float, check_int


def _as_layer_tuple(name: str, value: Any, depth: int) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of layer numbers, got {type(value).__name__}")
    layers = tuple(value)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{name} must hold ints, got {layer!r}")
        if not 1 <= layer <= depth:
            raise ValueError(f"{name} holds layer {layer}; layers are numbered 1 to depth={depth}")
    return layers


@dataclass(frozen=True)
class BlockRecurrentConfig:
    """Architecture of a :class:`~block_recurrent.BlockRecurrentModel`.

    ``None`` fields are resolved in ``__post_init__`` exactly as the reference resolves them:
    ``recurrent_layers`` defaults to ``(depth // 2,)``, ``read_recurrent_layers`` to ``recurrent_layers``
    and ``num_state_vectors`` to ``block_width``.
    """

    # vocabulary and width
    num_tokens: int
    dim: int
    depth: int
    dim_head: int = 64
    heads: int = 8
    # key/value heads: 1 (the reference: multi-query, one key/value head shared by every query head), heads
    # (meliad: multi-head), or a divisor of heads in between (grouped-query); for token and state attention
    kv_heads: int = 1
    ff_mult: float = 4
    # "geglu" (the reference: GEGLU, inner width dim * ff_mult * 2/3) or "relu" (meliad: a ReLU MLP of inner
    # width dim * ff_mult)
    ff_activation: str = "geglu"

    # blocks and segments: a forward call takes up to max_seq_len tokens, cut into blocks of block_width
    max_seq_len: int = 1024
    block_width: int = 512

    # recurrence: which layers keep a state (write it) and which layer reads each state
    recurrent_layers: tuple[int, ...] | None = None
    read_recurrent_layers: tuple[int, ...] | None = None
    num_state_vectors: int | None = None

    # the recurrent cell's variants (paper section 3): "fixed" (learned EMA, the paper's and the reference's) or
    # "lstm" gate; "skip" (one gate after attention) or "dual" (a second gate after a feed-forward on the state).
    # The default, the LSTM gate with its forget gate at +3 and slow state cells, carries a value 8 blocks back
    # on most seeds where the fixed gate mostly does not, at the same corpus score
    # (docs/experiments/slow-state-cells.md, 2026-12-05-default-model-recall.md)
    gate: str = "lstm"
    state_update: str = "skip"
    # how the write's state vectors take the block's tokens: "attention" (the paper's: each vector attends over
    # the tokens, softmax over tokens) or "slots" (Slot Attention's competition: each token's softmax is over the
    # vectors and a learned null slot, each vector takes the mean of what it won and is rewritten in proportion
    # to how much it won, so a token that no vector claims changes none; not in the paper), or "delta" (an
    # associative memory: per head, an (S, dim_head) matrix that each token writes a value into under a key of its
    # own by the delta rule, replacing what that key held, and that the reading tokens look up with keys; needs
    # dim == heads * dim_head; no gate, so gate, gate_keep_init and gate_projection do not apply and state_update
    # must be "skip"; not in the paper)
    state_write: str = "attention"
    # the fixed gate's initial keep bias b_g (keep = sigmoid(b_g)): a number starts every channel there (a gate
    # that starts nearly shut holds a value longer before training has opened it: docs/experiments/gate-init.md);
    # "paper": N(0, 0.1) per channel, the paper's and the reference's init; "spread": per channel, half-lives
    # geometric from 1 to 256 blocks (recurrent.spread_keep_bias). With gate="lstm", a number replaces the forget
    # gate's offset ("paper": +1; 3.0 starts f at 0.95); "spread" is fixed-gate only. None is read as "paper"
    gate_keep_init: float | str | None = 3.0
    # the state cells' parameters are stored divided by this and multiplied back where they are used, so that
    # Adam-type optimisers, whose step is about the learning rate whatever the gradient's size, move them at this
    # multiple of the learning rate: a slow cell stays near a write that keeps while the reads learn to use it
    # (docs/experiments/slow-state-cells.md). 1: no scaling, the reference's and the paper's
    state_cell_scale: float = 0.1
    # False (meliad, our default): the state's output projection is the gate's W_z. True (the reference): the
    # gate projects that (already projected) update once more, z = W_z h + b_z. The same functions either way, but
    # the fixed gate learns beyond-window recall far more often without the second matrix
    # (docs/experiments/gate-projection.md)
    gate_projection: bool = False

    # attention window: "block" (the reference: the whole previous block, the causal prefix and the token
    # itself) or "sliding" (meliad: exactly the block_width tokens before each token)
    attention_window: str = "block"
    # token self-attention positions: "rotary_xpos" (the reference) or "t5" (the paper's relative bias)
    position_encoding: str = "rotary_xpos"
    t5_num_buckets: int = 32
    t5_max_distance: int = 128
    # the paper's Block-Feedback: every layer reads every recurrent state
    state_feedback: bool = False

    # attention
    all_layers_qk_rmsnorm: bool = False
    # learned per-dimension gains on the L2-normalised queries and keys (the reference); meliad has none
    qk_norm_gains: bool = True
    # initial value of the learned per-head temperature of L2-normalised attention: 1 is meliad's; the reference
    # meant 8 and ran 1/sqrt(dim_head) (docs/experiments/qk-temperature.md)
    qk_rmsnorm_scale: float = 1.0
    # accepted for the reference's constructor, with a warning when True: attention always runs through SDPA,
    # which chooses flash kernels itself where the device allows
    use_flash_attn: bool = False
    # "auto" (the faster of "sdpa" and "matmul" for the call, see attention.MATMUL_MAX_LOGITS), "sdpa" (torch's fused
    # kernels), "matmul" (two matrix products), or "math" (the plain path the others are tested against)
    attn_implementation: str = "auto"
    rotary_theta: float = 10000.0
    xpos_scale_base: float = 512.0

    # Transformer-XL memory, optionally with a compressed second level
    use_compressed_mem: bool = False
    compressed_mem_factor: int = 4

    # regularisation (never inside the recurrence)
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0

    # loss
    ignore_index: int = -100

    def __post_init__(self) -> None:
        check_int("num_tokens", self.num_tokens, 1)
        check_int("dim", self.dim, 1)
        check_int("depth", self.depth, 1)
        check_int("dim_head", self.dim_head, 2)
        if self.dim_head % 2:
            raise ValueError(f"dim_head must be even for rotary embeddings, got {self.dim_head}")
        check_int("heads", self.heads, 1)
        for flag in ("qk_norm_gains", "gate_projection", "state_feedback", "all_layers_qk_rmsnorm", "use_compressed_mem",
                     "use_flash_attn"):
            check_bool(flag, getattr(self, flag))
        if self.use_flash_attn:
            warnings.warn(
                "use_flash_attn has no effect here (it is accepted for the reference's constructor): attention always "
                "runs through torch's scaled_dot_product_attention, which picks flash kernels where the device allows",
                UserWarning,
                stacklevel=3,
            )
        check_int("kv_heads", self.kv_heads, 1, self.heads)
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})")
        if self.ff_activation not in ("geglu", "relu"):
            raise ValueError(f"ff_activation must be 'geglu' or 'relu', got {self.ff_activation!r}")
        check_float("ff_mult", self.ff_mult, 0.0)
        if self.ff_inner_dim < 1:
            raise ValueError(f"ff_mult={self.ff_mult} gives an empty feed-forward for dim={self.dim}")
        check_int("block_width", self.block_width, 1)
        check_int("max_seq_len", self.max_seq_len, 1)
        if self.max_seq_len % self.block_width:
            raise ValueError(
                f"max_seq_len ({self.max_seq_len}) must be a multiple of block_width ({self.block_width})"
            )

        # recurrent_layers=() builds the paper's baselines: Transformer-XL without recurrence
        recurrent = self.recurrent_layers
        if recurrent is None:
            if self.depth < 2:
                raise ValueError("depth=1 has no default recurrent layer (depth // 2 = 0); pass recurrent_layers")
            recurrent = (self.depth // 2,)
        recurrent = _as_layer_tuple("recurrent_layers", recurrent, self.depth)
        if len(set(recurrent)) != len(recurrent):
            raise ValueError(f"recurrent_layers must be unique, got {recurrent}")
        read = recurrent if self.read_recurrent_layers is None else self.read_recurrent_layers
        read = _as_layer_tuple("read_recurrent_layers", read, self.depth)
        if len(read) != len(recurrent):
            raise ValueError(
                f"read_recurrent_layers needs one entry per recurrent layer ({len(recurrent)}), got {len(read)}"
            )
        for read_layer, write_layer in zip(read, recurrent):
            if read_layer > write_layer:
                raise ValueError(
                    f"read_recurrent_layers: layer {read_layer} cannot read the state written by the lower "
                    f"layer {write_layer} (a read layer must be <= its write layer)"
                )
        object.__setattr__(self, "recurrent_layers", recurrent)
        object.__setattr__(self, "read_recurrent_layers", read)

        num_states = self.block_width if self.num_state_vectors is None else self.num_state_vectors
        check_int("num_state_vectors", num_states, 1)
        object.__setattr__(self, "num_state_vectors", num_states)

        check_float("qk_rmsnorm_scale", self.qk_rmsnorm_scale, 0.0, open_low=True)
        if self.gate not in ("fixed", "lstm"):
            raise ValueError(f"gate must be 'fixed' or 'lstm', got {self.gate!r}")
        if self.gate_keep_init is None:  # configs written before "paper" had a name
            object.__setattr__(self, "gate_keep_init", "paper")
        if isinstance(self.gate_keep_init, str):
            if self.gate_keep_init not in ("paper", "spread"):
                raise ValueError(f"gate_keep_init must be a number, 'paper' or 'spread', got {self.gate_keep_init!r}")
        else:
            check_float("gate_keep_init", self.gate_keep_init, -1e3, 1e3)
        if self.gate != "fixed" and self.gate_keep_init == "spread":
            raise ValueError("gate_keep_init='spread' sets the fixed gate's biases; with gate='lstm' give a number "
                             "(the forget gate's offset) or 'paper'")
        check_float("state_cell_scale", self.state_cell_scale, 0.0, 100.0, open_low=True)
        if self.state_update not in ("skip", "dual"):
            raise ValueError(f"state_update must be 'skip' or 'dual', got {self.state_update!r}")
        if self.state_write not in ("attention", "slots", "delta"):
            raise ValueError(f"state_write must be 'attention', 'slots' or 'delta', got {self.state_write!r}")
        if self.state_write == "delta" and self.state_update != "skip":
            raise ValueError(f"state_write='delta' has no gate for a second update: state_update must be 'skip', "
                             f"got {self.state_update!r}")
        if self.state_write == "delta" and self.dim != self.heads * self.dim_head:
            raise ValueError(f"state_write='delta' splits each state vector into the heads' memory rows: dim "
                             f"({self.dim}) must equal heads * dim_head ({self.heads} * {self.dim_head})")
        if self.attention_window not in ("block", "sliding"):
            raise ValueError(f"attention_window must be 'block' or 'sliding', got {self.attention_window!r}")
        if self.attention_window == "sliding" and self.use_compressed_mem:
            raise ValueError("attention_window='sliding' counts tokens; it cannot be combined with use_compressed_mem")
        if self.position_encoding not in ("rotary_xpos", "t5"):
            raise ValueError(f"position_encoding must be 'rotary_xpos' or 't5', got {self.position_encoding!r}")
        check_int("t5_num_buckets", self.t5_num_buckets, 2)
        check_int("t5_max_distance", self.t5_max_distance, self.t5_num_buckets // 2 + 1)
        # (a config read back from its own JSON passes read_recurrent_layers equal to recurrent_layers)
        if self.state_feedback and read != recurrent:
            raise ValueError("state_feedback makes every layer read every state; do not also pass read_recurrent_layers")
        check_choice("attn_implementation", self.attn_implementation, ("auto", "sdpa", "matmul", "math"))
        check_float("rotary_theta", self.rotary_theta, 1.0)
        check_float("xpos_scale_base", self.xpos_scale_base, 1.0)
        if self.use_compressed_mem:
            check_int("compressed_mem_factor", self.compressed_mem_factor, 2)
            if self.block_width < 2:
                raise ValueError("use_compressed_mem needs block_width >= 2 (the compressed level keeps block_width // 2)")
        check_float("attn_dropout", self.attn_dropout, 0.0, 1.0, open_high=True)
        check_float("ff_dropout", self.ff_dropout, 0.0, 1.0, open_high=True)
        check_int("ignore_index", self.ignore_index, -(2**62))

    # derived sizes

    @property
    def ff_inner_dim(self) -> int:
        if self.ff_activation == "relu":
            return int(self.dim * self.ff_mult)
        return int(self.dim * self.ff_mult * 2 / 3)  # GEGLU's two input halves keep the parameter count

    @property
    def blocks_side_by_side(self) -> bool:
        """Whether whole blocks can run side by side (``BlockRecurrentModel.forward_blocks``): each layer's
        memory is its own previous block (FIFO, not compressed) and no layer reads a state written above it
        (feedback would chain every layer block after block)."""
        return not self.use_compressed_mem and all(
            self.recurrent_layers[i] <= layer for layer in range(1, self.depth + 1) for i in self.reads_of_layer(layer)
        )

    @property
    def kv_dim(self) -> int:
        """Width of a layer's raw keys (and values) per position, as memories and states keep them."""
        return self.kv_heads * self.dim_head

    @property
    def memory_lengths(self) -> tuple[int, ...]:
        """Length of each memory level, most recent first: the previous block, then the compressed past."""
        if self.use_compressed_mem:
            return (self.block_width, self.block_width // 2)
        return (self.block_width,)

    @property
    def max_memory_len(self) -> int:
        return sum(self.memory_lengths)

    def reads_of_layer(self, layer: int) -> tuple[int, ...]:
        """Indices into ``recurrent_layers`` of the states that ``layer`` (1-based) reads."""
        if self.state_feedback:
            return tuple(range(len(self.recurrent_layers)))
        return tuple(i for i, read in enumerate(self.read_recurrent_layers) if read == layer)

    # serialisation

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["recurrent_layers"] = list(self.recurrent_layers)
        data["read_recurrent_layers"] = list(self.read_recurrent_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BlockRecurrentConfig":
        if not isinstance(data, dict):
            raise TypeError(f"config must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        data = dict(data)
        for name in ("recurrent_layers", "read_recurrent_layers"):
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        return cls(**data)

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> "BlockRecurrentConfig":
        """A config as a checkpoint stored it. A stored config holds every field of its day, so a field it lacks
        was added later: it takes the value that builds the architecture of that day (:data:`ADDED_FIELDS`),
        not today's default."""
        if not isinstance(data, dict):
            raise TypeError(f"config must be a dict, got {type(data).__name__}")
        return cls.from_dict({**ADDED_FIELDS, **data})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "BlockRecurrentConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "BlockRecurrentConfig":
        return cls.from_json(Path(path).read_text())

    def replace(self, **changes: Any) -> "BlockRecurrentConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "BlockRecurrentConfig":
        """A named preset (see :data:`PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})


# fields added after configs were first saved, with the value that means what configs without them built
ADDED_FIELDS: dict[str, Any] = {
    "gate_projection": True,  # every gate had its own projection
    "state_cell_scale": 1.0,  # the cells' parameters were stored unscaled
}

# the recorded recipes keep the cell they were measured with: the fixed gate, the paper's keep init, no scaling
FIXED_GATE = dict(gate="fixed", gate_keep_init="paper", state_cell_scale=1.0)

PRESETS: dict[str, dict[str, Any]] = {
    # brt train's default, the best of the recipes that train in five minutes on two CPU cores
    # (docs/experiments/default-recipe.md). Blocks of 16 bytes, so that a step of 2,048 bytes reads 128 documents
    # side by side: the number of documents a step reads mattered more than a longer attention context. Every layer
    # L2-normalises its attention with an initial temperature of 4: at 1, logits of cosine similarities in [-1, 1]
    # start nearly uniform and learn slower. The cell is the config's default: the LSTM gate at +3, slow state cells
    "mini": dict(num_tokens=256, dim=128, depth=4, dim_head=32, heads=4, max_seq_len=16, block_width=16,
                 num_state_vectors=16, recurrent_layers=(2,), all_layers_qk_rmsnorm=True, qk_rmsnorm_scale=4.0,
                 gate="lstm", gate_keep_init=3.0),
    # the one-hour recipe's model (`brt train --recipe hour`, docs/experiments/hour-recipe.md): mini's shape at
    # width 192, with blocks of 32 so attention reaches 32-64 bytes back, and 128 rows of 32 bytes per step
    "hour": dict(num_tokens=256, dim=192, depth=4, dim_head=48, heads=4, max_seq_len=32, block_width=32,
                 num_state_vectors=16, recurrent_layers=(2,), all_layers_qk_rmsnorm=True, qk_rmsnorm_scale=4.0,
                 **FIXED_GATE),
    # a few seconds per step on a laptop CPU; for tests and smoke runs
    "tiny": dict(num_tokens=256, dim=64, depth=2, dim_head=16, heads=4, max_seq_len=64, block_width=32,
                 num_state_vectors=16, recurrent_layers=(1,)),
    # learns visibly on a 2-core CPU in minutes
    "small": dict(num_tokens=256, dim=256, depth=4, dim_head=64, heads=4, max_seq_len=256, block_width=128,
                  num_state_vectors=128, recurrent_layers=(2,)),
    # the reference's enwik8 example
    "enwik8": dict(num_tokens=256, dim=512, depth=6, dim_head=64, heads=8, max_seq_len=1024, block_width=512,
                   num_state_vectors=512, recurrent_layers=(4,)),
    # the paper's Rec:fixed:skip in meliad's architecture (its medium_150M + bias_skip configs): 12 layers of width
    # 1024, 8 heads of 128 with per-head keys/values, ReLU MLP of 4096, L2-normalised attention everywhere, T5
    # relative bias (32 buckets, distance 128), sliding window of 512, 4096-token segments, 512 states in
    # layer 10. Non-embedding parameters 160,461,944 (151,022,688 with recurrent_layers=()), as meliad's.
    # Bytes as tokens: pass num_tokens for a subword vocabulary
    "paper": dict(num_tokens=256, dim=1024, depth=12, dim_head=128, heads=8, kv_heads=8, ff_activation="relu",
                  ff_mult=4, qk_norm_gains=False, all_layers_qk_rmsnorm=True, gate_projection=False,
                  attention_window="sliding", position_encoding="t5", t5_num_buckets=32, t5_max_distance=128,
                  max_seq_len=4096, block_width=512, num_state_vectors=512, recurrent_layers=(10,), **FIXED_GATE),
}
