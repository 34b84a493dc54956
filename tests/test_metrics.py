"""Prometheus metrics: exact values for known requests, promtool's lint, a real Prometheus scrape."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest

from adapters_registry.peft_format import CONFIG_FILE, WEIGHTS_FILE
from adapters_registry.registry import AdapterRegistry
from adapters_registry.store import AdapterStore
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc
from server.api.metrics import BASE_LABEL, OTHER_LABEL, AdapterLabels
from tests import processes
from tests.engine_helpers import make_core
from tests.inprocess_server import serving
from tests.server_process import start_server

PROMETHEUS_BIN = Path(sys.prefix) / "opt" / "prometheus" / "usr" / "bin"


def tool(name: str) -> str:
    path = PROMETHEUS_BIN / name
    assert path.is_file(), (f"{path} is missing: run the suite with ./dev test "
                            "(it unpacks Debian's prometheus)")
    return str(path)


# ---- exact values, in process ---------------------------------------------------------------

@pytest.fixture
def served(tiny_model_dir, tiny_adapter_dirs, tmp_path):
    """(stub, metrics registry) of an in-process server with adapters a8 and a4 registered."""
    def open_registry(spec):
        return AdapterRegistry(AdapterStore(tmp_path / "store"), spec, max_rank=64,
                               cache_bytes=2**24)

    core = make_core(tiny_model_dir, {}, max_slots=2, registry=open_registry)
    registry = core.registry
    for name, source in (("a8", "all-r8"), ("a4", "attn-r4")):
        d = tiny_adapter_dirs[source]
        registry.register(name, (d / CONFIG_FILE).read_bytes(), (d / WEIGHTS_FILE).read_bytes())
    with serving(core) as (channel, running):
        yield inference_pb2_grpc.InferenceStub(channel), running.metrics.registry
    registry.close()
    registry.store.close()


def greedy(prompt_ids, adapter, tokens):
    return pb.GenerateRequest(prompt_token_ids=prompt_ids, adapter_id=adapter,
                              params=pb.SamplingParams(max_new_tokens=tokens))


def test_counters_and_histograms_count_exactly_what_was_served(served):
    stub, registry = served
    value = registry.get_sample_value
    stub.Generate(greedy([1, 2, 3], "a8", 5))  # cold: loads a8 into host RAM and a slot
    stub.Generate(greedy([4, 5, 6], "a8", 5))  # warm in both tiers
    stub.Generate(greedy([7, 8], "", 4))  # the base model
    for out in stub.GenerateStream(greedy([9], "a4", 3)):
        pass
    with pytest.raises(grpc.RpcError):
        stub.Generate(greedy([1], "missing", 3))
    with pytest.raises(grpc.RpcError):
        stub.Generate(pb.GenerateRequest(prompt="x", params=pb.SamplingParams(top_p=2.0)))

    assert value("loraplex_requests_total", {"outcome": "length"}) == 4
    assert value("loraplex_requests_total", {"outcome": "unknown_adapter"}) == 1
    assert value("loraplex_requests_total", {"outcome": "invalid"}) == 1
    assert value("loraplex_prompt_tokens_total") == 3 + 3 + 2 + 1
    assert value("loraplex_generation_tokens_total") == 5 + 5 + 4 + 3
    for histogram in ("loraplex_time_to_first_token_seconds", "loraplex_e2e_request_latency_seconds",
                      "loraplex_request_queue_time_seconds"):
        assert value(f"{histogram}_count") == 4, histogram  # requests that ran
    assert value("loraplex_inter_token_latency_seconds_count") == 4 + 4 + 3 + 2
    assert value("loraplex_adapter_requests_total", {"adapter": "a8"}) == 2
    assert value("loraplex_adapter_requests_total", {"adapter": "a4"}) == 1
    assert value("loraplex_adapter_requests_total", {"adapter": BASE_LABEL}) == 1
    assert value("loraplex_adapter_generation_tokens_total", {"adapter": "a8"}) == 10
    assert value("loraplex_adapter_prompt_tokens_total", {"adapter": "a8"}) == 6
    # tiers: a8 and a4 each loaded once into host RAM and a slot; a8's second request hit both
    assert value("loraplex_adapter_cache_loads_total", {"tier": "host"}) == 2
    assert value("loraplex_adapter_cache_hits_total", {"tier": "host"}) == 1
    assert value("loraplex_adapter_cache_misses_total", {"tier": "host"}) == 2
    assert value("loraplex_adapter_cache_loads_total", {"tier": "device"}) == 2
    assert value("loraplex_adapter_cache_hits_total", {"tier": "device"}) == 1
    assert value("loraplex_adapter_load_seconds_count", {"tier": "host"}) == 2
    assert value("loraplex_adapter_load_seconds_count", {"tier": "device"}) == 2
    assert value("loraplex_adapters_resident", {"tier": "store"}) == 2
    assert value("loraplex_adapters_resident", {"tier": "host"}) == 2
    assert value("loraplex_adapters_resident", {"tier": "device"}) == 2
    for adapter in ("a8", "a4"):  # each by name, for routing by affinity
        for tier in ("device", "host"):
            assert value("loraplex_adapter_resident", {"adapter": adapter, "tier": tier}) == 1
    assert value("loraplex_adapter_resident", {"adapter": "_other", "tier": "host"}) == 0
    assert value("loraplex_num_requests_running") == value("loraplex_num_requests_waiting") == 0
    assert value("loraplex_kv_cache_usage_ratio") == 0
    assert value("loraplex_base_model_bytes") > 0 and value("loraplex_full_copy_bytes") > 0
    assert value("loraplex_full_copies_bytes") == 2 * value("loraplex_full_copy_bytes")
    assert value("loraplex_serving_bytes") > value("loraplex_base_model_bytes")


def test_prefix_cache_series_count_the_prompt_tokens_found(served):
    stub, registry = served
    value = registry.get_sample_value
    prompt = list(range(1, 21))  # one full block of 16, and 4 tokens
    stub.Generate(greedy(prompt, "a4", 2))
    stub.Generate(greedy(prompt, "a4", 2))
    assert value("loraplex_prefix_cache_queries_total") == 2 * 20
    assert value("loraplex_prefix_cache_hits_total") == 16
    assert value("loraplex_prefix_cache_hit_ratio") == 16 / 40
    assert value("loraplex_prefix_cache_blocks") >= 1  # kept, with no sequence running
    assert value("loraplex_prefix_cache_evictions_total") == 0
    assert value("loraplex_kv_cache_usage_ratio") == 0  # cached blocks count as free


def test_host_residency_names_only_the_busiest_adapters(tiny_model_dir, tiny_adapter_dirs,
                                                         tmp_path):
    """Device slots are bounded by --max-slots; host RAM is not, so adapters outside the top K
    by traffic are counted under _other (here K = 1)."""
    def open_registry(spec):
        return AdapterRegistry(AdapterStore(tmp_path / "store"), spec, max_rank=64,
                               cache_bytes=2**24)

    core = make_core(tiny_model_dir, {}, max_slots=2, registry=open_registry)
    for name, source in (("a8", "all-r8"), ("a4", "attn-r4")):
        d = tiny_adapter_dirs[source]
        core.registry.register(name, (d / CONFIG_FILE).read_bytes(),
                               (d / WEIGHTS_FILE).read_bytes())
    with serving(core, top_adapters=1) as (channel, running):
        stub = inference_pb2_grpc.InferenceStub(channel)
        stub.Generate(greedy([1, 2, 3], "a8", 2))
        stub.Generate(greedy([1, 2, 3], "a4", 2))
        value = running.metrics.registry.get_sample_value
        assert value("loraplex_adapter_resident", {"adapter": "a8", "tier": "host"}) == 1
        assert value("loraplex_adapter_resident", {"adapter": "a4", "tier": "host"}) is None
        assert value("loraplex_adapter_resident", {"adapter": "_other", "tier": "host"}) == 1
        assert value("loraplex_adapter_resident", {"adapter": "a4", "tier": "device"}) == 1
    core.registry.close()
    core.registry.store.close()


def test_per_adapter_gauges_show_who_runs_and_who_waits(tiny_model_dir, tiny_adapter_dirs):
    core = make_core(tiny_model_dir, {"a8": tiny_adapter_dirs["all-r8"],
                                      "a4": tiny_adapter_dirs["attn-r4"]}, max_batch_size=1)
    with serving(core) as (channel, running):
        stub = inference_pb2_grpc.InferenceStub(channel)
        value = running.metrics.registry.get_sample_value
        long = stub.GenerateStream(pb.GenerateRequest(
            prompt_token_ids=[1, 2, 3], adapter_id="a8",
            params=pb.SamplingParams(max_new_tokens=400, ignore_eos=True)))
        next(long)  # a8 holds the one place in the batch
        queued = stub.Generate.future(greedy([4, 5], "a4", 2))
        deadline = time.monotonic() + 60
        while value("loraplex_adapter_requests_waiting", {"adapter": "a4"}) != 1:
            assert time.monotonic() < deadline, "a4's request never showed as waiting"
            time.sleep(0.01)
        assert value("loraplex_adapter_requests_running", {"adapter": "a8"}) == 1
        assert value("loraplex_adapter_requests_running", {"adapter": "a4"}) is None
        long.cancel()
        assert queued.result(timeout=60).usage.completion_tokens == 2


def test_adapter_labels_keep_the_busiest_and_never_shrink_a_series():
    labels = AdapterLabels(k=2, every=10)
    assert [labels.label(a) for a in ("x", "y", "z")] == ["x", "y", OTHER_LABEL]
    assert labels.label(None) == BASE_LABEL
    seen = [labels.label("z") for _ in range(30)]  # z becomes the busiest: it gets a label
    assert seen[-1] == "z" and OTHER_LABEL in seen[:5]
    assert {labels.label("x"), labels.label("y")} & {OTHER_LABEL}  # one of x, y made room


# ---- the real server: promtool and Prometheus ----------------------------------------------

@pytest.fixture(scope="module")
def metrics_server(demo_cache, tmp_path_factory):
    process = start_server("--threads", "1", "--metrics-port", "auto", "--log-format", "json",
                           "--store", str(tmp_path_factory.mktemp("store")),
                           env={"LORAPLEX_CACHE_DIR": str(demo_cache)})
    with grpc.insecure_channel(process.target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for adapter in ("attn-r4", "all-r16", "mlp-r8-bf16", "", "attn-r4"):
            stub.Generate(pb.GenerateRequest(prompt="Hello", adapter_id=adapter,
                                             params=pb.SamplingParams(max_new_tokens=3)))
    yield process, process.metrics_port
    assert process.stop() == 0, process.output()


def test_one_json_log_line_per_request(metrics_server):
    lines = [json.loads(line) for line in metrics_server[0].log if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    requests = [line for line in lines if line["logger"] == "loraplex.requests"]
    assert [r["adapter"] for r in requests] == ["attn-r4", "all-r16", "mlp-r8-bf16", "",
                                                "attn-r4"]
    for r in requests:
        assert r["outcome"] == "length" and r["completion_tokens"] == 3
        assert r["prompt_tokens"] > 0 and r["cached_tokens"] >= 0
        assert 0 <= r["queue_ms"] <= r["ttft_ms"] <= r["total_ms"]
        assert r["message"].startswith(f"request {r['request_id']} adapter=")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def test_promtool_finds_no_problem(metrics_server):
    text = scrape(metrics_server[1])
    assert 'loraplex_adapter_requests_total{adapter="attn-r4"} 2.0' in text
    result = subprocess.run([tool("promtool"), "check", "metrics"], input=text,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == result.stderr.strip() == ""


def test_a_real_prometheus_scrapes_a_counter_and_a_histogram(metrics_server, tmp_path):
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: loraplex\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_server[1]}']\n")

    def launch(web_port: int):
        log = (tmp_path / "prometheus.log").open("w+")
        proc = processes.start(
            [tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{web_port}"], stdout=log, stderr=log)
        answering = wait_until_answering(f"http://127.0.0.1:{web_port}/-/ready", proc)
        log.seek(0)
        if not answering and "address already in use" in log.read():
            raise processes.PortTaken()
        assert answering, log.read()
        return proc, web_port

    prometheus, web_port = processes.retrying_on_a_taken_port(launch)
    try:
        requests = query(web_port, 'sum(loraplex_requests_total{outcome="length"})')
        ttft = query(web_port, "loraplex_time_to_first_token_seconds_count")
        assert requests == ttft == 5
    finally:
        processes.stop(prometheus)


def wait_until_answering(url: str, proc, timeout: float = 60) -> bool:
    """True once `url` answers; False if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer: it listens
        except OSError:
            time.sleep(0.2)
    return False


def query(port: int, promql: str, timeout: float = 60) -> float:
    """The value of an instant query once Prometheus has scraped it."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                result = json.load(reply)["data"]["result"]
            if result:
                return float(result[0]["value"][1])
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    raise AssertionError(f"Prometheus never answered {promql!r}")


def test_vllm_compatible_series_for_the_gateway(demo_cache, tmp_path):
    process = start_server("--threads", "1", "--metrics-port", "auto", "--vllm-metrics",
                           "--max-slots", "3", "--store", str(tmp_path / "store"),
                           env={"LORAPLEX_CACHE_DIR": str(demo_cache)})
    try:
        text = scrape(process.metrics_port)
        for name in ("vllm:num_requests_running 0.0", "vllm:num_requests_waiting 0.0",
                     "vllm:kv_cache_usage_perc 0.0", "vllm:gpu_cache_usage_perc 0.0",
                     'vllm:lora_requests_info{max_lora="3",running_lora_adapters="",'
                     'waiting_lora_adapters=""}'):
            assert name in text, name
    finally:
        assert process.stop() == 0, process.output()
