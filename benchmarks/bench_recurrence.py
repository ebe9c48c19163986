"""What the recurrence costs in a training step: Rec against XL (the same model with ``recurrent_layers=()``) at
``mini``'s and the hour recipe's shapes, on the CPU, with the cost split into the state's read, its write and the
replayed write.

    python benchmarks/bench_recurrence.py                       # every shape but paper, one thread, 12 rounds
    python benchmarks/bench_recurrence.py --shapes mini --profile   # and torch.profiler's top operators
    git archive 8d768d5 block_recurrent | tar -x -C /tmp/before    # an older tree, to compare with:
    python benchmarks/bench_recurrence.py --baseline /tmp/before    # its steps alternate with this tree's

A step is what the trainer does: truncated back-propagation over the segment (``forward_backward``; the write
replayed where each backward pass is one block, as ``brt train`` does), gradient clipping, fused AdamW, under bf16
autocast where it is native. Per shape, five set-ups alternate step by step in one process (so that other load on
the machine hits them alike), and the median of each is reported:

- ``xl``: no recurrence;
- ``read``: the recurrent model whose write is replaced by keeping the state (views, reads and the wider output
  projection, no write);
- ``write``: the recurrent model without the replay;
- ``rec``: the recurrent model as trained (with the replay where the trainer replays);
- differences: read = read - xl, write = write - read, replay = rec - write (the replay adds the write's
  backward: a replayed block leaves its own write to the next pass).

With ``--baseline DIR`` (a folder holding another ``block_recurrent`` tree) the xl and rec set-ups of that tree
alternate with this tree's in the same process, for a before/after table that the machine's load hits alike.

The record: docs/experiments/2026-12-05-long-documents.md.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from block_recurrent.host_memory import keep_freed_memory  # noqa: E402
from block_recurrent.training.precision import native_bf16  # noqa: E402
from block_recurrent.training.trainer import fused_adamw_supported  # noqa: E402

# shape: (preset, model changes, rows, whether the trainer replays the write)
SHAPES = {
    "mini": ("mini", {}, 128, True),  # brt train's default: 128 rows x one block of 16
    "mini-8blocks": ("mini", dict(max_seq_len=128), 16, False),  # 16 rows x 8 blocks of 16
    "mini-16blocks": ("mini", dict(max_seq_len=256), 8, False),  # 8 rows x 16 blocks (the long-documents runs)
    "hour": ("hour", {}, 128, False),  # the hour recipe: 128 rows x one block of 32, no replay
    "hour-replay": ("hour", {}, 128, True),
    "hour-4blocks": ("hour", dict(max_seq_len=128), 32, False),
    # the paper's model (one recurrent layer of twelve, width 1,024, 512 states), one row of one block of 512: where
    # the products dominate. Seconds per step: pass --shapes paper --rounds 6
    "paper": ("paper", dict(max_seq_len=512), 1, False),
}
SETUPS = ("xl", "read", "write", "rec")


def load_tree(package: str) -> SimpleNamespace:
    """What a step needs from a ``block_recurrent`` tree importable as ``package``."""
    module = lambda name: importlib.import_module(f"{package}.{name}")
    return SimpleNamespace(
        Config=module("model.config").BlockRecurrentConfig, Model=module("model.model").BlockRecurrentModel,
        SegmentRunner=module("training.segments").SegmentRunner,
        passes_one_block=module("training.segments").passes_one_block,
        parameter_groups=module("training.trainer").parameter_groups,
    )


def baseline_tree(folder: str, into: Path) -> SimpleNamespace:
    """The tree in ``folder``/block_recurrent, copied as the package ``block_recurrent_baseline`` (its modules
    import each other relatively, so the copy runs its own code beside this tree's)."""
    shutil.copytree(Path(folder) / "block_recurrent", into / "block_recurrent_baseline")
    sys.path.insert(0, str(into))
    return load_tree("block_recurrent_baseline")


def build(tree: SimpleNamespace, preset: str, changes: dict, setup: str):
    torch.manual_seed(0)
    config = tree.Config.from_name(preset, **changes)
    if setup == "xl":
        config = config.replace(recurrent_layers=(), read_recurrent_layers=None)
    model = tree.Model(config)
    if setup == "read":
        for cell in model.cells:
            cell.write = lambda view, *block: view.state  # the state kept as it is: no write at all
    return model


class Setup:
    """One model with its optimiser and carried state, stepping on the same tokens."""

    def __init__(self, tree: SimpleNamespace, preset: str, changes: dict, rows: int, replay: bool, setup: str):
        self.model = build(tree, preset, changes, setup)
        config = self.model.config
        self.replay = replay and setup == "rec" and tree.passes_one_block(config, 1)
        self.runner = tree.SegmentRunner(self.model)
        self.optimizer = torch.optim.AdamW(tree.parameter_groups(self.model, 0.1, 0.1), lr=1e-3,
                                           fused=fused_adamw_supported(torch.device("cpu")))
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, 256, (rows, config.max_seq_len + 1), generator=generator)
        self.state = self.written = None

    def step(self, autocast) -> float:
        """One step; returns the CPU time it took (the process's, all threads): waits for a core that other
        processes hold do not count, so that a loaded machine changes the figures less than the wall-clock."""
        began = time.process_time()
        with autocast:
            result = self.runner.forward_backward(self.tokens, state=self.state, replay_write=self.replay,
                                                  written_from=self.written)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state, self.written = result.state, result.written_from
        return time.process_time() - began


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def profile(setup: Setup, autocast, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for _ in range(2):
        setup.step(autocast)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            setup.step(autocast)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=[s for s in SHAPES if s != "paper"], choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=12, help="steps of each set-up (the first 2 not counted)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: where native, as brt train)")
    parser.add_argument("--profile", action="store_true", help="also print the Rec step's top operators")
    parser.add_argument("--baseline", default=None, help="a folder holding another block_recurrent tree: before/after")
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="glibc's malloc keeps freed memory, as brt does (block_recurrent.host_memory); compare "
                             "with a run of --no-keep-freed-memory")
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    bf16 = native_bf16(torch.device("cpu")) if args.bf16 is None else args.bf16
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    trees = {"": load_tree("block_recurrent")}
    with tempfile.TemporaryDirectory() as folder:
        if args.baseline is not None:
            trees = {"before": baseline_tree(args.baseline, Path(folder)), "after": trees[""]}
        run(args, trees, autocast, bf16)


