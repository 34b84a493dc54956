"""Per-sequence sampling on the logits' device: greedy, temperature, top-k, top-p, repetition
penalty, seeds, and one device-to-host copy per step (the tokens, with their log-probabilities).

A sampled row draws by inverting its distribution's CDF at one uniform number that a
counter-based generator makes from the sequence's seed and the position of the token
(`uniform(seed, position)`, a SplitMix64 hash, computed on the host): a sequence's tokens depend
only on its own logits, seed and positions, never on what else shares the batch or on how many
draws came before, and no device generator state exists to synchronise.

Log-probabilities are the model's own (raw): from its logits before the repetition penalty, a
structured-output mask (server/engine/structured.py), temperature, top-k and top-p, as vLLM
reports them by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.engine.structured import StructuredOutput, apply_bitmask
from server.errors import InvalidRequest
from server.host_to_device import upload

MAX_STOP_STRINGS = 16
# Logits are divided (or multiplied) by these: outside the ranges they overflow to inf/NaN, and a
# sampling error in one row would fail the whole step for every request in it.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3
PENALTY_RANGE = (1e-2, 1e2)
MAX_STOP_STRING_CHARS = 256
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass
class SamplingParams:
    max_new_tokens: int | None = 16  # None: as many as the context length leaves
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None = a fresh random seed per request
    stop: list[str] = field(default_factory=list)  # generation ends before the first match
    stop_token_ids: list[int] = field(default_factory=list)
    repetition_penalty: float = 1.0  # HF/CTRL semantics over prompt and generated tokens
    logprobs: bool = False  # return the log-probability of each generated token
    top_logprobs: int = 0  # and the N most likely tokens at each position, with theirs
    # the prompt tokens' log-probabilities (with this many alternatives each); None = not asked.
    # Such a request computes its whole prompt (the prefix cache does not serve it).
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    structured: StructuredOutput | None = None  # what the output must match

    @classmethod
    def given(cls, **fields) -> SamplingParams:
        """The parameters a request gave: fields that are None keep their defaults. Every face
        converts its wire format through this one constructor."""
        return cls(**{name: value for name, value in fields.items() if value is not None})

    def validate(self, vocab_size: int) -> None:
        if self.max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens must be at least 1")
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise InvalidRequest(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, "
                                 f"{MAX_TEMPERATURE}]")
        if not (0 < self.top_p <= 1):
            raise InvalidRequest("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise InvalidRequest("top_k must be >= 0 (0 = off)")
        if not PENALTY_RANGE[0] <= self.repetition_penalty <= PENALTY_RANGE[1]:
            raise InvalidRequest(f"repetition_penalty must be in [{PENALTY_RANGE[0]}, "
                                 f"{PENALTY_RANGE[1]}]")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InvalidRequest("seed must be in [0, 2**63)")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s or len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise InvalidRequest(f"stop strings must be 1..{MAX_STOP_STRING_CHARS} characters")
        if any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise InvalidRequest(f"stop_token_ids must be in [0, {vocab_size})")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.structured is not None:
            self.structured.validate()

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class SampleRow:
    """What the sampler needs of one sequence."""

    params: SamplingParams
    seed: int | None  # the sequence's seed; None for greedy rows
    position: int  # the position of the token being sampled: the sequence's length so far
    seen_tokens: list[int] | None  # prompt + generated ids, for the repetition penalty


_MASK64 = 2**64 - 1


def uniform(seed: int, position: int) -> float:
    """A number in (0, 1), a function of (seed, position) alone: SplitMix64's finalizer over the
    seed's stream at that position, 53 bits of it, centred in its interval."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return ((z >> 11) + 0.5) / 2**53


