"""A trained model whose attentions to and from its recurrent states run at a chosen temperature.

Each L2-normalised attention has a learned per-head temperature (its logits are cosine similarities times it),
initialised at ``qk_rmsnorm_scale``. Under Adam a temperature moves by about the learning rate per step, so in a
few thousand steps at 1e-3 it stays near its initial value (4 -> 4.0-4.2 in the qa1 runs), and attention over a
64-token block cannot turn sharp whatever the model would need. This sets the temperature of the state write
(``--write``: the state's queries over the block's tokens), of the state's self-attention (``--self``) and of the
tokens' reads of the state (``--reads``), for every head, leaving every other weight as it was; fine-tuning goes on
from there.

    python experiments/set_state_temperature.py --checkpoint runs/qa1 --write 16 --out runs/qa1-write16

The new folder keeps the checkpoint's tokenizer and ``tune.json``, so ``brt tune`` and ``brt eval --task`` read the
task it was tuned on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from block_recurrent import BlockRecurrentModel  # noqa: E402
from block_recurrent.model.attention import Attention  # noqa: E402
from block_recurrent.tasks.commands import load_model  # noqa: E402
from harness import require_attention_cells, save_edited_checkpoint  # noqa: E402


KINDS = ("write", "self", "reads")


def state_attentions(model: BlockRecurrentModel) -> dict[str, list[Attention]]:
    """The model's attentions to and from recurrent states, by kind (``KINDS``)."""
    return {
        "write": [cell.write_attn for cell in model.cells],
        "self": [cell.self_attn for cell in model.cells],
        "reads": [read.attn for layer in model.layers for read in layer.attn.state_reads],
    }


def set_temperatures(model: BlockRecurrentModel, temperatures: dict[str, float]) -> None:
    """Set every head's temperature of the attentions of each kind in ``temperatures`` (kinds as
    :func:`state_attentions`), in place; the state cells' scaled parametrisation stores them divided by its scale."""
    found = state_attentions(model)
    for kind, value in temperatures.items():
        if kind not in found:
            raise ValueError(f"the kind of state attention must be one of {sorted(found)}, got {kind!r}")
        if not value > 0:
            raise ValueError(f"the {kind} temperature must be positive, got {value}")
        if not found[kind]:
            raise ValueError(f"the model has no {kind} state attention")
        for attn in found[kind]:
            with torch.no_grad():
                if parametrize.is_parametrized(attn, "temperature"):
                    # assigning to a parametrised tensor stores its right inverse (scaled cells: value / scale)
                    attn.temperature = torch.full_like(attn.temperature, value)
                else:
                    attn.temperature.fill_(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    for kind in KINDS:
        parser.add_argument(f"--{kind}", type=float, default=None, help=f"the {kind} attentions' temperature")
    args = parser.parse_args()
    temperatures = {kind: getattr(args, kind) for kind in KINDS if getattr(args, kind) is not None}
    if not temperatures:
        parser.error("give at least one of --write, --self, --reads")
    model, _, tokenizer_file, folder = load_model(args.checkpoint, "cpu")
    require_attention_cells(model, args.checkpoint, "state attentions")
    before = {kind: [a.temperature.tolist() for a in attns] for kind, attns in state_attentions(model).items()}
    set_temperatures(model, temperatures)
    save_edited_checkpoint(model, args.out, tokenizer_file, folder)
    for kind, value in temperatures.items():
        print(f"{kind}: {before[kind]} -> {value}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
