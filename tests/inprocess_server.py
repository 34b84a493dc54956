"""Serve an EngineCore from this process (its own event loop on a thread), for gRPC and HTTP
tests; `post_json` for the HTTP ones."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from server.api.http_api import bound_port, create_app, start_http_server
from server.app import RunningServer, create_server
from server.serving import Tokens


@contextmanager
def serving(core, http: bool = False, **options) -> Iterator[tuple[grpc.Channel, RunningServer]]:
    """A channel to a started, SERVING server around `core`; stopped (and its engine closed) on
    exit. `options` go to server.app.create_server (tokens=..., credentials=...). With `http`,
    the OpenAI-compatible HTTP API is served too, at `running.http_url`."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state = {}

    async def start():
        running = state["running"] = await create_server(core, "127.0.0.1:0", **options)
        if http:
            app = create_app(running.backend, options.get("tokens", Tokens(None, None)),
                             running.metrics.registry,
                             max_body_bytes=options.get("max_message_bytes", 8 << 20))
            state["http"] = await start_http_server(app, "127.0.0.1", 0)
            running.http_url = f"http://127.0.0.1:{bound_port(state['http'][0])}"
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()),
                                              loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(60), "the in-process server did not start"
    running = state["running"]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield channel, running
    finally:
        if http:
            state["http"][0].should_exit = True
            asyncio.run_coroutine_threadsafe(asyncio.wait_for(state["http"][1], 10),
                                             loop).result(15)
        asyncio.run_coroutine_threadsafe(running.grpc.server.stop(None), loop).result(10)
        running.backend.ready().engine.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def post_json(url: str, body: bytes, timeout: float = 300) -> tuple[int, object, dict]:
    """POSTs a JSON body: (HTTP status, headers, decoded JSON answer), errors included."""
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, reply.headers, json.load(reply)
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.load(error)
