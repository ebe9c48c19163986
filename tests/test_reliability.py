"""Nothing lost, nothing silent (issue 10): the run-folder lock, checksummed checkpoints, finite settings,
changed data, left-overs, durable writes, zero scored tokens, file permissions, and one-line CLI errors.

Command-line behaviours run `python -m block_recurrent` in a subprocess: exit status, one `brt: error:` line,
no traceback."""

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from block_recurrent import BlockRecurrentConfig, BlockRecurrentTransformer
from block_recurrent.persistence.checkpoint import (
    CheckpointError, DamagedCheckpoint, from_pretrained, latest_checkpoint, load_training_checkpoint, save_pretrained,
    save_training_checkpoint, step_directories,
)
from block_recurrent.persistence.storage import write_manifest
from block_recurrent.training.trainer import TrainConfig, Trainer, TrainingDiverged
from conftest import interruptible

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def brt(*argv, cwd=None, stdin=None, preexec_fn=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "block_recurrent", *map(str, argv)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, input=stdin, preexec_fn=preexec_fn, timeout=timeout)


def assert_one_line_error(done, message, status=2):
    assert done.returncode == status, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("brt: error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr[-2000:]


def write_corpus(folder, documents=8):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        (folder / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (3 + i))
    return folder


def tiny_run(corpus, run, *extra):
    return ("train", "--preset", "tiny", "--data", corpus, "--out-dir", run, "--batch-size", 2, "--warmup-steps", 1,
            "--log-every", 1, "--no-progress", "--eval-every", 0, *extra)


def settings(tmp_path, **changes):
    base = dict(data=str(write_corpus(tmp_path / "data")), out_dir=str(tmp_path / "run"), batch_size=2,
                max_steps=3, warmup_steps=1, eval_every=0, checkpoint_every=1, log_every=1, progress=False,
                final_eval=False, bf16=False)
    return TrainConfig(**{**base, **changes})


def tiny():
    return BlockRecurrentConfig.from_name("tiny")


def trained(tmp_path, steps=3, **changes):
    """A run folder with a checkpoint after each of ``steps`` steps."""
    config = settings(tmp_path, max_steps=steps, **changes)
    trainer = Trainer(tiny(), config)
    trainer.fit()
    trainer.close()
    return config, Path(config.out_dir)


def flip_tensor_bytes(path, count=20):
    """Flip ``count`` bytes inside the tensor data of a safetensors file (its header left intact)."""
    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    for i in range(count):
        raw[start + (len(raw) - start) * (i + 1) // (count + 2)] ^= 0xFF
    path.write_bytes(bytes(raw))


def edit_trainer_json(step_dir, change):
    """Rewrite trainer.json (and its checksum, as a writer would have): a damaged-but-consistent checkpoint."""
    data = json.loads((step_dir / "trainer.json").read_text())
    change(data)
    (step_dir / "trainer.json").write_text(json.dumps(data))
    write_manifest(step_dir)


# 2. one writer per run folder


def test_a_second_trainer_on_a_busy_run_folder_is_refused_and_the_first_is_unharmed(tmp_path):
    corpus, run = write_corpus(tmp_path / "data"), tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "block_recurrent", *map(str, tiny_run(
        corpus, run, "--max-steps", 100000, "--checkpoint-every", 2))], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=interruptible)
    try:
        deadline = time.monotonic() + 120
        while not (latest_checkpoint(run) and (run / "metrics.jsonl").read_text().count("\n") >= 3):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        second = brt(*tiny_run(corpus, run, "--max-steps", 5))
        assert_one_line_error(second, f"is in use by another training process (PID {first.pid})")
        resumed = brt("train", "--resume", "--out-dir", run, "--max-steps", 100000, "--no-progress")
        assert_one_line_error(resumed, f"(PID {first.pid})")
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one writer: every step once
    assert load_training_checkpoint(run).trainer["step"] == steps[-1]
    # the lock went with the process: the folder can be resumed now
    assert brt("train", "--resume", "--out-dir", run, "--max-steps", steps[-1] + 1, "--no-progress").returncode == 0


