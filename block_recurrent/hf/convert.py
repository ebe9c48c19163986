"""A brt checkpoint as a transformers folder: ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load it.

    python -m block_recurrent.hf runs/brt hf/brt-mini

The folder holds ``config.json`` (model type ``block_recurrent``), ``model.safetensors``, ``generation_config.json``,
the tokenizer (``tokenizer.json``: bytes, or the run's ``--tokenizer`` file) and two one-line modules that
``trust_remote_code=True`` loads; after ``import block_recurrent.hf`` the Auto classes know the model type and need
no remote code. Either way the ``block-recurrent`` package must be installed where the folder is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..persistence.checkpoint import TOKENIZER_FILE, load_pretrained
from .modeling import BlockRecurrentForCausalLM
from .tokenization import PAD_BYTE, byte_tokenizer, file_tokenizer

# remote code: the folder's modules only import the installed package's classes
REMOTE_CODE = {
    "configuration_block_recurrent.py": "from block_recurrent.hf.configuration import BlockRecurrentHFConfig  # noqa\n",
    "modeling_block_recurrent.py": "from block_recurrent.hf.modeling import BlockRecurrentForCausalLM  # noqa\n",
}
AUTO_MAP = {
    "AutoConfig": "configuration_block_recurrent.BlockRecurrentHFConfig",
    "AutoModelForCausalLM": "modeling_block_recurrent.BlockRecurrentForCausalLM",
}


def convert_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the model of ``checkpoint`` (a run folder: its newest complete checkpoint; a step folder; a
    save_pretrained folder) and its tokenizer to ``out_dir`` in transformers' layout. Returns ``out_dir``."""
    model, folder = load_pretrained(checkpoint)
    tokenizer_file = folder / TOKENIZER_FILE
    tokenizer = file_tokenizer(tokenizer_file) if tokenizer_file.exists() else byte_tokenizer()
    pad = tokenizer.pad_token_id if tokenizer_file.exists() else PAD_BYTE
    hf_model = BlockRecurrentForCausalLM.from_library(model, pad_token_id=pad)
    hf_model.config.auto_map = dict(AUTO_MAP)
    hf_model.generation_config.pad_token_id = pad
    hf_model.generation_config.eos_token_id = None  # bytes have no end token: generate runs max_new_tokens
    out_dir = Path(out_dir)
    hf_model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for name, text in REMOTE_CODE.items():
        (out_dir / name).write_text(text)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m block_recurrent.hf",
                                     description="a brt checkpoint as a transformers model folder")
    parser.add_argument("checkpoint", help="run folder (its newest checkpoint), step folder or save_pretrained folder")
    parser.add_argument("out_dir", help="the transformers folder to write")
    args = parser.parse_args(argv)
    try:
        out = convert_checkpoint(args.checkpoint, args.out_dir)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"written": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0
