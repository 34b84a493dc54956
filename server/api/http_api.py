"""The OpenAI-compatible HTTP API, beside gRPC in the same process and on the same Engine.

`/v1/models`, `/v1/completions` and `/v1/chat/completions` (streamed as server-sent events with
`stream: true`), plus `/health`, `/metrics`, the web page with its JSON routes
(server/api/web.py) and adapter management with the admin token (server/api/http_admin.py:
vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, the page's /api/admin routes).
`model` is the base model's name or an adapter's. Requests go through the same `Engine` as
gRPC, so they count in the same metrics and request log.

Errors have OpenAI's shape (server/api/http_errors.py: a domain error's kind picks its HTTP
status, type and code once). Choices, whole answers and server-sent events are
server/api/http_streams.py; a client that disconnects cancels its generation, streamed or not.
Defaults follow the OpenAI API, not the gRPC API: temperature 1, and for chat, max_tokens up
to the context length.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters_registry.mixtures import AdapterMix
from server.api.http_admin import add_admin_routes
from server.api.http_errors import ApiError, add_error_handlers
from server.api.http_streams import event_stream, generate_all, usage
from server.api.openai_fields import (adapter_mixture, chat_logprobs, completion_logprobs,
                                      echoed_prompt_logprobs, structured_output)
from server.api.web import add_web_routes
from server.engine.async_engine import Engine
from server.engine.core import FinishReason, GenerationRequest, RequestOutput
from server.engine.sampler import SamplingParams
from server.errors import ConfigError
from server.serving import Backend, Tokens, check_bearer

T = TypeVar("T")

OPENAI_FINISH_REASONS = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop",
                  FinishReason.EOS: "stop"}
# OpenAI fields loraplex cannot honour -> the values meaning "not used" (None always does).
UNSUPPORTED = {"suffix": ("",), "logit_bias": ({},),
               "presence_penalty": (0,), "frequency_penalty": (0,), "tools": ([],),
               "functions": ([],), "tool_choice": ("none", "auto"),
               "function_call": ("none", "auto")}
OPENAI_TEMPERATURE = 1.0  # the OpenAI API's default; the gRPC API's is 0 (greedy)
COMPLETION_MAX_TOKENS = 16  # the OpenAI API's default for /v1/completions
MAX_CHOICES = 16  # n
DRAIN_FACTOR = 4  # a body over the limit is read and dropped up to this many times the limit


# ---- request bodies (fields and defaults of the OpenAI API) ----------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields: see UNSUPPORTED, else ignored
    model: str
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    best_of: int | None = None  # only = n
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Extensions with vLLM's names (`extra_body` in the openai SDK).
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None


class CompletionBody(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1)  # None: COMPLETION_MAX_TOKENS
    logprobs: int | None = Field(None, ge=0, le=20)  # and this many alternatives per token
    echo: bool | None = False  # the prompt's text before the completion's


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the template
    role: str
    content: str | list[ContentPart] | None = None


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# ---- the app ---------------------------------------------------------------------------------

def create_app(backend: Backend, tokens: Tokens, metrics_registry: CollectorRegistry, *,
               max_body_bytes: int = 8 << 20) -> FastAPI:
    """The app over `backend` (its engine and registry, once loaded). Request bodies above
    `max_body_bytes` (--max-message-mb, as for gRPC) are refused with 413, never parsed."""
    app = FastAPI(title="loraplex", docs_url=None, redoc_url=None, openapi_url=None)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_authorizer(tokens))])

    @v1.get("/models")
    async def models():
        ready = backend.ready()
        model = ready.core.model
        created = int(model.model_dir.stat().st_mtime)
        adapters = [(r.name, int(r.created_at)) for r in ready.registry.store.list()
                    if r.error is None]
        return {"object": "list", "data": [
            {"id": model.name, "object": "model", "created": created, "owned_by": "loraplex"},
            *({"id": name, "object": "model", "created": at, "owned_by": "loraplex",
               "parent": model.name} for name, at in adapters)]}

    @v1.post("/completions")
    async def completions(request: Request):
        body = await _read_body(request, CompletionBody, backend, max_body_bytes)
        engine, adapter, mixture = _resolve(backend, body)
        wants_logprobs = body.logprobs is not None
        params = _sampling(body, body.max_tokens or COMPLETION_MAX_TOKENS, wants_logprobs,
                           body.logprobs or 0)
        if body.echo and wants_logprobs:  # the prompt's too: computed whole, not from the cache
            params = dataclasses.replace(params, prompt_logprobs=body.logprobs)
        prompt = _prompt(body.prompt)
        gens = [GenerationRequest(**prompt, adapter_id=adapter, params=p, mixture=mixture)
                for p in _choice_params(params, body.n)]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": body.model}
        tokenizer = engine.core.tokenizer
        echo = _prompt_text(tokenizer, prompt) if body.echo else ""
        offsets = [len(echo)] * len(gens)  # text_offset so far, per choice

        def choice(index, text, ids, lps, tops, finish, prompt=None):
            """`prompt`: (ids, entries) of an echoed prompt's log-probabilities."""
            lp = echoed = None
            if wants_logprobs:
                if prompt is not None:
                    echoed = echoed_prompt_logprobs(tokenizer, *prompt, body.logprobs)
                    offsets[index] = sum(len(t) for t in echoed["tokens"])
                lp = completion_logprobs(tokenizer, ids, lps, tops if body.logprobs else None,
                                         offsets[index])
                offsets[index] += sum(len(t) for t in lp["tokens"])
                if echoed is not None:
                    lp = _joined(echoed, lp)
            return {"index": index, "text": text, "logprobs": lp,
                    "finish_reason": finish and OPENAI_FINISH_REASONS[finish]}

        if not body.stream:
            results = await generate_all(request, engine, gens, body.model)
            return {**head, "usage": usage(results), "choices": [
                choice(i, echo + r.text, r.token_ids, r.logprobs, r.top_logprobs,
                       r.finish_reason, r.prompt) for i, r in enumerate(results)]}

        echoed = set()

        def chunks(index: int, out: RequestOutput) -> Iterator[dict]:
            text = out.new_text if index in echoed else echo + out.new_text
            echoed.add(index)
            prompt = None
            if out.prompt_logprobs is not None:
                prompt = (out.prompt_token_ids, out.prompt_logprobs)
            yield {**head, "choices": [choice(index, text, out.new_token_ids, out.new_logprobs,
                                              out.new_top_logprobs, out.finish_reason, prompt)],
                   **_usage_field(body)}

        return await event_stream(request, engine, gens, body.model, head, chunks,
                                  _include_usage(body))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_body(request, ChatBody, backend, max_body_bytes)
        engine, adapter, mixture = _resolve(backend, body)
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        messages = _chat_messages(engine.core.tokenizer, body.messages)
        # No max tokens given: up to the context length (None), once the engine has rendered
        # the conversation on a preparation thread.
        params = _sampling(body, body.max_completion_tokens or body.max_tokens,
                           bool(body.logprobs), body.top_logprobs or 0)
        gens = [GenerationRequest(messages=messages, adapter_id=adapter, params=p,
                                  mixture=mixture)
                for p in _choice_params(params, body.n)]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": body.model}
        tokenizer = engine.core.tokenizer

        def logprobs(token_ids, lps, tops):
            if not body.logprobs:
                return None
            return chat_logprobs(tokenizer, token_ids, lps, tops if body.top_logprobs else None)

        if not body.stream:
            results = await generate_all(request, engine, gens, body.model)
            return {**head, "object": "chat.completion", "usage": usage(results), "choices": [{
                "index": i, "message": {"role": "assistant", "content": r.text},
                "logprobs": logprobs(r.token_ids, r.logprobs, r.top_logprobs),
                "finish_reason": OPENAI_FINISH_REASONS[r.finish_reason]}
                for i, r in enumerate(results)]}

        head["object"] = "chat.completion.chunk"
        started = set()

        def chunks(index: int, out: RequestOutput) -> Iterator[dict]:
            delta = {"content": out.new_text}
            if index not in started:
                delta = {"role": "assistant", **delta}
                started.add(index)
            yield {**head, "choices": [{
                "index": index, "delta": delta,
                "logprobs": logprobs(out.new_token_ids, out.new_logprobs, out.new_top_logprobs),
                "finish_reason": out.finish_reason and OPENAI_FINISH_REASONS[out.finish_reason]}],
                **_usage_field(body)}

        return await event_stream(request, engine, gens, body.model, head, chunks,
                                  _include_usage(body))

    app.include_router(v1)

    @app.get("/health")
    async def health():
        backend.ready()  # NotReady while loading: 503
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics():  # a plain def: FastAPI runs it on a worker thread, off the event loop
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    add_web_routes(app, backend, tokens)
    add_admin_routes(app, backend, tokens)
    add_error_handlers(app)
    return app


