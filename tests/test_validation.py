"""Every bad input at a public entry point raises ValueError/TypeError naming the argument."""

import json

import pytest
import torch

from block_recurrent import BlockRecurrentConfig, BlockRecurrentTransformer, RecurrentTrainerWrapper, XLMemory

from conftest import TINY, make_model, random_tokens


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        (dict(max_seq_len=18), ValueError, "multiple of block_width"),
        (dict(recurrent_layers=(0,)), ValueError, "recurrent_layers"),
        (dict(recurrent_layers=(4,)), ValueError, "numbered 1 to depth=3"),
        (dict(recurrent_layers=(2, 2)), ValueError, "unique"),
        (dict(recurrent_layers=(2,), read_recurrent_layers=(3,)), ValueError, "read layer must be <="),
        (dict(recurrent_layers=(2,), read_recurrent_layers=(1, 2)), ValueError, "one entry per recurrent layer"),
        (dict(recurrent_layers=("2",)), TypeError, "recurrent_layers must hold ints"),
        (dict(depth=0), ValueError, "depth"),
        (dict(dim=2.5), TypeError, "dim must be an int"),
        (dict(dim_head=7), ValueError, "dim_head must be even"),
        (dict(num_state_vectors=0), ValueError, "num_state_vectors"),
        (dict(qk_rmsnorm_scale=0), ValueError, "qk_rmsnorm_scale"),
        (dict(attn_dropout=1.0), ValueError, "attn_dropout"),
        (dict(attn_implementation="flash"), ValueError, "attn_implementation"),
        (dict(use_compressed_mem=True, compressed_mem_factor=1), ValueError, "compressed_mem_factor"),
        (dict(gate="gru"), ValueError, "gate must be 'fixed' or 'lstm'"),
        (dict(state_update="single"), ValueError, "state_update must be 'skip' or 'dual'"),
        (dict(state_write="slot"), ValueError, "state_write must be 'attention', 'slots' or 'delta'"),
        (dict(state_write="delta", heads=4, state_update="dual"), ValueError, "state_update must be 'skip'"),
        (dict(state_write="delta", heads=2), ValueError, r"dim \(32\) must equal heads \* dim_head"),
        (dict(gate="lstm", gate_keep_init="spread"), ValueError, "gate_keep_init='spread' sets the fixed gate"),
        (dict(gate_keep_init="2"), ValueError, "gate_keep_init must be a number, 'paper' or 'spread'"),
        (dict(gate_keep_init=[2.0]), TypeError, "gate_keep_init must be a number"),
        (dict(attention_window="global"), ValueError, "attention_window"),
        (dict(attention_window="sliding", use_compressed_mem=True), ValueError, "cannot be combined"),
        (dict(position_encoding="alibi"), ValueError, "position_encoding"),
        (dict(state_feedback=True, read_recurrent_layers=(1,)), ValueError, "state_feedback"),
        (dict(kv_heads=3), ValueError, r"kv_heads must be an int in \[1, 2\]"),
        (dict(heads=4, kv_heads=3), ValueError, r"kv_heads \(3\) must divide heads \(4\)"),
        (dict(ff_activation="swiglu"), ValueError, "ff_activation must be 'geglu' or 'relu'"),
        (dict(gate_projection=1), TypeError, "gate_projection must be a bool"),
        (dict(qk_norm_gains="no"), TypeError, "qk_norm_gains must be a bool"),
    ],
)
def test_bad_config(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        BlockRecurrentConfig(**{**TINY, **overrides})


def test_depth_one_needs_explicit_recurrent_layer():
    with pytest.raises(ValueError, match="pass recurrent_layers"):
        BlockRecurrentConfig(**{**TINY, "depth": 1, "recurrent_layers": None})
    assert BlockRecurrentConfig(**{**TINY, "depth": 1, "recurrent_layers": (1,)}).recurrent_layers == (1,)


def test_reference_defaults_and_json_round_trip(tmp_path):
    config = BlockRecurrentConfig(num_tokens=256, dim=512, depth=6)
    assert config.recurrent_layers == (3,) and config.read_recurrent_layers == (3,)
    assert config.num_state_vectors == config.block_width == 512 and config.max_seq_len == 1024
    assert BlockRecurrentConfig.from_json(config.to_json()) == config
    config.save(tmp_path / "config.json")
    assert BlockRecurrentConfig.load(tmp_path / "config.json") == config
    data = json.loads(config.to_json())
    data["bogus"] = 1
    with pytest.raises(ValueError, match="unknown config fields: bogus"):
        BlockRecurrentConfig.from_dict(data)
    with pytest.raises(ValueError, match="unknown preset"):
        BlockRecurrentConfig.from_name("huge")
    assert BlockRecurrentConfig.from_name("tiny", dim=32).dim == 32


def test_model_constructor_errors():
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        BlockRecurrentTransformer(**TINY, bogus=1)
    with pytest.raises(TypeError, match="either a config or keyword"):
        BlockRecurrentTransformer(BlockRecurrentConfig(**TINY), dim=8)
    with pytest.raises(ValueError, match="multiple of block_width"):
        BlockRecurrentTransformer(**{**TINY, "max_seq_len": 17})


@pytest.mark.parametrize(
    "x, error, pattern",
    [
        (torch.full((1, 4), 32), ValueError, r"allowed range is \[0, 31\]"),
        (torch.full((1, 4), -1), ValueError, r"allowed range is \[0, 31\]"),
        (torch.zeros(1, 4), TypeError, "integer token ids"),
        (torch.zeros(4, dtype=torch.long), ValueError, r"shape \(batch, length\)"),
        (torch.zeros(1, 0, dtype=torch.long), ValueError, "at least one row and one token"),
        ([[1, 2, 3]], TypeError, "torch.Tensor"),
        (torch.zeros(1, 17, dtype=torch.long), ValueError, "at most max_seq_len=16"),
    ],
)
def test_bad_tokens(x, error, pattern):
    with pytest.raises(error, match=pattern):
        make_model()(x)


def test_bad_memories_and_states():
    model = make_model()
    _, mems, states = model(random_tokens(2, 16))
    x1 = random_tokens(1, 4)
    with pytest.raises(ValueError, match=r"xl_memories\[0\] has batch size 2 but the input has 1 rows"):
        model(x1, xl_memories=mems, states=states)
    with pytest.raises(ValueError, match="xl_memories has 2 entries; this model needs 3"):
        model(random_tokens(2, 4), xl_memories=mems[:2], states=states)
    with pytest.raises(ValueError, match="states has 2 entries; this model needs 1"):
        model(random_tokens(2, 4), xl_memories=mems, states=states * 2)
    with pytest.raises(ValueError, match=r"states\[0\] must have shape"):
        model(random_tokens(2, 4), xl_memories=mems, states=[states[0][:, :, :8]])
    with pytest.raises(ValueError, match=r"xl_memories\[1\] has width 4"):
        bad = list(mems)
        bad[1] = XLMemory(mems[1].keys[..., :4], mems[1].values[..., :4])
        model(random_tokens(2, 4), xl_memories=bad, states=states)
    with pytest.raises(ValueError, match=r"\(2, batch, length, dim_head\)"):
        model(random_tokens(2, 4), xl_memories=[torch.zeros(3, 2, 4, 8)] * 3, states=states)
    with pytest.raises(TypeError, match="must be an XLMemory"):
        model(random_tokens(2, 4), xl_memories=["x"] * 3, states=states)
    with pytest.raises(TypeError, match="state must be a ModelState"):
        model.run(random_tokens(2, 4), state=(mems, states))
    with pytest.raises(ValueError, match=r"reset must have shape \(2,\)"):
        model.run(random_tokens(2, 4), reset=torch.tensor([True]))
    with pytest.raises(TypeError, match="reset must be a bool tensor"):
        model.run(random_tokens(2, 4), reset=torch.tensor([1, 0]))


def test_bad_labels():
    model = make_model()
    with pytest.raises(ValueError, match="labels must have the shape of x"):
        model(random_tokens(1, 4), labels=random_tokens(1, 5))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 31\] or ignore_index=-100"):
        model(random_tokens(1, 4), labels=torch.full((1, 4), 40))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model(random_tokens(1, 1), return_loss=True)


def test_wrapper_bad_input():
    model = make_model()
    with pytest.raises(TypeError, match="BlockRecurrentModel"):
        RecurrentTrainerWrapper(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"state_dropout must be a finite number in \[0.0, 1.0\]"):
        RecurrentTrainerWrapper(model, state_dropout=1.5)
    wrapper = RecurrentTrainerWrapper(model)
    with pytest.raises(ValueError, match=r"k \* max_seq_len \+ 1"):
        wrapper(random_tokens(1, 16))
    with pytest.raises(ValueError, match=r"k \* max_seq_len \+ 1"):
        wrapper(random_tokens(1, 1))
    with pytest.raises(ValueError, match="backward_every must be an int >= 1"):
        wrapper.forward_backward(random_tokens(1, 17), backward_every=0)
    with pytest.raises(ValueError, match="with labels, x must have k"):
        wrapper(random_tokens(1, 17), labels=random_tokens(1, 17))
