"""The Python client and `loraplex-client`, against small fake servicers in this process.

The fakes record every request with its metadata and answer canned replies, so each test states
what goes on the wire and what the caller gets back. The real server is not involved.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from clients import AsyncLoraplexClient, LoraplexClient, LoraplexError, Models, StreamDelta
from clients import cli
from loraplex.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.certificates import write_certificates

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


# The fake server


@dataclass
class Call:
    method: str
    request: object  # the request message; UploadAdapter: the list of its messages
    metadata: dict


@dataclass
class Record:
    calls: list[Call] = field(default_factory=list)
    stream_ended: threading.Event = field(default_factory=threading.Event)

    def add(self, method, request, context):
        self.calls.append(Call(method, request, dict(context.invocation_metadata())))

    def of(self, method) -> list[Call]:
        return [c for c in self.calls if c.method == method]


def _abort_unknown(context, name):
    context.abort(grpc.StatusCode.NOT_FOUND, f"adapter '{name}' is not registered")


class FakeInference(inference_pb2_grpc.InferenceServicer):
    """Adapter "missing" is unknown; "fails-midway" streams one delta then fails; "endless"
    streams until cancelled; "slow" answers after half a second."""

    def __init__(self, record: Record):
        self.record = record

    def Generate(self, request, context):
        self.record.add("Generate", request, context)
        if request.adapter_id == "missing":
            _abort_unknown(context, request.adapter_id)
        if request.adapter_id == "busy-twice" and len(self.record.of("Generate")) <= 2:
            context.set_trailing_metadata((("grpc-retry-pushback-ms", "50"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full; retry later")
        if request.adapter_id == "slow":
            time.sleep(0.5)
        return inference_pb2.GenerateResponse(
            text="Hello world", token_ids=[7, 8], finish_reason=inference_pb2.STOP,
            usage=inference_pb2.Usage(prompt_tokens=3, completion_tokens=2),
            logprobs=[-0.5, -0.25] if request.return_logprobs else [])

    def GenerateStream(self, request, context):
        self.record.add("GenerateStream", request, context)
        if request.adapter_id == "missing":
            _abort_unknown(context, request.adapter_id)
        if request.adapter_id == "endless":  # ends only when the client cancels it
            context.add_callback(self.record.stream_ended.set)
            while context.is_active():
                yield inference_pb2.GenerateResponse(text="x", token_ids=[1])
                time.sleep(0.01)
            return
        yield inference_pb2.GenerateResponse(text="Hel", token_ids=[1], logprobs=[-0.1])
        if request.adapter_id == "fails-midway":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV cache full")
        yield inference_pb2.GenerateResponse(text="lo", token_ids=[2], logprobs=[-0.2])
        yield inference_pb2.GenerateResponse(
            text=" world", token_ids=[3], logprobs=[-0.3], finish_reason=inference_pb2.LENGTH,
            usage=inference_pb2.Usage(prompt_tokens=4, completion_tokens=3))

    def Tokenize(self, request, context):
        self.record.add("Tokenize", request, context)
        ids = [ord(c) for c in request.text]
        return inference_pb2.TokenizeResponse(token_ids=[1] + ids if request.add_special_tokens
                                              else ids)

    def ListModels(self, request, context):
        self.record.add("ListModels", request, context)
        return inference_pb2.ListModelsResponse(base_model="tiny-llama", chat_template=True,
                                                adapters=["a1", "a2"])


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    """Holds adapters a1..a5; pages by name, the page token being the last name of a page."""

    def __init__(self, record: Record):
        self.record = record
        self.adapters = {f"a{i}": admin_pb2.AdapterInfo(name=f"a{i}", version=i, rank=8)
                         for i in range(1, 6)}

    def _get(self, name, context):
        if name not in self.adapters:
            _abort_unknown(context, name)
        return self.adapters[name]

    def UploadAdapter(self, request_iterator, context):
        messages = list(request_iterator)
        self.record.add("UploadAdapter", messages, context)
        header = messages[0].header
        weights = b"".join(m.chunk for m in messages[1:])
        return admin_pb2.AdapterInfo(
            name=header.name, version=header.version if header.HasField("version") else 1,
            weights_sha256=hashlib.sha256(weights).hexdigest(), size_bytes=len(weights))

    def RegisterAdapter(self, request, context):
        self.record.add("RegisterAdapter", request, context)
        self.adapters[request.name] = admin_pb2.AdapterInfo(name=request.name, version=1)
        return self.adapters[request.name]

    def GetAdapter(self, request, context):
        self.record.add("GetAdapter", request, context)
        return self._get(request.name, context)

    def ListAdapters(self, request, context):
        self.record.add("ListAdapters", request, context)
        names = sorted(n for n in self.adapters if n > request.page_token)
        page = names[:request.page_size or 100]
        return admin_pb2.ListAdaptersResponse(
            adapters=[self.adapters[n] for n in page],
            next_page_token=page[-1] if len(names) > len(page) else "")

    def DeleteAdapter(self, request, context):
        self.record.add("DeleteAdapter", request, context)
        self._get(request.name, context)
        del self.adapters[request.name]
        return admin_pb2.DeleteAdapterResponse()

    def PinAdapter(self, request, context):
        self.record.add("PinAdapter", request, context)
        self._get(request.name, context).pinned = True
        return self.adapters[request.name]

    def UnpinAdapter(self, request, context):
        self.record.add("UnpinAdapter", request, context)
        self._get(request.name, context).pinned = False
        return self.adapters[request.name]

    def GetServerInfo(self, request, context):
        self.record.add("GetServerInfo", request, context)
        return admin_pb2.ServerInfo(
            version="0.1.0", base_model="tiny-llama", quantization="nf4", max_slots=8,
            adapters_stored=len(self.adapters),
            memory=admin_pb2.MemoryUse(base_model_bytes=5 << 30, store_bytes=3 * MiB))


@dataclass
class Fake:
    target: str
    record: Record
    admin: FakeAdmin
    health: health.HealthServicer


def _serve(credentials=None, with_admin=True):
    record = Record()
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    admin = FakeAdmin(record)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("loraplex.v1.Admin", health_pb2.HealthCheckResponse.NOT_SERVING)
    inference_pb2_grpc.add_InferenceServicer_to_server(FakeInference(record), server)
    if with_admin:  # a server started without an admin token has no Admin service
        admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = (server.add_secure_port("127.0.0.1:0", credentials) if credentials
            else server.add_insecure_port("127.0.0.1:0"))
    server.start()
    return server, Fake(f"127.0.0.1:{port}", record, admin, health_servicer)


@pytest.fixture
def fake():
    server, fake = _serve()
    yield fake
    server.stop(None)


@pytest.fixture
def client(fake):
    with LoraplexClient(fake.target, token="inf-token", admin_token="admin-token",
                        timeout=10) as client:
        yield client


def adapter_dir(path: Path, weights: bytes | None = b"\x00" * 100, *, config: bool = True,
                bin_weights: bool = False) -> Path:
    """A PEFT-shaped directory; the client checks only that the two files exist."""
    path.mkdir(parents=True, exist_ok=True)
    if config:
        (path / "adapter_config.json").write_text('{"r": 8, "peft_type": "LORA"}')
    if weights is not None:
        (path / "adapter_model.safetensors").write_bytes(weights)
    if bin_weights:
        (path / "adapter_model.bin").write_bytes(b"pickle")
    return path


# Inference


def test_generate_sends_every_given_field_and_maps_the_reply(client, fake):
    result = client.generate("Once", adapter="a1", max_new_tokens=5, temperature=0.7, top_p=0.9,
                             top_k=40, seed=123, stop=["\n", "END"], stop_token_ids=[2],
                             repetition_penalty=1.1, logprobs=True)

    request = fake.record.of("Generate")[0].request
    assert (request.prompt, request.adapter_id, request.return_logprobs) == ("Once", "a1", True)
    p = request.params
    assert (p.max_new_tokens, p.top_k, p.seed) == (5, 40, 123)
    assert p.temperature == pytest.approx(0.7) and p.top_p == pytest.approx(0.9)
    assert p.repetition_penalty == pytest.approx(1.1)
    assert list(p.stop) == ["\n", "END"] and list(p.stop_token_ids) == [2]
    assert result.text == "Hello world" and result.token_ids == [7, 8]
    assert result.finish_reason == "stop"
    assert (result.prompt_tokens, result.completion_tokens) == (3, 2)
    assert result.logprobs == [-0.5, -0.25]


def test_generate_leaves_unset_what_the_caller_did_not_give(client, fake):
    client.generate("Hi")
    client.generate("Hi", max_new_tokens=4, seed=0, stop="###")

    bare, some = (c.request for c in fake.record.of("Generate"))
    assert not bare.HasField("params") and bare.adapter_id == "" and not bare.return_logprobs
    assert some.params.HasField("max_new_tokens") and some.params.HasField("seed")
    assert some.params.seed == 0  # seed 0 is a seed, not "no seed"
    for unset in ("top_p", "repetition_penalty"):
        assert not some.params.HasField(unset)
    assert list(some.params.stop) == ["###"]  # one stop string, not three characters


def test_generate_takes_exactly_one_of_prompt_and_token_ids(client, fake):
    client.generate(prompt_token_ids=[5, 6, 7])
    assert fake.record.of("Generate")[0].request.prompt_token_ids == [5, 6, 7]
    with pytest.raises(ValueError, match="exactly one"):
        client.generate("Hi", prompt_token_ids=[1])
    with pytest.raises(ValueError, match="exactly one"):
        client.generate()
    assert len(fake.record.calls) == 1


def test_chat_sends_the_prompt_as_one_user_message(client, fake):
    client.generate("What is 2 + 2?", adapter="a1", chat=True)
    request = fake.record.of("Generate")[0].request
    assert request.prompt == "" and not request.prompt_token_ids
    assert [(m.role, m.content) for m in request.messages] == [("user", "What is 2 + 2?")]
    with pytest.raises(ValueError, match="chat needs a prompt"):
        client.generate(prompt_token_ids=[1, 2], chat=True)


def test_stream_yields_deltas_and_the_last_carries_finish_reason_and_usage(client, fake):
    deltas = list(client.stream("Hi", adapter="a2", max_new_tokens=3, logprobs=True))

    request = fake.record.of("GenerateStream")[0].request
    assert request.adapter_id == "a2" and request.params.max_new_tokens == 3
    assert request.return_logprobs
    assert deltas == [
        StreamDelta("Hel", [1], [pytest.approx(-0.1)]),
        StreamDelta("lo", [2], [pytest.approx(-0.2)]),
        StreamDelta(" world", [3], [pytest.approx(-0.3)], finish_reason="length",
                    prompt_tokens=4, completion_tokens=3, cached_prompt_tokens=0),
    ]


def test_a_stream_failing_midway_raises_loraplex_error_after_the_deltas_so_far(client):
    received = []
    with pytest.raises(LoraplexError) as error:
        for delta in client.stream("Hi", adapter="fails-midway"):
            received.append(delta.text)
    assert received == ["Hel"]
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.value.details == "KV cache full"


def test_leaving_a_stream_early_cancels_it_on_the_server(client, fake):
    for i, _ in enumerate(client.stream("Hi", adapter="endless")):
        if i == 2:
            break
    assert fake.record.stream_ended.wait(5)


def test_tokenize(client, fake):
    assert client.tokenize("ab") == [97, 98]
    assert client.tokenize("ab", add_special_tokens=True) == [1, 97, 98]
    assert fake.record.of("Tokenize")[1].request.add_special_tokens


def test_list_models(client):
    assert client.list_models() == Models("tiny-llama", True, ["a1", "a2"])


# Auth, health, errors


def test_each_service_gets_its_own_bearer_token(client, fake, tmp_path):
    client.generate("Hi")
    list(client.stream("Hi"))
    client.tokenize("Hi")
    client.list_models()
    client.get_adapter("a1")
    client.list_adapters()
    client.upload_adapter("new", adapter_dir(tmp_path / "new"))
    client.health()

    sent = {c.method: c.metadata.get("authorization") for c in fake.record.calls}
    assert sent == {"Generate": "Bearer inf-token", "GenerateStream": "Bearer inf-token",
                    "Tokenize": "Bearer inf-token", "ListModels": "Bearer inf-token",
                    "GetAdapter": "Bearer admin-token",
                    "ListAdapters": "Bearer admin-token", "UploadAdapter": "Bearer admin-token"}


def test_no_token_no_authorization_metadata(fake):
    with LoraplexClient(fake.target) as client:
        client.generate("Hi")
        client.get_adapter("a1")
    assert all("authorization" not in c.metadata for c in fake.record.calls)


def test_health_reports_the_status_name(client):
    assert client.health() == "SERVING"
    assert client.health("loraplex.v1.Admin") == "NOT_SERVING"
    with pytest.raises(LoraplexError) as error:
        client.health("no.such.Service")
    assert error.value.code == grpc.StatusCode.NOT_FOUND


def test_an_error_status_becomes_loraplex_error_with_code_and_details(client):
    with pytest.raises(LoraplexError) as error:
        client.get_adapter("x")
    assert error.value.code == grpc.StatusCode.NOT_FOUND
    assert error.value.details == "adapter 'x' is not registered"
    assert str(error.value) == "NOT_FOUND: adapter 'x' is not registered"
    assert not isinstance(error.value, grpc.RpcError)
    with pytest.raises(LoraplexError, match="^NOT_FOUND: adapter 'missing'"):
        client.generate("Hi", adapter="missing")
    with pytest.raises(LoraplexError, match="^NOT_FOUND"):
        next(client.stream("Hi", adapter="missing"))


def test_deadline_and_unreachable_server_are_loraplex_errors(client):
    with pytest.raises(LoraplexError) as error:
        client.generate("Hi", adapter="slow", timeout=0.1)
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with LoraplexClient(f"127.0.0.1:{port}", timeout=5) as nowhere:
        with pytest.raises(LoraplexError) as error:
            nowhere.list_adapters()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


# Admin


def test_upload_sends_the_header_then_the_file_in_chunks(client, fake, tmp_path):
    weights = os.urandom(2 * MiB + 12345)
    directory = adapter_dir(tmp_path / "mine", weights)
    progress = []

    info = client.upload_adapter("mine", directory, progress=lambda *p: progress.append(p))

    messages = fake.record.of("UploadAdapter")[0].request
    header = messages[0].header
    assert messages[0].WhichOneof("part") == "header"
    assert header.name == "mine" and not header.HasField("version")
    assert header.adapter_config_json == (directory / "adapter_config.json").read_text()
    assert header.sha256 == hashlib.sha256(weights).hexdigest() and header.size == len(weights)
    chunks = [m.chunk for m in messages[1:]]
    assert all(m.WhichOneof("part") == "chunk" for m in messages[1:])
    assert [len(c) for c in chunks] == [MiB, MiB, 12345]
    assert b"".join(chunks) == weights
    assert progress[0] == (0, len(weights)) and progress[-1] == (len(weights), len(weights))
    assert [sent for sent, _ in progress] == sorted(sent for sent, _ in progress)
    assert (info.name, info.size_bytes, info.weights_sha256) == ("mine", len(weights),
                                                                 header.sha256)


def test_upload_with_a_version_and_a_chunk_size(client, fake, tmp_path):
    info = client.upload_adapter("mine", adapter_dir(tmp_path / "a", b"w" * 2500), version=7,
                                 chunk_size=1000)
    messages = fake.record.of("UploadAdapter")[0].request
    assert messages[0].header.version == 7 and info.version == 7
    assert [len(m.chunk) for m in messages[1:]] == [1000, 1000, 500]


def test_upload_of_an_empty_weights_file_sends_only_the_header(client, fake, tmp_path):
    progress = []
    client.upload_adapter("e", adapter_dir(tmp_path / "e", b""),
                          progress=lambda *p: progress.append(p))
    assert len(fake.record.of("UploadAdapter")[0].request) == 1
    assert progress == [(0, 0)]


def test_upload_refuses_a_directory_without_safetensors_before_any_rpc(client, fake, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.bin.*convert.*safetensors"):
        client.upload_adapter("old", adapter_dir(tmp_path / "old", None, bin_weights=True))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        client.upload_adapter("noconf", adapter_dir(tmp_path / "noconf", config=False))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        client.upload_adapter("nodir", tmp_path / "does-not-exist")
    assert fake.record.calls == []


def test_list_adapters_follows_page_tokens_to_the_end(client, fake):
    adapters = client.list_adapters(page_size=2)
    assert [a.name for a in adapters] == ["a1", "a2", "a3", "a4", "a5"]
    pages = [(c.request.page_size, c.request.page_token) for c in fake.record.of("ListAdapters")]
    assert pages == [(2, ""), (2, "a2"), (2, "a4")]


def test_register_get_pin_unpin_delete_and_server_info(client, fake):
    assert client.register_adapter("s3ad", "s3://bucket/prefix").name == "s3ad"
    assert fake.record.of("RegisterAdapter")[0].request.source == "s3://bucket/prefix"
    assert client.get_adapter("a3").version == 3
    assert client.pin_adapter("a3").pinned
    assert not client.unpin_adapter("a3").pinned
    assert client.delete_adapter("a3") is None
    assert "a3" not in fake.admin.adapters
    info = client.server_info()
    assert info.base_model == "tiny-llama" and info.memory.base_model_bytes == 5 << 30


# The asyncio client


def test_async_client_generates_streams_and_tokenizes(fake):
    async def main():
        async with AsyncLoraplexClient(fake.target, token="inf-token") as client:
            result = await client.generate("Hi", adapter="a1", top_k=5, logprobs=True)
            deltas = [d async for d in client.stream("Hi", max_new_tokens=3)]
            ids = await client.tokenize("ab")
            models = await client.list_models()
            with pytest.raises(LoraplexError) as error:
                await client.generate("Hi", adapter="missing")
            midway = []
            with pytest.raises(LoraplexError) as midway_error:
                async for delta in client.stream("Hi", adapter="fails-midway"):
                    midway.append(delta.text)
            return result, deltas, ids, models, error.value, midway, midway_error.value

    result, deltas, ids, models, error, midway, midway_error = asyncio.run(main())
    assert (result.text, result.finish_reason, result.logprobs) == ("Hello world", "stop",
                                                                    [-0.5, -0.25])
    generate, stream = fake.record.of("Generate")[0], fake.record.of("GenerateStream")[0]
    assert generate.request.params.top_k == 5 and not generate.request.params.HasField("seed")
    assert stream.request.params.max_new_tokens == 3
    assert generate.metadata["authorization"] == "Bearer inf-token"
    assert "".join(d.text for d in deltas) == "Hello world"
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 3
    assert ids == [97, 98]
    assert models == Models("tiny-llama", True, ["a1", "a2"])
    assert fake.record.of("ListModels")[0].metadata["authorization"] == "Bearer inf-token"
    assert str(error) == "NOT_FOUND: adapter 'missing' is not registered"
    assert midway == ["Hel"] and midway_error.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_async_client_uploads_lists_and_leaves_streams_early(fake, tmp_path):
    weights = os.urandom(MiB + 7)
    progress = []

    async def main():
        async with AsyncLoraplexClient(fake.target, admin_token="admin-token") as client:
            info = await client.upload_adapter("mine", adapter_dir(tmp_path / "m", weights),
                                               version=2, progress=lambda *p: progress.append(p))
            adapters = await client.list_adapters(page_size=3)
            with pytest.raises(FileNotFoundError):
                await client.upload_adapter("old", adapter_dir(tmp_path / "o", None))
            async for _ in client.stream("Hi", adapter="endless"):
                break
            with pytest.raises(LoraplexError, match="^NOT_FOUND"):
                await client.pin_adapter("nope")
            return info, adapters, await client.server_info(), await client.health()

    info, adapters, server_info, status = asyncio.run(main())
    messages = fake.record.of("UploadAdapter")[0].request
    assert messages[0].header.version == 2 and messages[0].header.size == len(weights)
    assert b"".join(m.chunk for m in messages[1:]) == weights
    assert info.weights_sha256 == hashlib.sha256(weights).hexdigest()
    assert progress[-1] == (len(weights), len(weights))
    assert fake.record.of("UploadAdapter")[0].metadata["authorization"] == "Bearer admin-token"
    assert [a.name for a in adapters] == ["a1", "a2", "a3", "a4", "a5"]
    assert [c.request.page_token for c in fake.record.of("ListAdapters")] == ["", "a3"]
    assert fake.record.stream_ended.wait(5)
    assert server_info.max_slots == 8 and status == "SERVING"


# TLS


def test_tls_and_mutual_tls(tmp_path):
    files = write_certificates(tmp_path)
    credentials = grpc.ssl_server_credentials(
        [(files["server.key"].read_bytes(), files["server.pem"].read_bytes())],
        root_certificates=files["ca.pem"].read_bytes(), require_client_auth=True)
    server, fake = _serve(credentials)
    try:
        with LoraplexClient(fake.target, root_certificates=files["ca.pem"],
                            client_certificate=files["client.pem"],
                            client_key=files["client.key"], timeout=5) as client:
            assert client.generate("Hi").text == "Hello world"
        with LoraplexClient(fake.target, root_certificates=files["ca.pem"], timeout=5) as client:
            with pytest.raises(LoraplexError) as error:  # no client certificate
                client.generate("Hi")
            assert error.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ValueError, match="together"):
            LoraplexClient(fake.target, client_certificate=files["client.pem"])
    finally:
        server.stop(None)


# The command line


def _cli(fake: Fake, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    run = subprocess.run([sys.executable, "-m", "clients.cli", *args], cwd=REPO,
                         env={**clean, "LORAPLEX_TARGET": fake.target, **(env or {})},
                         capture_output=True, timeout=30)
    run.stdout, run.stderr = run.stdout.decode(), run.stderr.decode()  # keeping "\r"
    return run


def test_cli_generate_prints_the_text_and_sends_the_flags(fake):
    run = _cli(fake, "generate", "Once", "--adapter", "a1", "--max-new-tokens", "4",
               "--temperature", "0.5", "--seed", "9", "--stop", "\n",
               env={"LORAPLEX_TOKEN": "inf-token"})
    assert (run.returncode, run.stdout, run.stderr) == (0, "Hello world\n", "")
    call = fake.record.of("Generate")[0]
    assert call.request.adapter_id == "a1" and call.request.params.seed == 9
    assert call.request.params.max_new_tokens == 4 and list(call.request.params.stop) == ["\n"]
    assert not call.request.params.HasField("top_p")
    assert call.metadata["authorization"] == "Bearer inf-token"


def test_cli_chat_flag_sends_a_user_message(fake):
    run = _cli(fake, "generate", "Hi there", "--chat")
    assert run.returncode == 0, run.stderr
    request = fake.record.of("Generate")[0].request
    assert [(m.role, m.content) for m in request.messages] == [("user", "Hi there")]


def test_cli_stream_prints_the_text_as_it_arrives(fake):
    run = _cli(fake, "stream", "Hi")
    assert (run.returncode, run.stdout) == (0, "Hello world\n")


def test_cli_error_is_one_line_on_stderr_with_exit_status_1(fake):
    run = _cli(fake, "get", "nope")
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == "loraplex-client: error: NOT_FOUND: adapter 'nope' is not registered\n"


def test_cli_admin_command_on_a_server_without_admin_says_how_to_start_one():
    server, fake = _serve(with_admin=False)
    try:
        run = _cli(fake, "list")
    finally:
        server.stop(None)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == ("loraplex-client: error: UNIMPLEMENTED: this server has no admin API: "
                          "start it with --admin-token-file FILE\n")


def test_cli_unreachable_server_is_one_line_with_what_to_do():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{s.getsockname()[1]}"
    run = _cli(Fake(target, Record(), None, None), "generate", "hi")
    assert run.returncode == 1 and run.stderr.count("\n") == 1
    assert run.stderr.startswith("loraplex-client: error: UNAVAILABLE: ")
    assert f"is a loraplex server running at {target}?" in run.stderr


def test_cli_upload_shows_progress_and_sends_the_admin_token(fake, tmp_path):
    token_file = tmp_path / "admin-token"
    token_file.write_text("admin-token\n")
    weights = os.urandom(2 * MiB + MiB // 2)
    directory = adapter_dir(tmp_path / "mine", weights)

    run = _cli(fake, "--admin-token-file", str(token_file), "upload", "mine", str(directory),
               "--version", "3")

    assert run.returncode == 0, run.stderr
    last_frame = run.stderr.rstrip("\n").split("\r")[-1]  # tqdm redraws its line in place
    assert last_frame.startswith("upload: 100%") and "2.50M/2.50M" in last_frame
    assert "name:" in run.stdout and "mine" in run.stdout
    call = fake.record.of("UploadAdapter")[0]
    assert call.metadata["authorization"] == "Bearer admin-token"
    assert call.request[0].header.version == 3
    assert b"".join(m.chunk for m in call.request[1:]) == weights


def test_cli_upload_without_safetensors_fails_before_connecting(fake, tmp_path):
    run = _cli(fake, "upload", "old", str(adapter_dir(tmp_path / "old", None, bin_weights=True)))
    assert run.returncode == 1
    assert run.stderr.startswith("loraplex-client: error: ") and run.stderr.count("\n") == 1
    assert "safetensors" in run.stderr and fake.record.calls == []


def test_cli_usage_errors_exit_2(fake, tmp_path):
    assert _cli(fake).returncode == 2
    assert _cli(fake, "--tls-cert", "c.pem", "info").returncode == 2
    assert _cli(fake, "--admin-token-file", str(tmp_path / "absent"), "list").returncode == 2


def test_cli_list_get_info_print_lines_or_json(fake, capsys, monkeypatch):
    monkeypatch.setenv("LORAPLEX_TARGET", fake.target)

    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "VERSION", "RANK"] and len(lines) == 6
    assert lines[3].split()[:3] == ["a3", "3", "8"]

    assert cli.main(["list", "--json"]) == 0
    assert [a["name"] for a in json.loads(capsys.readouterr().out)] == ["a1", "a2", "a3", "a4",
                                                                         "a5"]
    assert cli.main(["get", "a2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["name"], got["version"], got["pinned"], got["target_modules"]) == ("a2", 2, False,
                                                                                   [])
    assert cli.main(["get", "a2"]) == 0
    assert "version:" in capsys.readouterr().out

    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["memory"]["base_model_bytes"] == 5 << 30  # a number, not a string
    assert cli.main(["info"]) == 0
    assert "tiny-llama" in capsys.readouterr().out

    assert cli.main(["pin", "a1"]) == 0 and fake.admin.adapters["a1"].pinned
    assert cli.main(["delete", "a1"]) == 0
    assert capsys.readouterr().out.endswith("deleted a1\n")
    assert cli.main(["register", "r", "/srv/adapters/r"]) == 0
    assert fake.record.of("RegisterAdapter")[0].request.source == "/srv/adapters/r"


# Packaging


def test_the_client_package_imports_without_torch_or_the_server():
    code = ("import sys\n"
            "for name in ('torch', 'transformers', 'server', 'adapters_registry'):\n"
            "    sys.modules[name] = None\n"
            "import clients, clients.cli\n"
            "print(clients.LoraplexClient.__name__)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=30)
    assert (run.returncode, run.stdout.strip()) == (0, "LoraplexClient"), run.stderr


# Retries


def test_an_overloaded_server_is_retried_after_its_hint(fake):
    with LoraplexClient(fake.target, timeout=10) as client:
        reply = client.generate("Hi", adapter="busy-twice")
    assert reply.text == "Hello world"
    assert len(fake.record.of("Generate")) == 3  # two refusals, each retried after 50 ms


def test_retries_can_be_turned_off(fake):
    with LoraplexClient(fake.target, timeout=10, retries=0) as client:
        with pytest.raises(LoraplexError) as error:
            client.generate("Hi", adapter="busy-twice")
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(fake.record.of("Generate")) == 1


def test_only_calls_that_change_nothing_are_retried():
    from clients._common import channel_options

    config = json.loads(dict(channel_options(3))["grpc.service_config"])
    names = {(n["service"], n["method"]) for n in config["methodConfig"][0]["name"]}
    assert ("loraplex.v1.Inference", "Generate") in names
    assert not {m for _, m in names} & {"UploadAdapter", "RegisterAdapter", "DeleteAdapter",
                                         "PinAdapter", "UnpinAdapter"}
    policy = config["methodConfig"][0]["retryPolicy"]
    assert policy["maxAttempts"] == 4
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
