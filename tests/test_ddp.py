"""Data parallelism: two gloo ranks under torchrun equal one process on the combined batch, and resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from block_recurrent import BlockRecurrentConfig
from block_recurrent.training.trainer import TrainConfig, Trainer

WORKER = Path(__file__).with_name("ddp_worker.py")


def write_corpus(folder):
    folder.mkdir()
    # lengths differ, most documents end inside the first window: ranks see different numbers of real tokens
    for i in range(10):
        (folder / f"part{i}.txt").write_text(f"[{i}] " + "lorem ipsum dolor sit amet, consectetur. "[: 5 + 7 * i] * (1 + i // 3))
    return folder


def one_block():
    """The tiny model with segments of one block: the trainer replays the state's write, whose inputs the
    checkpoint gathers from every rank (as ddp_worker.py builds it)."""
    return BlockRecurrentConfig.from_name("tiny").replace(max_seq_len=32)


def single_process(data, out, batch_size):
    return TrainConfig(data=str(data), out_dir=str(out), batch_size=batch_size, segments=2, warmup_steps=1,
                         eval_every=0, checkpoint_every=0, progress=False, lr=3e-3, bf16=False, final_eval=False)


def test_two_gloo_ranks_equal_one_rank_on_the_combined_batch_and_resume(tmp_path):
    data = write_corpus(tmp_path / "data")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(data), str(out), "2"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = load_file(str(out / "result.safetensors"))
    ddp_losses = json.loads((out / "losses.json").read_text())["losses"]

    # one process, both ranks' rows (2 + 2) in one batch
    trainer = Trainer(one_block(), single_process(data, tmp_path / "one", 4))
    assert trainer.replay_write
    first = trainer.train_step()["loss"]
    assert first == pytest.approx(ddp_losses[0], rel=1e-6)
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad, ddp[f"grad.{name}"], rtol=1e-4, atol=1e-7)
    second = trainer.train_step()["loss"]
    assert second == pytest.approx(ddp_losses[1], rel=1e-5)

    # the 2-rank checkpoint (step 1) resumes in one process with the same 4 rows, carried states included
    resumed = Trainer(one_block(), single_process(data, out / "run", 4), resume=True)
    assert all(w is not None for w in resumed.written_from)
    assert resumed.step == 1
    assert resumed.train_step()["loss"] == pytest.approx(ddp_losses[1], rel=1e-5)
    uninterrupted = dict(trainer.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        torch.testing.assert_close(p.grad, uninterrupted[name].grad, rtol=1e-3, atol=1e-6)
        # AdamW divides by sqrt(v): a rounding-size gradient difference can move a weight by ~lr; still << lr
        torch.testing.assert_close(p, ddp[f"param.{name}"], rtol=1e-3, atol=3e-4)
        torch.testing.assert_close(p, uninterrupted[name], rtol=1e-3, atol=3e-4)


def test_torchrun_cli_writes_one_checkpoint_that_resumes_on_one_process(tmp_path):
    data = write_corpus(tmp_path / "data")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "block_recurrent", "train", "--preset", "tiny", "--data", str(data), "--out-dir", str(run),
               "--batch-size", "2", "--max-steps", "2", "--eval-every", "2", "--eval-tokens", "300",
               "--sample-tokens", "4", "--no-progress", "--no-bf16", "--no-final-eval"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("checkpoints in") == 2  # both ranks finish; only rank 0 wrote
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 2] and "val_bpb" in records[1]
    saved = json.loads((run / "step-00000002" / "trainer.json").read_text())
    assert saved["world_size"] == 2 and len(saved["data"]["positions"]) == 4

    # the same 4 rows on one process
    from block_recurrent.cli import main

    assert main(["train", "--resume", "--out-dir", str(run), "--batch-size", "4", "--max-steps", "3",
                 "--no-progress"]) == 0
    assert json.loads((run / "step-00000003" / "trainer.json").read_text())["world_size"] == 1
