"""The `loraplex` command as a user runs it: a real process, real flags, real signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest

from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc

LORAPLEX = [sys.executable, "-m", "server.cli"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "LORAPLEX_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
            "LORAPLEX_THREADS": "1"}


def _run(args, env, timeout=300):
    return subprocess.run(LORAPLEX + args, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_serve_without_model_serves_the_demo_and_drains_on_sigterm(env):
    """The demo adapters are registered in the adapter store and served from the registry."""
    proc = subprocess.Popen(LORAPLEX + ["serve", "--port", "0"], env=env, text=True,
                            stderr=subprocess.PIPE)
    try:
        port = _wait_for_port(proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for adapter in ["", "attn-r4", "all-r64-rslora", "mlp-r8-bf16"]:
                reply = stub.Generate(pb.GenerateRequest(
                    prompt="Hello", adapter_id=adapter, params=pb.SamplingParams(max_new_tokens=4)))
                assert len(reply.token_ids) >= 1
            with pytest.raises(grpc.RpcError) as error:
                stub.Generate(pb.GenerateRequest(prompt="Hello", adapter_id="no-such-adapter"))
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            assert "adapter 'no-such-adapter' is not registered" in error.value.details()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()


def _wait_for_port(proc, timeout=300) -> int:
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"serving on [\w.]+:(\d+)", line)
        if match:
            return int(match[1])
    raise AssertionError("server did not start:\n" + "".join(lines))


def test_generate_prints_text(env):
    result = _run(["generate", "--prompt", "Hi", "--adapter", "all-r16", "--max-new-tokens", "5",
                   "--quantize", "none"], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_generate_takes_a_mixture(env):
    """A cat mixture whose second weight is 0 answers exactly as its first adapter alone."""
    common = ["generate", "--prompt", "Hi", "--max-new-tokens", "5", "--quantize", "none"]
    alone = _run(common + ["--adapter", "all-r16"], env)
    mixed = _run(common + ["--mix", "all-r16=1", "--mix", "attn-r4=0", "--combination", "cat"],
                 env)
    assert mixed.returncode == 0, mixed.stderr
    assert mixed.stdout == alone.stdout
    refused = _run(common + ["--mix", "all-r16=1", "--mix", "attn-r4=1"], env)  # ranks differ
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].endswith(
        "linear needs adapters of one rank, got all-r16: r=16, attn-r4: r=4; use cat or svd for "
        "different ranks")


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/dir"], "model directory not found"),
    (["--mix", "all-r16=one"], "--mix expects NAME=WEIGHT"),
    (["--mix", "all-r16=1", "--combination", "dare"], "combination type 'dare' is not one of"),
    (["--quantize", "none", "--max-slots", "0"], "--max-slots must be at least 1"),
    (["--adapter-dir", "broken"], "--adapter-dir expects NAME=PATH"),
])
def test_user_errors_are_one_line_without_traceback(env, args, message):
    result = _run(["generate", "--prompt", "x"] + args, env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unsupported_model_type_is_one_clear_line(env, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    result = _run(["generate", "--prompt", "x", "--model", str(tmp_path)], env)
    assert result.returncode == 2
    assert "model type 'gpt2'" in result.stderr and "Traceback" not in result.stderr
