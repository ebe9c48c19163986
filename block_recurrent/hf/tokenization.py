"""Tokenizers transformers loads without remote code: the library's bytes as a ``tokenizers`` byte-level
tokenizer (token id = byte value, vocabulary 256), or a run's own ``--tokenizer`` file as it is."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

# byte 0 (never in text) pads rows; ids are bytes, so no id is free for special tokens of their own
PAD_BYTE = 0


def _byte_alphabet() -> dict[int, str]:
    """Byte -> the printable character byte-level tokenizers stand it for (GPT-2's table: printable bytes as
    themselves, the others moved to 256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """UTF-8 bytes as tokens, ids 0-255 as the library's ByteTokenizer gives them; pads on the left (generation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = _byte_alphabet()
    backend = Tokenizer(models.BPE(vocab={char: byte for byte, char in alphabet.items()}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    pad = alphabet[PAD_BYTE]
    # split_special_tokens: the pad character typed in a text is that text's bytes, not the pad token
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, eos_token=pad, padding_side="left",
                                   split_special_tokens=True, clean_up_tokenization_spaces=False)


def file_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A run's ``tokenizers`` JSON file (``brt train --tokenizer``), padding on the left."""
    return PreTrainedTokenizerFast(tokenizer_file=str(path), padding_side="left", clean_up_tokenization_spaces=False)
