"""The gRPC server: Inference, Admin, grpc.health.v1 and reflection on one port.

`serve` opens the port first, with health NOT_SERVING, loads the model on a thread, then turns
SERVING; calls that arrive before get UNAVAILABLE. On SIGTERM or SIGINT health turns NOT_SERVING
again, new calls are refused, in-flight ones get `--grace-seconds` to finish, then the process
exits. Domain errors become status codes in server/api/grpc_errors.py; tokens and TLS are in
server/api/auth.py.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapters_registry.registry import AdapterRegistry
from loraplex.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from server.api.admin import AdminServicer
from server.tools.cost import CostReport, cost_report
from server.engine.async_engine import Engine, RequestRecord
from server.api.auth import AuthInterceptor, Tokens, load_tokens, server_credentials
from server.config import ServerConfig
from server.engine.core import EngineCore, FinishReason, GenerationRequest
from server.api.grpc_errors import ErrorInterceptor, NotReady
from server.api.http_api import bound_port, create_app, start_http_server
from server.api.metrics import Metrics
from server.api.request_log import log_request
from server.engine.sampler import InvalidRequest, SamplingParams
from server.engine.threads import run_on_own_thread, single_threaded

log = logging.getLogger(__name__)

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
FINISH_REASONS = {
    FinishReason.LENGTH: inference_pb2.LENGTH,
    FinishReason.STOP: inference_pb2.STOP,
    FinishReason.EOS: inference_pb2.EOS,
    FinishReason.CANCELLED: inference_pb2.CANCELLED,
}


@dataclass(frozen=True)
class Ready:
    engine: Engine
    registry: AdapterRegistry | None  # None: only adapters resident in the core are served
    cost: CostReport  # measured at load: the base as served, slot tables, one full copy


class Backend:
    """What the servicers serve from: empty until the model is loaded."""

    def __init__(self):
        self._ready: Ready | None = None

    def ready(self) -> Ready:
        if self._ready is None:
            raise NotReady("the model is still loading; retry when health is SERVING")
        return self._ready

    def set_ready(self, engine: Engine, registry: AdapterRegistry | None) -> None:
        model = engine.core.model
        self._ready = Ready(engine, registry, cost_report(model, {}, model.model_dir))


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, backend: Backend):
        self.backend = backend

    async def Generate(self, request, context):
        result = await self.backend.ready().engine.generate(to_generation_request(request))
        return inference_pb2.GenerateResponse(
            text=result.text, token_ids=result.token_ids,
            finish_reason=FINISH_REASONS[result.finish_reason],
            usage=inference_pb2.Usage(prompt_tokens=result.prompt_tokens,
                                      completion_tokens=result.completion_tokens),
            logprobs=result.logprobs)

    async def GenerateStream(self, request, context):
        async for out in self.backend.ready().engine.stream(to_generation_request(request)):
            message = inference_pb2.GenerateResponse(
                text=out.new_text, token_ids=out.new_token_ids, logprobs=out.new_logprobs)
            if out.finished:
                message.finish_reason = FINISH_REASONS[out.finish_reason]
                message.usage.prompt_tokens = out.prompt_tokens
                message.usage.completion_tokens = out.completion_tokens
            yield message

    async def Tokenize(self, request, context):
        ids = self.backend.ready().engine.core.tokenizer(request.text,
                                         add_special_tokens=request.add_special_tokens)["input_ids"]
        return inference_pb2.TokenizeResponse(token_ids=ids)


def to_generation_request(request: inference_pb2.GenerateRequest) -> GenerationRequest:
    """Maps the wire message to the engine's request; proto3 defaults mean 'use the default'."""
    if sum(map(bool, (request.prompt, request.prompt_token_ids, request.messages))) > 1:
        raise InvalidRequest("give exactly one of prompt, prompt_token_ids and messages")
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
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    return GenerationRequest(prompt=request.prompt or None,
                             prompt_token_ids=list(request.prompt_token_ids) or None,
                             messages=messages or None,
                             adapter_id=request.adapter_id or None, params=params)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    backend: Backend
    health: health.aio.HealthServicer
    metrics: Metrics

    def start_engine(self, core: EngineCore, registry: AdapterRegistry | None) -> Engine:
        """Runs `core` behind the services, reporting each request to the metrics and the log."""
        self.metrics.watch_loads(registry, core.slots)

        def observe(record: RequestRecord) -> None:
            self.metrics.observe(record)
            log_request(record)

        engine = Engine(core, registry, observer=observe)
        self.backend.set_ready(engine, registry)
        return engine

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", INFERENCE_SERVICE, ADMIN_SERVICE):
            await self.health.set(service, status)


