"""Issue 25, one test (or a few) per numbered item: readers take the newest complete checkpoint and say what they
skipped, a checkpoint proves itself, the data fingerprint covers content, trainer.json is checked, sizes are
estimated before allocating, generation streams and stops cleanly, readers survive rotation, errors name things.

A run of the tiny preset is trained once per module and copied into each test. Command-line behaviours that need
a real process (signals, streaming) run `python -m block_recurrent` in a subprocess; the rest call ``main``."""

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from block_recurrent import BlockRecurrentConfig, BlockRecurrentTransformer, save_pretrained
from block_recurrent.cli import main
from block_recurrent.persistence.checkpoint import (
    CheckpointError, DamagedCheckpoint, from_pretrained, load_pretrained, newest_intact_checkpoint,
    save_training_checkpoint, step_directories,
)
from block_recurrent.persistence.storage import remove_leftovers, write_manifest
from block_recurrent.training.checkpointing import check_record
from block_recurrent.training.trainer import TrainConfig, Trainer
from conftest import interruptible

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def write_corpus(folder, documents=8):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        (folder / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (3 + i))
    return folder


def settings(root, **changes):
    base = dict(data=str(root / "data"), out_dir=str(root / "run"), batch_size=2, max_steps=3, warmup_steps=1,
                eval_every=0, checkpoint_every=1, log_every=1, progress=False, final_eval=False, bf16=False)
    return TrainConfig(**{**base, **changes})


