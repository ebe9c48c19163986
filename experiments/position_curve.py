"""Rec against Transformer-XL and the sliding window, from runs of ``default_recipe.py``: held-out bits per byte
over the whole split and by position in the file.

    python experiments/default_recipe.py --only rec20 xl20 slide20 --seeds 0 1 --jobs 3
    python experiments/position_curve.py rec20 xl20 slide20 --plot docs/experiments/rec_xl_slide_positions.png

Reads runs/recipes/results.jsonl (the last result of every candidate and seed) and prints markdown tables:
per run, the whole-split score and wall-clock; per candidate, bits per byte in ranges of positions (every
held-out file that reaches a range counts its bytes there). With ``--plot``, the curve per 1 K bucket up to
32 K, one line per run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from block_recurrent.inference.diagnostics import pool_ranges, range_label

ROOT = Path(__file__).resolve().parents[1]

EDGES = [0, 1024, 4096, 8192, 16384, 32768]  # the ranges of docs/experiments/rec-xl-slide.md


def load(path: Path, names: list[str]) -> dict[tuple[str, int], dict]:
    runs = {}
    for line in path.read_text().splitlines():
        result = json.loads(line)
        if result["name"] in names and "positions" in result:
            runs[result["name"], result["seed"]] = result  # a later run of the same candidate and seed wins
    return runs


def tables(runs: dict[tuple[str, int], dict], names: list[str]) -> str:
    lines = ["| run | seed | steps | parameters | train s (threads) | held-out bits per byte |", "|---|---:|---:|---:|---:|---:|"]
    for (name, seed), r in sorted(runs.items(), key=lambda item: (names.index(item[0][0]), item[0][1])):
        lines.append(f"| {name} | {seed} | {r['steps']} | {r['parameters'] / 1e6:.2f} M | {r['train_s']:.0f} "
                     f"({r.get('threads', '?')}) | {r['held_out_bpb']:.4f} |")
    first = pool_ranges(next(iter(runs.values()))["positions"], EDGES[:-1])  # (the last edge closes the table)
    lines += ["", "| run | seed | " + " | ".join(range_label(b, e) for b, e, _, _ in first) + " |",
              "|---|---:|" + "---:|" * len(first)]
    for (name, seed), r in sorted(runs.items(), key=lambda item: (names.index(item[0][0]), item[0][1])):
        cells = [f"{bits:.3f}" for _, _, bits, _ in pool_ranges(r["positions"], EDGES[:-1])]
        lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    lines.append("| bytes scored | | " + " | ".join(f"{n:,}" for _, _, _, n in first) + " |")
    return "\n".join(lines)


def plot(runs: dict[tuple[str, int], dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    colours = {}
    for (name, seed), r in sorted(runs.items()):
        colour = colours.setdefault(name, f"C{len(colours)}")
        starts = [start / 1024 for start, _, _ in r["positions"]]
        axes.plot(starts, [bpb for _, bpb, _ in r["positions"]], color=colour, linestyle="-" if seed == 0 else "--",
                  label=f"{name} seed {seed}")
    axes.set_xlabel("position in the file (K bytes, bucket start)")
    axes.set_ylabel("held-out bits per byte")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", help="candidates of default_recipe.py")
    parser.add_argument("--results", default=str(ROOT / "runs" / "recipes" / "results.jsonl"))
    parser.add_argument("--plot", default=None, help="write the per-position curve here (needs matplotlib)")
    args = parser.parse_args(argv)
    runs = load(Path(args.results), args.names)
    if not runs:
        sys.exit(f"no run of {', '.join(args.names)} with a per-position curve in {args.results}")
    print(tables(runs, args.names))
    if args.plot:
        plot(runs, Path(args.plot))
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