def test_trainers_of_one_process_share_the_lock_and_closing_releases_it(tmp_path):
    config = settings(tmp_path)
    first = Trainer(tiny(), config)
    first.save()
    second = Trainer(tiny(), config, resume=True)  # same process: allowed (the lock keeps out other processes)
    probe = [sys.executable, "-c", "import sys; from block_recurrent.persistence.storage import lock_run_folder; "
             "from pathlib import Path; lock_run_folder(Path(sys.argv[1]))", config.out_dir]
    busy = subprocess.run(probe, capture_output=True, text=True, env=ENV)
    assert busy.returncode != 0 and f"(PID {os.getpid()})" in busy.stderr
    first.close()
    second.close()
    assert subprocess.run(probe, capture_output=True, text=True, env=ENV).returncode == 0


# 3. checksums: flipped bytes are found, the file is named, resume steps back


def test_flipped_tensor_bytes_are_refused_naming_the_file(tmp_path):
    _, run = trained(tmp_path, steps=3)
    for step, name in ((3, "model.safetensors"), (2, "optimizer.safetensors"), (1, "trainer.safetensors")):
        folder = run / f"step-{step:08d}"
        flip_tensor_bytes(folder / name)
        with pytest.raises(DamagedCheckpoint, match=f"{name} is damaged .*sha256"):
            load_training_checkpoint(folder)
    with pytest.raises(DamagedCheckpoint, match="model.safetensors is damaged"):
        from_pretrained(run / "step-00000003")  # brt eval and generate load the same way
    with pytest.raises(DamagedCheckpoint, match="no complete checkpoint in .*run: step-00000003 .*step-00000002 .*step-00000001"):
        Trainer(tiny(), settings(tmp_path), resume=True)


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_so(tmp_path):
    config, run = trained(tmp_path, steps=3)
    flip_tensor_bytes(run / "step-00000003" / "model.safetensors")
    with pytest.warns(UserWarning) as caught:
        resumed = Trainer(tiny(), config, resume=True)
    messages = [str(w.message) for w in caught]
    assert any("resuming from step-00000002, the newest complete checkpoint in " in m and "; skipped: step-00000003 ("
               in m and "step-00000003/model.safetensors is damaged" in m for m in messages), messages
    assert any("step-00000003 is incomplete or damaged: renamed to step-00000003.damaged" in m for m in messages), messages
    assert resumed.step == 2
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step-")) == [
        "step-00000001", "step-00000002", "step-00000003.damaged"]  # set aside: "latest" is intact again
    assert latest_checkpoint(run).name == "step-00000002"
    resumed.close()

    flip_tensor_bytes(run / "step-00000002" / "trainer.safetensors")
    done = brt("train", "--resume", "--out-dir", run, "--max-steps", 4, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "brt: warning: resuming from step-00000001" in done.stderr and "Traceback" not in done.stderr
    assert "step-00000002/trainer.safetensors is damaged" in done.stderr
    assert load_training_checkpoint(run).trainer["step"] == 4
    done = brt("eval", "--checkpoint", run, "--data", tmp_path / "data" / "doc1.txt")
    assert done.returncode == 0 and "bits/byte" in done.stdout


def test_brt_eval_names_a_damaged_weights_file(tmp_path):
    _, run = trained(tmp_path, steps=1)
    flip_tensor_bytes(run / "step-00000001" / "model.safetensors")
    done = brt("eval", "--checkpoint", run, "--data", tmp_path / "data" / "doc1.txt")
    assert_one_line_error(done, "model.safetensors is damaged")


# 4. non-finite numbers are refused at the boundary, and never saved


@pytest.mark.parametrize("name", ["lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip",
                                  "xl_memories_dropout", "state_dropout"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_train_config_refuses_non_finite_numbers(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        TrainConfig(**{name: value})


@pytest.mark.parametrize("option", ["--lr inf", "--min-lr-ratio nan", "--grad-clip nan", "--weight-decay inf"])
def test_cli_refuses_non_finite_options(tmp_path, option):
    flag, value = option.split()
    done = brt("train", "--preset", "tiny", "--out-dir", tmp_path / "run", flag, value)
    assert_one_line_error(done, f"argument {flag}: must be a finite number")
    assert not (tmp_path / "run").exists()


def test_a_model_config_with_infinity_is_refused(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(BlockRecurrentConfig.from_name("tiny").to_json().replace('"qk_rmsnorm_scale": 1.0',
                                                                            '"qk_rmsnorm_scale": Infinity'))
    done = brt("train", "--model-config", path, "--out-dir", tmp_path / "run")
    assert_one_line_error(done, f"--model-config {path}: qk_rmsnorm_scale must be a finite number")


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    config = settings(tmp_path)
    trainer = Trainer(tiny(), config)
    trainer.train_step()
    trainer.save()
    with torch.no_grad():
        trainer.model.to_logits.weight[0, 0] = float("inf")
    trainer.step += 1
    with pytest.raises(TrainingDiverged, match="weights hold NaN or inf after step 2; not saved"):
        trainer.save()
    with pytest.raises(CheckpointError, match="not saved, 1 weights hold NaN or inf"):
        save_training_checkpoint(tmp_path / "run", 2, model=trainer.model, optimizer=trainer.optimizer, trainer={},
                                 tensors={})
    assert [p.name for p in step_directories(tmp_path / "run")] == ["step-00000001"]


# 5. resume checks the data


def test_resume_compares_data_folders_resolved_and_their_documents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "data")
    config, run = trained(tmp_path, steps=1, data="./data")
    for spelling in ("data/", str(tmp_path / "data"), "./data"):  # one folder, however it is written
        Trainer(tiny(), config.replace(data=spelling), resume=True).close()

    doc = tmp_path / "data" / "doc3.txt"
    doc.write_text(doc.read_text() + " and a longer ending")  # longer: every saved data position still fits
    with pytest.raises(CheckpointError, match=r"the data changed \((train|validation) documents: .*allow_data_change"):
        Trainer(tiny(), config, resume=True)
    with pytest.warns(UserWarning, match="resuming .* on changed data"):
        resumed = Trainer(tiny(), config.replace(allow_data_change=True), resume=True)
    assert resumed.step == 1
    resumed.close()

    (tmp_path / "data" / "doc3.txt").unlink()
    with pytest.raises(CheckpointError, match="the data changed"):
        Trainer(tiny(), config, resume=True)


def test_resume_from_another_folder_whose_data_is_another_folder_is_refused(tmp_path):
    write_corpus(tmp_path / "a" / "data")
    write_corpus(tmp_path / "b" / "data")
    assert brt(*tiny_run("data", tmp_path / "run", "--max-steps", 1), cwd=tmp_path / "a").returncode == 0
    done = brt("train", "--resume", "--out-dir", tmp_path / "run", "--max-steps", 2, cwd=tmp_path / "b")
    assert_one_line_error(done, f"data: checkpoint {tmp_path / 'a' / 'data'}, now {tmp_path / 'b' / 'data'}")
    done = brt("train", "--resume", "--allow-data-change", "--out-dir", tmp_path / "run", "--max-steps", 2,
               "--no-progress", cwd=tmp_path / "b")
    assert done.returncode == 0 and "brt: warning: resuming" in done.stderr and "changed data" in done.stderr
    # allowed once, not for good: the next resume checks again
    done = brt("train", "--resume", "--out-dir", tmp_path / "run", "--max-steps", 3, cwd=tmp_path / "a")
    assert_one_line_error(done, f"data: checkpoint {tmp_path / 'b' / 'data'}, now {tmp_path / 'a' / 'data'}")


# 6. one line instead of a traceback


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--log-every", 0), "log_every must be an int >= 1"),
        (("--device", "tpu"), "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
        (("--device", "mps"), "MPS (Apple GPUs) is not available"),
        (("--out-dir", "{tmp}/file"), "is a file, not a folder"),
        (("--out-dir", "{tmp}/file/run"), "lies under a file"),
        (("--out-dir", ""), "out_dir must be a non-empty str"),
        (("--eval-tokens", 0), "eval_tokens must be an int >= 2"),
    ],
)
def test_bad_train_options_give_one_line(tmp_path, argv, message):
    if "mps" in argv and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    (tmp_path / "file").write_text("not a folder")
    corpus = write_corpus(tmp_path / "data")
    done = brt("train", "--preset", "tiny", "--data", corpus, "--max-steps", 1, "--no-progress",
               *(str(a).format(tmp=tmp_path) for a in argv))
    assert_one_line_error(done, message)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_dir_gives_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    corpus = write_corpus(tmp_path / "data")
    assert_one_line_error(brt(*tiny_run(corpus, locked, "--max-steps", 1)), "is not writable")
    assert_one_line_error(brt(*tiny_run(corpus, locked / "run", "--max-steps", 1)), "cannot be created")


def test_an_out_dir_without_write_permission_is_named(tmp_path, monkeypatch):
    from block_recurrent.persistence import storage

    monkeypatch.setattr(storage.os, "access", lambda path, mode: False)  # as a read-only folder answers
    with pytest.raises(ValueError, match="out_dir .*run is not writable"):
        Trainer(tiny(), settings(tmp_path))


def test_a_full_disk_while_saving_gives_one_line_and_leaves_no_partial_checkpoint(tmp_path):
    corpus, run = write_corpus(tmp_path / "data"), tmp_path / "run"
    limit = 800_000  # the tiny model's weights (595 kB) fit, its optimizer state (1.2 MB) does not

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail with EFBIG

    done = brt(*tiny_run(corpus, run, "--max-steps", 2, "--checkpoint-every", 1), preexec_fn=small_disk)
    assert_one_line_error(done, f"could not write {run / 'step-00000001'}")
    assert "File too large" in done.stderr
    assert sorted(p.name for p in run.iterdir()) == [".lock", "metrics.jsonl", "run.toml"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("data"), "trainer.json is damaged (no data positions)"),
        (lambda d: d.update(optimizer={}), "trainer.json is damaged (its optimizer entry has no param_groups)"),
        (lambda d: d.pop("train_config"), "trainer.json is damaged (no train_config)"),
        (lambda d: d.update(format=2), "has checkpoint format 2; this version of block-recurrent reads format 1"),
        (lambda d: d["data"]["positions"][0].__setitem__(2, -5), "data position of row 0 ([0, 0, -5]) must be"),
        (lambda d: d["data"]["positions"].__setitem__(1, [0, 0]), "data position of row 1 ([0, 0]) must be three"),
        (lambda d: d["data"]["positions"].__setitem__(1, [0, 99, 0]), "lies past the end of the data"),
    ],
)
def test_damaged_training_state_gives_one_line(tmp_path, change, message):
    _, run = trained(tmp_path, steps=1)
    edit_trainer_json(run / "step-00000001", change)
    done = brt("train", "--resume", "--out-dir", run, "--max-steps", 2, "--no-progress")
    assert_one_line_error(done, message)


@pytest.mark.parametrize(
    "argv, message",
    [
        (("generate", "--checkpoint", "runs/brtt", "--prompt", "x"), "checkpoint runs/brtt: no such folder"),
        (("generate", "--checkpoint", "./run", "--prompt", "x"), "no such folder"),
        (("eval", "--checkpoint", "missing/"), "no such folder"),
        (("train", "--model-config", "bad.json"), "--model-config bad.json is not valid JSON"),
        (("train", "--resume", "--out-dir", "run", "--preset", "small"), "dim: checkpoint 64, requested 256"),
        (("eval", "--checkpoint", "run", "--data", "one.txt"), "nothing was scored"),
        (("generate", "--checkpoint", "run", "--prompt", "x", "--temperature", "nan"), "must be a finite number"),
    ],
)
def test_mistyped_paths_bad_configs_and_nothing_to_score_give_one_line(tmp_path, argv, message):
    (tmp_path / "runs").mkdir()
    (tmp_path / "bad.json").write_text('{"dim": 64,')
    (tmp_path / "one.txt").write_text("x")  # one byte: no next token to predict
    if "run" in argv:
        trained(tmp_path, steps=1)
    assert_one_line_error(brt(*argv, cwd=tmp_path), message)


def test_a_one_byte_validation_split_is_refused_before_training(tmp_path):
    (tmp_path / "short.txt").write_text("x = 1\nprint(x)\n" + "#")  # 5% of it is one byte
    done = brt("train", "--preset", "tiny", "--data", tmp_path / "short.txt", "--out-dir", tmp_path / "run")
    assert_one_line_error(done, "nothing could be scored")


# 7. left-overs, atomic rewrites, fsync


def test_stale_temporary_folders_are_cleared_at_start_up(tmp_path):
    config, run = trained(tmp_path, steps=2)
    (run / ".tmp-step-00000003-99999").mkdir()
    (run / ".tmp-step-00000003-99999" / "model.safetensors").write_bytes(b"half")
    (run / "step-00000002").rename(run / ".old-step-00000002-99998")  # killed between its two renames
    (run / ".metrics.jsonl.tmp").write_text("{}")
    (run / ".loss_curve.png.tmp").write_text("")
    with pytest.warns(UserWarning, match="cleared what an interrupted run left"):
        resumed = Trainer(tiny(), config, resume=True)
    assert resumed.step == 2  # the old copy was put back
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".lock"]
    resumed.close()


