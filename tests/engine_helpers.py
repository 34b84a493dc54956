"""Helpers for tests that drive an EngineCore step by step."""

from __future__ import annotations

import torch

from server.config import EngineConfig
from server.engine.core import EngineCore, GenerationRequest, load_engine_core
from server.engine.sampler import SamplingParams


def make_core(model_dir, adapter_dirs, *, quantize="none", registry=None,
              **overrides) -> EngineCore:
    """A core on the CPU with the adapter directories registered; `registry(spec)` opens its
    registry (default: in RAM)."""
    config = EngineConfig(model=model_dir, quantize=quantize, device="cpu",
                          kv_cache_mb=overrides.pop("kv_cache_mb", 16), **overrides)
    config.validate()
    return load_engine_core(config, {name: str(path) for name, path in adapter_dirs.items()},
                            registry=registry)


def greedy_request(prompt_ids, adapter=None, max_new_tokens=8, **params) -> GenerationRequest:
    return GenerationRequest(prompt_token_ids=list(prompt_ids), adapter_id=adapter,
                             params=SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True,
                                                   **params))


def run_to_completion(core: EngineCore, submissions=None, max_steps=10_000):
    """Steps until idle. `submissions[step] = [(request_id, request), ...]` joins at that step.

    Returns {request_id: (token_ids, text, finish_reason)}.
    """
    submissions = dict(submissions or {})
    tokens: dict[str, list[int]] = {}
    texts: dict[str, list[str]] = {}
    reasons: dict[str, str] = {}
    for step in range(max_steps):
        for request_id, request in submissions.pop(step, []):
            core.add_request(request, request_id)
            tokens[request_id], texts[request_id] = [], []
        if not core.has_work() and not submissions:
            break
        for out in core.step():
            tokens[out.request_id] += out.new_token_ids
            texts[out.request_id].append(out.new_text)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return {rid: (tokens[rid], "".join(texts[rid]), reasons.get(rid)) for rid in tokens}


def peft_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], list]:
    """Greedy decoding with a full forward per token, the plainest possible reference: the new
    tokens and each step's fp32 logits row."""
    ids, rows = list(prompt), []
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            rows.append(logits.float())
            ids.append(int(logits.argmax()))
    return ids[len(prompt):], rows


def record_logits(core: EngineCore) -> dict[str, list]:
    """Captures each request's logits row of every step into the returned dict."""
    seen: dict[str, list] = {}

    def observe(request_ids, logits):
        for request_id, row in zip(request_ids, logits):
            seen.setdefault(request_id, []).append(row.clone())

    core.logits_observer = observe
    return seen