@dataclass
class Sampled:
    """One row's draw: the token, its log-probability and the most likely alternatives (token
    id, log-probability), most likely first, when the row asked for them."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


Mask = tuple[torch.Tensor, list[int]]
"""A structured-output bitmask ([rows, ceil(vocab / 32)] int32, host) and the logits rows its
rows mask."""


def sample(logits: torch.Tensor, rows: list[SampleRow], mask: Mask | None = None
           ) -> list[Sampled]:
    """logits: [N, vocab] fp32 on any device, one row per sequence (changed in place by a
    mask) -> one draw per row, read back with one device-to-host copy."""
    wanted = [i for i, row in enumerate(rows) if row.params.wants_logprobs]
    raw = None
    if wanted:  # before anything changes the logits
        index = torch.tensor(wanted, device=logits.device)
        raw = torch.log_softmax(logits.index_select(0, index), dim=-1)
    logits = _apply_repetition_penalty(logits, rows)
    if mask is not None:
        apply_bitmask(logits, *mask)
    tokens = logits.argmax(dim=-1)  # [N]; greedy rows keep these
    for i, row in enumerate(rows):
        if not row.params.greedy:
            tokens[i] = _sample_row(logits[i], row)
    top = max((row.params.top_logprobs for row in rows), default=0)
    packed = torch.zeros(len(rows), 2 + 2 * top, dtype=torch.float64, device=logits.device)
    packed[:, 0] = tokens  # [id, logprob, top ids..., top logprobs...]; ids are exact in fp64
    if wanted:
        packed[index, 1] = raw.gather(1, tokens.index_select(0, index)[:, None])[:, 0].double()
        if top:
            values, ids = raw.topk(top, dim=-1)
            packed[index, 2:2 + top] = ids.double()
            packed[index, 2 + top:] = values.double()
    host = packed.cpu().tolist()  # the step's one copy
    draws = [Sampled(int(line[0])) for line in host]
    for i in wanted:
        k = rows[i].params.top_logprobs
        draws[i].logprob = host[i][1]
        draws[i].top = [(int(t), lp) for t, lp in zip(host[i][2:2 + k], host[i][2 + top:2 + top + k])]
    return draws


def prompt_logprobs(logits: torch.Tensor, next_tokens: list[int], top: int
                    ) -> list[tuple[float, list[tuple[int, float]]]]:
    """logits: [n, vocab], row j predicting next_tokens[j] -> per row, that token's raw
    log-probability and the `top` most likely (token, log-probability); one host copy."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = upload(torch.tensor(next_tokens, dtype=torch.long), logits.device)
    packed = [logprobs.gather(1, index[:, None]).double()]
    if top:
        values, ids = logprobs.topk(top, dim=-1)
        packed += [ids.double(), values.double()]
    host = torch.cat(packed, dim=1).cpu().tolist()
    return [(line[0], [(int(t), lp) for t, lp in zip(line[1:1 + top], line[1 + top:])])
            for line in host]


def _apply_repetition_penalty(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    penalized = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if not penalized:
        return logits
    logits = logits.clone()
    for i in penalized:
        seen = upload(torch.tensor(rows[i].seen_tokens, dtype=torch.long), logits.device)
        penalty = rows[i].params.repetition_penalty
        values = logits[i, seen]
        logits[i, seen] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def _sample_row(logits: torch.Tensor, row: SampleRow) -> torch.Tensor:
    """logits: [vocab] -> one token id (a 0-d tensor on the logits' device), the first whose
    cumulative probability reaches the row's uniform number: no host synchronisation."""
    p = row.params
    scaled = logits / p.temperature
    if p.top_k > 0 and p.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        scaled = _top_p_filter(scaled, p.top_p)
    cdf = torch.softmax(scaled, dim=-1).cumsum(dim=-1)  # [vocab]
    # u in (0, 1): the first index whose CDF reaches u * total has probability > 0
    target = cdf[-1:] * uniform(row.seed, row.position)
    return torch.searchsorted(cdf, target).clamp_(max=cdf.shape[0] - 1)[0]


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose probabilities sum to >= top_p."""
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before it
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))

