"""Prometheus metrics: every `loraplex_` series, served on `--metrics-port` at /metrics.

Two kinds of source:
- events: the engine's `RequestRecord` per request (`Metrics.observe`), and the registry's and
  the engine's slot-write timings, feed counters and histograms as they happen;
- state: running and waiting sequences, KV-cache use, adapter tiers and their cumulative
  counters are read at scrape time by a collector, from the snapshot the engine's loop thread
  publishes after each step (`Engine.stats`) and from the registry, so the step loop never
  updates a gauge.

Per-adapter series have bounded cardinality (`AdapterLabels`). With `--vllm-metrics`, the series
the Kubernetes Gateway API Inference Extension's endpoint picker reads from vLLM are exported
too (their names contain ':', which promtool's lint flags; they are vLLM's names, kept as is).
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from adapters_registry.resolver import OUTCOMES
from server.engine.async_engine import RequestRecord
from server.engine.core import EngineCore
from server.engine.stats import EngineStats
from server.errors import ErrorKind
from server.model.memory import stored_cost
from server.serving import Backend

BASE_LABEL = "_base"  # the base model (adapter names cannot start with '_')
OTHER_LABEL = "_other"  # adapters outside the top K (an adapter may be named "other")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
REFUSAL_OUTCOMES = {
    ErrorKind.INVALID: "invalid",
    ErrorKind.NOT_FOUND: "unknown_adapter",
    ErrorKind.OVERLOADED: "overloaded",
    ErrorKind.UNAVAILABLE: "unavailable",
    ErrorKind.FAILED_PRECONDITION: "adapter_unavailable",
    ErrorKind.UNAUTHENTICATED: "unauthenticated",
    ErrorKind.PERMISSION_DENIED: "permission_denied",
}


def outcome(record: RequestRecord) -> str:
    """A finish reason (length, stop, eos, cancelled), why the request was refused, or "error"
    (a bug)."""
    return record.finish_reason or REFUSAL_OUTCOMES.get(record.refusal, "error")


class AdapterLabels:
    """Label values for per-adapter series: the K busiest adapters by recent traffic, each under
    its own name, and OTHER_LABEL for the rest.

    Every `every` requests the K are chosen again from traffic counts halved at each re-rank (so
    recent traffic weighs most). Labels are decided when a request is counted: an adapter that
    drops out of the top K counts under OTHER_LABEL from then on, so every series only grows.
    """

    def __init__(self, k: int, every: int = 200):
        self.k = k
        self.every = every
        self._scores: Tally[str] = Tally()
        self._top: set[str] = set()
        self._seen = 0
        self._lock = threading.Lock()

    def label(self, adapter: str | None) -> str:
        if not adapter:
            return BASE_LABEL
        with self._lock:
            self._scores[adapter] += 1
            self._seen += 1
            if len(self._top) < self.k and adapter not in self._top:
                self._top.add(adapter)  # room left: no need to wait for a re-rank
            elif self._seen % self.every == 0:
                self._top = {name for name, _ in self._scores.most_common(self.k)}
                self._scores = Tally({n: c // 2 for n, c in self._scores.items() if c // 2})
            return adapter if adapter in self._top else OTHER_LABEL

    def is_top(self, adapter: str) -> bool:
        """Whether the adapter has a series of its own now (without counting a request)."""
        with self._lock:
            return adapter in self._top


class Metrics:
    def __init__(self, backend: Backend, *, top_adapters: int = 20, vllm_metrics: bool = False):
        """`backend` is read at scrape time once the model is loaded."""
        self.registry = CollectorRegistry()
        self.adapter_labels = AdapterLabels(top_adapters)
        r = self.registry
        self.requests = Counter("loraplex_requests", "Requests by outcome: a finish reason "
                                "(length, stop, eos, cancelled) or why it was refused.",
                                ["outcome"], registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds",
                              "Submission to first token (adapter loading and queueing included).",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.token_gap = Histogram("loraplex_inter_token_latency_seconds",
                                   "Time between consecutive tokens of a request.",
                                   buckets=TOKEN_GAP_BUCKETS, registry=r)
        self.e2e = Histogram("loraplex_e2e_request_latency_seconds",
                             "Submission to the end of a request.", buckets=REQUEST_BUCKETS,
                             registry=r)
        self.queue = Histogram("loraplex_request_queue_time_seconds",
                               "Arrival in the engine to first scheduled in a step.",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens of finished and "
                                     "cancelled requests.", registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Generated tokens.",
                                         registry=r)
        self.adapter_requests = Counter(
            "loraplex_adapter_requests", f"Requests per adapter ({BASE_LABEL} = the base model, "
            f"{OTHER_LABEL} = adapters outside the top K by traffic).", ["adapter"], registry=r)
        self.adapter_prompt_tokens = Counter("loraplex_adapter_prompt_tokens",
                                             "Prompt tokens per adapter.", ["adapter"], registry=r)
        self.adapter_generation_tokens = Counter("loraplex_adapter_generation_tokens",
                                                 "Generated tokens per adapter.", ["adapter"],
                                                 registry=r)
        self.load_seconds = Histogram(
            "loraplex_adapter_load_seconds", "Adapter loads into a tier: host (store to host "
            "RAM: read, sha256, validation) and device (host RAM to a slot).", ["tier"],
            buckets=LOAD_BUCKETS, registry=r)
        self.mixture_requests = Counter(
            "loraplex_mixture_requests", "Requests that ran with a weighted mixture of adapters "
            "(their per-adapter series name the mixture), by combination type.",
            ["combination"], registry=r)
        r.register(_StateCollector(backend, vllm_metrics, self.adapter_labels))

    def observe(self, record: RequestRecord) -> None:
        """Counts every request by outcome; the rest only for requests that ran (a refused one
        has no latency worth a bucket, and its adapter name may not exist)."""
        self.requests.labels(outcome(record)).inc()
        if record.queue_seconds is None:
            return
        label = self.adapter_labels.label(record.adapter)
        self.adapter_requests.labels(label).inc()
        if record.combination is not None:
            self.mixture_requests.labels(record.combination).inc()
        self.e2e.observe(record.e2e_seconds)
        self.queue.observe(record.queue_seconds)
        if record.ttft_seconds is not None:
            self.ttft.observe(record.ttft_seconds)
        for gap in record.token_gaps:
            self.token_gap.observe(gap)
        self.prompt_tokens.inc(record.prompt_tokens)
        self.generation_tokens.inc(record.completion_tokens)
        self.adapter_prompt_tokens.labels(label).inc(record.prompt_tokens)
        self.adapter_generation_tokens.labels(label).inc(record.completion_tokens)

    def watch_loads(self, core: EngineCore) -> None:
        """Times each store -> RAM load of the core's registry and each slot write."""
        core.registry.load_observer = self.load_seconds.labels("host").observe
        core.slot_write_observer = self.load_seconds.labels("device").observe

    def serve(self, port: int) -> int:
        """Serves /metrics on `port` (0: any free port); returns the port bound."""
        server, _ = start_http_server(port, registry=self.registry)
        return server.server_port


