"""Evidence behind docs/experiments/variants-comparison.md: the recall task is out of the baselines' reach by
construction, the comparison script's table builder runs end to end on a 2-step config, and the paper preset has
meliad's parameter counts."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from block_recurrent import BlockRecurrentTransformer
from block_recurrent.tasks import RecallTask

ROOT = Path(__file__).resolve().parents[1]


def _load_compare_variants():
    if str(ROOT / "experiments") not in sys.path:
        sys.path.insert(0, str(ROOT / "experiments"))  # the script imports its sibling, harness
    spec = importlib.util.spec_from_file_location("compare_variants", ROOT / "experiments" / "compare_variants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_variants"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _query_logits(model: BlockRecurrentTransformer, inputs: torch.Tensor) -> torch.Tensor:
    model.double().eval()  # float64: a leak of the value token could not hide in rounding
    with torch.no_grad():
        logits, _ = model.run(inputs)
    return logits[:, -1]  # (B, V): the query position


@pytest.mark.parametrize(
    "changes, depth, reachable",
    [
        (dict(recurrent_layers=()), 3, False),  # Transformer-XL: each layer reaches one more block back
        (dict(recurrent_layers=(), attention_window="sliding"), 4, False),  # Slide:depth+1
        (dict(recurrent_layers=(2,)), 3, True),  # the recurrent state carries the value
    ],
)
def test_value_token_reaches_query_only_through_recurrence(changes, depth, reachable):
    block = 8
    # distance >= depth + 1 blocks: beyond depth stacked windows of one block (and of W tokens when sliding)
    task = RecallTask(block_width=block, distance=depth + 1, num_values=16)
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(num_tokens=task.vocab_size, dim=32, depth=depth, heads=2, dim_head=16,
                                      block_width=block, max_seq_len=task.length, num_state_vectors=block, **changes)
    inputs, _ = task.batch(4, torch.Generator().manual_seed(0))
    changed = inputs.clone()
    changed[:, 0] = (inputs[:, 0] + 1) % task.num_values  # another value, nothing else changes
    difference = (_query_logits(model, inputs) - _query_logits(model, changed)).abs().max().item()
    if reachable:
        assert difference > 1e-6, "the recurrent model's query ignores the value token"
    else:
        assert difference < 1e-12, f"the value token leaks into a baseline's query (max |dlogit| = {difference})"


def test_value_token_in_reach_changes_xl_logits():
    # control: the same check can see a change when the value is inside XL's reach (distance < depth)
    task = RecallTask(block_width=8, distance=2, num_values=16)
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(num_tokens=task.vocab_size, dim=32, depth=3, heads=2, dim_head=16,
                                      block_width=8, max_seq_len=task.length, recurrent_layers=())
    inputs, _ = task.batch(4, torch.Generator().manual_seed(0))
    changed = inputs.clone()
    changed[:, 0] = (inputs[:, 0] + 1) % task.num_values
    assert (_query_logits(model, inputs) - _query_logits(model, changed)).abs().max().item() > 1e-4


def test_compare_variants_table_on_quick_config(tmp_path):
    cv = _load_compare_variants()
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):  # a tiny corpus instead of the standard library (loading that takes seconds)
        (data / f"doc{i}.py").write_text("".join(f"def f{j}(x):\n    return x + {i * j}\n" for j in range(40)))
    budget = cv.QUICK
    results = cv.run(budget, str(data), log=lambda _: None)
    table = cv.build_table(results, budget)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [row.split(" | ")[0][2:] for row in rows] == list(cv.VARIANTS)
    for result in results:
        assert result.params > result.non_embedding > 0
        assert len(result.recall_accuracy) == len(budget.recall_seeds)
        assert all(0.0 <= a <= 1.0 for a in result.recall_accuracy)
        assert math.isfinite(result.bpb) and result.bpb > 0
        assert result.corpus_tokens_per_s > 0 and result.recall_tokens_per_s > 0
    # the sliding baseline has the extra layer; XL has no recurrent parameters
    by_name = {r.name: r for r in results}
    assert by_name["XL"].params < by_name["Rec:fixed:skip"].params
    assert by_name["Slide:4 (+1 layer)"].params > by_name["XL"].params
    assert cv.plot_positions(results, tmp_path / "plot.png", budget) is False or (tmp_path / "plot.png").exists()


@pytest.mark.parametrize(
    "recurrent_layers, meliad_count",
    [((), 151_022_688), ((10,), 160_461_944)],  # meliad's 12-layer baseline and Rec:fixed:skip (the issue)
)
def test_paper_preset_has_meliads_parameter_counts(recurrent_layers, meliad_count):
    from block_recurrent import BlockRecurrentConfig

    with torch.device("meta"):  # shapes only
        model = BlockRecurrentTransformer(BlockRecurrentConfig.from_name("paper", recurrent_layers=recurrent_layers))
    assert model.num_parameters(non_embedding=True) == meliad_count
    # the rest: token embedding, final norm, output projection (256 byte tokens, width 1024)
    assert model.num_parameters() - meliad_count == 256 * 1024 + 1024 + 1024 * 256


def test_paper_preset_recurrent_layer_adds_what_meliads_does():
    """Piece by piece, the 9,439,256 parameters meliad's recurrent layer adds to a layer of width E = 1024."""
    from block_recurrent import BlockRecurrentConfig

    E, S, H = 1024, 512, 8
    with torch.device("meta"):
        model = BlockRecurrentTransformer(BlockRecurrentConfig.from_name("paper"))
    cell = model.layers[9].attn.cell
    count = lambda module: sum(p.numel() for p in module.parameters())
    assert count(cell.to_state_kv) + count(cell.to_self_queries) + count(cell.to_cross_queries) == 4 * E * E
    assert count(cell.to_update) == 2 * E * E  # [self, cross] attention outputs -> E
    assert cell.initial_state.numel() == cell.state_ids.numel() == S * E
    assert count(cell.gate) == E  # the fixed gate's keep bias only: meliad's output projection is W_z
    assert count(cell.norm) == E and count(cell.self_attn) == count(cell.write_attn) == H
    read = model.layers[9].attn.state_reads[0]
    assert count(read) == E * E + H  # the tokens' second queries and their temperature
    # the tokens' output projection takes [self-attention, state read]: one E x E matrix more
    assert model.layers[9].attn.to_out.weight.shape == (E, 2 * E)
    assert count(cell) + count(read) + E * E == 9_439_256
