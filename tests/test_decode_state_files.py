"""Decode states on disk: a continuation from a saved state equals the uninterrupted decode exactly, for rows
that share a position and rows that keep their own; states of other models are refused."""

import pytest
import torch

from block_recurrent.inference.generation import decode_step, generate, prefill
from block_recurrent.persistence.decode_state import load_decode_state, save_decode_state
from block_recurrent.persistence.files import CheckpointError

from conftest import TINY, make_model, random_tokens
from test_generation import CONFIGS

W = TINY["block_width"]


def teacher_forced(model, ds, tokens):
    """Logits (B, T, V) of feeding tokens (B, T) one by one from ``ds``."""
    out = []
    for t in range(tokens.shape[1]):
        logits, ds = decode_step(model, tokens[:, t], ds)
        out.append(logits)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("config", ["default", "compressed", "sliding_t5_feedback", "grouped_query"])
@pytest.mark.parametrize("fed", [W + 2, 2 * W])  # mid-block, and at a block boundary
def test_a_saved_state_continues_exactly(tmp_path, config, fed):
    model = make_model(**CONFIGS[config])
    text = random_tokens(2, fed + 2 * W + 1)
    with torch.no_grad():
        _, ds = prefill(model, text[:, :fed])
        expected = teacher_forced(model, ds, text[:, fed:])
        save_decode_state(model, ds, tmp_path / "state.safetensors")
        loaded = load_decode_state(model, tmp_path / "state.safetensors")
        got = teacher_forced(model, loaded, text[:, fed:])
    assert loaded.position == ds.position
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_rows_at_their_own_positions_continue_exactly(tmp_path):
    model = make_model()
    lengths = [1, W, W + 3, 2 * W + 1]
    texts = [random_tokens(1, n + W + 2, seed=i)[0] for i, n in enumerate(lengths)]
    with torch.no_grad():
        _, ds = prefill(model, [t[:n] for t, n in zip(texts, lengths)])
        rest = torch.stack([t[n : n + W + 2] for t, n in zip(texts, lengths)])
        expected = teacher_forced(model, ds, rest)
        save_decode_state(model, ds, tmp_path / "rows.safetensors")
        loaded = load_decode_state(model, tmp_path / "rows.safetensors")
        got = teacher_forced(model, loaded, rest)
    assert loaded.per_row and torch.equal(loaded.positions, ds.positions)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_generation_continues_from_a_saved_state_as_without_the_stop(tmp_path):
    model = make_model()
    prompt = random_tokens(1, 5)
    whole = generate(model, prompt, 3 * W, temperature=0)
    first, ds = generate(model, prompt, W + 1, temperature=0, return_state=True)
    save_decode_state(model, ds, tmp_path / "s.safetensors")
    rest = generate(model, first[:, -1:], 2 * W - 1, temperature=0, state=load_decode_state(model, tmp_path / "s.safetensors"))
    assert torch.equal(torch.cat((first, rest), dim=1), whole)


def test_states_of_other_models_and_bad_files_are_refused(tmp_path):
    model = make_model()
    with torch.no_grad():
        _, ds = prefill(model, random_tokens(1, W + 1))
    path = save_decode_state(model, ds, tmp_path / "s.safetensors")
    with pytest.raises(CheckpointError, match="another config"):
        load_decode_state(make_model(dim_head=4), path)
    with pytest.raises(CheckpointError, match="other weights"):
        load_decode_state(make_model(seed=1), path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_decode_state(model, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="damaged"):
        load_decode_state(model, tmp_path / "junk.safetensors")
    with pytest.raises(TypeError, match="DecodeState"):
        save_decode_state(model, ds.committed, tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match="folder"):
        save_decode_state(model, ds, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.safetensors", "s.safetensors"]  # no temp left


def test_brt_generate_saves_and_continues_a_document(tmp_path, capsys):
    """--state-out after one prompt, --state-in with the next: the text a single run over everything gives."""
    from block_recurrent import BlockRecurrentConfig, BlockRecurrentModel, save_pretrained
    from block_recurrent.cli import main

    torch.manual_seed(0)
    model = BlockRecurrentModel(BlockRecurrentConfig.from_name("tiny")).eval()
    save_pretrained(model, tmp_path / "model")
    state = tmp_path / "doc.safetensors"
    common = ["generate", "--checkpoint", str(tmp_path / "model"), "--temperature", "0"]
    assert main([*common, "--prompt", "ab", "--max-new-tokens", "5", "--state-out", str(state)]) == 0
    first = capsys.readouterr().out
    assert main([*common, "--prompt", "cd", "--max-new-tokens", "4", "--state-in", str(state)]) == 0
    second = capsys.readouterr().out

    ids = lambda text: torch.tensor(list(text.encode()))
    generated = generate(model, ids("ab"), 5, temperature=0)[0]
    after = generate(model, torch.cat((ids("ab"), generated, ids("cd"))), 4, temperature=0)[0]
    text = lambda t: bytes(t.tolist()).decode("utf-8", errors="replace")
    assert first == "ab" + text(generated) + "\n"
    assert second == "cd" + text(after) + "\n"
    torch.manual_seed(1)
    save_pretrained(BlockRecurrentModel(BlockRecurrentConfig.from_name("tiny")), tmp_path / "other")
    assert main(["generate", "--checkpoint", str(tmp_path / "other"), "--prompt", "x", "--state-in", str(state)]) == 2
    assert "other weights" in capsys.readouterr().err
