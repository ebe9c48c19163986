"""Load weights trained with the reference port (lucidrains/block-recurrent-transformer-pytorch 0.4.4).

The reference never applies its intended qk temperature: its L2-normalised attention runs at
1/sqrt(dim_head). ``from_reference_state_dict`` therefore sets our learned temperatures to that value, so a
converted model computes exactly what the reference computed (checked against the reference package itself by ``tests/test_reference.py``).
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import Tensor

from ..model.config import BlockRecurrentConfig
from .adapter import BlockRecurrentTransformer

# reference name pattern -> our name; {i} is the 0-based layer index
_LAYER_RENAMES = {
    r"0\.norm\.gamma": "attn.norm.weight",
    r"0\.to_q\.weight": "attn.to_q.weight",
    r"0\.to_kv\.weight": "attn.to_kv.weight",
    r"0\.to_out\.weight": "attn.to_out.weight",
    r"0\.attn\.q_scale": "attn.attn.q_gain",
    r"0\.attn\.k_scale": "attn.attn.k_gain",
    r"0\.state_container\.state_norm\.gamma": "attn.cell.norm.weight",
    r"0\.state_container\.q_from_state\.weight": "attn.cell.to_cross_queries.weight",
    r"0\.state_container\.state_to_q\.weight": "attn.cell.to_self_queries.weight",
    r"0\.state_container\.state_to_kv\.weight": "attn.cell.to_state_kv.weight",
    r"0\.state_container\.init_state": "attn.cell.initial_state",
    r"0\.state_container\.state_pos_ids": "attn.cell.state_ids",
    r"0\.state_container\.to_state_out\.weight": "attn.cell.to_update.weight",
    r"0\.state_container\.state_self_attn\.(q|k)_scale": "attn.cell.self_attn.{0}_gain",
    r"0\.state_container\.from_state_cross_attn\.(q|k)_scale": "attn.cell.write_attn.{0}_gain",
    r"0\.state_container\.state_out_to_gate\.(weight|bias)": "attn.cell.gate.to_candidate.{0}",
    r"1\.0\.gamma": "ff.norm.weight",
    r"1\.1\.weight": "ff.proj_in.weight",
    r"1\.3\.weight": "ff.proj_out.weight",
}
# config fields that select something the reference does not have, and the value that matches it
REFERENCE_ARCHITECTURE = dict(
    kv_heads=1, ff_activation="geglu", qk_norm_gains=True, gate="fixed", gate_keep_init="paper", gate_projection=True,
    state_cell_scale=1.0, state_update="skip", state_write="attention",
    attention_window="block", position_encoding="rotary_xpos", state_feedback=False,
)
_GATE_BETA = r"0\.state_container\.learned_ema_beta"
_SKIPPED = re.compile(r".*\.beta$")  # the reference's LayerNorm keeps a zero bias buffer


def _read_target(config: BlockRecurrentConfig, write_index: int) -> str | None:
    """Our prefix of the StateRead that reads the state written by 0-based layer ``write_index``.

    The reference keeps the tokens' read projection in the writing layer's state container; ours lives
    in the reading layer, one per read, in the order of ``config.recurrent_layers``.
    """
    if write_index + 1 not in config.recurrent_layers:
        return None
    state = config.recurrent_layers.index(write_index + 1)
    read_layer = config.read_recurrent_layers[state]
    return f"layers.{read_layer - 1}.attn.state_reads.{config.reads_of_layer(read_layer).index(state)}"


def _our_name(name: str, config: BlockRecurrentConfig) -> tuple[str, bool] | None:
    """(our parameter name, negate) for a reference parameter name, or None if it has no counterpart."""
    if name == "token_emb.weight":
        return name, False
    if name == "to_logits.0.gamma":
        return "norm_out.weight", False
    if name == "to_logits.1.weight":
        return "to_logits.weight", False
    match = re.fullmatch(r"mem_manager\.layers\.(\d+)\.1\.1\.(weight|bias)", name)
    if match:
        return f"layers.{match[1]}.attn.memory.compress.{match[2]}", False
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if match:
        index, rest = match.groups()
        read = re.fullmatch(r"0\.state_container\.(q_to_state\.weight|to_state_cross_attn\.(q|k)_scale)", rest)
        if read:
            target = _read_target(config, int(index))
            if target is None:
                return None
            return target + (".to_queries.weight" if read[2] is None else f".attn.{read[2]}_gain"), False
        if re.fullmatch(_GATE_BETA, rest):
            # the reference's gate is sigmoid(beta) * z + (1 - sigmoid(beta)) * c; ours keeps c with sigmoid(b)
            return f"layers.{index}.attn.cell.gate.keep_bias", True
        for pattern, target in _LAYER_RENAMES.items():
            inner = re.fullmatch(pattern, rest)
            if inner:
                return f"layers.{index}." + target.format(*inner.groups()), False
    return None


def from_reference_state_dict(
    state_dict: dict[str, Tensor], config: BlockRecurrentConfig
) -> BlockRecurrentTransformer:
    """A model with the reference's weights. ``config`` must match the reference model's arguments.

    The fields the reference has no argument for (``REFERENCE_ARCHITECTURE``) are set to its architecture
    where ``config`` leaves them at our defaults; one set to anything else is an error.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(BlockRecurrentConfig)}
    changed = {
        name: getattr(config, name)
        for name, value in REFERENCE_ARCHITECTURE.items()
        if getattr(config, name) not in (value, defaults[name])
    }
    if changed:
        raise ValueError(
            f"the reference has one architecture; these config fields differ from it: {changed} "
            f"(the reference's values: { {name: REFERENCE_ARCHITECTURE[name] for name in changed} })"
        )
    config = config.replace(**REFERENCE_ARCHITECTURE)
    config = config.replace(qk_rmsnorm_scale=config.dim_head**-0.5)
    model = BlockRecurrentTransformer(config)
    ours = model.state_dict()
    converted, unknown = {}, []
    for name, tensor in state_dict.items():
        if _SKIPPED.fullmatch(name):
            continue
        target = _our_name(name, config)
        if target is None or target[0] not in ours:
            unknown.append(name)
            continue
        our_name, negate = target
        if ours[our_name].shape != tensor.shape:
            raise ValueError(
                f"reference weight {name} has shape {tuple(tensor.shape)} but {our_name} needs "
                f"{tuple(ours[our_name].shape)}: the config does not match the reference model"
            )
        converted[our_name] = -tensor if negate else tensor
    if unknown:
        raise ValueError(f"reference weights with no counterpart in this config: {', '.join(unknown[:5])}")
    missing = sorted(set(ours) - set(converted) - {n for n in ours if n.endswith("temperature")})
    if missing:
        raise ValueError(f"the reference state dict lacks: {', '.join(missing[:5])} (config mismatch?)")
    with torch.no_grad():
        for name, tensor in converted.items():
            ours[name].copy_(tensor)
    return model