class _StateCollector(Collector):
    """Gauges and cumulative counters read from the engine and registry at scrape time."""

    def __init__(self, backend: Backend, vllm_metrics: bool, adapter_labels: AdapterLabels):
        self.backend = backend
        self.vllm_metrics = vllm_metrics
        self.adapter_labels = adapter_labels

    def collect(self):
        if not self.backend.is_ready:  # still loading: nothing to report yet
            return
        ready = self.backend.ready()
        stats, registry = ready.engine.stats, ready.registry
        yield GaugeMetricFamily("loraplex_num_requests_running",
                                "Sequences in the running batch.", value=stats.running)
        yield GaugeMetricFamily("loraplex_num_requests_waiting",
                                "Sequences waiting for the running batch.", value=stats.waiting)
        yield GaugeMetricFamily("loraplex_kv_cache_usage_ratio",
                                "Fraction of KV-cache blocks in use by running sequences (0-1); "
                                "cached blocks no sequence uses count as free.",
                                value=stats.kv_usage)
        yield CounterMetricFamily("loraplex_engine_steps", "Model steps the engine has run.",
                                  value=stats.steps)
        yield CounterMetricFamily("loraplex_engine_sampled_tokens",
                                  "Tokens sampled by the engine, counted at every step.",
                                  value=stats.generated_tokens)
        yield from _prefix_cache_series(stats)
        yield from _per_adapter_series(stats)
        yield from _cost_series(ready.cost, registry)
        yield from _tier_series(stats, registry)
        if registry.resolver is not None:
            yield _resolver_series(registry.resolver)
        yield _residency_series(stats, registry, self.adapter_labels)
        if self.vllm_metrics:
            yield from _vllm_series(stats, ready.core.config.max_slots)


