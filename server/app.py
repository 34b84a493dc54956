"""The server process: start the faces, load the model on a thread, serve, drain, stop.

`serve` opens the gRPC port first, with health NOT_SERVING, and loads the model on a thread of
its own; calls that arrive meanwhile get UNAVAILABLE. Once loaded it starts the engine's loop,
the metrics endpoint and the HTTP API, and turns SERVING. On SIGTERM or SIGINT health turns
NOT_SERVING again, new calls are refused, in-flight ones (gRPC and HTTP) get `--grace-seconds`
to finish, then the engine stops.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from server.api.auth import server_credentials
from server.api.grpc_server import GrpcServer, start_grpc_server
from server.api.http_api import bound_port, create_app, start_http_server
from server.api.metrics import Metrics
from server.api.request_log import log_request
from server.config import ServerConfig
from server.engine.async_engine import Engine, RequestRecord
from server.engine.core import EngineCore
from server.engine.threads import background, run_on_own_thread
from server.serving import Backend, Tokens, load_tokens

log = logging.getLogger(__name__)


@dataclass
class RunningServer:
    grpc: GrpcServer
    backend: Backend
    metrics: Metrics

    @property
    def port(self) -> int:
        return self.grpc.port

    def start_engine(self, core: EngineCore) -> Engine:
        """Runs `core` behind the faces, reporting each request to the metrics and the log."""
        self.metrics.watch_loads(core)

        def observe(record: RequestRecord) -> None:
            self.metrics.observe(record)
            log_request(record)

        # Every object alive now (the model, the tokenizer's tables) is kept out of the
        # collector's full passes: one over them holds the GIL for a long while, and when it
        # runs on a low-priority background thread the step loop waits that long.
        gc.freeze()
        engine = Engine(core, observer=observe)
        self.backend.set_ready(engine)
        return engine


async def start_server(address: str, *, tokens: Tokens = Tokens(None, None),
                       credentials: grpc.ServerCredentials | None = None,
                       max_message_bytes: int = 8 << 20, top_adapters: int = 20,
                       vllm_metrics: bool = False) -> RunningServer:
    """The gRPC server on `address` ('host:0' picks a free port) with health NOT_SERVING, and
    the metrics, both over a backend that is empty until `start_engine`."""
    backend = Backend()
    grpc_server = await start_grpc_server(address, backend, tokens=tokens,
                                          credentials=credentials,
                                          max_message_bytes=max_message_bytes)
    metrics = Metrics(backend, top_adapters=top_adapters, vllm_metrics=vllm_metrics)
    return RunningServer(grpc_server, backend, metrics)


async def create_server(core: EngineCore, address: str, **options) -> RunningServer:
    """A started, SERVING server around an already loaded core (tests, embedding)."""
    running = await start_server(address, **options)
    running.start_engine(core)
    await running.grpc.set_serving(True)
    return running


async def serve(load: Callable[[], EngineCore], config: ServerConfig) -> None:
    """Runs the server until SIGTERM/SIGINT; `load()` (on a thread) builds the core.

    An exception from `load` stops the server and propagates.
    """
    tokens = load_tokens(config)
    running = await start_server(f"{config.host}:{config.port}", tokens=tokens,
                                 credentials=server_credentials(config),
                                 max_message_bytes=int(config.max_message_mb * 2**20),
                                 top_adapters=config.top_adapters,
                                 vllm_metrics=config.vllm_metrics)
    log.info("listening on %s:%d; health NOT_SERVING until the model is loaded", config.host,
             running.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine = http = None
    # Helper threads touch torch single-threaded and the model loads on a thread that ends, so
    # the engine's loop thread holds the only OpenMP pool; the default executor runs admin work
    # (uploads: validation, hashing) at background priority (server/engine/threads.py).
    loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="loraplex-io",
                                                 initializer=background))
    loading = asyncio.wrap_future(run_on_own_thread(load, "loraplex-load"))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            engine = running.start_engine(loading.result())
            metrics_port = config.bind_port(config.metrics_port)
            if metrics_port is not None:
                log.info("metrics on :%d/metrics", running.metrics.serve(metrics_port))
            http_port = config.bind_port(config.http_port)
            if http_port is not None:
                http = await _start_http(running, tokens, config, http_port)
            await running.grpc.set_serving(True)
            log.info("serving on %s:%d", config.host, running.port)
            await stopping
        log.info("draining: NOT_SERVING, %.0f s grace for in-flight requests",
                 config.grace_seconds)
    finally:
        for task in (loading, stopping):
            task.cancel()  # the load's thread itself runs to its end (threads cannot be stopped)
        await running.grpc.set_serving(False)
        if http is not None:
            http[0].should_exit = True  # in-flight HTTP requests drain alongside gRPC's
        await running.grpc.server.stop(config.grace_seconds)
        if http is not None:
            await http[1]
        if engine is not None:
            engine.close()
    log.info("stopped")


async def _start_http(running: RunningServer, tokens: Tokens, config: ServerConfig, port: int):
    app = create_app(running.backend, tokens, running.metrics.registry,
                     max_body_bytes=int(config.max_message_mb * 2**20))
    http = await start_http_server(app, config.host, port,
                                   grace=config.grace_seconds, cert_file=config.tls_cert_file,
                                   key_file=config.tls_key_file,
                                   client_ca_file=config.tls_client_ca_file)
    log.info("http on %s:%d", config.host, bound_port(http[0]))
    return http
