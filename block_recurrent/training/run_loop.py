"""The run loop around :meth:`Trainer.train_step`: progress bar, metrics, validation and samples on
schedule, checkpoints, and Ctrl-C (finish the step in flight, save, stop)."""

from __future__ import annotations

import signal
import sys
import threading
import time
import warnings
from typing import Any

import torch

from ..inference.evaluation import bits_per_byte
from .loggers import open_loggers
from ..persistence.storage import replace_file
from .metrics import CURVE_FILE, METRICS_FILE, MetricsLog, plot_metrics
from .run_config import write_run_file



class RunLoop:
    """Runs a :class:`~block_recurrent.training.trainer.Trainer` until ``max_steps`` or a stop signal; only rank 0 writes
    files. The trainer owns its loop (``Trainer.fit``), so this module reads it without importing it, and changes
    it only through its methods: the loop keeps its own clock and hands the time to :meth:`Trainer.save`."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.metrics = MetricsLog(trainer.out_dir / METRICS_FILE)
        self.loggers = []  # TensorBoard, W&B: each record of metrics.jsonl goes to them too (rank 0)
        self.stop_requested = False
        self.elapsed = trainer.elapsed  # seconds of training, from the checkpoint the trainer was restored from

    def log(self, record: dict[str, Any]) -> None:
        if self.trainer.is_main:
            try:
                self.metrics.append(record)
            except OSError as error:  # a full disk: name the file (the checkpoints are unharmed)
                raise OSError(error.errno, f"could not append to {self.metrics.path}: {error.strerror}") from None
            for logger in self.loggers:
                logger.log(record)

    def _on_signal(self, signum, frame) -> None:
        # finish the step in flight, save, exit; a second signal interrupts at once
        self.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _truncate_metrics(self, step: int) -> None:
        """Cut the log back to ``step``. A log holding bytes that are not UTF-8 (a damaged disk block) must not
        stop a run whose checkpoint is intact: its text lines are kept, the damaged file set aside beside it."""
        try:
            self.metrics.truncate(step)
            return
        except UnicodeDecodeError:
            pass
        path = self.metrics.path
        raw = path.read_bytes()
        kept, dropped = [], 0
        for line in raw.splitlines():
            try:
                kept.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                dropped += 1
        aside = path.with_name(path.name + ".damaged")
        aside.write_bytes(raw)
        replace_file(path, "".join(line + "\n" for line in kept))
        warnings.warn(f"{path}: {dropped} lines were not UTF-8 text and were dropped (the file as it was is kept "
                      f"as {aside.name})", stacklevel=3)
        self.metrics.truncate(step)

    def _stop_everywhere(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0])
        return bool(self.trainer.dist.all_reduce(flag).item() > 0)

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        t, config = self.trainer, self.trainer.train_config
        if t.is_main:
            self._truncate_metrics(t.step)  # a resumed run forgets what was logged after its checkpoint
            write_run_file(t.out_dir, t.model_config, config)  # run.toml: `brt train --config` repeats the run
            self.loggers = open_loggers(config.log, t.out_dir, step=t.step, run_config={
                "model": t.model_config.to_dict(), "train": config.to_dict()})
        # Ctrl-C (and SIGTERM, which torchrun sends its workers on Ctrl-C) stop after the step in flight
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for number, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
                if signal.getsignal(number) is default:
                    previous[number] = signal.signal(number, self._on_signal)
        bar = tqdm(total=config.max_steps, initial=t.step, disable=not (t.is_main and config.progress),
                   unit="step", dynamic_ncols=True)
        last: dict[str, Any] = {"step": t.step}
        saved_at = t.step
        start, tokens_since, tick = time.perf_counter(), 0, time.perf_counter()
        interval_loss, interval_tokens = 0.0, 0  # loss and bpb are logged as means over the log interval
        try:
            while t.step < config.max_steps:
                # 1. one optimiser step
                metrics = t.train_step()
                tokens_since += metrics["tokens"]
                interval_loss += metrics["loss"] * metrics["tokens"]
                interval_tokens += metrics["tokens"]
                now = time.perf_counter()
                self.elapsed += now - start
                start = now
                bar.update(1)
                # 2. a metrics line every log_every steps, averaged over them
                if t.step % config.log_every == 0 or t.step == config.max_steps:
                    rate = tokens_since / max(now - tick, 1e-9)
                    loss = interval_loss / max(interval_tokens, 1)
                    bpb = bits_per_byte(loss, t.train_corpus.bytes_per_token)
                    tokens_since, tick, interval_loss, interval_tokens = 0, now, 0.0, 0
                    last = {"step": t.step, **metrics, "loss": loss, "bpb": bpb, "tokens_per_s": rate,
                            "tokens_seen": t.tokens_seen, "elapsed_s": round(self.elapsed, 2)}
                    self.log(last)
                    bar.set_postfix(loss=f"{loss:.3f}", bpb=f"{bpb:.3f}", tok_s=f"{rate:.0f}")
                # 3. validation and checkpoints on schedule (they do not count towards tokens/s)
                paused = False
                if config.eval_every and t.step % config.eval_every == 0:
                    last.update(self.validate_and_sample(bar))
                    paused = True
                if config.checkpoint_every and t.step % config.checkpoint_every == 0:
                    self.checkpoint()
                    saved_at, paused = t.step, True
                if paused:
                    tokens_since, tick = 0, time.perf_counter()
                # 4. a stop signal on any rank stops every rank after the same step
                if self._stop_everywhere():
                    bar.write(f"interrupted: saving step {t.step} and stopping", file=sys.stderr)
                    break
            if saved_at != t.step:
                self.checkpoint()
            # 5. the whole held-out split, next to gzip on the same files: did the model learn anything?
            if config.final_eval and not self.stop_requested and t.step == config.max_steps:
                final = t.validate(whole=True)
                final["held_out_gzip_bpb"] = t.held_out_gzip_bpb()
                self.log({"step": t.step, **final})
                last.update(final)
        finally:
            bar.close()
            for logger in self.loggers:
                logger.close()
            for number, handler in previous.items():
                signal.signal(number, handler)
        last["interrupted"] = self.stop_requested
        return last

    def validate_and_sample(self, bar) -> dict[str, Any]:
        """Validation loss (every rank), a sample (rank 0); both logged, and shown under the progress bar."""
        t = self.trainer
        result = t.validate()
        record = {"step": t.step, **result}
        message = f"step {t.step}: val loss {result['val_loss']:.4f}, {result['val_bpb']:.4f} bits/byte"
        if t.is_main and t.train_config.sample_tokens:
            prompt, continuation = t.sample_text()
            record["sample"] = {"prompt": prompt, "continuation": continuation}
            message += f"\n--- sample ---\n{prompt}\033[1m{continuation}\033[0m\n--------------"
        self.log(record)
        if t.is_main and t.train_config.progress:
            bar.write(message)
        return result

    def checkpoint(self) -> None:
        path = self.trainer.save(elapsed=self.elapsed)
        if path is not None:
            plot_metrics(self.metrics.path, self.trainer.out_dir / CURVE_FILE)