def _authorizer(tokens: Tokens) -> Callable[[Request], Awaitable[None]]:
    """The inference token (or the admin token) as `Authorization: Bearer`, when one is set."""
    async def authorize(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), tokens, admin=False)

    return authorize


def _resolve(backend: Backend, body: _Sampling
             ) -> tuple[Engine, str | None, AdapterMix | None]:
    """The engine, the adapter `body.model` names (None: the base model) and the mixture of
    adapters the body asks for (`model` then names the base model); refuses what loraplex does
    not support."""
    engine = backend.ready().engine
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise ApiError(400, "best_of must equal n: loraplex returns every sequence it "
                            "generates", param="best_of", code="unsupported_parameter")
    for name, value in (body.model_extra or {}).items():
        if name in UNSUPPORTED and value is not None and value not in UNSUPPORTED[name]:
            raise ApiError(400, f"{name} is not supported by loraplex", param=name,
                           code="unsupported_parameter")
    mixture = adapter_mixture(body.model_extra or {})
    base = engine.core.model.name
    if mixture is not None and body.model != base:
        raise ApiError(400, f"with adapter_mixture, model names the base model ({base!r}), "
                            f"not {body.model!r}", param="model")
    return engine, None if body.model == base else body.model, mixture


def _prompt(prompt: str | list) -> dict:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if prompt and all(isinstance(t, int) for t in prompt):
        return {"prompt_token_ids": list(prompt)}
    if len(prompt) == 1:
        return _prompt(prompt[0])
    raise ApiError(400, "prompt must be one string or one list of token ids: several prompts "
                        "per request are not supported", param="prompt")