def _prefix_cache_series(stats: EngineStats):
    """What the prefix cache saves: prompt tokens looked up and found (so not computed), the
    hit ratio, cached blocks that no sequence uses (reclaimable), and reclaims."""
    yield CounterMetricFamily("loraplex_prefix_cache_queries",
                              "Tokens of admitted sequences looked up in the prefix cache.",
                              value=stats.prefix_queried_tokens)
    yield CounterMetricFamily("loraplex_prefix_cache_hits",
                              "Tokens found in the prefix cache (not computed again).",
                              value=stats.prefix_hit_tokens)
    ratio = stats.prefix_hit_tokens / stats.prefix_queried_tokens if stats.prefix_queried_tokens else 0.0
    yield GaugeMetricFamily("loraplex_prefix_cache_hit_ratio",
                            "Hits over queries since the start (0-1).", value=ratio)
    yield GaugeMetricFamily("loraplex_prefix_cache_blocks",
                            "KV-cache blocks kept for the prefix cache that no running sequence "
                            "uses: reclaimable, so they count as free.",
                            value=stats.kv_blocks_cached)
    yield CounterMetricFamily("loraplex_prefix_cache_evictions",
                              "Cached KV blocks reclaimed for new content.",
                              value=stats.prefix_evictions)


def _per_adapter_series(stats: EngineStats):
    """Running and waiting sequences of each adapter that has any (at most the batch size plus
    --max-queue series). Tokens served per adapter: loraplex_adapter_{prompt,generation}_tokens."""
    for name, counts, what in (("running", stats.running_by_adapter, "in the running batch"),
                               ("waiting", stats.waiting_by_adapter, "waiting for it")):
        family = GaugeMetricFamily(f"loraplex_adapter_requests_{name}",
                                   f"Sequences of each adapter {what} ({BASE_LABEL} = the base "
                                   f"model); adapters with none are not listed.",
                                   labels=["adapter"])
        for adapter, n in sorted(counts.items()):
            family.add_metric([adapter or BASE_LABEL], n)
        yield family


def _cost_series(base, registry):
    """The cost explainer: the base as served, one full copy, and both for the stored adapters."""
    yield GaugeMetricFamily("loraplex_base_model_bytes",
                            "Bytes of the base model as served (quantized).",
                            value=base.base_served_bytes)
    yield GaugeMetricFamily("loraplex_slot_table_bytes",
                            "Bytes of the device slot tables (reserved at start).",
                            value=base.slot_table_bytes)
    yield GaugeMetricFamily("loraplex_full_copy_bytes",
                            "Bytes of one fully fine-tuned copy of the base at its checkpoint's "
                            "precision.", value=base.full_copy_bytes)
    report = stored_cost(base, registry.store.list())
    n = len(report.adapter_bytes)
    yield GaugeMetricFamily("loraplex_serving_bytes",
                            "Base as served + slot tables + every stored adapter.",
                            value=report.loraplex_bytes(n))
    yield GaugeMetricFamily("loraplex_full_copies_bytes",
                            "What one fully fine-tuned copy per stored adapter would take.",
                            value=report.full_copies_bytes(n))


