"""The Python API that servers call: asyncio generate/stream over an EngineCore on its own thread.

The step loop owns the core. Other threads talk to it through an inbox of commands, applied
between steps, and receive outputs through their event loop (`call_soon_threadsafe`).

A request is prepared (checked, its prompt tokenized: `EngineCore.prepare`) on a pool of
preparation threads, so a large or slow prompt delays only itself, never the step loop or the
event loop; the faces run their own per-request parsing there too (`Engine.off_loop`). Its
adapter is leased from the core's registry before the request reaches the loop (a
cold one is loaded on the registry's worker threads while the loop keeps stepping); the core
releases the lease when the request ends, however it ends. After every step the loop publishes
an `EngineStats` snapshot (`Engine.stats`) for metrics and the admin API. An observer (metrics,
request logs) gets one `RequestRecord` per request, finished, cancelled or refused.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from adapters_registry.host_cache import AdapterLease
from adapters_registry.store import UnknownAdapterError
from server.engine.core import EngineCore, GenerationRequest, RequestOutput
from server.engine.stats import EngineStats
from server.engine.threads import loop_threads, single_threaded
from server.errors import ErrorKind, kind_of

log = logging.getLogger(__name__)
T = TypeVar("T")
PREPARE_THREADS = 4  # requests prepared at once; a slow one leaves the others three


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # when asked


@dataclass
class RequestRecord:
    """One request's life, for metrics and the request log. Times in seconds."""

    request_id: str
    adapter: str | None  # its name, or a mixture's label (`linear(json=0.5,pirate=0.5)`)
    finish_reason: str | None  # None: refused before it ran
    refusal: ErrorKind | None = None  # why it was refused (None with no finish reason: a bug)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    queue_seconds: float | None = None  # arrival in the engine to first scheduled
    ttft_seconds: float | None = None  # submission (lease wait included) to first token
    e2e_seconds: float = 0.0  # submission to the end
    token_gaps: list[float] = field(default_factory=list)  # between consecutive tokens
    combination: str | None = None  # a mixture's combination type (linear, cat, svd, ties)


@dataclass
class _Tracked:
    """A request the loop thread is running: where its outputs go and what it holds."""

    sink: Callable[[RequestOutput], None]
    adapter: str | None
    combination: str | None
    submitted: float  # time.monotonic() when stream() was called
    token_times: list[float] = field(default_factory=list)


