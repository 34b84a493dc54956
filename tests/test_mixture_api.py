"""Weighted mixtures of adapters through every face, against a real server on the tiny demo:
OpenAI `extra_body.adapter_mixture`, gRPC `GenerateRequest.adapter_mixture`, the Python client
and the command line; their errors; metrics and the request log naming them.

The engine's equivalence with PEFT is tests/test_mixtures.py; here a `cat` mixture whose second
weight is 0 must answer exactly as its first adapter alone (its update is that adapter's, plus
exact zeros), which shows the faces hand the mixture to the engine as asked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from clients import LoraplexClient, LoraplexError
from tests.server_process import openai_client, start_demo_http_server, stopped_cleanly

BASE = "model"
PROMPT = "Once upon a time"
TOKENS = 12
REPO = Path(__file__).resolve().parents[1]


def mixture(weights, combination, adapters=("attn-r8", "all-r16"), **extra) -> dict:
    return {"adapters": list(adapters), "weights": list(weights),
            "combination_type": combination, **extra}


@pytest.fixture(scope="module")
def server(demo_cache, tmp_path_factory):
    store = tmp_path_factory.mktemp("mix") / "store"
    with stopped_cleanly(start_demo_http_server(demo_cache, store)) as process:
        yield process


@pytest.fixture(scope="module")
def api(server):
    with openai_client(server, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(server):
    with LoraplexClient(server.target, timeout=300) as client:
        yield client


def complete(api, model=BASE, **extra_body) -> str:
    return api.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                  extra_body={"ignore_eos": True, **extra_body}).choices[0].text


def test_a_cat_mixture_with_a_zero_weight_answers_as_its_first_adapter(api, grpc_client):
    alone = complete(api, "attn-r8")
    zero = mixture((1.0, 0.0), "cat")
    assert complete(api, adapter_mixture=zero) == alone
    reply = grpc_client.generate(PROMPT, adapter_mixture=zero, max_new_tokens=TOKENS,
                                 ignore_eos=True)
    assert reply.text == alone
    chat = api.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": PROMPT}], max_tokens=TOKENS,
        temperature=0, extra_body={"adapter_mixture": zero})
    chat_alone = api.chat.completions.create(
        model="attn-r8", messages=[{"role": "user", "content": PROMPT}], max_tokens=TOKENS,
        temperature=0)
    assert chat.choices[0].message.content == chat_alone.choices[0].message.content
    # both weights count: the answer leaves the first adapter's
    assert complete(api, adapter_mixture=mixture((1.0, 1.0), "cat")) != alone


def test_every_combination_type_serves_through_http_and_grpc_alike(api, grpc_client):
    mixes = [mixture((0.7, 0.3), "linear", ("attn-r8", "mlp-r8-bf16")),
             mixture((0.7, 0.3), "ties", ("attn-r8", "mlp-r8-bf16"), density=0.5),
             mixture((1.0, 0.5), "svd", ("attn-r4", "all-r16")),
             mixture((1.0, -0.5, 0.25), "cat", ("attn-r4", "all-r16", "mlp-r8-bf16"))]
    for mix in mixes:
        text = complete(api, adapter_mixture=mix)
        reply = grpc_client.generate(PROMPT, adapter_mixture=mix, max_new_tokens=TOKENS,
                                     ignore_eos=True)
        assert reply.text == text and reply.completion_tokens == TOKENS, mix


def test_the_command_line_takes_a_mixture(server, api):
    alone = complete(api, "attn-r8")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    run = subprocess.run([sys.executable, "-m", "clients.cli", "generate", PROMPT,
                          "--mix", "attn-r8=1", "--mix", "all-r16=0", "--combination", "cat",
                          "--max-new-tokens", str(TOKENS), "--temperature", "0"],
                         cwd=REPO, env={**clean, "LORAPLEX_TARGET": server.target},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    # the CLI does not set ignore_eos: its text is the start of the longer answer, or all of it
    assert alone.startswith(run.stdout.rstrip("\n")) or run.stdout.rstrip("\n") == alone


@pytest.mark.parametrize("extra, status, message", [
    ({"adapter_mixture": mixture((1, 1), "linear", ("attn-r4", "attn-r8"))}, 400, "one rank"),
    ({"adapter_mixture": mixture((1, 1), "dare_ties")}, 400, "not one of"),
    ({"adapter_mixture": mixture((1, 1), "cat", ("attn-r8", "nope"))}, 404, "nope"),
    ({"adapter_mixture": {"adapters": "attn-r8", "weights": [1]}}, 400, "list of adapter names"),
    ({"adapter_mixture": {"adapters": ["attn-r8"], "weights": [1], "bias": 2}}, 400,
     "unknown fields"),
])
def test_mixtures_that_cannot_be_served_are_answered_with_their_reason(server, extra, status,
                                                                       message):
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 2, **extra}
    code, answer = _post(server.http_url + "/v1/completions", body)
    assert code == status and message in answer["error"]["message"], answer


def test_a_mixture_with_an_adapter_as_model_is_400(server):
    body = {"model": "attn-r8", "prompt": PROMPT, "max_tokens": 2,
            "adapter_mixture": mixture((1, 1), "cat")}
    code, answer = _post(server.http_url + "/v1/completions", body)
    assert code == 400 and "names the base model" in answer["error"]["message"]


def test_grpc_errors_of_mixtures(grpc_client):
    with pytest.raises(LoraplexError) as error:
        grpc_client.generate(PROMPT, adapter_mixture=mixture((1, 1), "linear",
                                                             ("attn-r4", "attn-r8")))
    assert error.value.code.name == "INVALID_ARGUMENT" and "one rank" in error.value.details
    with pytest.raises(LoraplexError) as error:
        grpc_client.generate(PROMPT, adapter_mixture=mixture((1, 1), "cat", ("attn-r8", "nope")))
    assert error.value.code.name == "NOT_FOUND"
    with pytest.raises(LoraplexError) as error:  # JSON cannot carry it; protobuf's double can
        grpc_client.generate(PROMPT, adapter_mixture=mixture((1, float("inf")), "cat"))
    assert error.value.code.name == "INVALID_ARGUMENT" and "finite" in error.value.details
    with pytest.raises(ValueError, match="not both"):
        grpc_client.generate(PROMPT, adapter="attn-r8", adapter_mixture=mixture((1, 1), "cat"))


def test_metrics_and_the_request_log_name_mixtures(server, api):
    mix = mixture((0.5, 0.5), "linear", ("attn-r8", "mlp-r8-bf16"))
    complete(api, adapter_mixture=mix)
    complete(api, adapter_mixture=mix)
    with urllib.request.urlopen(server.http_url + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    label = "linear(attn-r8=0.5,mlp-r8-bf16=0.5)"
    assert f'loraplex_adapter_requests_total{{adapter="{label}"}}' in text
    assert _value(text, 'loraplex_mixture_requests_total{combination="linear"}') >= 2
    assert _value(text, "loraplex_adapter_merges_total") >= 1
    assert f"adapter={label} combination=linear" in server.output()


def _value(metrics: str, series: str) -> float:
    line = next(line for line in metrics.splitlines() if line.startswith(series + " "))
    return float(line.rsplit(" ", 1)[1])


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)
