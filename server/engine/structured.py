"""Structured output: a request's constraint (a JSON schema, any JSON object, a regex, a choice
among strings, an EBNF grammar) applied as a per-row token mask in the sampler, with xgrammar.

`Grammars.compile` turns a constraint into a compiled grammar on a preparation thread, never on
the step loop; xgrammar's compiler caches compiled grammars (by their text), so a schema sent
again costs nothing. Each constrained sequence gets its own matcher. Every step the engine fills
the constrained rows of one bitmask ([rows, ceil(vocab / 32)] int32, on the host), the sampler
applies it to those rows only, so one batch holds constrained and free requests for any
adapters, and each sampled token advances its matcher. A matcher that has reached the end of its
grammar (it accepted an end-of-sequence token) finishes its sequence.

Why xgrammar: its CPU path works here with torch 2.13 (grammar compilation and mask filling in
its C++ core, `apply_token_bitmask_inplace` with a CPU backend), it serves the same on CUDA, and
it is what vLLM and SGLang use by default.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import torch

from server.errors import InvalidRequest

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_CONSTRAINT_CHARS = 1 << 20
COMPILED_CACHE_BYTES = 64 << 20


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match. `value`: the JSON schema's text, the regex, the EBNF
    grammar, or the choices (a tuple of strings); unused for json_object."""

    kind: str
    value: str | tuple[str, ...] = ""

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequest(f"structured output kind must be one of {', '.join(KINDS)}, "
                                 f"not {self.kind!r}")
        if self.kind == "choice":
            if not self.value or not all(isinstance(c, str) and c for c in self.value):
                raise InvalidRequest("a choice constraint needs at least one non-empty string")
            size = sum(len(c) for c in self.value)
        elif self.kind == "json_object":
            size = 0
        else:
            if not isinstance(self.value, str) or not self.value.strip():
                raise InvalidRequest(f"the {self.kind} constraint is empty")
            size = len(self.value)
        if size > MAX_CONSTRAINT_CHARS:
            raise InvalidRequest(f"the {self.kind} constraint is longer than "
                                 f"{MAX_CONSTRAINT_CHARS} characters")


class Grammars:
    """Compiles constraints for one model's tokenizer; made on first use (building xgrammar's
    view of a large vocabulary takes a moment)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]):
        self._tokenizer, self.vocab_size = tokenizer, vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._compiler = None
        self._lock = threading.Lock()

    def compile(self, constraint: StructuredOutput):
        """A compiled grammar; INVALID_ARGUMENT with xgrammar's reason when it refuses."""
        constraint.validate()
        compiler = self._get_compiler()
        try:
            if constraint.kind == "json_schema":
                return compiler.compile_json_schema(constraint.value, any_whitespace=False)
            if constraint.kind == "json_object":  # an object, as OpenAI's JSON mode promises
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if constraint.kind == "regex":
                return compiler.compile_regex(constraint.value)
            if constraint.kind == "choice":
                return compiler.compile_grammar(_choice_grammar(constraint.value))
            return compiler.compile_grammar(constraint.value)
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = " ".join(str(exc).split())
            raise InvalidRequest(f"the {constraint.kind} constraint cannot be compiled: "
                                 f"{reason}") from None

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size,
                    stop_token_ids=self._stop_token_ids)
                self._compiler = xgrammar.GrammarCompiler(
                    info, max_threads=1, cache_enabled=True,
                    cache_limit_bytes=COMPILED_CACHE_BYTES)
            return self._compiler


def _choice_grammar(choices: tuple[str, ...]) -> str:
    """EBNF whose only sentences are the choices (string literals escaped as in JSON)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def new_matcher(compiled):
    import xgrammar

    return xgrammar.GrammarMatcher(compiled)


def fill_bitmask(matchers: list, vocab_size: int) -> torch.Tensor:
    """[len(matchers), ceil(vocab / 32)] int32 on the host: row i holds the tokens matcher i
    allows next (a set bit = allowed)."""
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(len(matchers), vocab_size)
    for row, matcher in enumerate(matchers):
        matcher.fill_next_token_bitmask(bitmask, row)
    return bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Sets the disallowed logits of `rows` (bitmask row j masks logits row rows[j]) to -inf,
    in place, on the logits' device."""
    import xgrammar

    full = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=torch.int32)
    full[rows] = bitmask
    xgrammar.apply_token_bitmask_inplace(logits, full.to(logits.device, non_blocking=True),
                                         vocab_size=logits.shape[1], indices=rows)
