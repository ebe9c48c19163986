"""Run files and experiment trackers: ``brt train --config run.toml`` (and the run.toml every run folder holds),
``--log tensorboard`` read back with TensorBoard's own reader, ``--log wandb`` as an offline run folder."""

import json
import struct
import sys
import time

import pytest
import torch

from block_recurrent.model.config import BlockRecurrentConfig
from block_recurrent.persistence.checkpoint import load_training_checkpoint
from block_recurrent.training.run_config import RUN_FILE, read_run_file, run_file_text
from block_recurrent.training.train_config import TrainConfig
from conftest import brt, tiny_run

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# run files


def test_the_run_folders_run_toml_repeats_the_run(tmp_path, corpus, capsys):
    first, second = tmp_path / "x", tmp_path / "y"
    assert brt(*tiny_run(corpus, first, "--max-steps", 3, "--eval-every", 3, "--lr", 0.01, "--no-final-eval")) == 0
    settings = tomllib.loads((first / RUN_FILE).read_text())
    assert settings["max_steps"] == 3 and settings["lr"] == 0.01 and settings["model"]["dim"] == 64
    assert brt("train", "--config", first / RUN_FILE, "--out-dir", second) == 0
    a, b = load_training_checkpoint(first), load_training_checkpoint(second)
    assert a.weights.keys() == b.weights.keys()
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)  # the same weights, bit for bit
    assert a.config == b.config
    assert {**a.trainer["train_config"], "out_dir": None} == {**b.trainer["train_config"], "out_dir": None}
    assert [r.get("loss") for r in records(first)] == [r.get("loss") for r in records(second)]


def test_a_run_file_sets_options_and_the_command_line_wins(tmp_path, corpus):
    run = tmp_path / "run"
    (tmp_path / "run.toml").write_text(f"""
preset = "tiny"
data = "{corpus}"
out_dir = "{run}"
max-steps = 3           # hyphens work too
batch_size = 2
lr = 1                  # an int where a float is meant
progress = false
eval_every = 0
final_eval = false

[model]                 # changes to the preset
dim = 32
depth = 1
""")
    assert brt("train", "--config", tmp_path / "run.toml", "--max-steps", 1) == 0
    saved = load_training_checkpoint(run)
    assert saved.trainer["step"] == 1 and saved.trainer["train_config"]["lr"] == 1.0
    assert (saved.config.dim, saved.config.depth, saved.config.block_width) == (32, 1, 32)  # tiny's block width
    # a whole model inline, no preset; and the written run.toml holds the model whole
    whole = tomllib.loads((run / RUN_FILE).read_text())["model"]
    assert BlockRecurrentConfig.from_dict(whole) == saved.config


@pytest.mark.parametrize("text, message", [
    ("max_stepz = 3", "unknown keys max_stepz"),
    ("preset = 'tiny'\nrecipe = 'hour'", "preset and recipe both choose the model"),
    ("[model]\nwidth = 3", "unknown model config fields width"),
    ("max_steps = ", "is not valid TOML"),
    ("max_steps = 'many'", "max_steps must be an int"),
    ("[model]\ndim = 8", "num_tokens"),  # a [model] alone must be a whole config
])
def test_bad_run_files_give_one_clear_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(f"out_dir = '{tmp_path / 'run'}'\n" + text + "\n")
    assert brt("train", "--config", path) == 2
    err = capsys.readouterr().err
    assert err.startswith("brt: error:") and message in err, err
    assert brt("train", "--config", tmp_path / "missing.toml") == 2
    assert "no such file" in capsys.readouterr().err


def test_the_toml_writer_round_trips_every_value():
    config = TrainConfig(data="we\"ird\\ path\twith\nlines\x7f and ünïcödé 😀", lr=1e-05, grad_clip=0.0, bf16=False,
                         log="tensorboard,wandb")
    model = BlockRecurrentConfig.from_name("tiny", gate="fixed", gate_keep_init="spread", recurrent_layers=(1, 2))
    text = run_file_text(model, config)
    parsed = tomllib.loads(text)
    model_fields = parsed.pop("model")
    assert BlockRecurrentConfig.from_dict(model_fields) == model
    import os
    assert TrainConfig(**{**parsed, "data": config.data}) == config
    assert parsed["data"] == os.path.realpath(config.data)  # paths resolved, so the file works from any folder
    assert "bf16 = false" in text and "replay_write" not in text  # None (auto) is left out: the default


# TensorBoard


