"""The text of generated token ids, given out as soon as it is final: what `brt generate` prints while it runs."""

from __future__ import annotations

import codecs

from .data import ByteTokenizer, Tokenizer


class TextStream:
    """The text of a growing sequence of token ids, given out as soon as it is final, in constant memory.

    Bytes go through an incremental UTF-8 decoder (a character may span tokens). Another tokenizer decodes the
    new ids after a few ids of context, since a token can change how its neighbours decode, and holds text back
    while it ends in an incomplete character (U+FFFD)."""

    CONTEXT, HOLD = 6, 16

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.context, self.pending = tokenizer, [], []
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace") if isinstance(tokenizer, ByteTokenizer) else None

    def push(self, token: int) -> str:
        """The text that ``token`` makes final (often all of it, sometimes none yet)."""
        if self.utf8 is not None:
            return self.utf8.decode(bytes([token])) if token < 256 else "\ufffd"
        self.pending.append(token)
        before, text = self.tokenizer.decode(self.context), self.tokenizer.decode(self.context + self.pending)
        if (text.endswith("\ufffd") or not text.startswith(before)) and len(self.pending) < self.HOLD:
            return ""
        self.context, self.pending = (self.context + self.pending)[-self.CONTEXT:], []
        return text[len(before):]

    def finish(self) -> str:
        """The text still held back, at the end of the sequence."""
        if self.utf8 is not None:
            return self.utf8.decode(b"", final=True)
        text = self.tokenizer.decode(self.context + self.pending)[len(self.tokenizer.decode(self.context)):]
        self.context, self.pending = [], []
        return text
