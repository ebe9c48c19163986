"""Rec against Transformer-XL on a long-context task: train from scratch (or fine-tune) at short distances, score
far beyond them, by distance and depth.

    python experiments/long_context_tasks.py --task mqar --seeds 2 --steps 400 --out runs/long-context
    python experiments/long_context_tasks.py --summarize runs/long-context --reach 128   # seeds pooled

Each model is ``--preset`` with ``--set FIELD=JSON`` overrides; "xl" is the same config with
``recurrent_layers=()`` (no state: Transformer-XL), "slide" that with a sliding window of one block and one layer
more (the paper's Slide:N+1). Each (model, seed) unit builds the model from the seed,
runs :func:`block_recurrent.tasks.tune` on fresh examples of ``--task`` (``--task-option NAME=JSON``), then
:func:`block_recurrent.tasks.score` on the same held-out examples for every model (seeded by the distance, not by
the unit). One torch thread per unit, ``--jobs`` units side by side. Writes ``results.json`` and a heat map per
unit into ``--out``, and prints the tables. ``--summarize DIR`` reads a ``results.json``, draws each model's heat
map with the seeds pooled and prints exact match by distance per seed, and over the answers whose needle lies more
than ``--reach`` tokens before them (every pair farther back than XL's layers x 2 blocks can see).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from block_recurrent import BlockRecurrentConfig, BlockRecurrentModel, keep_freed_memory, save_pretrained  # noqa: E402
from block_recurrent.tasks import TaskScores, TuneConfig, make_task, plot_heatmap, score, tune  # noqa: E402
from block_recurrent.tasks.commands import write_tune_summary  # noqa: E402


def run_unit(unit: dict) -> dict:
    torch.set_num_threads(1)
    keep_freed_memory()  # as brt does
    torch.manual_seed(unit["seed"])
    config = BlockRecurrentConfig.from_name(unit["preset"], **unit["overrides"])
    if unit["model"] in ("xl", "slide"):
        config = config.replace(recurrent_layers=(), read_recurrent_layers=None)
    if unit["model"] == "slide":  # the paper's Slide:N+1: a sliding window of one block, one layer more
        config = config.replace(attention_window="sliding", depth=config.depth + 1)
    model = BlockRecurrentModel(config)
    task = make_task(unit["task"], haystack=unit["haystack"], split="train",
                     **{**unit["task_options"], **unit["train_task_options"]})
    began = time.perf_counter()
    name = f"{unit['model']} seed {unit['seed']}"
    progress = lambda r: print(f"{name}: step {r['step']} loss {r['loss']:.3f} largest distance {r['largest']} "
                               f"{r['seconds']:.0f} s", flush=True)  # to watch a long run
    log = tune(model, task, TuneConfig(**unit["tune"], seed=unit["seed"]), log=progress)
    trained = time.perf_counter() - began
    held_out = make_task(unit["task"], haystack=unit["haystack"], split="validation", **unit["task_options"])
    if unit["save"]:  # to score again later, e.g. brt eval --task mqar --checkpoint DIR --distances 4096
        folder = save_pretrained(model, Path(unit["out"]) / "models" / f"{unit['model']}-seed{unit['seed']}")
        # brt tune's summary, with the task as scored here: brt eval --task scores the folder the same way
        write_tune_summary(folder, held_out.describe(), train_task=task.describe(), checkpoint=None,
                           preset=unit["preset"], model_options=unit["overrides"], config=unit["tune"], log=log)
    scores = score(model, held_out, unit["distances"], samples=unit["samples"], seed=10_000, batch_size=32)
    heatmap = Path(unit["out"]) / f"{unit['task']}-{unit['model']}-seed{unit['seed']}.png"
    plot_heatmap(scores, heatmap, title=f"{unit['task']}, {unit['model']}, seed {unit['seed']}: exact match")
    return {"model": unit["model"], "seed": unit["seed"], "parameters": model.num_parameters(),
            "train_seconds": round(trained, 1), "score_seconds": round(time.perf_counter() - began - trained, 1),
            "log": log, "scores": scores.to_dict(), "table": scores.table()}


def summarize(folder: Path, reach: int) -> None:
    """Pooled heat maps and the per-seed tables of a results.json (see the module docstring)."""
    results = json.loads((folder / "results.json").read_text())["results"]
    pooled: dict[str, list] = {}
    for r in results:
        pooled.setdefault(r["model"], []).append(r)
    print(f"| model | seed | exact match by distance {results[0]['scores']['distances']} | answers at least {reach} "
          "tokens back: exact match (answers) |")
    print("|---|---:|---|---|")
    for model, runs in pooled.items():
        first = runs[0]["scores"]
        depths, distances = np.asarray(first["depths"]), np.asarray(first["distances"])
        # a depth row holds needles up to its bin's upper edge, so at least (1 - edge) * distance tokens back
        edges = np.append((depths[1:] + depths[:-1]) / 2, 1.0)
        far = (1 - edges)[:, None] * distances[None, :] >= reach
        correct, total = 0, 0
        for r in runs:
            c, t = np.asarray(r["scores"]["correct"]), np.asarray(r["scores"]["total"])
            correct, total = correct + c, total + t
            by = ", ".join(f"{x['exact_match']:.3f}" for x in r["scores"]["by_distance"])
            print(f"| {model} | {r['seed']} | {by} | {c[far].sum() / t[far].sum():.3f} ({t[far].sum()}) |")
        scores = TaskScores(first["task"], first["chance"], tuple(distances.tolist()), tuple(depths.tolist()),
                            correct, total, np.zeros(len(distances)), np.zeros(len(distances)))
        seeds = ", ".join(str(r["seed"]) for r in runs)
        plot_heatmap(scores, folder / f"{first['task']['task']}-{model}-pooled.png",
                     title=f"{first['task']['task']}, {model}, seeds {seeds} pooled: exact match")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mqar")
    parser.add_argument("--task-option", action="append", default=[], metavar="NAME=JSON")
    parser.add_argument("--train-task-option", action="append", default=[], metavar="NAME=JSON",
                        help="a task option for training only (e.g. num_questions=4), over --task-option")
    parser.add_argument("--haystack", default="filler")
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON")
    parser.add_argument("--models", nargs="+", default=["rec", "xl"], choices=["rec", "xl", "slide"])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--state-lr-scale", type=float, default=1.0,
                        help="on top of the model's state_cell_scale (0.1 by default)")
    parser.add_argument("--train-distances", type=int, nargs=2, default=[0, 128], metavar=("MIN", "MAX"))
    parser.add_argument("--curriculum-steps", type=int, default=0)
    parser.add_argument("--curriculum-loss", type=float, default=0.0)
    parser.add_argument("--loss", default="answer", choices=["answer", "all"])
    parser.add_argument("--distances", type=int, nargs="+", default=[16, 64, 128, 256, 512, 1024])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="runs/long-context")
    parser.add_argument("--save", action="store_true",
                        help="keep each trained model in OUT/models/MODEL-seedN (save_pretrained, and a tune.json with "
                             "the task as scored here: brt eval --task scores it the same way)")
    parser.add_argument("--summarize", default=None, metavar="DIR", help="summarize DIR/results.json instead")
    parser.add_argument("--reach", type=int, default=128, help="with --summarize: tokens the baseline can see")
    args = parser.parse_args()
    if args.summarize is not None:
        summarize(Path(args.summarize), args.reach)
        return

    def pairs(items):
        return {name: json.loads(value) for name, _, value in (item.partition("=") for item in items)}

    tune_settings = dict(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         state_lr_scale=args.state_lr_scale, min_distance=args.train_distances[0],
                         max_distance=args.train_distances[1], curriculum_steps=args.curriculum_steps,
                         curriculum_loss=args.curriculum_loss,
                         loss=args.loss, log_every=50)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    units = [dict(model=m, seed=s, task=args.task, task_options=pairs(args.task_option),
                  train_task_options=pairs(args.train_task_option), haystack=args.haystack,
                  preset=args.preset, overrides=pairs(args.set), tune=tune_settings, distances=args.distances,
                  samples=args.samples, out=args.out, save=args.save)
             for s in range(args.first_seed, args.first_seed + args.seeds) for m in args.models]
    began = time.time()
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        results = pool.map(run_unit, units, chunksize=1)
    (Path(args.out) / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    for r in results:
        losses = ", ".join(f"{x['loss']:.2f}" for x in r["log"])
        print(f"\n{r['model']} seed {r['seed']} ({r['parameters']:,} parameters; trained {r['train_seconds']:.0f} s, "
              f"scored {r['score_seconds']:.0f} s); training loss every 50 steps: {losses}")
        print(r["table"])
    print(f"\nchance {results[0]['scores']['chance']:.3g}; wall time {time.time() - began:.0f} s")


if __name__ == "__main__":
    main()
