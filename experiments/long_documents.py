"""Rec against Transformer-XL and the sliding window on long documents (the built-in corpus's packages, each one
document), at equal wall-clock: the paper's comparison in miniature.

    python experiments/long_documents.py measure                       # step times side by side, one process
    python experiments/long_documents.py train --runs rec-8blocks xl-8blocks --seeds 0 1 --budget 420 --jobs 2
    python experiments/long_documents.py diagnose --runs rec-8blocks --seeds 0 --drop state memory
    python experiments/long_documents.py report --plot docs/experiments/long_documents_positions.png

The record: docs/experiments/2026-12-05-long-documents.md.

Variants, all at the ``mini`` preset's width (128, 4 layers of 4 heads of 32, blocks of 16 bytes) and brt train's
settings (AdamW at 3e-3, the state cells at 0.1x, the write replayed where a pass is one block, bf16 autocast):
``rec`` (16 state vectors in layer 2, the LSTM gate +3), ``xl`` (the same model without recurrence: the previous
block cached) and ``slide`` (no recurrence and no cache: each token sees exactly the 16 before it, and one layer
more, as the paper's Slide:13 against 12). Shapes: ``1block`` (128 rows of one block per step, the segments of
every recipe so far) and ``8blocks`` (16 rows of eight blocks: the state's gradient spans eight writes, as the
paper's segments do); both read 2,048 bytes per step, as do ``4blocks`` and ``16blocks`` (8 rows of sixteen blocks:
the state's gradient spans sixteen writes). ``--preset hour``: the hour recipe's width and blocks (192,
blocks of 32, so 4,096 bytes per step) with mini's cell, in another ``--out``. ``--set FIELD=JSON`` changes a model
field of every run (a lever: ``num_state_vectors=32``, ``gate_keep_init=5.0``), also in another ``--out``: it is
recorded in results.jsonl and the report names the run by it ("rec@num_state_vectors=32-8blocks").

1. ``measure`` times each variant's training step (the trainer's own ``train_step``) side by side in one process,
   one thread, alternating, in CPU time, and writes runs/long-docs/step_times.json.
2. ``train`` gives each run ``--budget`` CPU seconds: max_steps = budget / its step time, so that runs match in
   wall-clock on a machine of equal load whatever other load there is while they run; each is then scored on the
   held-out packages (whole split and by position in the document, log-spaced to 1 MB) and appended to
   runs/long-docs/results.jsonl.
3. ``diagnose`` scores trained runs with the state / the memory dropped after every block, and measures the keep
   values and the loss gradient reaching the state up to 15 blocks back.
4. ``documents`` scores trained runs package by package; ``stream`` compares the runs' training streams (their
   logged bits per byte, unseen text while in the first epoch) at equal steps and at equal shares of the budget.
5. ``report`` prints the tables and plots the per-position curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Sequence

from harness import map_units, parse_sets

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "long-docs"

VARIANTS = {
    "rec": {},
    "xl": dict(recurrent_layers=(), read_recurrent_layers=None),
    "slide": dict(depth=5, recurrent_layers=(), read_recurrent_layers=None, attention_window="sliding"),
}
SHAPES = {"1block": (128, 1), "4blocks": (32, 4), "8blocks": (16, 8), "16blocks": (8, 16)}  # rows, blocks per segment
BUCKET = 1024  # positions are scored in buckets of this many bytes, pooled into log-spaced ranges
GRADIENT_SPAN = 16  # diagnose: the state gradient from a block's loss to the states up to 15 blocks before it


def one_thread() -> None:
    """A worker's set-up: one thread (two workers share the two cores), freed memory kept as brt keeps it."""
    import torch

    from block_recurrent import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()


# the model's width and block size: mini's (the record's runs), or the hour recipe's (width 192, blocks of 32) with
# mini's cell (the LSTM gate at +3, slow state cells), where a Rec step costs less against an XL step
PRESETS = {"mini": {}, "hour": dict(gate="lstm", gate_keep_init=3.0, state_cell_scale=0.1)}


def run_folder(out: str | Path, run: str, seed: int) -> Path:
    """Where ``train`` saves a run and the other commands read it."""
    return Path(out) / f"{run}-seed{seed}"


