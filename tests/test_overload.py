"""A burst far past --max-queue: every call gets an answer it can act on.

1,500 concurrent gRPC calls on one channel, and 600 HTTP requests 200 at a time, against a server with a queue
of 64: each ends OK or RESOURCE_EXHAUSTED / 429 with the queue figure and a retry hint
(`grpc-retry-pushback-ms`, `Retry-After`), never a bare CANCELLED, UNKNOWN or INTERNAL; the
metrics count every call once, by outcome; the server serves normally afterwards.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc
from tests.engine_helpers import make_core
from tests.inprocess_server import post_json, serving

GRPC_BURST = 1500
HTTP_BURST = 600
HTTP_CONCURRENCY = 200
MAX_QUEUE = 64


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    core = make_core(tiny_model_dir, {}, max_queue=MAX_QUEUE, max_batch_size=8)
    with serving(core, http=True) as (_, running):
        yield running


def outcomes(running) -> float:
    return sum(sample.value for metric in running.metrics.registry.collect()
               if metric.name == "loraplex_requests" for sample in metric.samples
               if sample.name == "loraplex_requests_total")


def request() -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_token_ids=[1, 5, 6], params=pb.SamplingParams(
        max_new_tokens=4))


def test_a_grpc_burst_gets_ok_or_resource_exhausted_with_a_retry_hint(server):
    before = outcomes(server)

    async def burst() -> list[tuple[str, str, dict]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)

            async def one():
                call = stub.Generate(request(), timeout=300)
                try:
                    await call
                    return "OK", "", {}
                except grpc.aio.AioRpcError as error:
                    trailing = dict(error.trailing_metadata() or ())
                    return error.code().name, error.details(), trailing
            return await asyncio.gather(*(one() for _ in range(GRPC_BURST)))

    answers = asyncio.run(burst())
    codes = Counter(code for code, _, _ in answers)
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["RESOURCE_EXHAUSTED"] > 0, codes  # the burst did overflow the queue
    for code, details, trailing in answers:
        if code == "RESOURCE_EXHAUSTED":
            assert f"--max-queue {MAX_QUEUE}" in details
            assert int(trailing["grpc-retry-pushback-ms"]) > 0
    assert outcomes(server) - before == GRPC_BURST
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        assert inference_pb2_grpc.InferenceStub(channel).Generate(request()).token_ids


def test_an_http_burst_gets_200_or_429_with_retry_after(server):
    before = outcomes(server)
    body = json.dumps({"model": server.backend.ready().core.model.name, "prompt": [1, 5, 6],
                       "max_tokens": 4, "temperature": 0}).encode()

    def post() -> tuple[int, object, dict]:
        return post_json(server.http_url + "/v1/completions", body)

    with ThreadPoolExecutor(HTTP_CONCURRENCY) as pool:
        replies = list(pool.map(lambda _: post(), range(HTTP_BURST)))
    codes = Counter(status for status, _, _ in replies)
    assert set(codes) <= {200, 429}, codes
    assert codes[429] > 0, codes
    for status, headers, reply in replies:
        if status == 429:
            assert int(headers.get("Retry-After")) >= 1
            assert f"--max-queue {MAX_QUEUE}" in reply["error"]["message"]
    assert outcomes(server) - before == HTTP_BURST
    assert post()[0] == 200