def _tier_series(stats: EngineStats, registry):
    """Adapter cache counters and residency by tier: device (slots), host (RAM), store (disk)."""
    families = {
        "loads": CounterMetricFamily("loraplex_adapter_cache_loads",
                                     "Adapter loads into a tier.", labels=["tier"]),
        "hits": CounterMetricFamily("loraplex_adapter_cache_hits",
                                    "Requests that found their adapter in a tier.",
                                    labels=["tier"]),
        "misses": CounterMetricFamily("loraplex_adapter_cache_misses",
                                      "Requests that had to load their adapter into a tier.",
                                      labels=["tier"]),
        "evictions": CounterMetricFamily("loraplex_adapter_cache_evictions",
                                         "Adapters evicted from a tier to make room.",
                                         labels=["tier"]),
    }
    resident = GaugeMetricFamily("loraplex_adapters_resident", "Adapter versions in a tier.",
                                 labels=["tier"])
    resident_bytes = GaugeMetricFamily("loraplex_adapter_resident_bytes",
                                       "Bytes of adapters in a tier (device: the slot tables, "
                                       "reserved up front).", labels=["tier"])
    families["loads"].add_metric(["device"], stats.slot_loads)
    families["hits"].add_metric(["device"], stats.slot_hits)
    families["misses"].add_metric(["device"], stats.slot_loads)
    families["evictions"].add_metric(["device"], stats.slot_evictions)
    resident.add_metric(["device"], stats.slots_in_use)
    cache = registry.cache
    families["loads"].add_metric(["host"], registry.loads)
    families["hits"].add_metric(["host"], cache.hits)
    families["misses"].add_metric(["host"], cache.misses)
    families["evictions"].add_metric(["host"], cache.evictions)
    resident.add_metric(["host"], len(registry.resident()))
    resident_bytes.add_metric(["host"], cache.used_bytes)
    resident.add_metric(["store"], len(registry.store))
    resident_bytes.add_metric(["store"], registry.store.total_bytes())
    yield CounterMetricFamily("loraplex_adapter_load_failures",
                              "Store -> host RAM loads that failed.",
                              value=registry.load_failures)
    yield CounterMetricFamily("loraplex_adapter_merges",
                              "Weighted mixtures merged into one adapter in host RAM (linear, "
                              "svd, ties; kept there, and counted in its bytes, like any "
                              "adapter).", value=registry.merges)
    yield from families.values()
    yield resident
    yield resident_bytes


def _resolver_series(resolver):
    family = CounterMetricFamily(
        "loraplex_adapter_resolutions", "Lookups of unregistered adapters in the "
        "--adapter-resolver sources by outcome: resolved (found and stored), absent (found "
        "nowhere), absent_cached (answered from the negative cache), failed (a bad adapter "
        "or an unreachable source).", labels=["outcome"])
    for outcome in OUTCOMES:
        family.add_metric([outcome], resolver.counts[outcome])
    return family


def _residency_series(stats: EngineStats, registry, labels: AdapterLabels):
    """Which adapters a replica holds, for routing by affinity: 1 per adapter in a device slot
    (at most --max-slots series) and per adapter in host RAM that has a series of its own (the
    --top-adapters busiest); the other host-RAM adapters are counted under OTHER_LABEL."""
    family = GaugeMetricFamily(
        "loraplex_adapter_resident", "1 for each adapter in a tier: device (a slot) or host "
        f"(RAM); {OTHER_LABEL} counts host-RAM adapters outside the top K by traffic.",
        labels=["adapter", "tier"])
    for name in sorted({name for name, _ in stats.slot_adapters}):
        family.add_metric([name, "device"], 1)
    others = 0
    for name in sorted({key.name for key in registry.resident()}):
        if labels.is_top(name):
            family.add_metric([name, "host"], 1)
        else:
            others += 1
    family.add_metric([OTHER_LABEL, "host"], others)
    return family


def _vllm_series(stats: EngineStats, max_slots: int):
    """The vLLM series the Gateway API Inference Extension's endpoint picker scrapes."""
    yield GaugeMetricFamily("vllm:num_requests_running", "Requests running (vLLM name).",
                            value=stats.running)
    yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting (vLLM name).",
                            value=stats.waiting)
    for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        yield GaugeMetricFamily(name, "KV-cache usage, 0-1 (vLLM name).", value=stats.kv_usage)
    info = GaugeMetricFamily("vllm:lora_requests_info",
                             "Adapters of running and waiting requests; the value is the time "
                             "of this report (vLLM name).",
                             labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
    info.add_metric([",".join(stats.running_adapters), ",".join(stats.waiting_adapters),
                     str(max_slots)], time.time())
    yield info
