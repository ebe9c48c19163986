"""The ``brt`` command line: thin subcommands over library functions.

- ``brt train``: :func:`block_recurrent.training.trainer.train` with a preset (or a config JSON) and a
  :class:`~block_recurrent.training.trainer.TrainConfig` built from the options (one option per field).
- ``brt generate``: :func:`block_recurrent.persistence.checkpoint.from_pretrained` then
  :func:`block_recurrent.inference.generation.generate`.
- ``brt eval``: :func:`block_recurrent.persistence.checkpoint.from_pretrained` then
  :func:`block_recurrent.inference.evaluation.evaluate_corpus` over documents loaded by :mod:`block_recurrent.training.data`
  (without importing the trainer); with ``--task``, exact match on a long-context task by distance and depth.
- ``brt tune``: fine-tune a checkpoint on a long-context task. Both live in :mod:`block_recurrent.tasks.commands`.

Errors in the input (bad options, data, checkpoints, a run folder in use, a full disk) print one line
``brt: error: ...`` and exit with 2; a diverged run exits with 1. Library warnings print as ``brt: warning: ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import warnings
from pathlib import Path

from . import __version__
from .host_memory import keep_freed_memory
from .model.config import PRESETS
from .tasks.commands import add_eval_task_options, add_tune_command, run_task_eval, run_tune
from .training.diagnose import (
    add_document_options, add_eval_diagnostics, add_inspect_command, load_documents_for, run_eval_diagnostics,
    run_inspect,
)
from .training.run_config import read_text_input
from .training.train_config import RECIPES, finite_number, recipe

DEFAULT_PRESET = RECIPES["default"]["preset"]

TRAIN_HELP = {
    "data": "text file, .gz file or folder of them (default: the Python standard library's sources)",
    "val_data": "held-out documents (default: the fixed split of the training data, see docs/training.md)",
    "hf_dataset": "a Hugging Face dataset name or save_to_disk folder instead of --data (needs [hf])",
    "hf_split": "split of --hf-dataset",
    "text_field": "text column of --hf-dataset",
    "tokenizer": "a `tokenizers` JSON file (needs [tokenizers]); default: bytes",
    "mode": "stream: rows continue whole documents step after step; crop: random windows",
    "documents": "file: every file is a document; package: every folder at --package-depth is one, its files "
                 "concatenated, held out by package (default: file)",
    "package_depth": "with --documents package: the depth of the folders that are documents (default: 1)",
    "allow_data_change": "--resume: warn, instead of refusing, when the data's paths or documents changed",
    "batch_size": "rows per micro-batch (per rank)",
    "segments": "segments of max_seq_len tokens per row per step",
    "backward_every": "back-propagate through this many segments at a time",
    "grad_accum": "micro-batches per optimiser step",
    "max_steps": "optimiser steps",
    "lr": "peak learning rate",
    "state_lr_scale": "the recurrent state cells' parameters learn at this multiple of --lr (on top of the model's "
                      "state_cell_scale)",
    "min_lr_ratio": "final learning rate as a share of --lr (cosine decay)",
    "warmup_steps": "linear warm-up steps",
    "weight_decay": "AdamW weight decay (matrices only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this (0: off)",
    "xl_memories_dropout": "chance per segment to start it with an empty memory",
    "state_dropout": "chance per segment to start it with the initial state",
    "replay_write": "with one block per backward pass, redo each block's state write in the next pass so that the "
                    "write trains (default: on exactly then)",
    "seed": "seed of the weights, the data order and dropout",
    "device": "auto, cpu, cuda, cuda:N",
    "bf16": "bfloat16 autocast; state, gates and loss stay float32 (default: on where bf16 is native: CUDA, CPUs "
            "with AVX-512 BF16 or AMX)",
    "compile": "torch.compile the layers (CUDA only)",
    "out_dir": "run folder: checkpoints, metrics.jsonl, loss_curve.png",
    "log_every": "steps between metric lines (loss and bits per byte averaged over them)",
    "eval_every": "steps between validations and samples (0: never)",
    "eval_tokens": "validation tokens per evaluation, shared by every held-out file",
    "final_eval": "score the whole held-out split at the end, beside gzip -9",
    "sample_tokens": "tokens generated after each validation (0: none)",
    "checkpoint_every": "steps between checkpoints (0: only at the end and on Ctrl-C)",
    "keep_last": "checkpoints kept",
    "progress": "show the progress bar",
    "log": "experiment trackers beside metrics.jsonl: tensorboard, wandb or tensorboard,wandb (needs the extra of "
           "that name; W&B offline with WANDB_MODE=offline)",
}


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the one-line form of every other brt error."""

    def error(self, message: str):
        self.exit(2, f"brt: error: {message} (see {self.prog} --help)\n")


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field; unset options keep the config's defaults (or the resumed run's)."""
    from .training.train_config import TrainConfig

    group = parser.add_argument_group("training settings (TrainConfig)")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        help_text = TRAIN_HELP.get(field.name, "")
        if "default" not in help_text:
            help_text += f" (default: {default})"
        if isinstance(default, bool) or "bool" in str(field.type):  # bool, or bool | None (None: auto)
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            kind = str if default is None else finite_number if isinstance(default, float) else type(default)
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=field.name.upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="brt", description="Block-Recurrent Transformer: train, evaluate, generate")
    parser.add_argument("--version", action="version", version=f"block-recurrent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="train a model on long documents (or resume a run)")
    model = train.add_mutually_exclusive_group()
    model.add_argument("--preset", choices=None, default=None,
                       help=f"model preset: {', '.join(PRESETS)} (default: {DEFAULT_PRESET})")
    model.add_argument("--model-config", default=None, help="a model config JSON file instead of a preset")
    model.add_argument("--recipe", default=None,
                       help=f"a named recipe, a preset with the training settings measured with it: "
                            f"{', '.join(RECIPES)} (options given beside it still win; docs/training.md)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its latest checkpoint")
    train.add_argument("--config", metavar="FILE", default=None,
                       help="a TOML run file: options as keys (max_steps = 600), the model by preset and/or a [model] "
                            "table; options given here win. Every run folder holds a run.toml that repeats its run")
    _add_train_options(train)

    generate = commands.add_parser("generate", help="continue a prompt with a trained model")
    generate.add_argument("--checkpoint", required=True, help="run folder, step folder or save_pretrained folder")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text to continue")
    prompt.add_argument("--prompt-file", metavar="FILE", help="UTF-8 file holding the text to continue; - reads stdin")
    prompt.add_argument("--prompts", metavar="FILE",
                        help='JSON Lines, one {"prompt": "..."} per line (- reads stdin): continues every prompt, '
                             '--batch-size side by side, and writes one JSON line per prompt with its "continuation"')
    generate.add_argument("--max-new-tokens", type=int, default=256,
                          help="tokens to generate (default: 256); one --prompt streams them as they come, any "
                               "number; with --prompts at most 1048576 per prompt")
    generate.add_argument("--temperature", type=finite_number, default=0.8, help="0: greedy")
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=finite_number, default=None)
    generate.add_argument("--seed", type=int, default=0, help="seed of the sampling, in [0, 2**63 - 1] (default: 0)")
    generate.add_argument("--batch-size", type=int, default=32, help="--prompts generated side by side (default: 32)")
    generate.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    generate.add_argument("--compile", action="store_true",
                          help="decode through torch.compile: faster per token, after a first call that compiles "
                               "(slow the first time, quick once inductor has cached it; docs/generation.md)")
    generate.add_argument("--device", default="auto")
    generate.add_argument("--state-in", metavar="FILE", default=None,
                          help="continue the document whose decode state --state-out saved (same model only): the "
                               "prompt follows what that run fed")
    generate.add_argument("--state-out", metavar="FILE", default=None,
                          help="after generating, save the decode state (the prompt and every generated token fed) "
                               "to FILE (safetensors), to continue the document later with --state-in")

    evaluate = commands.add_parser("eval", help="bits per byte of a trained model on documents")
    evaluate.add_argument("--checkpoint", required=True, help="run folder, step folder or save_pretrained folder")
    evaluate.add_argument("--data", default=None,
                          help="text file, .gz or folder; default: the built-in corpus's validation documents")
    add_document_options(evaluate)
    evaluate.add_argument("--max-tokens", type=int, default=None, help="score documents until this many tokens")
    evaluate.add_argument("--batch-size", type=int, default=16, help="documents scored side by side (default: 16)")
    evaluate.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                          help="bfloat16 autocast (default: on where bf16 is native, except on the CPU for blocks under 64 "
                               "tokens, where float32 is faster; scores move in the third decimal)")
    evaluate.add_argument("--device", default="auto")
    add_eval_task_options(evaluate)
    add_eval_diagnostics(evaluate)
    add_tune_command(commands)
    add_inspect_command(commands)
    return parser


# subcommands


def run_train(args: argparse.Namespace) -> int:
    from .training.trainer import TrainConfig, TrainingDiverged, resume, train

    if args.config is not None:  # the file fills what the command line left out
        from .training.run_config import apply_run_file, read_run_file

        apply_run_file(args, read_run_file(args.config))
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    options = {name: value for name, value in vars(args).items() if name in known}
    if args.recipe is not None:
        if args.resume:
            raise ValueError("--recipe sets up a new run; a resumed run keeps the settings it was started with")
        preset, settings = recipe(args.recipe)
        args.preset, options = preset, {**settings, **options}
    try:
        if args.resume:  # the run's settings and model come from its checkpoint; a model given must be the same
            out_dir = options.pop("out_dir", TrainConfig.out_dir)
            result, config = resume(out_dir, model_config=_model_config(args, default=None), **options)
        else:
            config = TrainConfig(**options)
            result = train(_model_config(args, default=DEFAULT_PRESET), config)
    except TrainingDiverged as error:
        print(f"brt: training stopped: {error}", file=sys.stderr)
        return 1
    summary = ", ".join(f"{k} {result[k]:.4g}" for k in ("loss", "bpb", "val_bpb") if k in result)
    summary = summary or f"nothing to do, max_steps is {config.max_steps}"
    print(f"step {result['step']}: {summary}; checkpoints in {config.out_dir}")
    if "held_out_bpb" in result:
        print(f"held-out: {result['held_out_bpb']:.4f} bits per byte over the whole split ({result['held_out_tokens']} "
              f"tokens); gzip -9 on the same files, one by one: {result['held_out_gzip_bpb']:.4f}")
    return 0


def _model_config(args: argparse.Namespace, default: str | None):
    import torch

    from .model.config import BlockRecurrentConfig
    from .persistence.budget import check_model_fits

    fields = getattr(args, "model_fields", None)  # a run file's [model] table: changes, or a whole config alone
    base = None
    if args.model_config is not None:
        path = Path(args.model_config)
        if not path.is_file():
            raise ValueError(f"--model-config: no file at {path}")
        try:
            base = BlockRecurrentConfig.load(path)
        except json.JSONDecodeError as error:
            raise ValueError(f"--model-config {path} is not valid JSON ({error})") from None
        except UnicodeDecodeError:
            raise ValueError(f"--model-config {path} is not a UTF-8 text file") from None
        except (TypeError, ValueError) as error:
            raise ValueError(f"--model-config {path}: {error}") from None
        # every model is built on the CPU first: its parameters must fit there, whatever the device
        check_model_fits(base, torch.device("cpu"), f"--model-config {path}", bytes_per_parameter=4)
    elif args.preset or (default and fields is None):
        base = BlockRecurrentConfig.from_name(args.preset or default)
    if fields is not None:
        from .training.run_config import model_from_fields

        return model_from_fields(base, fields, f"--config {args.config}")
    return base


def _load(checkpoint: str, device: str):
    """The model and tokenizer of --checkpoint (a run folder: its newest complete checkpoint)."""
    from .persistence.checkpoint import TOKENIZER_FILE, load_pretrained
    from .training.data import load_tokenizer
    from .training.distributed import resolve_device

    if not checkpoint:
        raise ValueError("--checkpoint must name a folder or a Hub repository id, got ''")
    model, folder = load_pretrained(checkpoint, device=resolve_device(device))
    tokenizer_file = folder / TOKENIZER_FILE
    return model, load_tokenizer(tokenizer_file if tokenizer_file.exists() else None)


def _autocast(enabled: bool, device):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from .inference.generation import generate, stream
    from .model.checks import check_int
    from .training.text_stream import TextStream
    from .training.train_config import check_seed

    check_int("--batch-size", args.batch_size, 1)
    check_seed("--seed", args.seed)
    # one prompt streams in constant memory, so any length is fine; --prompts keeps each continuation whole
    check_int("--max-new-tokens", args.max_new_tokens, 0, None if args.prompts is None else MAX_COLLECTED_TOKENS)
    texts = _prompts_jsonl(args.prompts) if args.prompts is not None else [_prompt_text(args)]
    model, tokenizer = _load(args.checkpoint, args.device)
    generator = torch.Generator(model.device).manual_seed(args.seed)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator,
                   compile=args.compile)
    if args.prompts is None:
        prompt = torch.as_tensor(tokenizer.encode(texts[0]), dtype=torch.long, device=model.device)[None]
        state = None
        if args.state_in is not None:
            from .persistence.decode_state import load_decode_state

            state = load_decode_state(model, args.state_in)
        text, last = TextStream(tokenizer), None
        with _autocast(args.bf16, model.device):
            tokens = stream(model, prompt, args.max_new_tokens, state=state, **options)  # checked before writing
            _write(texts[0])
            try:  # each token is printed as it comes; Ctrl-C keeps what was printed (main exits with 130)
                for last in tokens:
                    _write(text.push(int(last[0])))
            finally:
                _write(text.finish() + "\n")
            if args.state_out is not None:
                _save_state(model, tokens.state, last, args.state_out)
        return 0
    if args.state_in is not None or args.state_out is not None:
        raise ValueError("--state-in and --state-out continue one document: give --prompt or --prompt-file, "
                         "not --prompts")
    for begin in range(0, len(texts), args.batch_size):  # a list of prompts of any lengths runs side by side
        batch = texts[begin : begin + args.batch_size]
        prompts = [torch.as_tensor(tokenizer.encode(t), dtype=torch.long, device=model.device) for t in batch]
        with _autocast(args.bf16, model.device):
            rows = generate(model, prompts, args.max_new_tokens, **options)
        for text, row in zip(batch, rows):
            print(json.dumps({"prompt": text, "continuation": tokenizer.decode(row.tolist())}), flush=True)
    return 0


def _save_state(model, state, last, path: str) -> None:
    """Save the decode state after the prompt and every printed token (the last one fed first)."""
    from .inference.decoding import eval_no_grad, step
    from .persistence.decode_state import save_decode_state

    if last is not None:
        with eval_no_grad(model):
            _, state = step(model, last, state)
    save_decode_state(model, state, path)


# --max-new-tokens with --prompts: every continuation is held until its JSON line is written
MAX_COLLECTED_TOKENS = 1 << 20


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _prompts_jsonl(path: str) -> list[str]:
    """The "prompt" of every line of a JSON Lines file (``-``: standard input)."""
    where = f"--prompts {path}"
    texts = []
    for number, line in enumerate(read_text_input(path, where).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: line {number} is not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"]:
            raise ValueError(f'{where}: line {number} needs a non-empty string "prompt"')
        texts.append(_utf8(record["prompt"], f"{where}: line {number}"))
    if not texts:
        raise ValueError(f"{where}: no prompt in the file")
    return texts


def _prompt_text(args: argparse.Namespace) -> str:
    """--prompt, or the text of --prompt-file (``-``: standard input), which has no command-line size limit."""
    if args.prompt is not None:
        text, where = args.prompt, "--prompt"
    else:
        where = f"--prompt-file {args.prompt_file}"
        text = read_text_input(args.prompt_file, where)
    if not text:
        raise ValueError(f"{where}: the prompt is empty")
    return _utf8(text, where)


def _utf8(text: str, where: str) -> str:
    """``text``, refused with a ValueError naming ``where`` when it cannot be UTF-8 (bytes that were not UTF-8 on
    the command line come as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{where}: not UTF-8 text (character {error.start} is {text[error.start]!r})") from None
    return text


def run_eval(args: argparse.Namespace) -> int:
    from .model.checks import check_int
    from .training.data import TokenCorpus
    from .training.precision import resolve_eval_bf16
    from .training.validation import evaluate_corpus

    if args.task is not None:  # a long-context task (block_recurrent.tasks.commands), not bits per byte
        return run_task_eval(args)

    if args.max_tokens is not None:
        check_int("--max-tokens", args.max_tokens, 2)
    check_int("--batch-size", args.batch_size, 1)
    model, tokenizer = _load(args.checkpoint, args.device)
    corpus = TokenCorpus.from_documents(load_documents_for(args), tokenizer)  # --data, or the held-out split
    bf16 = resolve_eval_bf16(args.bf16, model.device, model.config.block_width, model.blocks_side_by_side)
    if args.ablate or args.positions:  # block_recurrent.training.diagnose
        return run_eval_diagnostics(args, model, corpus, _autocast(bf16, model.device))
    with _autocast(bf16, model.device):  # raises when nothing would be scored
        result = evaluate_corpus(model, corpus, max_tokens=args.max_tokens, batch_size=args.batch_size)
    if not math.isfinite(result["loss"]):  # (the weights are finite: checked on load)
        raise ValueError(f"--checkpoint {args.checkpoint}: the loss is {result['loss']} (try without --bf16)")
    print(f"loss {result['loss']:.4f} nats/token, {result['bpb']:.4f} bits/byte over {result['tokens']} tokens "
          f"({result['documents']} of {len(corpus)} documents)")
    return 0


COMMANDS = {"train": run_train, "generate": run_generate, "eval": run_eval, "tune": run_tune,
            "inspect": lambda args: run_inspect(args, _load)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    keep_freed_memory()  # every command runs steps that allocate the same tensors again (host_memory)
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError, ImportError, OSError) as error:
        print(f"brt: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a Ctrl-C the command did not handle itself (training handles the first)
        print("brt: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"brt: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
