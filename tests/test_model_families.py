"""Llama-family layouts beyond Llama: Mistral (sliding window) and Qwen2 (q/k/v biases).

For each, a tiny random model saved by transformers is served by the engine with a PEFT LoRA
adapter and a PEFT DoRA adapter (DoRA scales the base output without its bias, which Qwen2's
q/k/v have); logits match transformers + PEFT on the same weights, base and adapters mixed,
with the CPU's kernels and with those a CUDA device gets (run by Triton's interpreter).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

from server.tools.demo import write_lora_adapter, write_tokenizer
from tests.conftest import write_dora_adapter
from tests.engine_helpers import greedy_request, make_core, record_logits, run_to_completion
from tests.test_engine_equivalence import CUDA_KERNELS

ADAPTERS = ("lora", "dora")

COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    # A window shorter than the prompts, so the sliding-window mask matters.
    "mistral": lambda: MistralConfig(sliding_window=8, **COMMON),
    "qwen2": lambda: Qwen2Config(use_sliding_window=False, **COMMON),
}
PROMPTS = [[1] + list(range(30, 50)), [1, 7, 8, 9]]
NEW_TOKENS = 5


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[request.param]())
    with torch.no_grad():  # HF initialises biases to zero; make Qwen2's visible
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(root / "model")
    write_tokenizer(root / "model")
    write_lora_adapter(root / "lora", base_model_dir=root / "model", r=8, lora_alpha=16,
                       target_modules=["q_proj", "v_proj", "down_proj"], seed=5, init_std=0.2)
    write_dora_adapter(root / "dora", base_model_dir=root / "model", r=4, lora_alpha=8,
                       target_modules=["q_proj", "k_proj", "up_proj"], seed=6)
    return request.param, root


def _peft_logits(root, adapter, prompt):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(str(root / "model"), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(root / (adapter or "lora")), adapter_name="a")
    ids, rows = list(prompt), []
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            if adapter:
                logits = model(torch.tensor([ids])).logits[0, -1]
            else:
                with model.disable_adapter():
                    logits = model(torch.tensor([ids])).logits[0, -1]
            rows.append(logits)
            ids.append(int(logits.argmax()))
    return ids[len(prompt):], rows


@pytest.mark.parametrize("kernels", [{}, CUDA_KERNELS], ids=["cpu-kernels", "cuda-kernels"])
def test_engine_matches_transformers_and_peft(family, kernels):
    model_type, root = family
    core = make_core(root / "model", {a: root / a for a in ADAPTERS}, max_slots=2, max_rank=16,
                     kv_block_size=4, **kernels)
    assert core.model.spec.model_type == model_type
    logits = record_logits(core)
    cases = [(adapter, i) for adapter in (None, *ADAPTERS) for i in range(len(PROMPTS))]
    results = run_to_completion(core, {0: [(f"{a}/{i}", greedy_request(PROMPTS[i], a, NEW_TOKENS))
                                           for a, i in cases]})
    for adapter, i in cases:
        want_tokens, want_rows = _peft_logits(root, adapter, PROMPTS[i])
        assert results[f"{adapter}/{i}"][0] == want_tokens
        for got, want in zip(logits[f"{adapter}/{i}"], want_rows):
            assert float((got - want).abs().max() / want.abs().max()) <= 1e-4