def run(args, trees: dict, autocast, bf16: bool) -> None:
    # with a baseline only xl and rec: the breakdown's set-ups would double the time
    setups_of = SETUPS if len(trees) == 1 else ("xl", "rec")
    print(f"training step (CPU time), {args.threads} thread(s), bf16 {bf16}, freed memory kept "
          f"{args.keep_freed_memory}, median of {args.rounds - 2} steps per set-up, set-ups alternating\n")
    if len(trees) == 1:
        print("| shape | rows x tokens | xl ms | rec ms | rec / xl | read ms | write ms | replay ms |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
    else:
        print("| shape | rows x tokens | " + " | ".join(f"{t} xl ms | {t} rec ms | {t} rec / xl" for t in trees) + " |")
        print("|---|---|" + "---:|---:|---:|" * len(trees))
    for shape in args.shapes:
        preset, changes, rows, replay = SHAPES[shape]
        setups = {(tree, name): Setup(trees[tree], preset, changes, rows, replay, name)
                  for tree in trees for name in setups_of}
        times = {key: [] for key in setups}
        for round_ in range(args.rounds):
            for key, setup in setups.items():
                spent = setup.step(autocast)
                if round_ >= 2:
                    times[key].append(spent)
        ms = {key: median(spent) * 1e3 for key, spent in times.items()}
        length = next(iter(setups.values())).model.config.max_seq_len
        if len(trees) == 1:
            ms = {name: ms["", name] for name in SETUPS}
            print(f"| {shape} | {rows} x {length} | {ms['xl']:.1f} | {ms['rec']:.1f} | {ms['rec'] / ms['xl']:.3f} | "
                  f"{ms['read'] - ms['xl']:.1f} | {ms['write'] - ms['read']:.1f} | "
                  f"{ms['rec'] - ms['write']:.1f} |", flush=True)
        else:
            print(f"| {shape} | {rows} x {length} | " + " | ".join(
                f"{ms[t, 'xl']:.1f} | {ms[t, 'rec']:.1f} | {ms[t, 'rec'] / ms[t, 'xl']:.3f}" for t in trees) + " |",
                flush=True)
        if args.profile:
            profile(setups[next(iter(trees)), "rec"], autocast)

if __name__ == "__main__":
    main()
