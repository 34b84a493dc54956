"""The OpenAI-compatible HTTP API of a real server process, through the official `openai` SDK:
the same outputs as the gRPC API for the same request, OpenAI's error shapes and statuses,
tokens, TLS, overload, cancellation, draining, /health and /metrics."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from transformers import AutoTokenizer

from clients import LoraplexClient
from server.serving import Tokens
from server.errors import ConfigError
from server.tools.demo import build_demo
from server.serving import Backend
from server.api.http_api import bound_port, create_app, start_http_server
from tests.certificates import write_certificates
from tests.server_process import (openai_client, start_demo_http_server, start_server,
                                   stopped_cleanly)

BASE = "model"  # the demo model's directory name: its model id
ADAPTERS = ["attn-r4", "attn-r8", "all-r16", "all-r64-rslora", "mlp-r8-bf16"]
PROMPT = "Once upon a time"
TOKEN = "http-inference-token"
ADMIN_TOKEN = "http-admin-token"
NO_TEMPLATE = "no-template"  # model id of the restricted server: the demo model, no chat template
FINISH = {"length": "length", "stop": "stop", "eos": "stop"}  # gRPC's -> OpenAI's
ERROR_KEYS = {"message", "type", "param", "code"}


def call(method: str, url: str, body: dict | bytes | None = None, token: str | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one plain HTTP request, errors included."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=120, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def metric(base_url: str, series: str) -> float:
    """The value of one series (`name` or `name{labels}`) in /metrics; 0 when absent."""
    _, _, text = call("GET", base_url + "/metrics")
    for line in text.decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return 0.0


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


STEPS = "loraplex_engine_steps_total"
STEP_BOUND = 200
"""Engine steps a request that asked for 2000 tokens may still run after its client left: the
time an HTTP disconnect takes to reach the engine, counted in (millisecond) steps of the tiny
model."""


def wait_until_idle(base_url: str) -> None:
    wait_for(lambda: metric(base_url, "loraplex_num_requests_running")
             == metric(base_url, "loraplex_num_requests_waiting") == 0)


# ---- the demo server: completions and chat, equal to gRPC ------------------------------------

@pytest.fixture(scope="module")
def demo_server(demo_cache, tmp_path_factory):
    store = tmp_path_factory.mktemp("http") / "store"
    with stopped_cleanly(start_demo_http_server(demo_cache, store)) as process:
        process.url = process.http_url
        yield process


@pytest.fixture(scope="module")
def api(demo_server):
    with openai_client(demo_server, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(demo_server):
    with LoraplexClient(demo_server.target, timeout=120) as client:
        yield client


def adapter_of(model: str) -> str | None:
    return None if model == BASE else model


def test_models_are_the_base_model_and_every_stored_adapter(api):
    models = api.models.list().data
    assert models[0].id == BASE and sorted(m.id for m in models[1:]) == sorted(ADAPTERS)
    assert all(m.object == "model" and m.owned_by == "loraplex" and m.created > 0
               for m in models)
    assert all(m.parent == BASE for m in models[1:])


def test_a_completion_equals_the_grpc_generation_for_each_model(api, grpc_client):
    """`model` chooses the adapter: greedy text, token counts and logprobs equal gRPC's, and
    differ from model to model."""
    seen = set()
    for model in [BASE, *ADAPTERS]:
        reply = api.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                       logprobs=0)
        expected = grpc_client.generate(PROMPT, adapter=adapter_of(model), max_new_tokens=12,
                                        temperature=0, logprobs=True)
        choice = reply.choices[0]
        assert (reply.object, reply.model, choice.index) == ("text_completion", model, 0)
        assert choice.text == expected.text
        assert choice.finish_reason == FINISH[expected.finish_reason]
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens,
                reply.usage.total_tokens) == (expected.prompt_tokens, expected.completion_tokens,
                                              expected.prompt_tokens + expected.completion_tokens)
        assert choice.logprobs.token_logprobs == pytest.approx(expected.logprobs, rel=1e-5)
        assert len(choice.logprobs.tokens) == expected.completion_tokens
        assert choice.logprobs.top_logprobs is None
        seen.add(tuple(round(lp, 3) for lp in expected.logprobs))
    assert len(seen) == 1 + len(ADAPTERS)


def test_a_streamed_completion_concatenates_to_the_whole_one(api, grpc_client):
    kwargs = dict(model="all-r16", prompt=PROMPT, max_tokens=12, temperature=0)
    whole = api.completions.create(**kwargs)
    chunks = list(api.completions.create(**kwargs, stream=True,
                                         stream_options={"include_usage": True}))
    *deltas, usage = chunks
    assert "".join(c.choices[0].text for c in deltas) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in deltas] == [None] * (len(deltas) - 1) + ["length"]
    assert all(c.usage is None and c.id == usage.id for c in deltas)
    assert usage.choices == [] and usage.usage == whole.usage
    grpc_text = "".join(d.text for d in grpc_client.stream(PROMPT, adapter="all-r16",
                                                            max_new_tokens=12, temperature=0))
    assert grpc_text == whole.choices[0].text
    plain = list(api.completions.create(**kwargs, stream=True))
    assert all(c.choices and c.usage is None for c in plain)


def test_usage_reports_the_prompt_tokens_found_in_the_prefix_cache(api, grpc_client):
    """A prompt sent again finds its full KV blocks (16 tokens each) in the prefix cache: the
    usage says how many prompt tokens were not computed, on HTTP and gRPC alike."""
    prompt = " ".join(f"word{i}" for i in range(40))  # well over two blocks
    first = api.completions.create(model="attn-r8", prompt=prompt, max_tokens=2, temperature=0)
    again = api.completions.create(model="attn-r8", prompt=prompt, max_tokens=2, temperature=0)
    prompt_tokens = first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == (prompt_tokens - 1) // 16 * 16 > 0
    assert again.choices[0].text == first.choices[0].text
    over_grpc = grpc_client.generate(prompt, adapter="attn-r8", max_new_tokens=2, temperature=0)
    assert over_grpc.cached_prompt_tokens == again.usage.prompt_tokens_details.cached_tokens
    chat = [{"role": "user", "content": prompt}]
    api.chat.completions.create(model="attn-r8", messages=chat, max_tokens=2)
    reply = api.chat.completions.create(model="attn-r8", messages=chat, max_tokens=2)
    assert reply.usage.prompt_tokens_details.cached_tokens > 0


def test_sampling_parameters_mean_what_they_mean_in_grpc(api, grpc_client):
    sampled = dict(max_tokens=20, temperature=0.9, top_p=0.95, seed=7)
    reply = api.completions.create(model="attn-r8", prompt=PROMPT, **sampled)
    expected = grpc_client.generate(PROMPT, adapter="attn-r8", max_new_tokens=20,
                                    temperature=0.9, top_p=0.95, seed=7)
    assert reply.choices[0].text == expected.text
    assert reply.usage.completion_tokens == expected.completion_tokens

    greedy = grpc_client.generate(PROMPT, adapter="attn-r8", max_new_tokens=20, temperature=0)
    stop = greedy.text[len(greedy.text) // 2]
    reply = api.completions.create(model="attn-r8", prompt=PROMPT, max_tokens=20,
                                   temperature=0, stop=[stop])
    expected = grpc_client.generate(PROMPT, adapter="attn-r8", max_new_tokens=20,
                                    temperature=0, stop=[stop])
    assert reply.choices[0].text == expected.text and stop not in expected.text
    assert reply.choices[0].finish_reason == "stop" == FINISH[expected.finish_reason]


def test_the_default_temperature_is_the_openai_one(api, grpc_client):
    """OpenAI's default temperature is 1 (sampling), where gRPC's is 0 (greedy)."""
    reply = api.completions.create(model=BASE, prompt=PROMPT, max_tokens=16, seed=3)
    sampled = grpc_client.generate(PROMPT, max_new_tokens=16, temperature=1.0, seed=3)
    assert reply.choices[0].text == sampled.text
    assert reply.usage.completion_tokens == sampled.completion_tokens == 16  # OpenAI's default


def test_a_prompt_may_be_token_ids_or_a_list_of_one_prompt(api, grpc_client):
    ids = grpc_client.tokenize("Hello world")
    by_ids = grpc_client.generate(prompt_token_ids=ids, adapter="mlp-r8-bf16",
                                  max_new_tokens=8, temperature=0)
    by_text = grpc_client.generate(PROMPT, adapter="mlp-r8-bf16", max_new_tokens=8,
                                   temperature=0)
    for prompt, expected in ((ids, by_ids), ([ids], by_ids), ([PROMPT], by_text)):
        reply = api.completions.create(model="mlp-r8-bf16", prompt=prompt, max_tokens=8,
                                       temperature=0)
        assert reply.choices[0].text == expected.text
        assert reply.usage.prompt_tokens == expected.prompt_tokens


def test_a_chat_completion_equals_grpc_on_the_templated_token_ids(api, grpc_client, demo_cache):
    tokenizer = AutoTokenizer.from_pretrained(build_demo(demo_cache, progress=None).model_dir)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Tell me a story"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    expected = grpc_client.generate(prompt_token_ids=ids, adapter="all-r16", max_new_tokens=10,
                                    temperature=0, logprobs=True)

    reply = api.chat.completions.create(model="all-r16", messages=messages, max_tokens=10,
                                        temperature=0, logprobs=True)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "all-r16"
    assert (choice.message.role, choice.message.content) == ("assistant", expected.text)
    assert choice.finish_reason == FINISH[expected.finish_reason]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        expected.prompt_tokens, expected.completion_tokens)
    assert [t.logprob for t in choice.logprobs.content] == pytest.approx(expected.logprobs,
                                                                         rel=1e-5)
    assert all(t.top_logprobs == [] for t in choice.logprobs.content)

    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    chunks = list(api.chat.completions.create(
        model="all-r16", messages=parts, max_completion_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    *deltas, usage = chunks
    assert deltas[0].object == "chat.completion.chunk"
    assert deltas[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in deltas[1:])
    assert "".join(c.choices[0].delta.content for c in deltas) == expected.text
    assert deltas[-1].choices[0].finish_reason == FINISH[expected.finish_reason]
    assert usage.usage.completion_tokens == expected.completion_tokens
    assert all(c.choices[0].logprobs is None for c in deltas)


# ---- errors -------------------------------------------------------------------------------------

def test_an_unknown_model_is_404_model_not_found(api, demo_server):
    for name in ("no-such-adapter", "org/no-such-model"):  # the second cannot be an adapter name
        with pytest.raises(openai.NotFoundError) as error:
            api.completions.create(model=name, prompt=PROMPT, max_tokens=2)
        assert error.value.status_code == 404
        assert (error.value.code, error.value.param) == ("model_not_found", "model")
        assert name in error.value.message
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="no-such-adapter", max_tokens=2,
                                    messages=[{"role": "user", "content": "Hi"}], stream=True)
    status, _, body = call("POST", demo_server.url + "/v1/completions",
                           {"model": "no-such-adapter", "prompt": "Hi"})
    assert status == 404 and set(json.loads(body)["error"]) == ERROR_KEYS


@pytest.mark.parametrize("bad", [
    dict(top_p=5), dict(max_tokens=0), dict(n=17), dict(temperature=-1), dict(seed=-1),
    dict(prompt=["two", "prompts"]), dict(logprobs=21), dict(logit_bias={"5": 1}),
    dict(presence_penalty=0.5), dict(stop=[""]), dict(stream=True, top_p=5),
    dict(max_tokens=5000),
])
def test_bad_completion_parameters_are_400(api, bad):
    kwargs = {"model": BASE, "prompt": PROMPT, "max_tokens": 4, **bad}
    with pytest.raises(openai.BadRequestError) as error:
        api.completions.create(**kwargs)
    assert error.value.status_code == 400 and error.value.type == "invalid_request_error"
    assert set(error.value.body) == ERROR_KEYS


@pytest.mark.parametrize("bad", [
    dict(messages=[]), dict(n=0), dict(max_completion_tokens=0), dict(top_p=0),
    dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
    dict(tools=[{"type": "function", "function": {"name": "f"}}]),
])
def test_bad_chat_parameters_are_400(api, bad):
    kwargs = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
              **bad}
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(**kwargs)


@pytest.mark.parametrize("body", [
    b"{not json", json.dumps({"model": BASE, "prompt": "Hi", "temperature": "hot"}).encode(),
    json.dumps({"prompt": "Hi"}).encode(),
])
def test_a_malformed_body_is_400_not_422(demo_server, body):
    status, _, reply = call("POST", demo_server.url + "/v1/completions", body)
    error = json.loads(reply)["error"]
    assert status == 400 and set(error) == ERROR_KEYS
    assert error["type"] == "invalid_request_error"


def test_health_and_metrics_answer_and_count_http_requests(demo_server, api):
    status, _, body = call("GET", demo_server.url + "/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    lengths = 'loraplex_requests_total{outcome="length"}'
    before = metric(demo_server.url, lengths)
    api.completions.create(model="attn-r4", prompt=PROMPT, max_tokens=3, temperature=0)
    assert metric(demo_server.url, lengths) == before + 1
    status, headers, _ = call("GET", demo_server.url + "/metrics")
    assert status == 200 and headers["content-type"] == CONTENT_TYPE_LATEST


# ---- a restricted server: no chat template, a token, one place in the batch ----------------

@pytest.fixture(scope="module")
def restricted_server(demo_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http-restricted")
    model = tmp / NO_TEMPLATE
    shutil.copytree(build_demo(demo_cache, progress=None).model_dir, model)
    (model / "chat_template.jinja").unlink()
    (tmp / "token").write_text(TOKEN)
    (tmp / "admin-token").write_text(ADMIN_TOKEN)
    process = start_server("--model", str(model), "--http-port", "auto", "--threads", "1",
                           "--quantize", "none", "--store", str(tmp / "store"),
                           "--max-batch-size", "1", "--max-step-tokens", "1", "--max-queue", "1",
                           "--inference-token-file", str(tmp / "token"),
                           "--admin-token-file", str(tmp / "admin-token"))
    process.url = process.http_url
    with stopped_cleanly(process):
        yield process


def restricted_api(server, key: str = TOKEN) -> openai.OpenAI:
    return openai_client(server, timeout=120, api_key=key)


def test_chat_on_a_model_without_a_chat_template_is_400(restricted_server):
    with restricted_api(restricted_server) as api, pytest.raises(openai.BadRequestError) as error:
        api.chat.completions.create(model=NO_TEMPLATE, max_tokens=2,
                                    messages=[{"role": "user", "content": "Hi"}])
    assert "chat template" in error.value.message
    assert error.value.code == "chat_template_missing"


def test_the_inference_token_is_required(restricted_server):
    url = restricted_server.url
    with restricted_api(restricted_server, key="wrong") as api:
        with pytest.raises(openai.AuthenticationError) as error:
            api.models.list()
        with pytest.raises(openai.AuthenticationError):
            api.completions.create(model=NO_TEMPLATE, prompt=PROMPT, max_tokens=2)
    assert error.value.status_code == 401 and error.value.code == "invalid_api_key"
    status, headers, body = call("POST", url + "/v1/completions",
                                 {"model": NO_TEMPLATE, "prompt": "Hi", "max_tokens": 2})
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert set(json.loads(body)["error"]) == ERROR_KEYS
    for key in (TOKEN, ADMIN_TOKEN):
        with restricted_api(restricted_server, key=key) as api:
            assert [m.id for m in api.models.list().data] == [NO_TEMPLATE]
            reply = api.completions.create(model=NO_TEMPLATE, prompt=PROMPT, max_tokens=2)
            assert reply.usage.completion_tokens == 2
    assert call("GET", url + "/health")[0] == 200  # probes need no token
    assert call("GET", url + "/metrics")[0] == 200


def test_a_full_queue_is_429_and_a_closed_stream_cancels_its_generation(restricted_server):
    url = restricted_server.url
    cancelled = 'loraplex_requests_total{outcome="cancelled"}'
    before = metric(url, cancelled)
    long = dict(model=NO_TEMPLATE, temperature=0, extra_body={"ignore_eos": True})
    with restricted_api(restricted_server) as api:
        running = api.completions.create(prompt="Hi", max_tokens=2000, stream=True, **long)
        next(iter(running))  # it holds the running batch's only place
        queued = ThreadPoolExecutor(1).submit(
            lambda: api.completions.create(prompt="Hello", max_tokens=2, **long))
        wait_for(lambda: metric(url, "loraplex_num_requests_waiting") == 1)
        with pytest.raises(openai.RateLimitError) as error:
            api.completions.create(prompt="one too many", max_tokens=1, **long)
        assert error.value.status_code == 429 and "--max-queue 1" in error.value.message
        running.close()  # the client goes away mid-stream: the place frees up
        at_close = metric(url, STEPS)
        assert queued.result(120).usage.completion_tokens == 2
    wait_for(lambda: metric(url, cancelled) == before + 1)
    wait_until_idle(url)
    assert metric(url, STEPS) - at_close <= STEP_BOUND  # not the 2000 steps it asked for


def test_a_client_disconnecting_cancels_a_non_streamed_generation(restricted_server):
    url = restricted_server.url
    cancelled = 'loraplex_requests_total{outcome="cancelled"}'
    before = metric(url, cancelled)
    body = json.dumps({"model": NO_TEMPLATE, "prompt": "Hi", "max_tokens": 2000,
                       "temperature": 0, "ignore_eos": True}).encode()
    port = int(url.rpartition(":")[2])
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                           b"Content-Type: application/json\r\n"
                           b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: metric(url, "loraplex_num_requests_running") == 1)
    at_close = metric(url, STEPS)
    wait_for(lambda: metric(url, cancelled) == before + 1)
    wait_until_idle(url)
    assert metric(url, STEPS) - at_close <= STEP_BOUND  # not the 2000 steps it asked for


def test_on_sigterm_a_stream_in_flight_finishes_then_the_server_exits(restricted_server):
    """The last test on this server: draining lets HTTP requests in flight finish."""
    with restricted_api(restricted_server) as api:
        stream = api.completions.create(
            model=NO_TEMPLATE, prompt="Hi", max_tokens=300, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = [next(iter(stream))]
        restricted_server.proc.send_signal(signal.SIGTERM)
        chunks += list(stream)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 300
    assert restricted_server.proc.wait(60) == 0
    assert "draining" in restricted_server.output()


# ---- in process: while the model loads -------------------------------------------------------

def test_health_is_503_and_requests_are_refused_while_the_model_loads():
    async def scenario():
        app = create_app(Backend(), Tokens(None, None), CollectorRegistry())
        server, task = await start_http_server(app, "127.0.0.1", 0)
        try:
            port = bound_port(server)
            with pytest.raises(ConfigError, match="cannot serve HTTP"):
                await start_http_server(app, "127.0.0.1", port)
            url = f"http://127.0.0.1:{port}"
            return await asyncio.gather(
                asyncio.to_thread(call, "GET", url + "/health"),
                asyncio.to_thread(call, "POST", url + "/v1/completions",
                                  {"model": BASE, "prompt": "Hi"}),
                asyncio.to_thread(call, "GET", url + "/metrics"))
        finally:
            server.should_exit = True
            await task

    health, completion, metrics = asyncio.run(scenario())
    for status, _, body in (health, completion):
        error = json.loads(body)["error"]
        assert status == 503 and error["type"] == "server_error"
        assert "loading" in error["message"]
    assert metrics[0] == 200


def test_the_tls_files_of_grpc_serve_https_and_require_client_certificates(tmp_path):
    pem = write_certificates(tmp_path)
    with_cert = ssl.create_default_context(cafile=pem["ca.pem"])
    with_cert.load_cert_chain(pem["client.pem"], pem["client.key"])
    without_cert = ssl.create_default_context(cafile=pem["ca.pem"])

    async def scenario():
        app = create_app(Backend(), Tokens(None, None), CollectorRegistry())
        server, task = await start_http_server(
            app, "127.0.0.1", 0, cert_file=str(pem["server.pem"]),
            key_file=str(pem["server.key"]), client_ca_file=str(pem["ca.pem"]))
        try:
            url = f"https://127.0.0.1:{bound_port(server)}/health"
            status = (await asyncio.to_thread(call, "GET", url, context=with_cert))[0]
            with pytest.raises(OSError):  # the handshake, or the first read, is refused
                await asyncio.to_thread(call, "GET", url, context=without_cert)
            with pytest.raises((OSError, http.client.HTTPException)):
                await asyncio.to_thread(call, "GET", "http" + url.removeprefix("https"))
            return status
        finally:
            server.should_exit = True
            await task

    assert asyncio.run(scenario()) == 503  # over mTLS; no model is loaded in this test
