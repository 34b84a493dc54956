"""The gRPC face of the engine: the Inference service, grpc.health.v1 and server reflection.

Domain errors map to precise status codes (bad input -> INVALID_ARGUMENT, unknown adapter ->
NOT_FOUND, an adapter that cannot be loaded -> FAILED_PRECONDITION, host adapter cache full of
in-use adapters -> RESOURCE_EXHAUSTED); only a bug is INTERNAL. SIGTERM or SIGINT: health turns NOT_SERVING, in-flight
requests get `grace` seconds to finish, then the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapters_registry.registry import AdapterCacheFullError, AdapterLoadError, AdapterRegistry
from adapters_registry.store import InvalidNameError, UnknownAdapterError
from loraplex.v1 import inference_pb2, inference_pb2_grpc
from server.async_engine import Engine
from server.engine import EngineCore, FinishReason, GenerationRequest, UnknownAdapter
from server.sampler import InvalidRequest, SamplingParams

log = logging.getLogger(__name__)

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
FINISH_REASONS = {
    FinishReason.LENGTH: inference_pb2.LENGTH,
    FinishReason.STOP: inference_pb2.STOP,
    FinishReason.EOS: inference_pb2.EOS,
    FinishReason.CANCELLED: inference_pb2.CANCELLED,
}
# First match wins: subclasses before their bases.
STATUS_OF = {InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
             InvalidNameError: grpc.StatusCode.INVALID_ARGUMENT,
             UnknownAdapter: grpc.StatusCode.NOT_FOUND,
             UnknownAdapterError: grpc.StatusCode.NOT_FOUND,
             AdapterCacheFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
             AdapterLoadError: grpc.StatusCode.FAILED_PRECONDITION}
DOMAIN_ERRORS = tuple(STATUS_OF)


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    async def Generate(self, request, context):
        result = await self.engine.generate(to_generation_request(request))
        return inference_pb2.GenerateResponse(
            text=result.text, token_ids=result.token_ids,
            finish_reason=FINISH_REASONS[result.finish_reason],
            usage=inference_pb2.Usage(prompt_tokens=result.prompt_tokens,
                                      completion_tokens=result.completion_tokens),
            logprobs=result.logprobs)

    async def GenerateStream(self, request, context):
        async for out in self.engine.stream(to_generation_request(request)):
            message = inference_pb2.GenerateResponse(
                text=out.new_text, token_ids=out.new_token_ids, logprobs=out.new_logprobs)
            if out.finished:
                message.finish_reason = FINISH_REASONS[out.finish_reason]
                message.usage.prompt_tokens = out.prompt_tokens
                message.usage.completion_tokens = out.completion_tokens
            yield message

    async def Tokenize(self, request, context):
        ids = self.engine.core.tokenizer(request.text,
                                         add_special_tokens=request.add_special_tokens)["input_ids"]
        return inference_pb2.TokenizeResponse(token_ids=ids)


def to_generation_request(request: inference_pb2.GenerateRequest) -> GenerationRequest:
    """Maps the wire message to the engine's request; proto3 defaults mean 'use the default'."""
    if request.prompt and request.prompt_token_ids:
        raise InvalidRequest("give exactly one of prompt and prompt_token_ids")
    p = request.params
    defaults = SamplingParams()
    params = SamplingParams(
        max_new_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else defaults.max_new_tokens,
        temperature=p.temperature,
        top_p=p.top_p if p.HasField("top_p") else defaults.top_p,
        top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        repetition_penalty=(p.repetition_penalty if p.HasField("repetition_penalty")
                            else defaults.repetition_penalty),
        logprobs=request.return_logprobs)
    return GenerationRequest(prompt=request.prompt or None,
                             prompt_token_ids=list(request.prompt_token_ids) or None,
                             adapter_id=request.adapter_id or None, params=params)


class DomainErrorInterceptor(grpc.aio.ServerInterceptor):
    """Aborts an RPC that raised a domain error with the matching status and its message."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is not None and handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary), handler.request_deserializer,
                handler.response_serializer)
        if handler is not None and handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _unary_stream(handler.unary_stream), handler.request_deserializer,
                handler.response_serializer)
        return handler


def _unary(behavior):
    async def wrapped(request, context):
        try:
            return await behavior(request, context)
        except DOMAIN_ERRORS as exc:
            await context.abort(_status_of(exc), str(exc))
    return wrapped


def _unary_stream(behavior):
    async def wrapped(request, context):
        try:
            async for message in behavior(request, context):
                yield message
        except DOMAIN_ERRORS as exc:
            await context.abort(_status_of(exc), str(exc))
    return wrapped


def _status_of(exc: Exception) -> grpc.StatusCode:
    return next(code for kind, code in STATUS_OF.items() if isinstance(exc, kind))


async def create_server(core: EngineCore, address: str, registry: AdapterRegistry | None = None
                        ) -> tuple[grpc.aio.Server, int, Engine, health.aio.HealthServicer]:
    """Builds and starts the server on `address` ('host:0' picks a free port).

    With a registry, adapters come from it; without, only those resident in `core` are served.
    """
    engine = Engine(core, registry)
    server = grpc.aio.server(interceptors=[DomainErrorInterceptor()])
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (INFERENCE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    await server.start()
    for service in ("", INFERENCE_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, port, engine, health_servicer


async def serve(core: EngineCore, *, host: str, port: int, registry: AdapterRegistry | None = None,
                grace: float = 30.0) -> None:
    server, bound, engine, health_servicer = await create_server(core, f"{host}:{port}", registry)
    log.info("serving on %s:%d", host, bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining: NOT_SERVING, %.0f s grace for in-flight requests", grace)
    for service in ("", INFERENCE_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace)
    engine.close()
    log.info("stopped")