def test_tensorboard_logs_what_metrics_jsonl_holds_and_a_resumed_run_continues_it(tmp_path, corpus):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    import shutil

    run = tmp_path / "run"
    assert brt(*tiny_run(corpus, run, "--max-steps", 3, "--checkpoint-every", 2, "--eval-every", 3,
                         "--log", "tensorboard", "--no-final-eval")) == 0
    # a run killed after logging step 3 but before its checkpoint was safe: resume from step 2, run to 5
    shutil.rmtree(run / "step-00000003")
    assert brt("train", "--resume", "--out-dir", run, "--max-steps", 5, "--no-progress", "--final-eval") == 0
    accumulator = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0,
                                                                                            "tensors": 0})
    accumulator.Reload()
    logged = records(run)
    train = [r for r in logged if "bpb" in r]
    for tag, key in (("train/loss", "loss"), ("train/bpb", "bpb"), ("train/lr", "lr"),
                     ("train/tokens_per_s", "tokens_per_s")):
        events = accumulator.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3, 4, 5]  # one value per step: the killed run's 3 is purged
        assert [e.value for e in events] == pytest.approx([r[key] for r in train], rel=1e-6)
    final = logged[-1]
    assert accumulator.Scalars("held_out/bpb")[-1].value == pytest.approx(final["held_out_bpb"], rel=1e-6)
    assert accumulator.Scalars("held_out/gzip_bpb")[-1].value == pytest.approx(final["held_out_gzip_bpb"], rel=1e-6)
    assert [e.step for e in accumulator.Scalars("val/bpb")] == [r["step"] for r in logged if "val_bpb" in r]
    samples = accumulator.Tensors("sample/text_summary")
    text = samples[-1].tensor_proto.string_val[0].decode()
    sample = [r for r in logged if "sample" in r][-1]["sample"]
    assert sample["continuation"].split("\n")[0] in text


# Weights & Biases, offline


def wandb_history(path, wait_s=20.0):
    """The history rows of an offline W&B run file (LevelDB-style log of protobuf records, after a 7-byte header),
    once W&B's service has written the run's exit record (it writes after ``finish`` returns)."""
    deadline = time.monotonic() + wait_s
    while True:
        rows, ended = _wandb_records(path)
        if ended or time.monotonic() > deadline:
            assert ended, f"{path}: no exit record after {wait_s} s"
            return rows
        time.sleep(0.1)


def _wandb_records(path):
    from wandb.proto import wandb_internal_pb2

    data, rows, pieces, ended = path.read_bytes(), [], b"", False
    assert data[:4] == b":W&B"
    block, offset = 32768, 7
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        length, kind = struct.unpack("<HB", data[offset + 4 : offset + 7])
        pieces += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
            ended = ended or record.WhichOneof("record_type") == "exit"
    return rows, ended


def test_wandb_logs_offline_into_the_run_folder(tmp_path, corpus, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert brt(*tiny_run(corpus, run, "--max-steps", 2, "--eval-every", 2, "--log", "wandb")) == 0
    run_id = (run / "wandb-run-id").read_text().strip()
    [folder] = (run / "wandb").glob(f"offline-run-*-{run_id}")
    rows = wandb_history(folder / f"run-{run_id}.wandb")
    logged = records(run)
    by_step = {}
    for row in rows:
        by_step.setdefault(row["_step"], {}).update(row)
    assert sorted(by_step) == [1, 2]
    assert [by_step[s]["train/loss"] for s in (1, 2)] == pytest.approx([r["loss"] for r in logged if "bpb" in r])
    assert by_step[2]["val/bpb"] == pytest.approx(logged[-2]["val_bpb"])
    assert by_step[2]["held_out/gzip_bpb"] == pytest.approx(logged[-1]["held_out_gzip_bpb"])
    table = json.loads((folder / "files" / by_step[2]["sample/path"]).read_text())  # the samples, as a table
    sample = [r for r in logged if "sample" in r][-1]["sample"]
    assert table["data"] == [[2, sample["prompt"], sample["continuation"]]]

    # a resumed run continues the same W&B run (offline: a second folder of the same run id, for `wandb sync`)
    assert brt("train", "--resume", "--out-dir", run, "--max-steps", 3, "--no-progress", "--no-final-eval") == 0
    assert (run / "wandb-run-id").read_text().strip() == run_id
    [resumed] = set((run / "wandb").glob(f"offline-run-*-{run_id}*")) - {folder}
    assert [row["_step"] for row in wandb_history(resumed / f"run-{run_id}.wandb")] == [3]
