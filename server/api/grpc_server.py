"""The gRPC face: the Inference service, and a server with every service on one port.

Inference, Admin (server/api/admin.py), grpc.health.v1 and reflection share one port. The
servicers translate messages to the engine's requests and back; domain errors become status codes
in server/api/grpc_errors.py, tokens are checked in server/api/auth.py. Starting the engine,
the other faces and draining are the process's business (server/app.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapters_registry.mixtures import AdapterMix
from loraplex.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from server.api.admin import AdminServicer
from server.api.auth import AuthInterceptor
from server.api.grpc_errors import ErrorInterceptor
from server.engine.core import FinishReason, GenerationRequest
from server.engine.sampler import SamplingParams
from server.engine.structured import StructuredOutput
from server.errors import InvalidRequest
from server.serving import Backend, Tokens

PENDING_CALLS = 100_000
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
FINISH_REASONS = {
    FinishReason.LENGTH: inference_pb2.LENGTH,
    FinishReason.STOP: inference_pb2.STOP,
    FinishReason.EOS: inference_pb2.EOS,
    FinishReason.CANCELLED: inference_pb2.CANCELLED,
}


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, backend: Backend):
        self.backend = backend

    async def Generate(self, request, context):
        result = await self.backend.ready().engine.generate(to_generation_request(request))
        return inference_pb2.GenerateResponse(
            text=result.text, token_ids=result.token_ids,
            finish_reason=FINISH_REASONS[result.finish_reason],
            usage=inference_pb2.Usage(prompt_tokens=result.prompt_tokens,
                                      completion_tokens=result.completion_tokens,
                                      cached_prompt_tokens=result.cached_tokens),
            logprobs=result.logprobs, top_logprobs=_top_logprobs(result.top_logprobs))

    async def GenerateStream(self, request, context):
        async for out in self.backend.ready().engine.stream(to_generation_request(request)):
            message = inference_pb2.GenerateResponse(
                text=out.new_text, token_ids=out.new_token_ids, logprobs=out.new_logprobs,
                top_logprobs=_top_logprobs(out.new_top_logprobs))
            if out.finished:
                message.finish_reason = FINISH_REASONS[out.finish_reason]
                message.usage.prompt_tokens = out.prompt_tokens
                message.usage.completion_tokens = out.completion_tokens
                message.usage.cached_prompt_tokens = out.cached_tokens
            yield message

    async def Tokenize(self, request, context):
        ready = self.backend.ready()
        ready.core.check_text_length("the text", len(request.text))
        ids = await ready.engine.off_loop(_token_ids, ready.core.tokenizer, request.text,
                                          request.add_special_tokens)
        return inference_pb2.TokenizeResponse(token_ids=ids)

    async def ListModels(self, request, context):
        """As HTTP's /v1/models: the base model, and the stored adapters without an error."""
        ready = self.backend.ready()
        adapters = [r.name for r in ready.registry.store.list() if r.error is None]
        return inference_pb2.ListModelsResponse(
            base_model=ready.core.model.name, adapters=adapters,
            chat_template=bool(getattr(ready.core.tokenizer, "chat_template", None)))


def _token_ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def _top_logprobs(per_token: list[list[tuple[int, float]]]) -> list[inference_pb2.TopLogprobs]:
    return [inference_pb2.TopLogprobs(token_ids=[t for t, _ in top], logprobs=[lp for _, lp in top])
            for top in per_token]


def _structured(request: inference_pb2.GenerateRequest) -> StructuredOutput | None:
    if not request.HasField("structured_output"):
        return None
    constraint = request.structured_output
    kind = constraint.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest("structured_output names no kind (json_schema, json_object, "
                             "regex, choice or grammar)")
    if kind == "choice":
        return StructuredOutput(kind, tuple(constraint.choice.choices))
    if kind == "json_object":
        return StructuredOutput(kind) if constraint.json_object else None
    return StructuredOutput(kind, getattr(constraint, kind))


def to_generation_request(request: inference_pb2.GenerateRequest) -> GenerationRequest:
    """Maps the wire message to the engine's request: an unset field (proto3's zero, or an
    optional field not present) means the default."""
    p = request.params

    def optional(name: str):
        return getattr(p, name) if p.HasField(name) else None

    params = SamplingParams.given(
        max_new_tokens=optional("max_new_tokens"), temperature=p.temperature,
        top_p=optional("top_p"), top_k=p.top_k, seed=optional("seed"), stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        repetition_penalty=optional("repetition_penalty"), ignore_eos=p.ignore_eos,
        logprobs=request.return_logprobs, top_logprobs=request.top_logprobs,
        structured=_structured(request))
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    return GenerationRequest(prompt=request.prompt or None,
                             prompt_token_ids=list(request.prompt_token_ids) or None,
                             messages=messages or None,
                             adapter_id=request.adapter_id or None, params=params,
                             mixture=_mixture(request))


def _mixture(request: inference_pb2.GenerateRequest) -> AdapterMix | None:
    if not request.HasField("adapter_mixture"):
        return None
    m = request.adapter_mixture
    return AdapterMix(tuple(m.adapter_ids), tuple(m.weights), m.combination_type or "linear",
                      m.density if m.HasField("density") else None)


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", INFERENCE_SERVICE, ADMIN_SERVICE):
            await self.health.set(service, status)


async def start_grpc_server(address: str, backend: Backend, *, tokens: Tokens = Tokens(None, None),
                            credentials: grpc.ServerCredentials | None = None,
                            max_message_bytes: int = 8 << 20) -> GrpcServer:
    """Opens `address` ('host:0' picks a free port) with every service; health NOT_SERVING.

    The Admin service is offered only when an admin token is configured.
    """
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               # grpc-core queues calls the aio server has not picked up yet, and past 1,000 of
               # them cancels the oldest with a bare CANCELLED. The engine's --max-queue is the
               # one overload control (RESOURCE_EXHAUSTED with a retry hint), so that queue is
               # made large enough never to decide first.
               ("grpc.server.max_pending_requests", PENDING_CALLS),
               ("grpc.server.max_pending_requests_hard_limit", 2 * PENDING_CALLS)]
    server = grpc.aio.server(interceptors=[AuthInterceptor(tokens), ErrorInterceptor()],
                             options=options)
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(backend), server)
    services = [INFERENCE_SERVICE]
    if tokens.admin is not None:
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(backend), server)
        services.append(ADMIN_SERVICE)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    port = (server.add_secure_port(address, credentials) if credentials
            else server.add_insecure_port(address))
    await server.start()
    running = GrpcServer(server, port, health_servicer)
    await running.set_serving(False)
    return running
