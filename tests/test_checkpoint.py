"""Checkpoints: round trips, atomic writes, keep-last, pickle refusal, damaged and mismatched files."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from block_recurrent import BlockRecurrentConfig, BlockRecurrentTransformer
from block_recurrent.persistence.checkpoint import (
    CheckpointError, DamagedCheckpoint, atomic_directory, from_pretrained, latest_checkpoint, load_training_checkpoint,
    optimizer_from_tensors, optimizer_to_tensors, save_pretrained, save_training_checkpoint, step_directories,
)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return BlockRecurrentTransformer(BlockRecurrentConfig.from_name("tiny", **overrides))


def adam_after_a_step(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9), foreach=False)
    model(torch.randint(0, 256, (2, 33)), return_loss=True)[0].backward()
    optimizer.step()
    return optimizer


def test_save_pretrained_round_trip_gives_the_same_logits(tmp_path):
    model = tiny_model()
    folder = save_pretrained(model, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["checksums.json", "config.json", "model.safetensors"]
    loaded = from_pretrained(folder)
    assert loaded.config == model.config
    tokens = torch.randint(0, 256, (2, 40))
    model.eval()
    assert torch.equal(model.run(tokens)[0], loaded.run(tokens)[0])


def test_optimizer_state_round_trip_continues_identically():
    model = tiny_model()
    optimizer = adam_after_a_step(model)
    tensors, info = optimizer_to_tensors(optimizer)
    json.dumps(info)  # the non-tensor part is plain JSON

    twin = tiny_model()
    twin.load_state_dict(model.state_dict())
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=0.5, foreach=False)
    optimizer_from_tensors(twin_optimizer, {"tensors": tensors, "json": json.loads(json.dumps(info))})
    assert twin_optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    tokens = torch.randint(0, 256, (2, 33))
    for m, opt in ((model, optimizer), (twin, twin_optimizer)):
        opt.zero_grad()
        m(tokens, return_loss=True)[0].backward()
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def save_step(run_dir, step, model, keep_last=3):
    optimizer = adam_after_a_step(model)
    return save_training_checkpoint(run_dir, step, model=model, optimizer=optimizer, trainer={"note": step},
                                    tensors={"rng.torch": torch.get_rng_state()}, keep_last=keep_last)


def test_training_checkpoint_round_trip_and_keep_last(tmp_path):
    model = tiny_model()
    for step in (1, 2, 3, 4):
        save_step(tmp_path, step, model, keep_last=2)
    assert [p.name for p in step_directories(tmp_path)] == ["step-00000003", "step-00000004"]
    saved = load_training_checkpoint(tmp_path)  # a run folder resolves to its latest checkpoint
    assert saved.path.name == "step-00000004" and saved.trainer["step"] == 4 and saved.trainer["note"] == 4
    assert saved.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved.weights[name], tensor)


def test_a_crash_mid_write_leaves_the_last_checkpoint_intact(tmp_path):
    model = tiny_model()
    good = save_step(tmp_path, 1, model)

    def crash(folder):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        atomic_directory(tmp_path / "step-00000002", crash)
    assert latest_checkpoint(tmp_path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]  # no half-written folder left
    load_training_checkpoint(tmp_path)


def test_pickled_files_are_refused(tmp_path):
    model = tiny_model()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(model.config.to_json())
    torch.save(model.state_dict(), legacy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        from_pretrained(legacy)
    disguised = tmp_path / "disguised"
    save_pretrained(model, disguised)
    torch.save(model.state_dict(), disguised / "model.safetensors")  # a torch.save file under the right name
    with pytest.raises(CheckpointError, match="pickle"):
        from_pretrained(disguised)


def test_damaged_checkpoints_name_the_broken_file(tmp_path):
    model = tiny_model()
    folder = save_step(tmp_path, 1, model)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1000])
    with pytest.raises(CheckpointError, match="model.safetensors is damaged"):
        load_training_checkpoint(folder)

    folder = save_step(tmp_path, 2, model)
    (folder / "trainer.json").write_text('{"step": 2, "optim')
    with pytest.raises(CheckpointError, match="trainer.json is damaged"):
        load_training_checkpoint(folder)

    folder = save_step(tmp_path, 3, model)
    (folder / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="step-00000003 is incomplete: optimizer.safetensors missing"):
        load_training_checkpoint(folder)

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        from_pretrained(tmp_path / "empty")


def test_weights_of_another_model_are_refused(tmp_path):
    from block_recurrent.persistence.storage import write_manifest

    save_pretrained(tiny_model(dim=32), tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(tiny_model().config.to_json())  # config lies about the weights
    write_manifest(tmp_path / "other")  # written so, not damaged afterwards (that is checksummed)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        from_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text('{"dim": 3}')
    write_manifest(tmp_path / "other")
    with pytest.raises(CheckpointError, match="not a valid model config"):
        from_pretrained(tmp_path / "other")


def test_hub_mixin_reads_and_writes_the_same_folders(tmp_path):
    pytest.importorskip("huggingface_hub")
    from block_recurrent.persistence.hub import BlockRecurrentHubModel

    model = tiny_model().eval()
    tokens = torch.randint(0, 256, (1, 40))
    hub = BlockRecurrentHubModel.from_pretrained(save_pretrained(model, tmp_path / "ours")).eval()  # local: no network
    assert torch.equal(hub.run(tokens)[0], model.run(tokens)[0])
    hub.save_pretrained(tmp_path / "theirs")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checksums recorded: nothing to warn about
        assert torch.equal(from_pretrained(tmp_path / "theirs").run(tokens)[0], model.run(tokens)[0])
    assert (tmp_path / "theirs" / "README.md").is_file()  # the mixin's model card, beside our files
    weights = tmp_path / "theirs" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    with pytest.raises(DamagedCheckpoint, match="sha256 differs"):
        from_pretrained(tmp_path / "theirs")


def test_a_config_written_before_gate_projection_existed_loads_with_the_projection(tmp_path):
    # such a checkpoint's gates had their own projection (the only kind then); its config lacks the field
    model = tiny_model(gate_projection=True)
    folder = save_pretrained(model, tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    del config["gate_projection"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "checksums.json").unlink()  # (written before checksums too)
    with pytest.warns(UserWarning, match="has no checksums.json, so damage to its files cannot be detected"):
        loaded = from_pretrained(folder)
    assert loaded.config.gate_projection is True
    tokens = torch.randint(0, 256, (2, 40))
    model.eval()
    assert torch.equal(model.run(tokens)[0], loaded.run(tokens)[0])


VARIANTS = {
    "fixed gate, skip update (default)": {},
    "lstm gate": dict(gate="lstm"),
    "dual update": dict(state_update="dual"),
    "lstm gate, dual update": dict(gate="lstm", state_update="dual"),
    "slot write": dict(state_write="slots"),
    "delta write": dict(state_write="delta", heads=4),
    "gate projection, keep init": dict(gate_projection=True, gate_keep_init=2.0),
    "sliding window": dict(attention_window="sliding"),
    "t5 positions": dict(position_encoding="t5", t5_num_buckets=8, t5_max_distance=32),
    "block-feedback": dict(state_feedback=True),
    "compressed memory": dict(use_compressed_mem=True, compressed_mem_factor=2),
    "read below write": dict(depth=3, recurrent_layers=(3,), read_recurrent_layers=(1,)),
    "two recurrent layers": dict(depth=3, recurrent_layers=(2, 3)),
    "XL baseline": dict(recurrent_layers=()),
    "meliad options": dict(kv_heads=4, ff_activation="relu", qk_norm_gains=False, all_layers_qk_rmsnorm=True),
    "the paper's preset, shrunk": dict(kv_heads=4, ff_activation="relu", qk_norm_gains=False,
                                       all_layers_qk_rmsnorm=True, attention_window="sliding", position_encoding="t5",
                                       state_feedback=True, gate="lstm", state_update="dual"),
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_variant_round_trips_through_save_and_load(tmp_path, overrides):
    model = tiny_model(**overrides).eval()
    folder = save_pretrained(model, tmp_path / "model")
    loaded = from_pretrained(folder)
    assert loaded.config == model.config
    assert BlockRecurrentConfig.load(folder / "config.json") == model.config
    tokens = torch.randint(0, 256, (2, 100))  # more than one segment: memories and states are carried
    assert torch.equal(model.run(tokens)[0], loaded.run(tokens)[0])


def test_an_unknown_checkpoint_format_is_refused(tmp_path):
    from block_recurrent.persistence.storage import write_manifest

    folder = save_step(tmp_path, 1, tiny_model())
    assert json.loads((folder / "trainer.json").read_text())["format"] == 1
    for value in (2, None):
        data = json.loads((folder / "trainer.json").read_text())
        data["format"] = value
        (folder / "trainer.json").write_text(json.dumps(data))
        write_manifest(folder)
        with pytest.raises(CheckpointError, match=f"checkpoint format {value}; this version .* reads format 1"):
            load_training_checkpoint(folder)


def test_push_to_hub_uploads_a_save_pretrained_folder(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from block_recurrent.persistence.checkpoint import push_to_hub

    calls = []

    class StubApi:  # records what a real HfApi would be asked to do (no network)
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path):
            uploaded = Path(folder_path)
            calls.append(("upload_folder", repo_id, sorted(p.name for p in uploaded.iterdir())))
            model = from_pretrained(uploaded)  # the folder is a complete model while the upload reads it
            calls.append(("loaded", model.config))
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub, "HfApi", StubApi)
    model = tiny_model()
    assert push_to_hub(model, "owner/name", token="secret") == "https://huggingface.co/owner/name/commit/0"
    assert calls == [("init", "secret"), ("create_repo", "owner/name", True, True),
                     ("upload_folder", "owner/name", ["checksums.json", "config.json", "model.safetensors"]), ("loaded", model.config)]


def test_a_safetensors_file_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    from block_recurrent.persistence.checkpoint import read_tensors, write_tensors

    path = tmp_path / "t.safetensors"
    for pad in range(300):  # a tensor name of some length puts 0x80 in the header length's first byte
        write_tensors({"x" * (pad + 1): torch.ones(2)}, path)
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert torch.equal(next(iter(read_tensors(path).values())), torch.ones(2))


def test_a_checkpoint_saved_before_state_cell_scale_and_paper_keep_init_loads_as_it_was(tmp_path):
    """Configs of that day lack state_cell_scale (the cells were stored unscaled) and wrote the paper's keep init
    as null; today's defaults (the LSTM gate, scaled cells) must not leak into them."""
    model = tiny_model(gate="fixed", gate_keep_init="paper", state_cell_scale=1.0)
    folder = save_pretrained(model, tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    del config["state_cell_scale"]
    config["gate_keep_init"] = None
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "checksums.json").unlink()  # the checksum of config.json no longer holds; what can be checked is
    with pytest.warns(UserWarning, match="no checksums.json"):
        loaded = from_pretrained(folder)
    assert loaded.config == model.config and loaded.config.gate_keep_init == "paper"
    tokens = torch.randint(0, 256, (2, 40))
    assert torch.equal(model.eval().run(tokens)[0], loaded.eval().run(tokens)[0])
    # a config a user writes by hand takes today's defaults
    assert BlockRecurrentConfig.from_dict({k: v for k, v in config.items() if k != "gate"}).state_cell_scale == 0.1
