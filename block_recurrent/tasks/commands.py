"""``brt tune`` and ``brt eval --task``: the long-context tasks on a checkpoint, from the command line.

    brt tune --task passkey --checkpoint runs/brt --out-dir runs/passkey --max-distance 1024 --max-steps 300
    brt eval --task passkey --checkpoint runs/passkey --distances 256 1024 4096 16384 --heatmap passkey.png
    brt tune --task passkey --preset mini --model-option block_width=64 --model-option max_seq_len=64 ...   # from scratch
    brt tune ... --resume   # the same command again, after a stop: goes on from the newest checkpoint in --out-dir

The parsers and the two command functions live here so that ``block_recurrent.cli`` only registers them.
Everything heavy is imported inside the functions: importing this module (as ``brt`` does) loads no trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from ..training.train_config import finite_number

TASK_NAMES = ("passkey", "mqar", "qa1", "qa2")
TUNE_FILE = "tune.json"

TUNE_HELP = {
    "max_steps": "optimiser steps",
    "batch_size": "examples per step",
    "lr": "peak learning rate",
    "state_lr_scale": "the recurrent state cells' parameters learn at this multiple of --lr (on top of the model's "
                      "state_cell_scale)",
    "min_distance": "shortest haystack (tokens) trained on",
    "max_distance": "longest haystack (tokens) trained on",
    "curriculum_steps": "grow the longest haystack from --min-distance to --max-distance over these steps (0: off)",
    "curriculum_loss": "count a curriculum step only while the last 20 steps' mean loss is at most this (nats per "
                       "token; 0: every step counts)",
    "loss": "answer: loss on the answers only; all: language-model loss on the whole text",
    "backward_every": "back-propagate through this many segments at a time (0: the whole example)",
}


def _add_task_choice(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--task", choices=TASK_NAMES, required=required, default=None,
                        help="long-context task: passkey (Landmark), mqar (multi-query recall), qa1 / qa2 (bAbI facts)")
    parser.add_argument("--haystack", choices=("filler", "corpus"), default=None,
                        help="text the needles hide in: Landmark's filler or the built-in corpus (default: filler for "
                             "passkey and mqar, corpus for qa1 and qa2)")
    parser.add_argument("--task-option", action="append", default=[], metavar="NAME=JSON",
                        help="a task setting, e.g. digits=5 (passkey), num_pairs=8 / value_len=2 (mqar), num_facts=6 "
                             "/ num_questions=4 / num_people=2 (qa1, qa2); repeatable")


def add_tune_command(commands) -> None:
    """Register ``brt tune`` on the ``brt`` subparsers."""
    from .tuning import TuneConfig

    tune = commands.add_parser("tune", help="fine-tune a checkpoint on a long-context task at short distances")
    _add_task_choice(tune, required=True)
    start = tune.add_mutually_exclusive_group(required=True)
    start.add_argument("--checkpoint", help="run folder, step folder or save_pretrained folder")
    start.add_argument("--preset", help="train a fresh model of this preset from scratch (bytes as tokens), e.g. mini")
    tune.add_argument("--model-option", action="append", default=[], metavar="FIELD=JSON",
                      help="with --preset: a config field, e.g. block_width=64; repeatable")
    tune.add_argument("--out-dir", required=True, help="where the tuned model is saved (save_pretrained + tune.json)")
    tune.add_argument("--device", default="auto")
    tune.add_argument("--save-every", type=int, default=100, metavar="STEPS",
                      help="every this many steps, a checkpoint in --out-dir (the newest kept; the tuned model "
                           "replaces it at the end) that --resume goes on from (0: none; default: 100)")
    tune.add_argument("--resume", action="store_true",
                      help="go on from the newest checkpoint of a stopped brt tune in --out-dir, exactly as if it had "
                           "not stopped; give the command it was started with")
    group = tune.add_argument_group("tuning settings (TuneConfig)")
    for field in dataclasses.fields(TuneConfig):
        kind = finite_number if isinstance(field.default, float) else type(field.default)
        group.add_argument("--" + field.name.replace("_", "-"), type=kind, default=field.default,
                           metavar=field.name.upper(),
                           help=f"{TUNE_HELP.get(field.name, '')} (default: {field.default})")


def add_eval_task_options(evaluate: argparse.ArgumentParser) -> None:
    """Add ``--task`` and its options to ``brt eval``."""
    group = evaluate.add_argument_group("long-context tasks (with --task: exact match by distance and depth)")
    group.add_argument("--task", choices=TASK_NAMES, default=None,
                       help="score a task instead of bits per byte: passkey, mqar, qa1, qa2")
    group.add_argument("--haystack", choices=("filler", "corpus"), default=None,
                       help="filler (Landmark's) or corpus (the built-in corpus's held-out text)")
    group.add_argument("--task-option", action="append", default=[], metavar="NAME=JSON", help="a task setting")
    group.add_argument("--distances", type=int, nargs="+", default=[64, 256, 1024, 4096],
                       help="haystack lengths in tokens (default: 64 256 1024 4096)")
    group.add_argument("--depths", type=finite_number, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                       help="needle depths, 0 (farthest) to 1 (next to the question)")
    group.add_argument("--samples", type=int, default=20, help="examples per distance (default: 20)")
    group.add_argument("--seed", type=int, default=0, help="seed of the examples (default: 0)")
    group.add_argument("--heatmap", default=None, metavar="PNG", help="write the distance x depth heat map here")
    group.add_argument("--json", default=None, metavar="FILE", help="write the scores as JSON here")


def task_options(items: list[str], option: str = "--task-option") -> dict[str, Any]:
    """``NAME=JSON`` strings (given to ``option``) as keyword arguments (a bare word is taken as a string)."""
    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"{option} takes NAME=JSON, got {item!r}")
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    return options


def load_model(checkpoint: str, device: str):
    """(model, tokenizer, the tokenizer's file or None, the folder read) of a checkpoint (a run folder: its newest
    complete one)."""
    from ..persistence.checkpoint import TOKENIZER_FILE, load_pretrained
    from ..training.data import load_tokenizer
    from ..training.distributed import resolve_device

    model, folder = load_pretrained(checkpoint, device=resolve_device(device))
    tokenizer_file = Path(folder) / TOKENIZER_FILE
    tokenizer_file = tokenizer_file if tokenizer_file.exists() else None
    return model, load_tokenizer(tokenizer_file), tokenizer_file, Path(folder)


def write_tune_summary(folder: Path, task: dict[str, Any], **details: Any) -> None:
    """``tune.json`` beside a tuned model: ``task`` (a task's ``describe()``), which ``brt eval --task`` scores the
    folder on by default (:func:`tuned_task`), and the tuning's ``details`` (settings, log)."""
    from ..persistence.storage import replace_file

    replace_file(Path(folder) / TUNE_FILE, json.dumps({"task": task, **details}, indent=2) + "\n")


def tuned_task(folder: Path, task: str, training: bool = False) -> dict[str, Any]:
    """The settings ``brt tune`` trained ``folder``'s model on (its ``tune.json``), when that was ``task``: the
    haystack and the task options, the defaults of ``brt tune`` and ``brt eval --task`` on it. Empty for any other
    folder. Where the task scored differs from the one trained on (``train_task``, written by
    ``experiments/long_context_tasks.py``), ``training`` picks the one trained on."""
    path = folder / TUNE_FILE
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
        described = summary.get("train_task", summary["task"]) if training else summary["task"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a brt tune summary ({error!r}); move it away to go on without it") from None
    if not isinstance(described, dict) or described.get("task") != task:
        return {}
    return {name: value for name, value in described.items() if name != "task"}


def task_settings(
    args: argparse.Namespace, folder: Path | None, training: bool = False
) -> tuple[str | None, dict[str, Any]]:
    """(haystack, task options) for ``brt tune`` (``training``) and ``brt eval --task``: a model tuned by ``brt tune``
    goes on with the task as it was tuned (the text's format: separators, digits, the preamble, read from
    ``folder``'s ``tune.json``, and printed); ``--haystack`` and ``--task-option`` override."""
    tuned = {} if folder is None else tuned_task(folder, args.task, training)
    tuned_haystack = tuned.pop("haystack", None)
    haystack = args.haystack or tuned_haystack
    options = {**tuned, **task_options(args.task_option)}
    if tuned:
        print(f"{args.task} as tuned ({folder / TUNE_FILE}; --haystack and --task-option override): " + ", ".join(
            f"{name}={json.dumps(value)}" for name, value in [("haystack", haystack), *options.items()]))
    return haystack, options


def fresh_model(preset: str, changes: dict[str, Any], seed: int, device: str):
    """(model, tokenizer, None): a preset's model with ``changes``, initialised from ``seed``, bytes as tokens."""
    import torch

    from ..model.config import BlockRecurrentConfig
    from ..model.model import BlockRecurrentModel
    from ..training.data import load_tokenizer
    from ..training.distributed import resolve_device

    config = BlockRecurrentConfig.from_name(preset, **changes)
    torch.manual_seed(seed)
    return BlockRecurrentModel(config).to(resolve_device(device)), load_tokenizer(None), None


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """``brt tune``'s output folder: new, an earlier brt tune's (replaced), or with ``resume`` a stopped one's."""
    from ..persistence.checkpoint import step_directories

    stopped = step_directories(out_dir)
    if resume and not stopped:
        raise ValueError(f"--resume: {out_dir} holds no checkpoint of a stopped brt tune to go on from")
    if stopped and not resume:
        raise ValueError(f"--out-dir {out_dir} holds a stopped brt tune (newest checkpoint: {stopped[-1].name}): add "
                         "--resume to go on from it, or give a new folder")
    # save_pretrained replaces the folder whole: never a run folder or a checkpoint by mistake
    if not stopped and out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / TUNE_FILE).exists():
        raise ValueError(f"--out-dir {out_dir} exists and holds something other than an earlier brt tune's output; "
                         "give a new folder")


def tuning_identity(model, task, config) -> dict[str, dict[str, Any]]:
    """What a resumed brt tune must share with the stopped one, as its checkpoint holds it (JSON's lists for tuples)."""
    return json.loads(json.dumps({"model config": model.config.to_dict(), "task": task.describe(),
                                  "settings": config.to_dict()}))


def resume_tuning(out_dir: Path, model, config, task) -> tuple[Any, dict[str, Any]]:
    """(progress, optimiser state) of the newest intact checkpoint of a stopped brt tune in ``out_dir``, its weights
    loaded into ``model``, after checking that the run goes on with the model, settings and task it was started
    with."""
    import torch

    from ..persistence.checkpoint import load_state, newest_intact_checkpoint
    from ..persistence.storage import remove_leftovers
    from .tuning import TuneProgress

    remove_leftovers(out_dir)  # a write cut short by the stop
    saved = newest_intact_checkpoint(out_dir)
    tuning = saved.trainer.get("tuning")
    if not isinstance(tuning, dict) or "progress" not in tuning:
        raise ValueError(f"--resume: {saved.path} is not a brt tune checkpoint")
    for name, now in tuning_identity(model, task, config).items():
        then = tuning.get(name)
        if not isinstance(then, dict):
            raise ValueError(f"--resume: {saved.path} is damaged (no {name})")
        if then != now:
            changed = sorted(k for k in set(now) | set(then) if then.get(k) != now.get(k))
            raise ValueError(f"--resume: not the stopped run's {name} ({', '.join(changed)}); give the command it "
                             "was started with")
    progress = TuneProgress.from_dict(tuning["progress"])
    if progress.step != saved.trainer.get("step"):
        raise ValueError(f"--resume: {saved.path} is damaged (progress at step {progress.step})")
    load_state(model, saved.weights, saved.path)
    if "torch_rng" in saved.tensors:  # dropout's draws, where the model has dropout
        torch.set_rng_state(saved.tensors["torch_rng"])
    print(f"resuming from {saved.path} (step {progress.step} of {config.max_steps})")
    return progress, saved.optimizer


def run_tune(args: argparse.Namespace) -> int:
    import torch

    from ..persistence.checkpoint import save_pretrained, save_training_checkpoint
    from . import make_task
    from .tuning import TuneConfig, tune

    out_dir = Path(args.out_dir)
    check_out_dir(out_dir, args.resume)
    config = TuneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TuneConfig)})
    model_options = task_options(args.model_option, "--model-option")
    folder = None
    if args.preset is not None:
        model, tokenizer, tokenizer_file = fresh_model(args.preset, model_options, config.seed, args.device)
    elif model_options:
        raise ValueError("--model-option changes a fresh model's config: give it with --preset, not --checkpoint")
    else:
        model, tokenizer, tokenizer_file, folder = load_model(args.checkpoint, args.device)
    haystack, options = task_settings(args, folder, training=True)
    # the corpus haystack of training comes from the training files; brt eval --task reads the held-out ones
    task = make_task(args.task, tokenizer, haystack, "train", **options)
    print(f"tuning on {args.task} ({json.dumps(task.describe())}), distances {config.min_distance}-"
          f"{config.max_distance}, {config.max_steps} steps")

    def log(record: dict[str, Any]) -> None:
        print(f"step {record['step']}: loss {record['loss']:.4f}, distance {record['distance']:.0f} (mean; largest "
              f"{record['largest']}), lr {record['lr']:.2e}, {record['seconds']:.0f} s", flush=True)

    progress = optimizer_state = None
    if args.resume:
        progress, optimizer_state = resume_tuning(out_dir, model, config, task)

    def save(progress, optimizer) -> None:
        tuning = {**tuning_identity(model, task, config), "progress": progress.to_dict()}
        save_training_checkpoint(out_dir, progress.step, model=model, optimizer=optimizer, trainer={"tuning": tuning},
                                 tensors={"torch_rng": torch.get_rng_state()}, keep_last=1,
                                 tokenizer_file=tokenizer_file)

    records = tune(model, task, config, log=log, save=save, save_every=args.save_every, resume=progress,
                   optimizer_state=optimizer_state)
    save_pretrained(model, out_dir, tokenizer_file=tokenizer_file)
    write_tune_summary(out_dir, task.describe(), checkpoint=args.checkpoint, preset=args.preset,
                       model_options=model_options, config=config.to_dict(), log=records)
    print(f"saved to {out_dir}")
    return 0


