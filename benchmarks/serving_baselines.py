"""In-process baselines on the same model and trace: what a user would run instead of loraplex.

Each replays the trace's arrivals against the wall clock. At each iteration it takes requests that
have arrived (waiting up to BATCH_WAIT for a batch to fill, as a dynamic batcher would), forms one
batch, and runs HF `generate` on it to completion (static batching, as these baselines do: a
request that arrives mid-batch waits for the next one):

- PEFT mixed batch:      up to B arrived requests, any adapters, `generate(adapter_names=...)`.
- PEFT one per batch:    the oldest request's adapter, with up to B arrived requests of that
                         adapter (S-LoRA's "PEFT" baseline: `set_adapter`, then `generate`).
- merged copies:         as one per batch, but on a full fp32 copy of the model with that
                         adapter merged; as many copies as the memory budget holds, LRU; a miss
                         merges the adapter into a copy (that time counts).
- base only:             up to B arrived requests on the NF4 base model, no adapter.

TTFT is taken when `generate` asks its logits processor for the first time (the prefill is done),
end-to-end latency when `generate` returns. A batch generates max(output_len) tokens for all its
rows (left-padded prompts); each request is credited its own output_len tokens.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from benchmarks.serving_runner import PROMPT_VOCAB, RequestResult
from benchmarks.traces import TraceRequest, prompt_tokens

PAD_ID = 0
BATCH_WAIT = 0.5  # seconds a batch may wait for more arrivals


class _FirstCall(LogitsProcessor):
    """Records when generate first asks for the next-token scores: the first token's time."""

    def __init__(self):
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def _generate(model, batch: list[TraceRequest], **extra) -> float:
    """Runs one static batch; returns the time of its first token (perf_counter)."""
    prompts = [prompt_tokens(r, PROMPT_VOCAB) for r in batch]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    new = max(r.output_len for r in batch)
    first = _FirstCall()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, logits_processor=LogitsProcessorList([first]),
                       pad_token_id=PAD_ID, **extra)
    return first.at


def replay(trace: list[TraceRequest], pick: Callable[[list[TraceRequest]], list[TraceRequest]],
           run: Callable[[list[TraceRequest]], float], batch_size: int,
           log) -> list[RequestResult]:
    """Replays arrivals; `pick(waiting)` chooses (and the loop removes) the next batch, `run(batch)`
    generates it and returns its first token's time. Like a dynamic batcher, the loop waits up to
    BATCH_WAIT after the oldest waiting request's arrival for the batch to fill."""
    pending = sorted(trace, key=lambda r: r.arrival)
    waiting: list[TraceRequest] = []
    results: list[RequestResult] = []
    start = time.perf_counter()
    while pending or waiting:
        now = time.perf_counter() - start
        while pending and pending[0].arrival <= now:
            waiting.append(pending.pop(0))
        if _wait_for_more(waiting, pending, batch_size):
            time.sleep(max(0.0, pending[0].arrival - now))
            continue
        batch = pick(waiting)
        for request in batch:
            waiting.remove(request)
        first = run(batch) - start
        end = time.perf_counter() - start
        results += [RequestResult(r, r.arrival, first - r.arrival, end - r.arrival, r.output_len)
                    for r in batch]
        log(f"    {len(results)}/{len(trace)} requests done (batch of {len(batch)})")
    return sorted(results, key=lambda result: result.request.index)


def _wait_for_more(waiting: list[TraceRequest], pending: list[TraceRequest],
                   batch_size: int) -> bool:
    """Nothing waits yet, or the batch is not full and the next request arrives within BATCH_WAIT
    of the oldest waiting one."""
    if not waiting:
        return True
    return (len(waiting) < batch_size and bool(pending)
            and pending[0].arrival <= waiting[0].arrival + BATCH_WAIT)


def fifo(batch_size: int):
    return lambda waiting: waiting[:batch_size]


def one_adapter(batch_size: int):
    """The oldest request's adapter, with its other waiting requests, up to batch_size."""
    def pick(waiting: list[TraceRequest]) -> list[TraceRequest]:
        adapter = waiting[0].adapter
        return [r for r in waiting if r.adapter == adapter][:batch_size]
    return pick


# ---- the models ----------------------------------------------------------------------------------

def load_nf4(model_dir: Path):
    from benchmarks.core_engine import load_hf

    return load_hf(model_dir)


def load_peft(model_dir: Path, adapter_dirs: dict[int, Path]):
    from benchmarks.core_engine import load_peft as load

    return load(model_dir, {str(index): path for index, path in adapter_dirs.items()})


def peft_mixed(model, trace: list[TraceRequest], batch_size: int, log) -> list[RequestResult]:
    def run(batch):
        return _generate(model, batch, adapter_names=[str(r.adapter) for r in batch])
    return replay(trace, fifo(batch_size), run, batch_size, log)


def peft_one_per_batch(model, trace: list[TraceRequest], batch_size: int,
                       log) -> list[RequestResult]:
    def run(batch):
        model.set_adapter(str(batch[0].adapter))
        return _generate(model, batch)
    return replay(trace, one_adapter(batch_size), run, batch_size, log)


def base_only(model, trace: list[TraceRequest], batch_size: int, log) -> list[RequestResult]:
    return replay(trace, fifo(batch_size), lambda batch: _generate(model, batch), batch_size,
                  log)


def load_fp32(model_dir: Path):
    """The base model unquantized in fp32: what a merged full copy is."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 device_map={"": "cpu"}).eval()
    model.generation_config.eos_token_id = None  # as load_nf4: EOS ignored
    return model


class MergedCopies:
    """Up to `capacity` fp32 copies of the model, each with one adapter merged in, LRU."""

    def __init__(self, model_dir: Path, adapter_dirs: dict[int, Path], capacity: int):
        self.model_dir, self.adapter_dirs, self.capacity = model_dir, adapter_dirs, capacity
        model = load_fp32(model_dir)
        self.copy_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied once
        self.base_state = {k: v.clone() for k, v in model.state_dict().items()}
        self.copies: OrderedDict[int, torch.nn.Module] = OrderedDict()
        self.merges = 0

    def model_for(self, adapter: int):
        if adapter in self.copies:
            self.copies.move_to_end(adapter)
            return self.copies[adapter]
        model = self.copies.popitem(last=False)[1] if len(self.copies) >= self.capacity \
            else load_fp32(self.model_dir)
        model.load_state_dict(self.base_state)
        self._merge(model, self.adapter_dirs[adapter])
        self.copies[adapter] = model
        self.merges += 1
        return model

    @staticmethod
    def _merge(model, adapter_dir: Path) -> None:
        """W += scale · B @ A for every module of the adapter (what PEFT's merge computes)."""
        import json

        from safetensors.torch import load_file

        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        scale = config["lora_alpha"] / config["r"]
        tensors = load_file(adapter_dir / "adapter_model.safetensors")
        with torch.no_grad():
            for key, a in tensors.items():
                if key.endswith("lora_A.weight"):
                    prefix = key.removesuffix(".lora_A.weight")
                    b = tensors[prefix + ".lora_B.weight"]
                    weight = model.get_submodule(prefix.removeprefix("base_model.model.")).weight
                    weight.add_(scale * (b.float() @ a.float()))

    def serve(self, trace: list[TraceRequest], batch_size: int, log) -> list[RequestResult]:
        return replay(trace, one_adapter(batch_size),
                      lambda batch: _generate(self.model_for(batch[0].adapter), batch), batch_size,
                      log)