class Engine:
    def __init__(self, core: EngineCore,
                 observer: Callable[[RequestRecord], None] | None = None):
        """`observer` is called once per request, on the loop thread or the caller's event loop;
        it must be quick and thread-safe."""
        self.core = core
        self.registry = core.registry
        self.observer = observer
        self.stats: EngineStats = core.stats()  # replaced by the loop thread after every step
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._requests: dict[str, _Tracked] = {}  # on the loop thread
        self._ids = itertools.count()
        self._prepare_pool = ThreadPoolExecutor(PREPARE_THREADS,
                                                thread_name_prefix="loraplex-prepare",
                                                initializer=single_threaded)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()
        # A replaced or deleted adapter: wake the loop, whose next step frees stale slots.
        self.registry.add_listener(lambda name: self._wake.set())

    # ---- public API -----------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Runs one request to the end and returns the whole result."""
        text, ids, logprobs, top = [], [], [], []
        last = None
        async for out in self.stream(request):
            text.append(out.new_text)
            ids += out.new_token_ids
            logprobs += out.new_logprobs
            top += out.new_top_logprobs
            last = out
        return GenerationResult(text="".join(text), token_ids=ids, finish_reason=last.finish_reason,
                                prompt_tokens=last.prompt_tokens,
                                completion_tokens=last.completion_tokens, logprobs=logprobs,
                                cached_tokens=last.cached_tokens, top_logprobs=top)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Yields one RequestOutput per generated token; the last has `finished` set.

        Leaving the loop early (break, cancellation, a client gone) aborts the request, which
        frees its KV blocks and adapter slot at the next step boundary.
        """
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        request_id = f"r{next(self._ids)}"
        submitted = time.monotonic()
        added = loop.create_future()
        try:
            prepared = await self.off_loop(self.core.prepare, request)
            lease = await self._lease(request)
        except Exception as exc:
            self._refused(request_id, request, submitted, exc)
            raise

        def deliver(out: RequestOutput) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, out)

        def add() -> None:
            try:  # the core owns the lease from here, and releases it if it refuses
                self.core.add_prepared(prepared, request_id, adapter=lease)
                self._requests[request_id] = _Tracked(deliver, request.adapter_label,
                                                      _combination(request), submitted)
                loop.call_soon_threadsafe(_resolve, added, None)
            except Exception as exc:  # validation errors travel back to the caller
                loop.call_soon_threadsafe(_resolve, added, exc)

        self._submit(add)
        finished = False
        try:
            error = await added
            if error is not None:
                finished = True
                self._refused(request_id, request, submitted, error)
                raise error
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._submit(lambda: self._abort(request_id))

    async def off_loop(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on a preparation thread: per-request work that may be large (parsing,
        tokenizing) stays off the event loop and off the step loop."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, fn, *args)

    async def _lease(self, request: GenerationRequest) -> AdapterLease | None:
        """The registry's lease on the request's adapter (or mixture), waiting for a cold load
        (or a merge) if needed."""
        if request.mixture is not None:
            for name in request.mixture.adapters:
                if self.registry.current_key(name) is None:
                    await self._resolve(name)
            future = self.registry.acquire_mixture(request.mixture, self.core.config.max_slots)
        elif not request.adapter_id:
            return None
        else:
            try:
                future = self.registry.acquire(request.adapter_id)  # raises UnknownAdapterError
            except UnknownAdapterError:
                await self._resolve(request.adapter_id)
                future = self.registry.acquire(request.adapter_id)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._release_unused)  # granted after the caller left
            raise

    async def _resolve(self, name: str) -> None:
        """Looks for an unregistered adapter in the resolver's sources (once per name however
        many ask); without a resolver, the registry's acquire says it is unknown."""
        if self.registry.resolver is not None:
            await asyncio.wrap_future(self.registry.resolver.resolve(name))

    def _refused(self, request_id: str, request: GenerationRequest, submitted: float,
                 error: Exception) -> None:
        if self.observer is not None:
            self.observer(RequestRecord(request_id, request.adapter_label, None,
                                        refusal=kind_of(error), combination=_combination(request),
                                        e2e_seconds=time.monotonic() - submitted))

    def _release_unused(self, future: Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self.registry.release(future.result())

    def close(self) -> None:
        """Stops the step loop; unfinished requests are cancelled."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    # ---- the loop thread ------------------------------------------------------------------

    def _loop(self) -> None:
        loop_threads(self.core.config.threads)
        while not self._stopping:
            self._drain_inbox()
            if not self.core.has_work():
                self.stats = self.core.stats()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.core.step()
            except Exception:  # a bug: fail the step's requests rather than hang their callers
                log.exception("engine step failed; cancelling running requests")
                self._fail_all()
                continue
            self.stats = self.core.stats()  # first: a caller that has its answer sees it counted
            for out in outputs:
                self._emit(out)
        self._fail_all()
        self.stats = self.core.stats()

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            command()

    def _submit(self, command: Callable[[], None]) -> None:
        self._inbox.put(command)
        self._wake.set()

    def _abort(self, request_id: str) -> None:
        """The caller left: cancel the request; nobody listens to its last output."""
        tracked = self._requests.pop(request_id, None)
        out = self.core.abort(request_id)
        if tracked is not None and out is not None:
            self._end(tracked, out)

    def _emit(self, out: RequestOutput) -> None:
        tracked = self._requests.get(out.request_id)
        if tracked is None:
            return
        if out.new_token_ids:
            tracked.token_times.append(time.monotonic())
        if out.finished:
            del self._requests[out.request_id]
            self._end(tracked, out)
        tracked.sink(out)

    def _end(self, tracked: _Tracked, last: RequestOutput) -> None:
        """The request is over: the observer hears of it."""
        if self.observer is None:
            return
        times = tracked.token_times
        self.observer(RequestRecord(
            last.request_id, tracked.adapter, last.finish_reason,
            prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
            cached_tokens=last.cached_tokens, queue_seconds=last.queue_seconds,
            ttft_seconds=times[0] - tracked.submitted if times else None,
            e2e_seconds=time.monotonic() - tracked.submitted,
            token_gaps=[b - a for a, b in zip(times, times[1:])],
            combination=tracked.combination))

    def _fail_all(self) -> None:
        for request_id in list(self._requests):
            out = self.core.abort(request_id)
            if out is not None:
                self._emit(out)


def _combination(request: GenerationRequest) -> str | None:
    return request.mixture.effective if request.mixture is not None else None


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if not future.done():
        future.set_result(error)