def tiny():
    return BlockRecurrentConfig.from_name("tiny")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder with checkpoints after steps 1, 2 and 3 (and its data folder beside it)."""
    root = tmp_path_factory.mktemp("trained")
    write_corpus(root / "data")
    trainer = Trainer(tiny(), settings(root))
    trainer.fit()
    trainer.close()
    return root


@pytest.fixture
def run(trained_run, tmp_path):
    """A fresh copy of the trained run, ``tmp_path / "run"``, beside a link to its data (the same folder, resolved)."""
    (tmp_path / "data").symlink_to(trained_run / "data")
    shutil.copytree(trained_run / "run", tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
    return tmp_path / "run"


def step(run, number):
    return run / f"step-{number:08d}"


def edit_trainer_json(folder, change):
    """Rewrite trainer.json and its checksum, as a writer would have: consistent on disk, wrong in content."""
    data = json.loads((folder / "trainer.json").read_text())
    change(data)
    (folder / "trainer.json").write_text(json.dumps(data))
    write_manifest(folder)


def brt(*argv):
    return main([str(a) for a in argv])


def one_error(capsys, message):
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("brt: error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err


# 1. an incomplete newest step folder is stepped past by every reader


@pytest.mark.parametrize("damage", ["trainer.json", "config.json", "empty newer folder"])
def test_every_reader_steps_past_an_incomplete_newest_checkpoint(run, damage, capsys):
    if damage == "empty newer folder":
        step(run, 99).mkdir()
        skipped, used = step(run, 99), step(run, 3)
    else:
        (step(run, 3) / damage).unlink()
        skipped, used = step(run, 3), step(run, 2)
    reason = f"skipped: {skipped.name} ({skipped} is incomplete: "
    with pytest.warns(UserWarning, match=f"reading {used.name}, the newest complete checkpoint") as caught:
        model, folder = load_pretrained(run)  # brt eval and brt generate read through this
    assert folder == used and reason in str(caught[0].message)
    assert brt("eval", "--checkpoint", run, "--data", run.parent / "data" / "doc1.txt") == 0
    assert "bits/byte" in capsys.readouterr().out

    config = settings(run.parent, max_steps=4)
    with pytest.warns(UserWarning, match=f"resuming from {used.name}") as caught:
        resumed = Trainer(tiny(), config, resume=True)
    assert resumed.step == int(used.name[5:])
    assert any(f"renamed to {skipped.name}.damaged" in str(w.message) for w in caught)  # set aside, kept for a look
    resumed.fit()
    resumed.close()
    assert step_directories(run)[-1].name == "step-00000004"


def test_brt_train_resume_steps_past_a_deleted_trainer_json(run, capsys):
    (step(run, 3) / "trainer.json").unlink()
    assert brt("train", "--resume", "--out-dir", run, "--max-steps", 4, "--no-progress") == 0
    captured = capsys.readouterr()
    assert "brt: warning: resuming from step-00000002" in captured.err and "trainer.json missing" in captured.err
    assert captured.out.startswith("step 4:")


# 2. a checkpoint without checksums.json is not trusted silently; non-finite weights are refused everywhere


def overwrite_weight_bytes(path, offset=100, value=b"\x7f\x7f\x7f\x7f"):
    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[start + offset : start + offset + len(value)] = value
    path.write_bytes(bytes(raw))


def test_a_newest_checkpoint_without_checksums_is_skipped_and_resume_steps_back(run, capsys):
    (step(run, 3) / "checksums.json").unlink()
    overwrite_weight_bytes(step(run, 3) / "model.safetensors", value=b"\x00\x00\xc0\x7f")  # a float32 NaN
    assert brt("eval", "--checkpoint", run, "--data", run.parent / "data" / "doc1.txt") == 0
    captured = capsys.readouterr()
    assert "reading step-00000002" in captured.err and "step-00000003 (no checksums.json)" in captured.err
    assert math.isfinite(float(captured.out.split()[1]))

    with pytest.warns(UserWarning, match="resuming from step-00000002"):
        resumed = Trainer(tiny(), settings(run.parent, max_steps=3), resume=True)
    assert resumed.step == 2
    resumed.close()


def test_a_run_written_before_checksums_still_resumes_from_its_newest_checkpoint_and_says_so(run):
    for number in (1, 2, 3):
        (step(run, number) / "checksums.json").unlink()
    overwrite_weight_bytes(step(run, 3) / "model.safetensors", value=b"\x00\x00\xc0\x7f")  # a float32 NaN
    with pytest.warns(UserWarning, match="step-00000002 has no checksums.json"):
        model, folder = load_pretrained(run)  # step 3 checked for what can be checked: NaN, so stepped past
    assert folder.name == "step-00000002"
    with pytest.warns(UserWarning, match="resuming from step-00000002.*step-00000003 \\(no checksums.json, and .*NaN"):
        resumed = Trainer(tiny(), settings(run.parent, max_steps=3), resume=True)
    assert resumed.step == 2
    resumed.close()


def test_a_folder_without_checksums_is_checked_for_what_it_can_be_and_said_so(tmp_path, capsys):
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(tiny())
    save_pretrained(model, tmp_path / "model")
    (tmp_path / "model" / "checksums.json").unlink()
    with pytest.warns(UserWarning, match="has no checksums.json, so damage to its files cannot be detected"):
        from_pretrained(tmp_path / "model")
    # every weight NaN: refused wherever it is read, named
    from safetensors.torch import save_file

    save_file({k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()},
              str(tmp_path / "model" / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DamagedCheckpoint, match="model.safetensors holds NaN or inf in .* tensors"):
            from_pretrained(tmp_path / "model")
    assert brt("generate", "--checkpoint", tmp_path / "model", "--prompt", "x") == 2
    one_error(capsys, "holds NaN or inf")
    with torch.no_grad():
        model.to_logits.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="NaN or inf"):
        save_pretrained(model, tmp_path / "never")
    assert not (tmp_path / "never").exists()


# 3. the data fingerprint covers content


def test_an_edit_that_keeps_every_size_is_seen_on_resume(tmp_path):
    write_corpus(tmp_path / "data")
    config = settings(tmp_path, max_steps=1)
    Trainer(tiny(), config).fit()
    doc = tmp_path / "data" / "doc3.txt"
    doc.write_text(doc.read_text().upper())  # the edit: one file uppercased, its size unchanged
    with pytest.raises(CheckpointError, match=r"the data changed \((train|validation) documents: .*content"):
        Trainer(tiny(), config.replace(max_steps=2), resume=True)


def test_a_fingerprint_saved_before_content_hashes_is_compared_by_names_and_sizes(run):
    def drop_content(data):
        for part in ("train", "validation"):
            del data["data_source"][part]["content"]

    edit_trainer_json(step(run, 3), drop_content)
    Trainer(tiny(), settings(run.parent, max_steps=4), resume=True).close()


# 4. trainer.json is checked: types, ranges, consistency with its folder and the run


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(step=-5), "step must be an int >= 0, got -5"),
        (lambda d: d.update(step=2), "step 2 inside the folder of step 3"),
        (lambda d: d.update(step="3"), "step must be an int >= 0, got '3'"),
        (lambda d: d.update(tokens_seen=float("nan")), "tokens_seen must be an int >= 0, got nan"),
        (lambda d: d.update(tokens_seen=10**12), "tokens_seen 1000000000000 is more than 3 steps"),
        (lambda d: d.update(world_size=0), "world_size must be an int >= 1, got 0"),
        (lambda d: d.update(elapsed_s="12s"), "elapsed_s must be a finite number >= 0, got '12s'"),
        (lambda d: d["data"].update(total_rows=7), "total_rows 7"),
        (lambda d: d["data"]["positions"].pop(), "one per row of the 2 expected"),
        (lambda d: d.update(tokenizer={"kind": "../../etc/passwd"}), "tokenizer must be of kind 'bytes'"),
        (lambda d: d["train_config"].update(batch_size=0), "train_config: batch_size must be an int >= 1"),
        (lambda d: d.update(data_source=[]), "data_source has no paths"),
    ],
)
def test_trainer_json_is_checked_like_every_other_input(run, change, message):
    for older in (1, 2):
        shutil.rmtree(step(run, older))
    edit_trainer_json(step(run, 3), change)
    with pytest.raises(DamagedCheckpoint, match="no complete checkpoint .*trainer.json is damaged") as caught:
        newest_intact_checkpoint(run, check_record)
    assert message in str(caught.value)


def test_an_inconsistent_trainer_json_is_stepped_past_and_never_overwrites_a_newer_step(run, capsys):
    edit_trainer_json(step(run, 3), lambda d: d.update(step=2))  # would have trained into step 3's folder
    assert brt("train", "--resume", "--out-dir", run, "--max-steps", 4, "--no-progress") == 0
    assert "resuming from step-00000002" in capsys.readouterr().err
    assert [p.name for p in step_directories(run)] == ["step-00000002", "step-00000003", "step-00000004"]


# 5. sizes are estimated before anything is allocated; Ctrl-C never gives a traceback


def test_a_step_too_large_for_memory_is_refused_naming_the_setting_and_the_estimate(tmp_path, capsys):
    write_corpus(tmp_path / "data")
    assert brt("train", "--preset", "tiny", "--data", tmp_path / "data", "--out-dir", tmp_path / "run",
               "--segments", 100000000, "--batch-size", 1) == 2
    one_error(capsys, "segments 100000000 x max_seq_len 64 tokens per step: needs at least 95.4 GiB (token buffers")
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


@pytest.mark.parametrize("field, value", [("dim", 10**9), ("num_tokens", 10**10), ("depth", 10**6)])
def test_a_model_config_too_large_for_memory_is_refused_by_train_and_generate(tmp_path, capsys, field, value):
    config = tiny().to_dict()
    config[field] = value
    (tmp_path / "big.json").write_text(json.dumps(config))
    assert brt("train", "--model-config", tmp_path / "big.json", "--out-dir", tmp_path / "run") == 2
    one_error(capsys, f"--model-config {tmp_path / 'big.json'} ({field} {value}" if field == "num_tokens" else
              f"--model-config {tmp_path / 'big.json'} (")
    model = tmp_path / "model"
    save_pretrained(BlockRecurrentTransformer(tiny()), model)
    (model / "config.json").write_text(json.dumps(config))
    write_manifest(model)
    assert brt("generate", "--checkpoint", model, "--prompt", "x") == 2
    one_error(capsys, f"{model / 'config.json'} (num_tokens")


def test_ctrl_c_anywhere_in_a_command_exits_130_with_one_line(monkeypatch, capsys):
    import block_recurrent.training.trainer as trainer_module

    def interrupted(*args, **kwargs):  # as a second Ctrl-C during the final summary would
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "train", interrupted)
    assert brt("train", "--preset", "tiny") == 130
    assert capsys.readouterr().err == "brt: interrupted\n"


# 6. brt generate streams, and Ctrl-C keeps what was printed


def test_generate_streams_and_ctrl_c_keeps_what_was_printed(run):
    command = [sys.executable, "-m", "block_recurrent", "generate", "--checkpoint", str(run), "--prompt", "the quick",
               "--max-new-tokens", "1000000000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                               preexec_fn=interruptible)
    try:
        first = os.read(process.stdout.fileno(), 4096)  # the prompt, then tokens as they come
        deadline = time.monotonic() + 60
        while len(first) < 200:
            assert process.poll() is None and time.monotonic() < deadline
            first += os.read(process.stdout.fileno(), 4096)
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.decode().splitlines()[-1] == "brt: interrupted" and b"Traceback" not in err
    printed = first + out
    assert printed.startswith(b"the quick") and printed.endswith(b"\n") and len(printed) > 200


def test_streamed_text_equals_the_text_generated_at_once(run, capsys):
    # greedy, so the two decodes agree: the streamed bytes, decoded as they come, equal the whole decode
    from block_recurrent.inference.generation import generate

    assert brt("generate", "--checkpoint", run, "--prompt", "é the quick", "--max-new-tokens", 40,
               "--temperature", 0) == 0
    model = from_pretrained(run)
    prompt = torch.tensor([list("é the quick".encode())])
    new = generate(model, prompt, 40, temperature=0)
    expected = "é the quick" + bytes(new[0].tolist()).decode("utf-8", errors="replace") + "\n"
    assert capsys.readouterr().out == expected


class SpacedBytes:
    """A tokenizer stub: ids are UTF-8 bytes, decoded whole, with a space before a token 32 that starts the text
    (so a token changes how its neighbour decodes), as subword tokenizers can."""

    vocab_size = 256

    def decode(self, ids):
        text = bytes(ids).decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text


@pytest.mark.parametrize("tokenizer", ["bytes", "another"])
def test_streamed_text_is_the_text_of_every_token_decoded_at_once(tokenizer):
    from block_recurrent.training.data import ByteTokenizer
    from block_recurrent.training.text_stream import TextStream

    decoder = ByteTokenizer() if tokenizer == "bytes" else SpacedBytes()
    ids = list(" é the quick ☃ brown fox, ok".encode()) + [0xE2, 0x98]  # ends inside a character
    stream = TextStream(decoder)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.finish() == decoder.decode(ids)
    assert sum(1 for p in pieces if p) > len(ids) // 2  # given out as it comes, not at the end


def test_max_new_tokens_is_bounded_where_continuations_are_kept_whole(run, tmp_path, capsys):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a"}\n')
    assert brt("generate", "--checkpoint", run, "--prompts", tmp_path / "prompts.jsonl",
               "--max-new-tokens", 2**21) == 2
    one_error(capsys, "--max-new-tokens must be an int in [0, 1048576], got 2097152")
    assert brt("generate", "--checkpoint", run, "--prompt", "a", "--max-new-tokens", -1) == 2
    one_error(capsys, "--max-new-tokens must be an int >= 0, got -1")


# 7. readers racing the run's rotation look again, and never call a rotated checkpoint damaged


def test_a_checkpoint_rotated_away_while_it_is_read_sends_the_reader_to_the_next_newest(run, monkeypatch):
    import block_recurrent.persistence.checkpoint as checkpoint

    saved = Trainer(tiny(), settings(run.parent, max_steps=4), resume=True)
    real = checkpoint.read_config
    rotated = []

    def read_config_while_the_run_rotates(directory):
        config = real(directory)
        if not rotated:  # the writer saves step 4 and rotates with keep_last 1 between two reads of step 3
            rotated.append(directory.name)
            saved.step = 4
            save_training_checkpoint(run, 4, model=saved.model, optimizer=saved.optimizer, trainer={}, tensors={},
                                     keep_last=1)
        return config

    monkeypatch.setattr(checkpoint, "read_config", read_config_while_the_run_rotates)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing was skipped for damage: no warning
        model, folder = load_pretrained(run)
    assert rotated == ["step-00000003"] and folder.name == "step-00000004"
    assert [p.name for p in step_directories(run)] == ["step-00000004"]
    saved.close()


def test_readers_in_a_loop_beside_a_writer_rotating_every_step_never_fail(run):
    trainer = Trainer(tiny(), settings(run.parent, max_steps=10**6), resume=True)
    stop, failures, loads = threading.Event(), [], [0]

    def read():
        while not stop.is_set():
            try:
                from_pretrained(run)
                loads[0] += 1
            except Exception as error:  # noqa: BLE001 - any failure is the finding
                failures.append(repr(error))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(30):
            trainer.train_step()
            save_training_checkpoint(run, trainer.step, model=trainer.model, optimizer=trainer.optimizer,
                                     trainer={}, tensors={}, keep_last=1)
    finally:
        stop.set()
        reader.join()
        trainer.close()
    assert not failures and loads[0] > 0, failures[:3]


# 8. every error names the file or option


def test_a_full_disk_while_logging_names_the_metrics_file_and_leaves_no_temporary(run, monkeypatch, capsys):
    from block_recurrent.persistence import storage
    from block_recurrent.training.metrics import MetricsLog

    def full(self, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MetricsLog, "append", full)
    assert brt("train", "--resume", "--out-dir", run, "--max-steps", 4, "--no-progress") == 2
    one_error(capsys, f"could not append to {run / 'metrics.jsonl'}: No space left on device")

    def half_written(path, text):
        path.write_text(text[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage, "write_text", half_written)
    with pytest.raises(OSError, match=f"could not rewrite {run / 'metrics.jsonl'}: No space left"):
        storage.replace_file(run / "metrics.jsonl", "{}\n")
    assert not (run / ".metrics.jsonl.tmp").exists()


def test_binary_bytes_in_the_metrics_log_do_not_stop_a_resume(run):
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b"\xff\xfe\x00garbage\n")
    with pytest.warns(UserWarning, match="1 lines were not UTF-8 text and were dropped"):
        resumed = Trainer(tiny(), settings(run.parent, max_steps=4), resume=True)
        resumed.fit()
    resumed.close()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    assert (run / "metrics.jsonl.damaged").read_bytes().endswith(b"garbage\n")


@pytest.mark.parametrize(
    "argv, message",
    [
        (("train", "--preset", "tiny", "--seed", "99999999999999999999999"),
         "seed must be an int in [0, 9223372036854775807], got 99999999999999999999999"),
        (("train", "--preset", "tiny", "--seed", "-1"), "seed must be an int in [0, 9223372036854775807], got -1"),
        (("generate", "--checkpoint", "{run}", "--prompt", "x", "--seed", "-1"),
         "--seed must be an int in [0, 9223372036854775807], got -1"),
        (("generate", "--checkpoint", "{run}", "--prompt", "\udcff\udcfe"), "--prompt: not UTF-8 text"),
        (("generate", "--checkpoint", "", "--prompt", "x"), "--checkpoint must name a folder"),
        (("eval", "--checkpoint", "", "--data", "x"), "--checkpoint must name a folder"),
        (("eval", "--checkpoint", "{run}", "--max-tokens", "1"), "--max-tokens must be an int >= 2, got 1"),
    ],
)
def test_errors_name_the_option_and_its_range(run, capsys, argv, message):
    assert brt(*(a.format(run=run) for a in argv)) == 2
    one_error(capsys, message)


def test_a_prompt_of_bytes_that_are_not_utf8_gives_one_line_from_a_real_command_line(run):
    done = subprocess.run([sys.executable, "-m", "block_recurrent", "generate", "--checkpoint", str(run),
                           "--prompt", b"\xff\xfe"], capture_output=True, env=ENV, timeout=120)
    assert done.returncode == 2 and done.stderr.decode().startswith("brt: error: --prompt: not UTF-8 text")


def test_a_leftover_symlink_is_removed_not_what_it_points_to(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep.txt").write_text("kept")
    (tmp_path / ".tmp-step-00000003-99").symlink_to(tmp_path / "target")
    assert remove_leftovers(tmp_path) == [".tmp-step-00000003-99"]
    assert not os.path.lexists(tmp_path / ".tmp-step-00000003-99")
    assert (tmp_path / "target" / "keep.txt").read_text() == "kept"
