"""Generation on behalf of an HTTP client: several choices merged into one stream of outputs,
whole answers, server-sent events, and cancellation when the client leaves."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from server.api.http_errors import ApiError, ClientGone, check_finished, error_body, model_errors
from server.engine.async_engine import Engine
from server.engine.core import FinishReason, GenerationRequest, RequestOutput

T = TypeVar("T")


def usage(results: list) -> dict:
    """One request's usage, whatever its number of choices: the prompt counts once."""
    prompt, cached = results[0].prompt_tokens, results[0].cached_tokens
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`; if the client disconnects first, cancels it (which aborts the generation)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def outputs_of(engine: Engine, gens: list[GenerationRequest]
                     ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) of every generation as they come. The first choice's first
    output comes before the others start: by then its prompt is in the prefix cache, and the
    others compute only what the cache does not hold. Closing this closes every generation."""
    first = engine.stream(gens[0])
    async with contextlib.aclosing(first):
        yield 0, await anext(first)
        if len(gens) == 1:
            async for out in first:
                yield 0, out
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream) -> None:
            try:
                async with contextlib.aclosing(stream):
                    async for out in stream:
                        await merged.put((index, out, None))
            except Exception as exc:  # refused (overloaded, ...): the request fails
                await merged.put((index, None, exc))
            await merged.put((index, None, None))

        tasks = [asyncio.create_task(pump(0, first))]
        tasks += [asyncio.create_task(pump(i, engine.stream(g))) for i, g in enumerate(gens[1:], 1)]
        try:
            running = len(tasks)
            while running:
                index, out, error = await merged.get()
                if error is not None:
                    raise error
                if out is None:
                    running -= 1
                else:
                    yield index, out
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


@dataclasses.dataclass
class Choice:
    """One choice's whole answer, gathered from its outputs."""

    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    prompt: tuple[list[int], list] | None = None  # an echoed prompt's ids and log-probabilities

    def add(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt = (out.prompt_token_ids, out.prompt_logprobs)
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        self.logprobs += out.new_logprobs
        self.top_logprobs += out.new_top_logprobs
        if out.finished:
            self.finish_reason = out.finish_reason
            self.prompt_tokens, self.completion_tokens, self.cached_tokens = (
                out.prompt_tokens, out.completion_tokens, out.cached_tokens)


async def generate_all(request: Request, engine: Engine, gens: list[GenerationRequest],
                       model: str) -> list[Choice]:
    """Every choice's whole answer; cancelled if the client leaves."""
    async def gather() -> list[Choice]:
        choices = [Choice() for _ in gens]
        async with contextlib.aclosing(outputs_of(engine, gens)) as outputs:
            async for index, out in outputs:
                choices[index].add(out)
        return choices

    with model_errors(model, engine):
        choices = await unless_disconnected(request, gather())
    for choice in choices:
        check_finished(choice.finish_reason)
    return choices


async def event_stream(request: Request, engine: Engine, gens: list[GenerationRequest],
                       model: str, head: dict,
                       chunks: Callable[[int, RequestOutput], Iterator[dict]],
                       include_usage: bool) -> StreamingResponse:
    """Server-sent events: `chunks(choice, output)` for each engine output, a last chunk with
    the usage of all choices if `include_usage` (stream_options.include_usage), then `[DONE]`.

    The first output is awaited before the response starts, so a refused request gets its HTTP
    status. Closing the outputs aborts every generation: that happens when the client
    disconnects (the response task is cancelled) or the event generator is closed.
    """
    outputs = outputs_of(engine, gens)
    with model_errors(model, engine):
        first = await unless_disconnected(request, anext(outputs))

    async def events() -> AsyncIterator[str]:
        finished = [Choice() for _ in gens]
        async with contextlib.aclosing(outputs):
            index, out = first
            while True:
                if out.finish_reason == FinishReason.CANCELLED:
                    error = ApiError(503, "the server cancelled the request (shutting down, or "
                                          "an engine failure: see its log)",
                                     type="server_error", code="cancelled")
                    yield sse(error_body(error))
                    break
                for chunk in chunks(index, out):
                    yield sse(chunk)
                if out.finished:
                    finished[index].add(out)
                try:
                    index, out = await anext(outputs)
                except StopAsyncIteration:
                    if include_usage:
                        yield sse({**head, "choices": [], "usage": usage(finished)})
                    break
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