async def _read_body(request: Request, model: type[T], backend: Backend, max_bytes: int) -> T:
    """The JSON body as `model`, parsed and validated on a preparation thread, off the event
    loop. Past `max_bytes` it is refused with 413 and never kept: the rest is read and dropped
    (up to DRAIN_FACTOR x the limit, so the client can read the answer; beyond that the
    connection is closed)."""
    chunks, size = [], 0
    header = request.headers.get("content-length", "")
    declared = int(header) if header.isdigit() else 0
    if declared <= DRAIN_FACTOR * max_bytes:
        async for chunk in request.stream():
            size += len(chunk)
            if size > DRAIN_FACTOR * max_bytes:
                break
            if size <= max_bytes:
                chunks.append(chunk)
    if max(size, declared) > max_bytes:
        raise ApiError(413, f"the request body is larger than {max_bytes} bytes "
                            f"(--max-message-mb)", code="request_too_large")
    engine = backend.ready().engine
    try:
        return await engine.off_loop(model.model_validate_json, b"".join(chunks))
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def _chat_messages(tokenizer, messages: list[ChatMessage]) -> list[dict]:
    """The conversation as the chat template takes it: text content parts joined."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template, so chat completions "
                            "are not available; use /v1/completions", param="messages",
                       code="chat_template_missing")
    rendered = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise ApiError(400, "only text content parts are supported",
                               param="messages", code="unsupported_parameter")
            content = "".join(part.text or "" for part in content)
        rendered.append({**m.model_dump(exclude_none=True), "content": content or ""})
    return rendered


def _sampling(body: _Sampling, max_tokens: int | None, logprobs: bool,
              top_logprobs: int) -> SamplingParams:
    """max_tokens None: as many as the context length leaves."""
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    params = SamplingParams.given(
        max_new_tokens=max_tokens,
        temperature=OPENAI_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop=stop,
        stop_token_ids=body.stop_token_ids, repetition_penalty=body.repetition_penalty,
        logprobs=logprobs, top_logprobs=top_logprobs, ignore_eos=body.ignore_eos,
        # response_format, guided_*, structured_outputs: fields the body models leave undeclared
        structured=structured_output(body.model_extra or {}))
    return params if max_tokens is not None else dataclasses.replace(params, max_new_tokens=None)


def _choice_params(params: SamplingParams, n: int | None) -> list[SamplingParams]:
    """One parameter set per choice: choice i samples with the request's seed + i (a seedless
    request draws a fresh seed per choice)."""
    if params.seed is None:
        return [params] * (n or 1)
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(n or 1)]


def _joined(first: dict, then: dict) -> dict:
    """Two `logprobs` objects of the completions API, one after the other."""
    tops = None
    if first["top_logprobs"] is not None or then["top_logprobs"] is not None:
        tops = (first["top_logprobs"] or []) + (then["top_logprobs"] or [])
    return {"tokens": first["tokens"] + then["tokens"],
            "token_logprobs": first["token_logprobs"] + then["token_logprobs"],
            "top_logprobs": tops, "text_offset": first["text_offset"] + then["text_offset"]}


def _prompt_text(tokenizer, prompt: dict) -> str:
    """The prompt as text, for echo."""
    if "prompt" in prompt:
        return prompt["prompt"]
    return tokenizer.decode(prompt["prompt_token_ids"])


def _include_usage(body: _Sampling) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _usage_field(body: _Sampling) -> dict:
    """With include_usage, every chunk has `usage`: null, and a last one carries it."""
    return {"usage": None} if _include_usage(body) else {}


# ---- the server ------------------------------------------------------------------------------

class _Server(uvicorn.Server):
    """A uvicorn server that leaves SIGTERM/SIGINT to its owner, which sets `should_exit`."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def start_http_server(app: FastAPI, host: str, port: int, *, grace: float | None = None,
                            cert_file: str = "", key_file: str = "", client_ca_file: str = ""
                            ) -> tuple[uvicorn.Server, asyncio.Task]:
    """Serves `app` on `host:port` (0 picks a free port: `bound_port`) from the running loop.

    With `cert_file` and `key_file` it serves HTTPS, and with `client_ca_file` it requires
    client certificates signed by that CA, as the gRPC server does with the same files.
    Stop it with `server.should_exit = True` and await the task: it stops accepting, lets
    requests in flight finish for up to `grace` seconds (None: no limit), then cancels them.
    An address that cannot be bound (in use, ...) raises ConfigError here.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ConfigError(f"cannot serve HTTP on {host}:{port}: {exc}") from exc
    # log_config=None: uvicorn's loggers go through loraplex's logging (text or JSON).
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                            log_config=None, access_log=False, timeout_graceful_shutdown=grace,
                            ssl_certfile=cert_file or None, ssl_keyfile=key_file or None,
                            ssl_ca_certs=client_ca_file or None,
                            ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca_file else ssl.CERT_NONE)
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises why it stopped
            raise RuntimeError("the HTTP server stopped while starting")
        await asyncio.sleep(0.01)
    return server, task


def bound_port(server: uvicorn.Server) -> int:
    return server.servers[0].sockets[0].getsockname()[1]