def configs(run: str, seed: int, steps: int, out: Path, data: str | None, preset: str = "mini",
            state_lr_scale: float | None = None, model_options: dict | None = None):
    """The model config and TrainConfig of ``run`` ("VARIANT-SHAPE"); ``state_lr_scale`` overrides brt train's,
    ``model_options`` (``--set``) the model config's fields after the preset and the variant."""
    from block_recurrent import BlockRecurrentConfig, TrainConfig

    variant, shape = run.split("-")
    rows, blocks = SHAPES[shape]
    width = BlockRecurrentConfig.from_name(preset).block_width
    model = BlockRecurrentConfig.from_name(preset, max_seq_len=width * blocks,
                                           **{**PRESETS[preset], **VARIANTS[variant], **(model_options or {})})
    train = TrainConfig(data=data, documents="package", batch_size=rows, max_steps=steps, seed=seed, bf16=True,
                        out_dir=str(run_folder(out, run, seed)), eval_every=0, checkpoint_every=0, sample_tokens=0,
                        final_eval=False, progress=False, keep_last=1, log_every=50)
    if state_lr_scale is not None:
        train = dataclasses.replace(train, state_lr_scale=state_lr_scale)
    return model, train


def held_out(data: str | None, with_names: bool = False):
    """The held-out packages as token tensors (with their names: ``(names, tensors)``)."""
    import torch

    from block_recurrent.training.data import ByteTokenizer, TokenCorpus
    from block_recurrent.training.packages import source_documents, split_source

    packages = split_source(source_documents(data, documents="package"), "package")[1]
    corpus = TokenCorpus.from_documents(packages, ByteTokenizer())
    tensors = [torch.from_numpy(corpus.document(i).astype("int64")) for i in range(len(corpus))]
    return ([p.name for p in packages], tensors) if with_names else tensors


# 1. step times, side by side


