"""The engine: requests in, one packed model step at a time, tokens out.

`EngineCore` is synchronous and single-threaded: `add_request`, `abort`, `step`. Tests drive it
step by step. `Engine` (server/engine/async_engine.py) runs it on a thread for asyncio callers.

Adapters come only from the registry, as leases: a request for an adapter holds a lease on one
version of it from `add_request` until it ends. The registry may be the server's durable one or
an in-memory one (tests, `loraplex generate`). Each step first admits sequences (the scheduler
decides, the engine writes adapter versions new to their device slot), then runs one packed
forward pass and samples.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import queue
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters_registry.host_cache import AdapterLease
from adapters_registry.mixtures import AdapterMix
from adapters_registry.registry import AdapterRegistry
from adapters_registry.spec import BaseModelSpec
from adapters_registry.weights import LoraWeights
from server.config import EngineConfig, RegistryConfig
from server.engine.adapter_slots import AdapterSlots
from server.engine.admission import BASE_TENANT, make_waiting_queue
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.kv_cache import KVCache
from server.engine.sampler import (Mask, SampleRow, Sampled, SamplingParams, prompt_logprobs,
                                   sample)
from server.engine.scheduler import ScheduledChunk, Scheduler, Sequence
from server.engine.stats import EngineStats
from server.engine.structured import Grammars, fill_bitmask, new_matcher
from server.errors import ConfigError, InvalidRequest, Overloaded
from server.host_to_device import upload
from server.lora.layer import LoraContext, wrap_lora_targets
from server.lora.op import select_kernel
from server.model.loading import DTYPES, LoadedModel
from server.model.step import ModelRunner, SeqChunk, build_step_inputs, select_decode_attention

log = logging.getLogger(__name__)

class FinishReason:
    LENGTH = "length"  # max_new_tokens or the model's context length reached
    STOP = "stop"  # a stop string or stop token id
    EOS = "eos"  # the model's end-of-sequence token
    CANCELLED = "cancelled"


@dataclass
class GenerationRequest:
    """Exactly one of prompt, prompt_token_ids and messages ({"role", "content"} dicts, rendered
    with the model's chat template)."""

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    adapter_id: str | None = None  # None or "" = base model
    params: SamplingParams = field(default_factory=SamplingParams)
    mixture: AdapterMix | None = None  # several adapters with weights, instead of adapter_id

    @property
    def adapter_label(self) -> str | None:
        """How logs and metrics name what the request runs with (None: the base model)."""
        return self.mixture.label if self.mixture is not None else self.adapter_id or None


@dataclass
class PreparedRequest:
    """A request checked and tokenized, ready to queue (`EngineCore.prepare`)."""

    prompt_ids: list[int]
    adapter_id: str | None
    params: SamplingParams
    grammar: object | None = None  # the compiled structured-output constraint
    mixture: AdapterMix | None = None


@dataclass
class RequestOutput:
    """What one step produced for one request: a delta, and the totals when it finished."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[float]
    finished: bool = False
    # per new token, when asked: the most likely (token id, log-probability), most likely first
    new_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # with the first token, when asked: the prompt's ids, and the (log-probability,
    # alternatives) of its tokens 1..n-1 (the first has no context to be predicted from)
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens found in the prefix cache, not computed
    queue_seconds: float | None = None  # when finished: arrival to first scheduled (or to end)


@dataclass
class _Live:
    """Engine-side state of one request besides its Sequence."""

    seq: Sequence
    detok: IncrementalDetokenizer
    pending_text: str = ""  # text held back while it could be the start of a stop string


class EngineCore:
    def __init__(self, model: LoadedModel, config: EngineConfig, registry: AdapterRegistry):
        """`registry` must validate adapters against `model` with `config.max_rank`."""
        self.model = model
        self.config = config
        self.registry = registry
        self.tokenizer = model.tokenizer
        # The LoRA kernel is chosen (and the CPU one built) now, never in a request.
        self.lora = LoraContext(select_kernel(config.lora_kernel, model.device))
        self.layers = wrap_lora_targets(model.hf, self.lora, max_slots=config.max_slots,
                                        max_rank=config.max_rank,
                                        dtype=DTYPES[config.lora_dtype], device=model.device,
                                        compute_dtype=model.dtype)
        self.kv = _make_kv_cache(model, config)
        self.max_model_len = _max_model_len(model, config, self.kv)
        # A prompt longer than this many characters cannot fit max_model_len tokens: no token
        # covers more than the vocabulary's longest entry (x2 for normalizers that merge
        # characters). Checked before tokenizing, so an oversized prompt costs nothing.
        self.max_prompt_chars = (self.max_model_len * 2
                                 * max(map(len, self.tokenizer.get_vocab()), default=1))
        self.slots = AdapterSlots(config.max_slots)
        self.scheduler = Scheduler(
            self.kv, self.slots, max_batch_size=config.max_batch_size,
            max_step_tokens=config.max_step_tokens,
            waiting=make_waiting_queue(config.admission, config.weights()),
            max_running_per_adapter=config.max_running_per_adapter,
            max_slot_write_bytes_per_step=int(config.max_slot_write_mb_per_step * 2**20))
        self.runner = ModelRunner(model.hf, self.kv, self.lora,
                                  select_decode_attention(config.attention_kernel, model.device))
        # CUDA: adapter slot writes from pinned host memory on their own stream (_write_slot)
        self._copy_stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None
        self.eos_ids = _eos_token_ids(model)
        self.grammars = Grammars(self.tokenizer, model.spec.vocab_size, self.eos_ids)
        self._live: dict[str, _Live] = {}
        self._ids = itertools.count()
        self.steps = 0  # model steps run
        self.generated_tokens = 0  # tokens sampled, over all requests
        # Names of adapters the registry replaced or deleted (from any thread); their stale
        # versions' slots are retired at the next step.
        self._changed: queue.SimpleQueue[str] = queue.SimpleQueue()
        registry.add_listener(self._changed.put)
        # Called after each model step with (request ids, logits [N, vocab]); for tests and
        # debugging, None in service.
        self.logits_observer: Callable[[list[str], torch.Tensor], None] | None = None
        # Called with the seconds each adapter slot write took (metrics); None in tests.
        self.slot_write_observer: Callable[[float], None] | None = None

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request: GenerationRequest, request_id: str | None = None,
                    adapter: AdapterLease | None = None) -> str:
        """Validates and queues a request; it joins the running batch at the next step.

        `adapter`: a lease on `request.adapter_id`, which the core releases when the request ends
        (or is refused here). Without one, the core leases the adapter itself, waiting while a
        cold one loads. The async Engine prepares requests and leases adapters off the loop
        thread, then calls `add_prepared`.
        """
        try:
            prepared = self.prepare(request)
        except BaseException:
            if adapter is not None:
                self.registry.release(adapter)
            raise
        if request.mixture is not None and adapter is None:
            adapter = self.registry.acquire_mixture(request.mixture, self.config.max_slots).result()
        elif request.adapter_id and adapter is None:
            adapter = self.registry.acquire(request.adapter_id).result()
        return self.add_prepared(prepared, request_id, adapter)

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Checks a request and tokenizes its prompt. Reads only the model's tokenizer and
        limits, so any thread may call it (the async Engine uses a pool): a large prompt costs
        its own time, not the step loop's."""
        if request.mixture is not None:
            if request.adapter_id:
                raise InvalidRequest("name either an adapter or a mixture of adapters, not both")
            request.mixture.validate(self.config.max_slots)
        prompt_ids = self._prompt_ids(request)
        params = request.params
        if params.max_new_tokens is None:  # as many as the context leaves
            params = dataclasses.replace(params,
                                         max_new_tokens=max(1, self.max_model_len - len(prompt_ids)))
        params.validate(self.model.spec.vocab_size)
        if len(prompt_ids) + params.max_new_tokens > self.max_model_len:
            raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens "
                                 f"({params.max_new_tokens}) exceeds the maximum sequence length "
                                 f"{self.max_model_len}")
        grammar = None
        if params.structured is not None:  # compiled here, on the caller's thread
            grammar = self.grammars.compile(params.structured)
        return PreparedRequest(prompt_ids, request.adapter_id or None, params, grammar,
                               request.mixture)

    def add_prepared(self, prepared: PreparedRequest, request_id: str | None = None,
                     adapter: AdapterLease | None = None) -> str:
        """Queues a prepared request (on the core's thread); releases `adapter` if refused."""
        try:
            return self._add(prepared, request_id or f"req-{next(self._ids)}", adapter)
        except BaseException:
            if adapter is not None:
                self.registry.release(adapter)
            raise

    def _add(self, prepared: PreparedRequest, request_id: str,
             adapter: AdapterLease | None) -> str:
        mixture = prepared.mixture
        self._check_queue(mixture.primary if mixture else prepared.adapter_id or BASE_TENANT)
        if mixture is not None:
            self._check_mixture(mixture, adapter)
        else:
            self._check_adapter(prepared.adapter_id, adapter)
        params = prepared.params
        seed = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
        seq = Sequence(request_id=request_id, prompt_ids=prepared.prompt_ids, params=params,
                       adapter=adapter, seed=seed, mixture=mixture)
        if prepared.grammar is not None:
            seq.matcher = new_matcher(prepared.grammar)
        self._live[request_id] = _Live(seq, IncrementalDetokenizer(self.tokenizer))
        self.scheduler.add(seq)
        return request_id

    def _check_queue(self, tenant: str) -> None:
        waiting = self.scheduler.waiting
        if len(waiting) >= self.config.max_queue:
            raise Overloaded(f"server overloaded: {len(waiting)} requests are waiting "
                             f"(--max-queue {self.config.max_queue}); retry later")
        limit = self.config.max_queue_per_adapter
        if limit and waiting.counts[tenant] >= limit:
            what = f"adapter {tenant!r}" if tenant else "the base model"
            raise Overloaded(f"{what} has {waiting.counts[tenant]} requests waiting "
                             f"(--max-queue-per-adapter {limit}); retry later")

    def _check_adapter(self, adapter_id: str | None, lease: AdapterLease | None) -> None:
        if not adapter_id:
            if lease is not None:
                raise InvalidRequest("an adapter lease was given for a base-model request")
            return
        if lease is None:
            raise InvalidRequest(f"no lease was given for adapter {adapter_id!r}")
        if lease.key.name != adapter_id:
            raise InvalidRequest(f"the lease is for adapter {lease.key.name!r}, the request names "
                                 f"{adapter_id!r}")
        if lease.weights.rank > self.config.max_rank:
            raise InvalidRequest(f"adapter {lease.key.name!r} has rank {lease.weights.rank}, "
                                 f"above --max-rank {self.config.max_rank}")

    def _check_mixture(self, mixture: AdapterMix, lease: AdapterLease | None) -> None:
        if lease is None or lease.key.name != mixture.label:
            raise InvalidRequest(f"no lease was given for the mixture {mixture.label}")
        for part, _ in lease.slot_uses():
            if part.weights.rank > self.config.max_rank:
                raise InvalidRequest(f"adapter {part.key.name!r} of the mixture has rank "
                                     f"{part.weights.rank}, above --max-rank "
                                     f"{self.config.max_rank}")

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancels a request, freeing its KV blocks, adapter slot reference and lease at once."""
        live = self._live.pop(request_id, None)
        if live is None:
            return None
        self._finish(live.seq)
        return self._output(live, [], "", [], FinishReason.CANCELLED)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or not self._changed.empty()

    def stats(self) -> EngineStats:
        """A snapshot of the scheduler, KV cache and slot table (call on the core's thread)."""
        return EngineStats.of(self.scheduler, self.kv, self.slots, steps=self.steps,
                              generated_tokens=self.generated_tokens)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if seq.adapter is not None:
            self.registry.release(seq.adapter)

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        given = [request.prompt, request.prompt_token_ids, request.messages]
        if sum(part is not None for part in given) != 1:
            raise InvalidRequest("give exactly one of prompt, prompt_token_ids and messages")
        if request.messages is not None:
            contents = sum(len(m.get("content") or "") for m in request.messages)
            self.check_text_length("the messages' contents", contents)
            ids = render_chat(self.tokenizer, request.messages)
        elif request.prompt is not None:
            self.check_text_length("the prompt", len(request.prompt))
            ids = self.tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = request.prompt_token_ids
            if len(ids) > self.max_model_len:
                raise InvalidRequest(f"prompt ({len(ids)} tokens) exceeds the maximum sequence "
                                     f"length {self.max_model_len}")
            vocab = self.model.spec.vocab_size
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
                raise InvalidRequest(f"prompt_token_ids must be integers in [0, {vocab})")
            ids = list(ids)
        if not ids:
            raise InvalidRequest("the prompt is empty")
        return ids

    def check_text_length(self, what: str, chars: int) -> None:
        """Refuses text too long to be a prompt of this model before anyone tokenizes it."""
        if chars > self.max_prompt_chars:
            raise InvalidRequest(f"{what} ({chars} characters) is longer than any prompt of "
                                 f"at most {self.max_model_len} tokens can be (the maximum "
                                 f"sequence length; at most {self.max_prompt_chars} characters)")

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one packed forward over every scheduled sequence; returns the new outputs."""
        self._retire_changed_adapters()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        self._write_new_slots(scheduled)
        chunks = [_chunk(c) for c in scheduled]
        inputs = build_step_inputs(chunks, self.kv, self.runner.windows, self.model.device)
        # [N, vocab] on the model's device, N = chunks that need logits; sampled there, and
        # only the tokens (with their logprobs) come back to the host
        logits = self.runner.forward(inputs)
        sampling, sample_rows, row = [], [], 0
        for c, chunk in zip(scheduled, chunks):
            rows = len(chunk.token_ids) if chunk.all_logits else int(chunk.needs_logits)
            if chunk.all_logits:
                self._record_prompt_logprobs(c.seq, chunk, logits[row:row + rows])
            if chunk.needs_logits:
                sampling.append(c.seq)
                sample_rows.append(row + rows - 1)
            row += rows
            c.seq.num_computed += c.num_tokens
        if row != len(sample_rows):  # some chunks returned every row's logits
            logits = logits[upload(torch.tensor(sample_rows, dtype=torch.long), logits.device)]
        self.scheduler.computed(scheduled)  # before sampling ends (and frees) any of them
        if self.logits_observer is not None:
            self.logits_observer([seq.request_id for seq in sampling], logits)
        draws = sample(logits, [_sample_row(seq) for seq in sampling],
                       self._grammar_mask(sampling))
        self.steps += 1
        self.generated_tokens += len(draws)
        return [self._append_token(seq, draw) for seq, draw in zip(sampling, draws)]

    def _record_prompt_logprobs(self, seq: Sequence, chunk: SeqChunk,
                                logits: torch.Tensor) -> None:
        """Keeps the log-probabilities of the prompt tokens this chunk's rows predict (row j,
        position chunk.start + j, predicts the token at the next position); a recompute after
        preemption skips those already kept."""
        prompt = seq.prompt_ids
        kept = len(seq.prompt_logprobs)  # positions 1..kept are done
        rows = [j for j in range(len(chunk.token_ids))
                if kept < chunk.start + j + 1 < len(prompt)]
        if rows:
            seq.prompt_logprobs += prompt_logprobs(
                logits[rows], [prompt[chunk.start + j + 1] for j in rows],
                seq.params.prompt_logprobs)

    def _grammar_mask(self, sampling: list[Sequence]) -> Mask | None:
        """The tokens each constrained sequence's grammar allows next, by row."""
        rows = [i for i, seq in enumerate(sampling) if seq.matcher is not None]
        if not rows:
            return None
        bitmask = fill_bitmask([sampling[i].matcher for i in rows], self.grammars.vocab_size)
        return bitmask, rows

    def _retire_changed_adapters(self) -> None:
        """Frees the device slots of replaced or deleted versions (and of mixtures of them)
        once no request uses them, and drops their KV blocks from the prefix cache."""
        while not self._changed.empty():
            name = self._changed.get()
            current = self.registry.current_key(name)
            self.slots.retire_stale(name, current)
            self.kv.allocator.forget_adapter(lambda key: key.is_stale(name, current))

    def _write_new_slots(self, scheduled: list[ScheduledChunk]) -> None:
        """Admission: writes each adapter version placed in a slot that does not hold it yet
        (and computes a DoRA adapter's magnitude factors against the served weights)."""
        for slot, lease in (write for c in scheduled for write in c.writes):
            start = time.perf_counter()
            try:
                self._write_slot(slot, lease.weights)
            except BaseException:
                self.slots.retire(lease.key)  # half written: never hand it out again
                raise
            if self.slot_write_observer is not None:
                self.slot_write_observer(time.perf_counter() - start)

    def _write_slot(self, slot: int, weights: LoraWeights) -> None:
        """On CUDA, from pinned host memory on a side stream: the host never waits for the copy,
        and the step's kernels, queued after it, wait on the device. On the CPU, in place."""
        if self._copy_stream is None:
            self.layers.write(slot, weights)
            return
        weights.pin()
        with torch.cuda.stream(self._copy_stream):
            self.layers.write(slot, weights)
        torch.cuda.current_stream().wait_stream(self._copy_stream)

    def _append_token(self, seq: Sequence, draw: Sampled) -> RequestOutput:
        live = self._live[seq.request_id]
        token, logprob = draw.token, draw.logprob
        seq.output_ids.append(token)
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            log.error("request %s: the grammar refused token %d it allowed", seq.request_id, token)
        reason = self._finish_reason(seq, token)
        text = "" if reason in (FinishReason.STOP, FinishReason.EOS) else live.detok.add(token)
        if reason is not None:
            text += live.detok.finish()
        text, stopped = self._apply_stop_strings(live, text, final=reason is not None)
        if stopped:
            reason = FinishReason.STOP
        new_logprobs = [logprob] if logprob is not None else []
        if reason is not None:
            self._live.pop(seq.request_id)
            self._finish(seq)
        out = self._output(live, [token], text, new_logprobs, reason)
        if seq.params.top_logprobs:
            out.new_top_logprobs = [draw.top]
        if seq.params.prompt_logprobs is not None and len(seq.output_ids) == 1:
            out.prompt_token_ids, out.prompt_logprobs = seq.prompt_ids, seq.prompt_logprobs
        return out

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if token in params.stop_token_ids:
            return FinishReason.STOP
        if token in self.eos_ids and not params.ignore_eos:
            return FinishReason.EOS
        if seq.matcher is not None and seq.matcher.is_terminated():
            return FinishReason.STOP  # the grammar is complete (with ignore_eos, or a stop id)
        if len(seq.output_ids) >= params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _apply_stop_strings(self, live: _Live, text: str, final: bool) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string ended the generation).

        Text that could still become the start of a stop string is held back, so a stream never
        shows part of a stop string; the stop string itself is never returned.
        """
        stops = live.seq.params.stop
        if not stops:
            return text, False
        held = live.pending_text + text
        found = [held.find(s) for s in stops if s in held]
        if found:
            live.pending_text = ""
            return held[:min(found)], True
        if final:
            live.pending_text = ""
            return held, False
        keep = max(len(s) for s in stops) - 1
        cut = max(0, len(held) - keep)
        live.pending_text = held[cut:]
        return held[:cut], False

    def _output(self, live: _Live, token_ids: list[int], text: str, logprobs: list[float],
                reason: str | None) -> RequestOutput:
        seq = live.seq
        queue_seconds = None
        if reason is not None:
            queue_seconds = (seq.first_scheduled_time or time.monotonic()) - seq.arrival_time
        return RequestOutput(request_id=seq.request_id, new_token_ids=token_ids, new_text=text,
                             new_logprobs=logprobs, finished=reason is not None,
                             finish_reason=reason, prompt_tokens=len(seq.prompt_ids),
                             completion_tokens=len(seq.output_ids),
                             cached_tokens=seq.cached_tokens or 0, queue_seconds=queue_seconds)


def _chunk(c: ScheduledChunk) -> SeqChunk:
    seq = c.seq
    start = seq.num_computed
    return SeqChunk(token_ids=seq.tokens[start:start + c.num_tokens], start=start,
                    block_table=seq.block_table, slots=seq.slots,
                    needs_logits=start + c.num_tokens == seq.num_tokens,
                    all_logits=(seq.params.prompt_logprobs is not None
                                and start < len(seq.prompt_ids)))


def _sample_row(seq: Sequence) -> SampleRow:
    seen = seq.tokens if seq.params.repetition_penalty != 1.0 else None
    return SampleRow(params=seq.params, seed=seq.seed, position=seq.num_tokens, seen_tokens=seen)


def _make_kv_cache(model: LoadedModel, config: EngineConfig) -> KVCache:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = dict(num_layers=cfg.num_hidden_layers, block_size=config.kv_block_size,
                 kv_heads=cfg.num_key_value_heads, head_dim=head_dim)
    per_block = KVCache.bytes_per_block(dtype=model.dtype, **shape)
    num_blocks = int(config.kv_cache_mb * 2**20) // per_block
    if num_blocks < 1:
        raise ConfigError(f"--kv-cache-mb {config.kv_cache_mb} holds no KV block "
                             f"({per_block} bytes each)")
    return KVCache(num_blocks=num_blocks, dtype=model.dtype, device=model.device,
                   prefix_caching=config.prefix_cache, **shape)


def _max_model_len(model: LoadedModel, config: EngineConfig, kv: KVCache) -> int:
    limit = config.max_model_len or getattr(model.config, "max_position_embeddings", 0) or 2048
    return min(limit, kv.num_blocks * kv.block_size)


END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>", "<|end|>")
"""Chat models end a turn with one of these (ChatML, Llama 3, Gemma, Phi); a chat answer stops
there even when the checkpoint's configs name only the document-level EOS."""