def load_scored_task(args: argparse.Namespace, device: str, **options: Any):
    """(model, task): ``args.checkpoint``'s model and the task ``brt eval --task`` scores it on, from the held-out
    text: as tuned, where ``brt tune`` made the model (:func:`task_settings`), ``--haystack``, ``--task-option``
    and then ``options`` overriding."""
    from . import make_task

    model, tokenizer, _, folder = load_model(args.checkpoint, device)
    haystack, tuned = task_settings(args, folder)
    return model, make_task(args.task, tokenizer, haystack, "validation", **{**tuned, **options})


def run_task_eval(args: argparse.Namespace) -> int:
    import torch

    from .scoring import plot_heatmap, score

    if getattr(args, "positions", False):
        raise ValueError("--positions scores documents by position; with --task use --distances and --depths")
    model, task = load_scored_task(args, args.device)
    # float32 unless --bf16 is given: an argmax between two near-equal digits may flip under bf16
    runs = {}  # drop -> scores, the same examples each time
    for drop in [None, *(args.ablate or [])]:
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bool(args.bf16)):
            runs[drop] = score(model, task, args.distances, depths=args.depths, samples=args.samples,
                               seed=args.seed, batch_size=args.batch_size, drop=drop)
    scores = runs[None]
    print(f"{args.task}: exact match by distance (haystack tokens) and depth; chance {scores.chance:.3g}")
    print(scores.table())
    for drop, ablated in list(runs.items())[1:]:
        print(f"\n{drop} dropped after every block:")
        print(ablated.table())
    if len(runs) > 1:
        print("\n" + ablation_table(runs))
    if args.json is not None:
        record = scores.to_dict()
        if len(runs) > 1:
            record["ablations"] = {drop: ablated.to_dict() for drop, ablated in list(runs.items())[1:]}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    if args.heatmap is not None:
        written = plot_heatmap(scores, args.heatmap)
        if written is not None:
            print(f"heat map: {written}")
    return 0


def ablation_table(runs: dict) -> str:
    """Exact match by distance with everything carried and with each drop side by side (a markdown table);
    ``runs`` maps a drop (None first: carried) to its TaskScores on the same examples."""
    names = ["carried" if drop is None else f"{drop} dropped" for drop in runs]
    lines = ["| distance | " + " | ".join(names) + " |", "|" + "---:|" * (1 + len(names))]
    columns = [scores.by_distance() for scores in runs.values()]
    for j, distance in enumerate(next(iter(runs.values())).distances):
        lines.append(f"| {distance} | " + " | ".join(f"{column[j][1]:.3f}" for column in columns) + " |")
    return "\n".join(lines)
