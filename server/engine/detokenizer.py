"""Incremental detokenization: text deltas as tokens arrive, never half a UTF-8 character."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Decodes a growing list of generated token ids into text, one delta per token.

    It decodes a short window (from `prefix` on) rather than the whole output, and holds text
    back while the window ends in an incomplete character (decoded as U+FFFD).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # ids before this are already emitted as text

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before = decode(self.ids[self.prefix:self.read])
        after = decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""