def _eos_token_ids(model: LoadedModel) -> set[int]:
    """The generation config's EOS ids, the tokenizer's EOS, and the tokenizer's end-of-turn
    special tokens."""
    ids = set()
    generation = getattr(model.hf, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    ids.add(model.tokenizer.eos_token_id)
    special = set(model.tokenizer.all_special_tokens) | {
        t.content for t in getattr(model.tokenizer, "added_tokens_decoder", {}).values()
        if getattr(t, "special", False)}
    ids.update(model.tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS if t in special)
    return {i for i in ids if i is not None}


def render_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Prompt token ids of a conversation in the model's chat template, ending with the prompt
    of the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model's tokenizer has no chat template: send a prompt instead "
                             "of messages")
    if not messages:
        raise InvalidRequest("messages is empty")
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True, return_dict=True)
    except Exception as exc:  # jinja's errors, and the template's own raise_exception
        raise InvalidRequest(f"the chat template refused the messages: {exc}") from None
    return list(encoded["input_ids"])


def load_engine_core(config: EngineConfig, adapters: dict[str, str] | None = None, *,
                     registry: Callable[[BaseModelSpec], AdapterRegistry] | None = None
                     ) -> EngineCore:
    """Loads the configured model and builds the engine over an adapter registry.

    `registry(spec)` opens the registry for the loaded model's spec (the server's is durable:
    `make_registry` over an AdapterStore); by default the adapters live in RAM. The named
    adapter directories (NAME -> path) are registered in it.
    """
    from adapters_registry.peft_format import read_adapter_files
    from server.model.loading import load_model

    if config.threads:
        torch.set_num_threads(config.threads)
    model = load_model(config.model, quantize=config.quantize, device=config.device,
                       dtype=DTYPES[config.dtype], quant_kernel=config.quant_kernel,
                       prepack=config.prepack)
    if config.served_model_name:
        model = dataclasses.replace(model, name=config.served_model_name)
    if registry is None:
        adapter_registry = make_registry(model.spec, config.max_rank)
    else:
        adapter_registry = registry(model.spec)
    for name, path in (adapters or {}).items():
        adapter_registry.register(name, *read_adapter_files(
            Path(path), name, adapter_registry.max_adapter_bytes))
    return EngineCore(model, config, adapter_registry)


def make_registry(spec: BaseModelSpec, max_rank: int, *, store=None,
                  config: RegistryConfig | None = None) -> AdapterRegistry:
    """A registry for adapters of `spec` kept in `store` (an AdapterStore; None: in RAM), sized
    by `config`; its load workers are background threads at `config.load_nice`
    (server/engine/threads.py)."""
    from adapters_registry.memory_store import MemoryStore
    from adapters_registry.resolver import AdapterResolver
    from server.engine.threads import background

    config = config or RegistryConfig()
    registry = AdapterRegistry(store if store is not None else MemoryStore(), spec,
                               max_rank=max_rank, cache_bytes=int(config.adapter_cache_mb * 2**20),
                               allowed_roots=config.source_roots,
                               max_adapter_bytes=int(config.max_adapter_mb * 2**20),
                               load_workers=config.load_workers,
                               worker_init=functools.partial(background, config.load_nice))
    if config.resolver_uris:
        registry.resolver = AdapterResolver(registry, config.resolver_uris,
                                            negative_ttl=config.resolver_negative_ttl)
    return registry