def test_a_kill_during_the_metrics_rewrite_loses_nothing(tmp_path, monkeypatch):
    from block_recurrent.persistence import storage

    config, run = trained(tmp_path, steps=2)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "loss": 1.0}\n')  # logged past the checkpoint
    before = metrics.read_text()

    def killed(*args):
        raise KeyboardInterrupt  # the process dies here, between writing the new file and the rename

    monkeypatch.setattr(storage.os, "replace", killed)
    resumed = Trainer(tiny(), config.replace(max_steps=3), resume=True)
    with pytest.raises(KeyboardInterrupt):
        resumed.fit()
    assert metrics.read_text() == before
    resumed.close()
    monkeypatch.undo()

    with pytest.warns(UserWarning, match="cleared what an interrupted run left: .metrics.jsonl.tmp"):
        resumed = Trainer(tiny(), config.replace(max_steps=3), resume=True)
    resumed.fit()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
    assert not (run / ".metrics.jsonl.tmp").exists()


def test_checkpoint_files_and_folders_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    trained(tmp_path, steps=1)
    final = tmp_path / "run" / "step-00000001"
    names = {Path(p).name for p in synced}
    assert {"model.safetensors", "optimizer.safetensors", "trainer.safetensors", "trainer.json", "config.json",
            "checksums.json"} <= names
    assert str(final.parent) in synced  # the rename into the run folder
    assert any(Path(p).name.startswith(".tmp-step-00000001") for p in synced)  # the folder, before its rename