def measure(runs: list[str], rounds: int, data: str | None, out: Path, preset: str = "mini",
            model_options: dict | None = None) -> dict:
    from block_recurrent.training.trainer import Trainer

    one_thread()
    trainers = {}
    with tempfile.TemporaryDirectory() as folder:
        for run in runs:
            model, train = configs(run, 0, 10**6, Path(folder), data, preset, model_options=model_options)
            trainers[run] = Trainer(model, train)
        times = {run: [] for run in runs}
        for round_ in range(rounds):
            for run, trainer in trainers.items():
                began = time.process_time()
                trainer.train_step()
                if round_ >= 3:
                    times[run].append(time.process_time() - began)
        result = {}
        for run, trainer in trainers.items():
            spent = sorted(times[run])
            result[run] = {"step_s": spent[len(spent) // 2], "parameters": trainer.model.num_parameters()}
            trainer.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_times.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


# 2. training at equal budgets, then the held-out score by position


def train_one(unit: tuple) -> dict:
    run, seed, steps, out, data, preset, state_lr_scale, model_options = unit
    import torch

    from block_recurrent.inference.diagnostics import log_curve, whole
    from block_recurrent.inference.evaluation import evaluate_documents, position_curve
    from block_recurrent.persistence.checkpoint import from_pretrained
    from block_recurrent.training.trainer import train

    one_thread()
    model_config, config = configs(run, seed, steps, Path(out), data, preset, state_lr_scale, model_options)
    began, cpu = time.perf_counter(), time.process_time()
    last = train(model_config, config)
    trained, trained_cpu = time.perf_counter() - began, time.process_time() - cpu
    model = from_pretrained(config.out_dir)
    docs = held_out(data)
    began = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (blocks side by side: brt eval's auto is bf16 here)
        results = evaluate_documents(model, docs, bucket_size=BUCKET)
    record = {"run": run, "seed": seed, "steps": last["step"], "train_s": round(trained, 1),
              "train_cpu_s": round(trained_cpu, 1), "eval_s": round(time.perf_counter() - began, 1),
              "train_bpb": last.get("bpb"), "held_out_bpb": whole(results), "parameters": model.num_parameters(),
              "ranges": log_curve(results), "curve": position_curve(results), "documents": len(docs),
              "bytes": sum(len(d) for d in docs), "state_lr_scale": config.state_lr_scale,
              "model_options": model_options}
    append(Path(out) / "results.jsonl", record)  # as soon as it is done: a later failure loses nothing
    return record


# 3. what the trained runs carry


def diagnose_one(unit: tuple) -> dict:
    run, seed, drops, out, data = unit
    import torch

    from block_recurrent.inference.diagnostics import evaluate_ablated, keep_values, log_curve, state_gradients, whole
    from block_recurrent.persistence.checkpoint import from_pretrained

    one_thread()
    model = from_pretrained(run_folder(out, run, seed))
    docs = held_out(data)
    record = {"run": run, "seed": seed, "ablations": {}}
    for drop in drops:
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results = evaluate_ablated(model, docs, drop, bucket_size=BUCKET)
        record["ablations"][drop] = {"held_out_bpb": whole(results), "ranges": log_curve(results),
                                     "eval_s": round(time.perf_counter() - began, 1)}
    if model.config.recurrent_layers:
        sample = [d[:16384] for d in docs]  # the first 16 K of every held-out package
        record["keep"] = [{"layer": s.layer, "gate": s.gate, "kind": s.kind, "blocks": s.blocks,
                           "keep": s.keep.tolist()} for s in keep_values(model, sample)]
        # the loss gradient reaching the state 0-15 blocks back, 64 windows spread over the held-out packages
        record["state_gradient"] = [
            {"layer": g.layer, "through_memory": g.through_memory, "windows": g.windows, "norms": g.norms.tolist(),
             "median_shares": g.median_shares.tolist()}
            for through_memory in (True, False)
            for g in state_gradients(model, docs, span=GRADIENT_SPAN, through_memory=through_memory)]
    append(Path(out) / "diagnostics.jsonl", record)
    return record


# 4. per package, and the training stream


def documents_one(unit: tuple) -> dict:
    """Held-out bits per byte of a trained run, package by package (each from a fresh state)."""
    run, seed, out, data = unit
    import torch

    from block_recurrent.inference.evaluation import evaluate_documents
    from block_recurrent.persistence.checkpoint import from_pretrained

    one_thread()
    model = from_pretrained(run_folder(out, run, seed))
    names, docs = held_out(data, with_names=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results = evaluate_documents(model, docs)
    return {"run": run, "seed": seed, "packages": [
        {"name": name, "bytes": len(doc), "bpb": r.bits_per_byte} for name, doc, r in zip(names, docs, results)]}


def documents_table(records: list[dict]) -> str:
    """Packages as rows, runs as columns, and each run against the first."""
    head = [f"{r['run']} s{r['seed']}" for r in records]
    lines = ["| package | bytes | " + " | ".join(head) + " | " + " | ".join(f"{h} - {head[0]}" for h in head[1:]) + " |",
             "|---|---:|" + "---:|" * (2 * len(records) - 1)]
    for i, package in enumerate(records[0]["packages"]):
        bpbs = [r["packages"][i]["bpb"] for r in records]
        lines.append(f"| {package['name']} | {package['bytes']:,} | " + " | ".join(f"{b:.4f}" for b in bpbs) + " | "
                     + " | ".join(f"{b - bpbs[0]:+.4f}" for b in bpbs[1:]) + " |")
    return "\n".join(lines)


def stream_table(out: Path, runs: list[str], seeds: list[int], window: int = 500) -> str:
    """The training stream's bits per byte (the trainer's logged means: text the run had not trained on while the
    stream is in its first epoch), each run against the first: at equal steps, in windows of ``window`` steps, and
    at equal shares of each run's own budget (fifths of its wall-clock)."""
    import numpy as np

    lines = []
    for seed in seeds:
        logs = {}
        for run in runs:
            rows = [r for r in load(run_folder(out, run, seed) / "metrics.jsonl") if "bpb" in r]
            logs[run] = {k: np.array([r[k] for r in rows]) for k in ("step", "bpb", "elapsed_s", "tokens_seen")}
        first, others = runs[0], runs[1:]
        lines += [f"seed {seed}, equal steps:", "", "| steps | MB read | " + " | ".join(f"{o} - {first}" for o in others) + " |",
                  "|---:|---:|" + "---:|" * len(others)]
        last = min(int(log["step"].max()) for log in logs.values())
        for begin in range(0, last, window):
            inside = {run: (log["step"] > begin) & (log["step"] <= begin + window) for run, log in logs.items()}
            if not all(m.any() for m in inside.values()):
                continue
            base = logs[first]["bpb"][inside[first]].mean()
            read = logs[first]["tokens_seen"][inside[first]].max() / 1e6
            lines.append(f"| {begin}-{begin + window} | {read:.1f} | " + " | ".join(
                f"{logs[o]['bpb'][inside[o]].mean() - base:+.3f}" for o in others) + " |")
        lines += ["", f"seed {seed}, equal shares of the budget:", "", "| share | " + " | ".join(runs) + " |",
                  "|---|" + "---:|" * len(runs)]
        for k in range(5):
            cells = []
            for run in runs:
                elapsed = logs[run]["elapsed_s"]
                inside = (elapsed > k / 5 * elapsed.max()) & (elapsed <= (k + 1) / 5 * elapsed.max())
                cells.append(f"{logs[run]['bpb'][inside].mean():.3f}" if inside.any() else "-")
            lines.append(f"| {k / 5:.1f}-{(k + 1) / 5:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# 5. tables and plots


def append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:  # one short line per append: runs side by side do not interleave
        handle.write(json.dumps(record) + "\n")


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def range_middles(ranges: list[tuple]) -> list[float]:
    """Where to plot each (begin, end, bits, count) position range on a log axis: its geometric middle."""
    return [math.sqrt(max(b, 256) * (e if e else 2 * b)) for b, e, _, _ in ranges]


def finish_position_axes(axes, shape: str, ticks: list[int]) -> None:
    """A per-position panel's log x axis, labels, grid and legend."""
    from block_recurrent.inference.diagnostics import range_label

    axes.set_xscale("log")
    axes.set_xticks(ticks, [range_label(t, None).rstrip("+") for t in ticks])
    axes.set_title(f"{shape} per segment")
    axes.set_xlabel("position in the document (bytes, log-spaced ranges)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)


SEED_LINES = ("-", "--", ":", "-.")  # seeds 0, 1, 2, 3 (then again)


def labelled(run: str, record: dict) -> str:
    """A run's name in a report: "VARIANT-SHAPE", with the state cells' rate where it is not brt train's and the
    model fields it changed ("rec@cells3-1block", "rec@num_state_vectors=32-8blocks"), so that runs of several
    folders can share a table and a plot."""
    scale = record.get("state_lr_scale", 1.0)
    changes = ([f"cells{scale:g}"] if scale != 1.0 else []) + [
        f"{name}={json.dumps(value)}" for name, value in (record.get("model_options") or {}).items()]
    if not changes:
        return run
    variant, shape = run.split("-")
    return f"{variant}@{','.join(changes)}-{shape}"


def variant_and_shape(label: str) -> tuple[str, str]:
    """A report label's two parts; the shape follows the last "-" (a ``--set`` value may hold one: ``=-1.0``)."""
    variant, shape = label.rsplit("-", 1)
    return variant, shape


def report(out: Path, plot: str | None, also: Sequence[Path] = (), runs: Sequence[str] | None = None) -> str:
    """The tables of ``out``'s runs (and of the folders ``also``; only ``runs`` if given), and the per-position
    plots."""
    from block_recurrent.inference.diagnostics import (
        format_curves, format_keep, format_state_gradients, KeepSummary, StateGradient,
    )

    import torch

    results, step_ms, diagnostics = {}, {}, []
    for folder in (out, *also):
        found = {(r["run"], r["seed"]): r for r in load(folder / "results.jsonl")  # a later run of the same wins
                 if runs is None or r["run"] in runs}
        times = json.loads((folder / "step_times.json").read_text()) if (folder / "step_times.json").exists() else {}
        for (run, seed), r in found.items():
            results[labelled(run, r), seed] = r
            step_ms[labelled(run, r), seed] = times.get(run, {}).get("step_s", float("nan")) * 1e3
        for d in load(folder / "diagnostics.jsonl"):
            if runs is not None and d["run"] not in runs:
                continue
            diagnostics.append({**d, "run": labelled(d["run"], found.get((d["run"], d["seed"]), {}))})
    lines = ["| run | seed | parameters | steps | step ms (CPU, measured) | train s (wall) | held-out bits per byte |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for (run, seed), r in sorted(results.items()):
        lines.append(f"| {run} | {seed} | {r['parameters'] / 1e6:.2f} M | {r['steps']:,} | {step_ms[run, seed]:.1f} | "
                     f"{r['train_s']:.0f} | {r['held_out_bpb']:.4f} |")
    lines += ["", format_curves({f"{run} seed {seed}": (r["held_out_bpb"], [tuple(x) for x in r["ranges"]])
                                 for (run, seed), r in sorted(results.items())})]
    for d in diagnostics:
        base = results.get((d["run"], d["seed"]))
        rows = {}
        if base is not None:
            rows["carried (as trained)"] = (base["held_out_bpb"], [tuple(x) for x in base["ranges"]])
        for drop, a in d["ablations"].items():
            rows[f"{drop} dropped after every block"] = (a["held_out_bpb"], [tuple(x) for x in a["ranges"]])
        lines += ["", f"{d['run']} seed {d['seed']}:", "", format_curves(rows)]
        if d.get("keep"):
            summaries = [KeepSummary(k["layer"], k["gate"], k["kind"], torch.tensor(k["keep"], dtype=torch.float64),
                                     k["blocks"]) for k in d["keep"]]
            lines += ["", format_keep(summaries)]
        if d.get("state_gradient"):
            gradients = [StateGradient(g["layer"], torch.tensor(g["norms"], dtype=torch.float64), g["windows"],
                                       g["through_memory"],
                                       # (records before the medians were kept have none)
                                       torch.tensor(g["median_shares"], dtype=torch.float64)
                                       if "median_shares" in g else None)
                         for g in d["state_gradient"]]
            lines += ["", "the loss gradient reaching the state d blocks back, as a share of d = 0:", "",
                      format_state_gradients(gradients)]
    if plot and results:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shapes = sorted({variant_and_shape(run)[1] for run, _ in results}, key=list(SHAPES).index)
        figure, panels = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4.2), sharey=True, squeeze=False)
        colours = {variant: f"C{i}" for i, variant in enumerate(VARIANTS)}
        for run, _ in sorted(results):  # a colour for each variant beyond the three (another cells' rate, a --set)
            colours.setdefault(variant_and_shape(run)[0], f"C{len(colours)}")
        ticks = [b for b, _, _, _ in [tuple(x) for x in next(iter(results.values()))["ranges"]]][1::2]
        for axes, shape in zip(panels[0], shapes):  # one panel per shape, a colour per variant, a line style per seed
            for (run, seed), r in sorted(results.items()):
                variant, run_shape = variant_and_shape(run)
                if run_shape != shape:
                    continue
                ranges = [tuple(x) for x in r["ranges"]]
                axes.plot(range_middles(ranges), [bits for _, _, bits, _ in ranges], color=colours[variant],
                          marker="o", markersize=3, linestyle=SEED_LINES[seed % len(SEED_LINES)],
                          label=f"{variant} seed {seed}")
            finish_position_axes(axes, shape, ticks)
        panels[0][0].set_ylabel("held-out bits per byte")
        figure.tight_layout()
        figure.savefig(plot, dpi=120)

        # the same, as the difference from XL of the same shape and seed (below 0: better than XL)
        figure, panels = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4.2), sharey=True, squeeze=False)
        for axes, shape in zip(panels[0], shapes):
            for (run, seed), r in sorted(results.items()):
                variant, run_shape = variant_and_shape(run)
                xl = results.get((f"xl-{shape}", seed))
                if run_shape != shape or variant == "xl" or xl is None:
                    continue
                base = {(b, e): bits for b, e, bits, _ in [tuple(x) for x in xl["ranges"]]}
                ranges = [tuple(x) for x in r["ranges"] if (x[0], x[1]) in base]
                axes.plot(range_middles(ranges), [bits - base[(b, e)] for b, e, bits, _ in ranges],
                          color=colours[variant], marker="o", markersize=3,
                          linestyle=SEED_LINES[seed % len(SEED_LINES)], label=f"{variant} - xl, seed {seed}")
            axes.axhline(0, color="black", linewidth=0.8)
            finish_position_axes(axes, shape, ticks)
        panels[0][0].set_ylabel("bits per byte minus XL's (same shape and seed)")
        figure.tight_layout()
        gap = str(Path(plot).with_name(Path(plot).stem + "_against_xl" + Path(plot).suffix))
        figure.savefig(gap, dpi=120)
        lines += ["", f"wrote {gap}"]
        lines += ["", f"wrote {plot}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("measure", "train", "diagnose", "documents", "stream", "report"))
    runs = [f"{v}-{s}" for s in SHAPES for v in VARIANTS]
    parser.add_argument("--runs", nargs="+", choices=runs, default=None,
                        help="the runs to train, diagnose or score (the 1block and 8blocks ones if not given); "
                             "report: all if not given")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--budget", type=float, default=420.0, help="CPU seconds of training per run")
    parser.add_argument("--rounds", type=int, default=15, help="measure: steps per run (the first 3 not counted)")
    parser.add_argument("--max-steps", type=int, default=None, help="instead of the budget (to check the script)")
    parser.add_argument("--drop", nargs="*", choices=("state", "memory", "both"), default=["state", "memory"],
                        help="diagnose: what to drop after every block (none given: only the keep values and the "
                             "state gradient)")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side, one thread each")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--data", default=None, help="a folder of packages instead of the built-in corpus")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--also", nargs="+", default=[], help="report: more folders of runs, in the same tables")
    parser.add_argument("--preset", default="mini", choices=sorted(PRESETS), help="the model's width and blocks")
    parser.add_argument("--state-lr-scale", type=float, default=None,
                        help="train: the state cells' learning rate against the rest (brt train's default if not given)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="measure, train: a model config field for every run, e.g. num_state_vectors=32 or "
                             "gate_keep_init=5.0 (after the preset and the variant; recorded in results.jsonl and "
                             "named in the report); repeatable")
    args = parser.parse_args(argv)
    out = Path(args.out)
    selected = args.runs or [r for r in runs if r.endswith(("-1block", "-8blocks"))]  # (report takes every run if none is named)
    model_options = parse_sets(args.set)

    if args.command == "measure":
        result = measure(selected, args.rounds, args.data, out, args.preset, model_options)
        print("| run | parameters | step ms (CPU, 1 thread) | against xl of its shape |\n|---|---:|---:|---:|")
        for run, r in result.items():
            xl = result.get("xl-" + variant_and_shape(run)[1], r)
            print(f"| {run} | {r['parameters'] / 1e6:.2f} M | {r['step_s'] * 1e3:.1f} | "
                  f"{r['step_s'] / xl['step_s']:.3f} |")
    elif args.command == "train":
        times = json.loads((out / "step_times.json").read_text()) if args.max_steps is None else {}
        units = [(run, seed, args.max_steps or max(1, round(args.budget / times[run]["step_s"])), str(out), args.data,
                  args.preset, args.state_lr_scale, model_options) for seed in args.seeds for run in selected]
        print("steps: " + ", ".join(f"{unit[0]} seed {unit[1]}: {unit[2]}" for unit in units), flush=True)
        for result in map_units(train_one, units, args.jobs, start="spawn"):
            print(f"{result['run']} seed {result['seed']}: {result['steps']} steps, {result['train_s']:.0f} s, "
                  f"held-out {result['held_out_bpb']:.4f}", flush=True)
    elif args.command == "diagnose":
        units = [(run, seed, args.drop, str(out), args.data) for seed in args.seeds for run in selected]
        for record in map_units(diagnose_one, units, args.jobs, start="spawn"):
            print(f"{record['run']} seed {record['seed']}: " + ", ".join(
                f"{drop} dropped {a['held_out_bpb']:.4f}" for drop, a in record["ablations"].items()), flush=True)
    elif args.command == "documents":
        units = [(run, seed, str(out), args.data) for seed in args.seeds for run in selected]
        # checked before scoring any: the table needs every run, and scoring one takes minutes
        from block_recurrent.persistence.checkpoint import latest_checkpoint

        folders = [run_folder(out, run, seed) for run, seed, _, _ in units]
        missing = [folder.name for folder in folders if latest_checkpoint(folder) is None]
        if missing:
            parser.error(f"no saved model in {out} for: {', '.join(missing)} (train them first, or leave them out)")
        print(documents_table(list(map_units(documents_one, units, args.jobs, start="spawn"))))
    elif args.command == "stream":
        print(stream_table(out, selected, args.seeds))
    else:
        print(report(out, args.plot, [Path(folder) for folder in args.also], args.runs))


if __name__ == "__main__":
    main()
