"""Incremental detokenization: text deltas as tokens arrive, never half a UTF-8 character.

`tokenizers.decoders.DecodeStream` does the work: it holds tokens back while they end in an
incomplete character. It has no flush, so at the end of a generation `finish` emits what it still
holds the way `decode` would: an incomplete UTF-8 sequence becomes U+FFFD.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        """`tokenizer`: a transformers fast tokenizer (its `backend_tokenizer` decodes)."""
        self.tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._held: list[int] = []  # ids since the last emitted text
        self._emitted: list[str] = []

    def add(self, token_id: int) -> str:
        """The text this token completes ("" while it ends in an incomplete character)."""
        self._ids.append(token_id)
        self._held.append(token_id)
        text = self._stream.step(self.tokenizer.backend_tokenizer, token_id)
        if not text:
            return ""
        self._held.clear()
        self._emitted.append(text)
        return text

    def finish(self) -> str:
        """The text of the tokens still held back, decoded as `decode` decodes them."""
        if not self._held:
            return ""
        self._held.clear()
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        whole, emitted = decode(self._ids), "".join(self._emitted)
        rest = whole[len(emitted):] if whole.startswith(emitted) else decode(self._ids[-1:])
        self._emitted.append(rest)
        return rest
