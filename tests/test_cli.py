"""The brt command line end to end on the tiny preset: train, resume, eval, generate, Ctrl-C, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from block_recurrent.persistence.checkpoint import latest_checkpoint, load_training_checkpoint
from conftest import HAS_CPP_COMPILER, brt, interruptible, tiny_run


def test_train_resume_eval_generate(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert brt(*tiny_run(corpus, run, "--max-steps", 3, "--checkpoint-every", 2, "--eval-every", 3)) == 0
    assert "step 3:" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step-")) == ["step-00000002", "step-00000003"]

    # resume: only what may change is given; the rest comes from the checkpoint
    assert brt("train", "--resume", "--out-dir", run, "--max-steps", 5, "--no-progress") == 0
    assert load_training_checkpoint(run).trainer["step"] == 5
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # training lines, the step-3 validation, each run's final score of the whole held-out split; no repeats
    assert [r["step"] for r in records] == [1, 2, 3, 3, 3, 4, 5, 5]
    final = records[-1]
    assert final["held_out_tokens"] > 0 and 0 < final["held_out_gzip_bpb"] < 8 and final["held_out_bpb"] > 0

    capsys.readouterr()
    assert brt("eval", "--checkpoint", run, "--data", corpus / "doc1.txt") == 0
    out = capsys.readouterr().out
    assert "bits/byte" in out and "(1 of 1 documents)" in out

    assert brt("generate", "--checkpoint", latest_checkpoint(run), "--prompt", "the quick", "--max-new-tokens", 12,
               "--temperature", 0) == 0
    text = capsys.readouterr().out
    assert text.startswith("the quick") and len(text.encode()) >= len("the quick")
    if not HAS_CPP_COMPILER:
        return  # torch.compile on the CPU needs a C++ compiler
    # greedy decoding through torch.compile continues the prompt the same way
    assert brt("generate", "--checkpoint", latest_checkpoint(run), "--prompt", "the quick", "--max-new-tokens", 12,
               "--temperature", 0, "--compile") == 0
    assert capsys.readouterr().out == text


@pytest.mark.parametrize(
    "argv, message",
    [
        (("train", "--preset", "huge"), "unknown preset 'huge'"),
        (("train", "--preset", "tiny", "--data", "{tmp}/missing"), "does not exist"),
        (("train", "--preset", "tiny", "--data", "{tmp}/blob.bin"), "not a UTF-8 text file"),
        (("train", "--preset", "tiny", "--data", "{tmp}/empty.txt"), "is empty"),
        (("train", "--preset", "tiny", "--data", "{tmp}/x", "--hf-dataset", "y"), "give one training source"),
        (("train", "--preset", "tiny", "--segments", "1", "--backward-every", "2"), "backward_every"),
        (("train", "--resume", "--out-dir", "{tmp}/nothing"), "no checkpoint to resume"),
        (("generate", "--checkpoint", "{tmp}/nothing", "--prompt", "x"), "no such folder"),
        (("generate", "--checkpoint", "owner/name/extra", "--prompt", "x"), "no such folder"),
        (("eval", "--checkpoint", "{tmp}", "--data", "{tmp}/empty.txt"), "holds no checkpoint"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, capsys, argv, message):
    (tmp_path / "blob.bin").write_bytes(b"\x00\xff\x00binary")
    (tmp_path / "empty.txt").write_text("")
    assert brt(*(a.format(tmp=tmp_path) for a in argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("brt: error:") and message in err


def test_a_named_recipe_sets_the_preset_and_training_settings_and_options_still_win(tmp_path, corpus, capsys):
    from block_recurrent.model.config import PRESETS, BlockRecurrentConfig
    from block_recurrent.training.train_config import RECIPES

    run = tmp_path / "run"
    assert brt("train", "--recipe", "hour", "--data", corpus, "--out-dir", run, "--max-steps", 1, "--batch-size", 2,
               "--warmup-steps", 1, "--no-progress", "--no-final-eval", "--sample-tokens", 0) == 0
    saved = load_training_checkpoint(run)
    assert saved.config == BlockRecurrentConfig(**PRESETS["hour"])
    settings = saved.trainer["train_config"]
    assert settings["checkpoint_every"] == RECIPES["hour"]["train"]["checkpoint_every"] != 500  # from the recipe
    assert (settings["max_steps"], settings["batch_size"]) == (1, 2)  # options beside it win
    assert brt("train", "--recipe", "hour", "--resume", "--out-dir", run) == 2
    assert "a resumed run keeps the settings" in capsys.readouterr().err
    assert brt("train", "--recipe", "week") == 2
    assert "recipe must be one of 'default', 'hour', got 'week'" in capsys.readouterr().err


def test_conflicting_and_mismatched_runs(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert brt(*tiny_run(corpus, run, "--max-steps", 1, "--eval-every", 0)) == 0
    assert brt(*tiny_run(corpus, run, "--max-steps", 2)) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert brt("train", "--resume", "--out-dir", run, "--preset", "small") == 2
    assert "another model config" in capsys.readouterr().err
    assert brt("train", "--resume", "--out-dir", run, "--lr", "0.5") == 2
    assert "lr: checkpoint 0.003, now 0.5" in capsys.readouterr().err  # the default lr, from the checkpoint
    with pytest.raises(SystemExit):  # argparse: --preset and --model-config exclude each other
        brt("train", "--preset", "tiny", "--model-config", tmp_path / "c.json")


def test_ctrl_c_in_a_real_process_saves_and_exits_cleanly(tmp_path, corpus):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "block_recurrent", *map(str, tiny_run(corpus, run, "--max-steps", 100000,
                                                                             "--checkpoint-every", 0, "--eval-every", 0))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=interruptible)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "interrupted" in err and "Traceback" not in err
    saved = load_training_checkpoint(run)
    assert saved.trainer["step"] >= 2


def test_train_with_a_tokenizer_file_and_a_local_hf_dataset(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    from test_data import write_bpe

    texts = [f"row {i}: " + "the quick brown fox jumps over the lazy dog. " * (2 + i % 5) for i in range(30)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    tokenizer = write_bpe(tmp_path / "bpe.json", texts)
    config = tmp_path / "model.json"
    from block_recurrent import BlockRecurrentConfig

    BlockRecurrentConfig.from_name("tiny", num_tokens=300).save(config)
    run = tmp_path / "run"
    assert brt("train", "--model-config", config, "--hf-dataset", tmp_path / "ds", "--tokenizer", tokenizer,
               "--out-dir", run, "--max-steps", 2, "--batch-size", 2, "--eval-every", 2, "--eval-tokens", 100,
               "--sample-tokens", 4, "--no-progress") == 0
    assert (latest_checkpoint(run) / "tokenizer.json").read_text() == tokenizer.read_text()
    capsys.readouterr()
    assert brt("generate", "--checkpoint", run, "--prompt", "the quick", "--max-new-tokens", 3) == 0
    assert capsys.readouterr().out.startswith("the quick")


def test_generate_many_prompts_from_json_lines_and_eval_options(tmp_path, corpus, capsys):
    """--prompts: one JSON line out per prompt, equal to generating each prompt alone (greedy)."""
    run = tmp_path / "run"
    assert brt(*tiny_run(corpus, run, "--max-steps", 2)) == 0
    prompts = ["the quick brown fox", "a", "document 3: the lazy dog jumps over the quick brown fox again and again"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)) + "\n")
    capsys.readouterr()
    assert brt("generate", "--checkpoint", run, "--prompts", jsonl, "--max-new-tokens", 9, "--temperature", 0,
               "--batch-size", 2) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == prompts
    for prompt, line in zip(prompts, lines):
        assert brt("generate", "--checkpoint", run, "--prompt", prompt, "--max-new-tokens", 9, "--temperature", 0) == 0
        assert capsys.readouterr().out == prompt + line["continuation"] + "\n"

    jsonl.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert brt("generate", "--checkpoint", run, "--prompts", jsonl) == 2
    assert 'line 2 needs a non-empty string "prompt"' in capsys.readouterr().err

    assert brt("eval", "--checkpoint", run, "--data", corpus, "--batch-size", 3) == 0
    batched = capsys.readouterr().out
    assert brt("eval", "--checkpoint", run, "--data", corpus, "--batch-size", 1) == 0
    one = capsys.readouterr().out
    assert batched.split(" bits/byte")[0][-6:] == one.split(" bits/byte")[0][-6:]  # the same 4-decimal score
    assert brt("eval", "--checkpoint", run, "--data", corpus, "--bf16") == 0
    assert "bits/byte" in capsys.readouterr().out
