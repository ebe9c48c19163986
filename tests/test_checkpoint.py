"""Checkpoints: round trips, atomic writes, keep-last, pickle refusal, damaged and mismatched files."""

import json

import pytest
import torch

from block_recurrent import BlockRecurrentConfig, BlockRecurrentTransformer
from block_recurrent.checkpoint import (
    CheckpointError, atomic_directory, from_pretrained, latest_checkpoint, load_training_checkpoint,
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
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
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
    with pytest.raises(CheckpointError, match="optimizer.safetensors is missing"):
        load_training_checkpoint(folder)

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        from_pretrained(tmp_path / "empty")


def test_weights_of_another_model_are_refused(tmp_path):
    save_pretrained(tiny_model(dim=32), tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(tiny_model().config.to_json())  # config lies about the weights
    with pytest.raises(CheckpointError, match="does not fit this model"):
        from_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text('{"dim": 3}')
    with pytest.raises(CheckpointError, match="not a valid model config"):
        from_pretrained(tmp_path / "other")


def test_hub_mixin_reads_and_writes_the_same_folders(tmp_path):
    pytest.importorskip("huggingface_hub")
    from block_recurrent.hub import BlockRecurrentHubModel

    model = tiny_model().eval()
    tokens = torch.randint(0, 256, (1, 40))
    hub = BlockRecurrentHubModel.from_pretrained(save_pretrained(model, tmp_path / "ours")).eval()  # local: no network
    assert torch.equal(hub.run(tokens)[0], model.run(tokens)[0])
    hub.save_pretrained(tmp_path / "theirs")
    assert torch.equal(from_pretrained(tmp_path / "theirs").run(tokens)[0], model.run(tokens)[0])


def test_a_config_written_before_gate_projection_existed_loads_with_the_projection(tmp_path):
    # such a checkpoint's gates had their own projection (the only kind then); its config lacks the field
    model = tiny_model(gate_projection=True)
    folder = save_pretrained(model, tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    del config["gate_projection"]
    (folder / "config.json").write_text(json.dumps(config))
    loaded = from_pretrained(folder)
    assert loaded.config.gate_projection is True
    tokens = torch.randint(0, 256, (2, 40))
    model.eval()
    assert torch.equal(model.run(tokens)[0], loaded.run(tokens)[0])
