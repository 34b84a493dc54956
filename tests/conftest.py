"""Shared fixtures: a tiny random Llama and PEFT adapters, built offline once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from server.demo import write_llama_model, write_lora_adapter  # noqa: E402

torch.set_num_threads(2)

# Every Linear satisfies bitsandbytes' 4-bit CPU constraints (in % 64 == 0, out % 32 == 0).
TINY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Adapters that differ in rank, lora_alpha, use_rslora and target modules.
TINY_ADAPTERS = {
    "attn-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=11),
    "all-r8": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR, seed=12),
    "all-r16-rslora": dict(r=16, lora_alpha=8, target_modules=ALL_LINEAR, use_rslora=True, seed=13),
    "qkvo-r64": dict(r=64, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     seed=14),
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    write_llama_model(path, **TINY_SHAPE, seed=3)
    return path


@pytest.fixture(scope="session")
def tiny_adapter_dirs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("tiny-adapters")
    dirs = {}
    for name, kwargs in TINY_ADAPTERS.items():
        dirs[name] = root / name
        write_lora_adapter(dirs[name], base_model_dir=tiny_model_dir, init_std=0.2, **kwargs)
    return dirs


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """A LORAPLEX_CACHE_DIR with the demo model and adapters built, for server processes."""
    from server.demo import build_demo

    root = tmp_path_factory.mktemp("loraplex-cache")
    build_demo(root, progress=None)
    return root