# 8. (zero scored tokens: see the one-line tests above)


# 9. permissions follow the umask


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_checkpoint_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        _, run = trained(tmp_path, steps=1)
        save_pretrained(from_pretrained(run), tmp_path / "model")
    finally:
        os.umask(previous)
    files = [p for p in (run / "step-00000001").iterdir()] + [p for p in (tmp_path / "model").iterdir()]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}


# 10. a prompt from a file or standard input


def test_generate_reads_the_prompt_from_a_file_or_stdin(tmp_path):
    torch.manual_seed(0)
    save_pretrained(BlockRecurrentTransformer(tiny()), tmp_path / "model")
    prompt = "def f(x):\n    return x  # é\n" * 10
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    common = ("generate", "--checkpoint", tmp_path / "model", "--max-new-tokens", 8, "--temperature", 0)
    inline = brt(*common, "--prompt", prompt)
    from_file = brt(*common, "--prompt-file", tmp_path / "prompt.txt")
    from_stdin = brt(*common, "--prompt-file", "-", stdin=prompt)
    assert inline.returncode == from_file.returncode == from_stdin.returncode == 0, from_file.stderr
    assert inline.stdout == from_file.stdout == from_stdin.stdout and inline.stdout.startswith(prompt)

    assert_one_line_error(brt(*common, "--prompt", "x", "--prompt-file", "-"), "not allowed with argument")
    assert_one_line_error(brt(*common), "one of the arguments --prompt --prompt-file --prompts is required")
    assert_one_line_error(brt(*common, "--prompt-file", tmp_path / "missing.txt"), "no such file")
    assert_one_line_error(brt(*common, "--prompt-file", "-", stdin=""), "the prompt is empty")
