"""Against the reference package itself: its weights, converted, give the same logits, losses and states.

Needs `pip install --no-deps block-recurrent-transformer-pytorch==0.4.4 beartype packaging` (.ci/run does
this); skipped otherwise. The reference runs at the temperature it really uses (1/sqrt(dim_head)).
"""

import pytest
import torch

from block_recurrent import BlockRecurrentConfig, RecurrentTrainerWrapper
from block_recurrent.reference import from_reference_state_dict, memory_to_reference

reference = pytest.importorskip("block_recurrent_transformer_pytorch")

BASE = dict(num_tokens=64, dim=32, depth=3, dim_head=8, heads=2, max_seq_len=16, block_width=8,
            num_state_vectors=4, recurrent_layers=(2,))
CASES = {
    "plain": {},
    "compressed": dict(use_compressed_mem=True, compressed_mem_factor=2),
    "read_below_write": dict(depth=4, recurrent_layers=(3,), read_recurrent_layers=(1,)),
    "two_recurrent_all_qknorm": dict(depth=4, recurrent_layers=(2, 4), all_layers_qk_rmsnorm=True),
}


@pytest.mark.parametrize("case", CASES)
def test_converted_reference_weights_reproduce_the_reference(case):
    torch.manual_seed(0)
    kwargs = {**BASE, **CASES[case]}
    ref_model = reference.BlockRecurrentTransformer(**kwargs).double().eval()
    ours = from_reference_state_dict(ref_model.state_dict(), BlockRecurrentConfig(**kwargs)).double().eval()
    seq = torch.randint(0, kwargs["num_tokens"], (2, 3 * kwargs["max_seq_len"] + 1))

    mems_r, states_r, mems_o, states_o = [], [], [], []
    for start in range(0, 3 * kwargs["max_seq_len"], kwargs["max_seq_len"]):
        window = seq[:, start : start + kwargs["max_seq_len"]]
        out_r, mems_r, states_r = ref_model(window, xl_memories=mems_r, states=states_r)
        out_o, mems_o, states_o = ours(window, xl_memories=mems_o, states=states_o)
        torch.testing.assert_close(out_o, out_r, rtol=1e-8, atol=1e-8)
    for a, b in zip(states_o, states_r):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
    for a, b in zip(mems_o, mems_r):
        torch.testing.assert_close(memory_to_reference(a), b, rtol=1e-8, atol=1e-8)

    loss_r = reference.RecurrentTrainerWrapper(ref_model)(seq)
    loss_o = RecurrentTrainerWrapper(ours)(seq)
    torch.testing.assert_close(loss_o, loss_r, rtol=1e-10, atol=1e-10)


def test_mismatched_config_is_refused():
    ref_model = reference.BlockRecurrentTransformer(**BASE)
    with pytest.raises(ValueError, match="config does not match|no counterpart|lacks"):
        from_reference_state_dict(ref_model.state_dict(), BlockRecurrentConfig(**{**BASE, "dim": 16}))
    with pytest.raises(ValueError, match="config does not match|no counterpart|lacks"):
        from_reference_state_dict(ref_model.state_dict(), BlockRecurrentConfig(**{**BASE, "recurrent_layers": (1,)}))


def test_architecture_fields_are_set_to_the_reference_unless_set_otherwise():
    ref_model = reference.BlockRecurrentTransformer(**BASE)
    # our defaults (no gate projection) become the reference's architecture ...
    ours = from_reference_state_dict(ref_model.state_dict(), BlockRecurrentConfig(**BASE))
    assert ours.config.gate_projection is True and ours.config.kv_heads == 1
    # ... but an explicit choice the reference does not have is refused
    assert ours.config.gate == "fixed" and ours.config.gate_keep_init == "paper" and ours.config.state_cell_scale == 1.0
    for field, value in (("gate_keep_init", 2.0), ("state_cell_scale", 0.5), ("kv_heads", 2), ("ff_activation", "relu"),
                         ("position_encoding", "t5")):
        with pytest.raises(ValueError, match=f"{field}"):
            from_reference_state_dict(ref_model.state_dict(), BlockRecurrentConfig(**{**BASE, field: value}))
