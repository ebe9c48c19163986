"""What a trained model would score on a task if its LSTM gates kept more of the state, or wrote less of each block:
the forget gate's and the input gate's logits shifted by constants at evaluation time, nothing retrained.

    python experiments/gate_shift.py --checkpoint runs/qa1 --task qa1 --forget-shift 0 1 2 --input-shift 0 -1

A score that rises with the forget shift says the keep the model learned loses what it needs (a higher initial
forget offset, or training on longer haystacks, is then the lever); one that falls says the model uses forgetting
(qa1's later facts overwrite earlier ones). A forget shift of +40 with an input shift of -40 freezes the state at its
initial value: the same scores as dropping the state after every block (``brt eval --ablate state``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from block_recurrent.model.recurrent import LSTMGate  # noqa: E402
from block_recurrent.tasks.commands import load_scored_task  # noqa: E402
from block_recurrent.tasks.scoring import score  # noqa: E402
from harness import add_tuned_task_arguments, require_attention_cells  # noqa: E402


@contextlib.contextmanager
def shifted_gates(model, forget: float = 0.0, input: float = 0.0):
    """Every LSTM gate of ``model`` with ``forget`` added to its forget gate's logits and ``input`` to its input
    gate's, restored on exit. The gates' projection ends [..., input, forget], so the shift is on its bias's last
    two ``dim`` entries."""
    gates = [m for m in model.modules() if isinstance(m, LSTMGate)]
    if not gates:
        raise ValueError("the model has no LSTM gate")
    # the stored tensors, restored bit for bit (a parametrisation's inverse, x / scale, may not round-trip)
    saved = [{name: value.clone() for name, value in gate.to_gates.state_dict().items()} for gate in gates]
    try:
        with torch.no_grad():
            for gate in gates:
                bias = gate.to_gates.bias
                dim = bias.shape[0] // (3 if gate.projection else 2)
                shift = torch.zeros_like(bias)
                shift[-2 * dim : -dim], shift[-dim:] = input, forget
                # assigned, not changed in place: the state cells' weights may be parametrised (slow state
                # cells), and then ``bias`` is computed from what is stored
                gate.to_gates.bias = bias + shift
        yield model
    finally:
        for gate, state in zip(gates, saved):
            gate.to_gates.load_state_dict(state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_tuned_task_arguments(parser)
    parser.add_argument("--forget-shift", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    parser.add_argument("--input-shift", type=float, nargs="+", default=[0.0])
    parser.add_argument("--distances", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    model, task = load_scored_task(args, "cpu")
    require_attention_cells(model, args.checkpoint, "gates")
    print(f"{args.checkpoint}: {args.task}, exact match (answer loss, nats/token) by distance; {args.samples} "
          f"examples per distance, seed {args.seed}")
    print("| forget shift | input shift | " + " | ".join(str(d) for d in args.distances) + " |")
    print("|---:|---:|" + "---:|" * len(args.distances))
    for forget in args.forget_shift:
        for input_shift in args.input_shift:
            with shifted_gates(model, forget, input_shift):
                scores = score(model, task, args.distances, samples=args.samples, seed=args.seed,
                               batch_size=args.batch_size)
            cells = " | ".join(f"{match:.2f} ({loss:.3f})" for _, match, _, loss in scores.by_distance())
            print(f"| {forget:+g} | {input_shift:+g} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
