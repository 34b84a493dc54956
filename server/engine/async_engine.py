"""The Python API that servers call: asyncio generate/stream over an EngineCore on its own thread.

The step loop owns the core. Other threads talk to it through an inbox of commands, applied
between steps, and receive outputs through their event loop (`call_soon_threadsafe`).

With a registry, a request's adapter is leased before the request reaches the loop (a cold one is
loaded on the registry's worker threads while the loop keeps stepping) and released when the
request ends, however it ends. An observer (metrics, request logs) gets one `RequestRecord` per
request, finished, cancelled or refused.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from adapters_registry.host_cache import AdapterLease
from adapters_registry.peft_format import LoraWeights
from adapters_registry.registry import AdapterLoadError, AdapterRegistry
from adapters_registry.store import UnknownAdapterError
from server.engine.core import EngineCore, GenerationRequest, Overloaded, RequestOutput, UnknownAdapter
from server.engine.sampler import InvalidRequest
from server.engine.threads import loop_threads

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float] = field(default_factory=list)


@dataclass
class RequestRecord:
    """One request's life, for metrics and the request log. Times in seconds."""

    request_id: str
    adapter: str | None
    outcome: str  # a finish reason (length, stop, eos, cancelled) or why it was refused
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_seconds: float | None = None  # arrival in the engine to first scheduled
    ttft_seconds: float | None = None  # submission (lease wait included) to first token
    e2e_seconds: float = 0.0  # submission to the end
    token_gaps: list[float] = field(default_factory=list)  # between consecutive tokens


# Why a request was refused before it ran, by exception type (first match wins).
REFUSALS = ((InvalidRequest, "invalid"), (UnknownAdapter, "unknown_adapter"),
            (UnknownAdapterError, "unknown_adapter"), (Overloaded, "overloaded"),
            (AdapterLoadError, "adapter_unavailable"), (Exception, "error"))


@dataclass
class _Tracked:
    """A request the loop thread is running: where its outputs go and what it holds."""

    sink: Callable[[RequestOutput], None]
    lease: AdapterLease | None
    adapter: str | None
    submitted: float  # time.monotonic() when stream() was called
    token_times: list[float] = field(default_factory=list)


class Engine:
    def __init__(self, core: EngineCore, registry: AdapterRegistry | None = None,
                 observer: Callable[[RequestRecord], None] | None = None):
        """Without a registry, requests may name only adapters resident in the core.

        `observer` is called once per request, on the loop thread or the caller's event loop;
        it must be quick and thread-safe.
        """
        self.core = core
        self.registry = registry
        self.observer = observer
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._requests: dict[str, _Tracked] = {}  # on the loop thread
        self._ids = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()
        if registry is not None:
            registry.add_listener(self._adapter_changed)

    # ---- public API -----------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Runs one request to the end and returns the whole result."""
        text, ids, logprobs = [], [], []
        last = None
        async for out in self.stream(request):
            text.append(out.new_text)
            ids += out.new_token_ids
            logprobs += out.new_logprobs
            last = out
        return GenerationResult(text="".join(text), token_ids=ids, finish_reason=last.finish_reason,
                                prompt_tokens=last.prompt_tokens,
                                completion_tokens=last.completion_tokens, logprobs=logprobs)

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
            lease = await self._lease(request)
        except Exception as exc:
            self._refused(request_id, request, submitted, exc)
            raise

        def deliver(out: RequestOutput) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, out)

        def add() -> None:
            try:
                self.core.add_request(request, request_id, adapter=lease)
                self._requests[request_id] = _Tracked(deliver, lease, request.adapter_id,
                                                      submitted)
                loop.call_soon_threadsafe(_resolve, added, None)
            except Exception as exc:  # validation errors travel back to the caller
                if lease is not None:
                    self.registry.release(lease)
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

    async def _lease(self, request: GenerationRequest) -> AdapterLease | None:
        """The registry's lease on the request's adapter, waiting for a cold load if needed."""
        if self.registry is None or not request.adapter_id:
            return None
        future = self.registry.acquire(request.adapter_id)  # raises UnknownAdapterError now
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._release_unused)  # granted after the caller left
            raise

    def _refused(self, request_id: str, request: GenerationRequest, submitted: float,
                 error: Exception) -> None:
        if self.observer is not None:
            outcome = next(label for kind, label in REFUSALS if isinstance(error, kind))
            self.observer(RequestRecord(request_id, request.adapter_id or None, outcome,
                                        e2e_seconds=time.monotonic() - submitted))

    def _release_unused(self, future: Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self.registry.release(future.result())

    def _adapter_changed(self, name: str) -> None:
        """Registry listener (any thread): free device slots of replaced or deleted versions."""
        self._submit(lambda: self.core.retire_adapter(name, self.registry.current_key(name)))

    def add_adapter(self, adapter_id: str, weights: LoraWeights) -> None:
        """Thread-safe; takes effect before the next step."""
        self._call(lambda: self.core.add_adapter(adapter_id, weights))

    def remove_adapter(self, adapter_id: str) -> None:
        self._call(lambda: self.core.remove_adapter(adapter_id))

    def close(self) -> None:
        """Stops the step loop; unfinished requests are cancelled."""
        self._stopping = True
        self._wake.set()
        self._thread.join()

    # ---- the loop thread ------------------------------------------------------------------

    def _loop(self) -> None:
        loop_threads(self.core.config.threads)
        while not self._stopping:
            self._drain_inbox()
            if not self.core.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.core.step()
            except Exception:  # a bug: fail the step's requests rather than hang their callers
                log.exception("engine step failed; cancelling running requests")
                self._fail_all()
                continue
            for out in outputs:
                self._emit(out)
        self._fail_all()

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

    def _call(self, fn: Callable[[], None]) -> None:
        """Runs fn on the loop thread and waits for it; re-raises its exception here."""
        if threading.current_thread() is self._thread:
            fn()
            return
        done = threading.Event()
        box: list[BaseException] = []

        def command() -> None:
            try:
                fn()
            except BaseException as exc:
                box.append(exc)
            done.set()

        self._submit(command)
        done.wait()
        if box:
            raise box[0]

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
        """The request is over: its lease goes back to the registry, the observer hears of it."""
        if tracked.lease is not None:
            self.registry.release(tracked.lease)
        if self.observer is None:
            return
        times = tracked.token_times
        self.observer(RequestRecord(
            last.request_id, tracked.adapter, last.finish_reason,
            prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
            queue_seconds=last.queue_seconds,
            ttft_seconds=times[0] - tracked.submitted if times else None,
            e2e_seconds=time.monotonic() - tracked.submitted,
            token_gaps=[b - a for a, b in zip(times, times[1:])]))

    def _fail_all(self) -> None:
        for request_id in list(self._requests):
            out = self.core.abort(request_id)
            if out is not None:
                self._emit(out)


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if not future.done():
        future.set_result(error)