async def start_server(address: str, *, tokens: Tokens = Tokens(None, None),
                       credentials: grpc.ServerCredentials | None = None,
                       max_message_bytes: int = 8 << 20, top_adapters: int = 20,
                       vllm_metrics: bool = False) -> RunningServer:
    """Opens `address` ('host:0' picks a free port) with every service; health NOT_SERVING.

    The Admin service is offered only when an admin token is configured.
    """
    backend = Backend()
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
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
    metrics = Metrics(backend, top_adapters=top_adapters, vllm_metrics=vllm_metrics)
    running = RunningServer(server, port, backend, health_servicer, metrics)
    await running.set_serving(False)
    return running


async def create_server(core: EngineCore, address: str, registry: AdapterRegistry | None = None,
                        **options) -> RunningServer:
    """A started, SERVING server around an already loaded core (tests, embedding)."""
    running = await start_server(address, **options)
    running.start_engine(core, registry)
    await running.set_serving(True)
    return running


async def serve(load: Callable[[], tuple[EngineCore, AdapterRegistry]], *, host: str, port: int,
                config: ServerConfig) -> None:
    """Runs the server until SIGTERM/SIGINT; `load()` (on a thread) builds the core and registry.

    An exception from `load` stops the server and propagates.
    """
    tokens = load_tokens(config)
    running = await start_server(f"{host}:{port}", tokens=tokens,
                                 credentials=server_credentials(config),
                                 max_message_bytes=int(config.max_message_mb * 2**20),
                                 top_adapters=config.top_adapters,
                                 vllm_metrics=config.vllm_metrics)
    log.info("listening on %s:%d; health NOT_SERVING until the model is loaded", host,
             running.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine = http = None
    # Helper threads touch torch single-threaded and the model loads on a thread that ends, so
    # the engine's loop thread holds the only OpenMP pool (server/engine/threads.py).
    loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="loraplex-io",
                                                 initializer=single_threaded))
    loading = asyncio.wrap_future(run_on_own_thread(load, "loraplex-load"))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            core, registry = loading.result()
            engine = running.start_engine(core, registry)
            if config.metrics_port:
                running.metrics.serve(config.metrics_port)
                log.info("metrics on :%d/metrics", config.metrics_port)
            if config.http_port:
                app = create_app(running.backend, tokens, running.metrics.registry)
                http = await start_http_server(
                    app, host, config.http_port, grace=config.grace_seconds,
                    cert_file=config.tls_cert_file, key_file=config.tls_key_file,
                    client_ca_file=config.tls_client_ca_file)
                log.info("http on %s:%d", host, bound_port(http[0]))
            await running.set_serving(True)
            log.info("serving on %s:%d", host, running.port)
            await stopping
        log.info("draining: NOT_SERVING, %.0f s grace for in-flight requests",
                 config.grace_seconds)
    finally:
        for task in (loading, stopping):
            task.cancel()  # the load's thread itself runs to its end (threads cannot be stopped)
        await running.set_serving(False)
        if http is not None:
            http[0].should_exit = True  # in-flight HTTP requests drain alongside gRPC's
        await running.server.stop(config.grace_seconds)
        if http is not None:
            await http[1]
        if engine is not None:
            engine.close()
    log.info("stopped")
