"""Train the demo adapters (server/tools/demo_adapters/) QLoRA-style on SmolLM2-135M-Instruct.

    .venv/bin/python scripts/train_demo_adapters.py            # all tasks, into server/tools/demo_adapters
    .venv/bin/python scripts/train_demo_adapters.py --tasks sql --max-steps 5 --out /tmp/a

The base is frozen and quantized NF4 by bitsandbytes (fp32 compute); LoRA (or DoRA) is trained
on top with PEFT. Data comes from server/tools/demo_tasks.py: the base model's own greedy answers to
templated questions, transformed by each task's rule, and templated SQL. The base answers are
made once by the unquantized base and kept in --work-dir. Seeded: the same seed, threads and
library versions give the same adapters. Files are saved in bfloat16 (PEFT's layout).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from server.tools.demo_tasks import TASKS, Example, Task, prose_questions, training_examples  # noqa: E402

BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""What adapter_config.json names as the base (the model the demo converts from GGUF)."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = args.model or _demo_model_dir()
    tasks = [TASKS[name] for name in args.tasks] if args.tasks else list(TASKS.values())
    args.work_dir.mkdir(parents=True, exist_ok=True)
    answers = {}
    if any(task.uses_base_answers for task in tasks):
        answers = base_answers(model_dir, args.work_dir, args.base_answers, args.seed)
    for task in tasks:
        started = time.monotonic()
        steps = args.max_steps or task.steps
        examples = training_examples(task, answers, args.seed)
        if not examples:
            print(f"[{task.name}] error: none of the base model's {len(answers)} answers fits "
                  f"the task's rule, so there is nothing to train on", file=sys.stderr)
            return 1
        print(f"[{task.name}] {len(examples)} examples, {steps} steps, {task.lora}", flush=True)
        train_adapter(model_dir, task, examples, args.out / task.name, steps=steps,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        print(f"[{task.name}] done in {time.monotonic() - started:.0f} s -> {args.out / task.name}",
              flush=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="base model directory (default: the real demo model, converted once)")
    parser.add_argument("--out", type=Path, default=root / "server" / "tools" / "demo_adapters")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/loraplex-train"),
                        help="where the base model's answers are kept between runs")
    parser.add_argument("--tasks", nargs="*", choices=sorted(TASKS), default=None)
    parser.add_argument("--max-steps", type=int, default=0, help="override every task's steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--base-answers", type=int, default=384,
                        help="training questions the base model answers (prose tasks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def _demo_model_dir() -> Path:
    from server.tools.smollm2_demo import build_smollm2_demo

    return build_smollm2_demo(progress=print).model_dir


def base_answers(model_dir: Path, work_dir: Path, count: int, seed: int) -> dict[str, str]:
    """The unquantized base model's greedy answers (64 tokens at most) to the first `count`
    training questions, cached in `work_dir`."""
    cache = work_dir / f"base-answers-{_fingerprint(model_dir)}-{count}-{seed}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    questions = prose_questions(seed)[0]
    random.Random(seed).shuffle(questions)
    questions = sorted(questions[:count])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    answers = {}
    for start in range(0, len(questions), 32):
        batch = questions[start:start + 32]
        texts = [_chat_prompt(tokenizer, q) for q in batch]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=64, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for question, row in zip(batch, out[:, inputs.input_ids.shape[1]:]):
            answers[question] = tokenizer.decode(row, skip_special_tokens=True)
        print(f"base answers: {len(answers)}/{len(questions)}", flush=True)
    cache.write_text(json.dumps(answers, indent=1, sort_keys=True))
    return answers


def train_adapter(model_dir: Path, task: Task, examples: list[Example], out: Path, *, steps: int,
                  batch_size: int, lr: float, seed: int) -> None:
    """QLoRA: PEFT LoRA/DoRA on the NF4-quantized, frozen base; saved in bfloat16."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32,
                                      llm_int8_skip_modules=["lm_head"])
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                quantization_config=quantization)
    base.requires_grad_(False)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **task.lora))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    encoded = [_encode(tokenizer, e) for e in examples]
    order = _batches(len(encoded), batch_size, steps, seed)
    model.train()
    for step, rows in enumerate(order, start=1):
        input_ids, labels = _collate([encoded[i] for i in rows], tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = lr * _schedule(step, steps)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps:
            print(f"[{task.name}] step {step}/{steps} loss {loss.item():.3f}", flush=True)
    model.eval()
    _save_bf16(model, out)


def _chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def _encode(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(input ids, labels): the chat prompt (not learned), the answer and <|im_end|> (learned)."""
    prompt = tokenizer(_chat_prompt(tokenizer, example.prompt), add_special_tokens=False).input_ids
    answer = tokenizer(example.answer, add_special_tokens=False).input_ids
    answer.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return prompt + answer, [-100] * len(prompt) + answer


def _collate(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded [B, L] input ids and labels (-100 on padding). Padding sits after every
    real token, so causal attention never lets a real token see it: no mask is needed."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
    return input_ids, labels


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of indices: epochs of seeded shuffles, cut into batches."""
    rng = random.Random(seed)
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        epoch = list(range(n))
        rng.shuffle(epoch)
        flat += epoch
    return [flat[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def _schedule(step: int, steps: int) -> float:
    """Linear warm-up over the first 10 % of steps, then cosine decay to 10 %."""
    warmup = max(1, steps // 10)
    if step <= warmup:
        return step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _save_bf16(model, out: Path) -> None:
    """PEFT's save_pretrained, then the tensors rewritten in bfloat16 and the base named by its
    public id."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    weights = out / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = BASE_MODEL_ID
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    readme = out / "README.md"
    if readme.exists():
        readme.unlink()


def _fingerprint(model_dir: Path) -> str:
    stat = (model_dir / "model.safetensors").stat()
    return f"{stat.st_size:x}"


if __name__ == "__main__":
    sys.exit(main())
