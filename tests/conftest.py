"""Shared fixtures: a tiny random Llama and PEFT adapters, built offline once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Servers and commands started without --model serve the tiny random-weight demo (fast); the
# tests of the real SmolLM2 demo ask for it with --demo smollm2.
os.environ.setdefault("LORAPLEX_DEMO", "tiny")
# The CUDA kernels run in Triton's interpreter on CPU tensors. Triton reads this when it is first
# imported (its own library of jit functions is built then), so it is set before anything can
# import it; nothing in the tests runs on a GPU.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from server.tools.demo import write_llama_model, write_lora_adapter  # noqa: E402
from tests import processes  # noqa: E402

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
    from server.tools.demo import build_demo

    root = tmp_path_factory.mktemp("loraplex-cache")
    build_demo(root, progress=None)
    return root


# DoRA adapters, trained-looking: PEFT initialises them (magnitude = the base's row norms, B = 0),
# then B and the magnitude are perturbed so that each changes the output.
TINY_DORA_ADAPTERS = {
    "dora-attn-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=21),
    "dora-all-r8": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR, seed=22),
    "dora-mlp-r16-rslora": dict(r=16, lora_alpha=8, use_rslora=True,
                                target_modules=["gate_proj", "up_proj", "down_proj"], seed=23),
}


def write_dora_adapter(directory, *, base_model_dir, r, lora_alpha, target_modules, seed,
                       use_rslora=False):
    """A PEFT DoRA adapter for the model in `base_model_dir`, saved by PEFT itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=lora_alpha, use_dora=True,
                                            use_rslora=use_rslora, target_modules=target_modules))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "lora_B" in name:
                parameter.copy_(0.2 * noise)
            elif "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.3 * noise)
    model.save_pretrained(str(directory))


@pytest.fixture(scope="session")
def tiny_dora_adapter_dirs(tmp_path_factory, tiny_model_dir):
    return _write_adapters(tmp_path_factory.mktemp("tiny-dora-adapters"), tiny_model_dir,
                           TINY_DORA_ADAPTERS, write=write_dora_adapter)


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory):
    """The tiny model's shape with tied embeddings: lm_head uses embed_tokens' weight."""
    path = tmp_path_factory.mktemp("tiny-llama-tied")
    write_llama_model(path, **TINY_SHAPE, seed=4, tie_word_embeddings=True)
    return path


# Adapters on embed_tokens and lm_head, saved by PEFT for the base they are served on (PEFT adds
# its copies of the base embedding weights). On a tied base, ensure_weight_tying makes PEFT give
# lm_head the embedding adapter's tensors (transposed) as well.
TINY_VOCAB_ADAPTERS = {
    "embed-r4": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], seed=31),
    "head-r8": dict(r=8, lora_alpha=16, target_modules=["lm_head", "v_proj"], seed=32),
    "embed-head-r16-rslora": dict(r=16, lora_alpha=8, use_rslora=True, seed=33,
                                  target_modules=["embed_tokens", "lm_head", "down_proj"]),
}
TIED_VOCAB_ADAPTERS = {
    "tied-embed-head-r8": dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "o_proj"],
                               ensure_weight_tying=True, seed=34),
}


def write_peft_adapter(directory, *, base_model_dir, seed, **lora_config):
    """A PEFT LoRA adapter saved by PEFT itself, every LoRA tensor 0.2·N(0, 1) (seeded)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(**lora_config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(str(directory))


def _write_adapters(root, base_model_dir, adapters, write=None):
    """`write(directory, base_model_dir=..., **kwargs)` for each adapter (default: PEFT's LoRA)."""
    write = write or write_peft_adapter
    dirs = {}
    for name, kwargs in adapters.items():
        dirs[name] = root / name
        write(dirs[name], base_model_dir=base_model_dir, **kwargs)
    return dirs


@pytest.fixture(scope="session")
def tiny_vocab_adapter_dirs(tmp_path_factory, tiny_model_dir):
    return _write_adapters(tmp_path_factory.mktemp("tiny-vocab-adapters"), tiny_model_dir,
                           TINY_VOCAB_ADAPTERS)


@pytest.fixture(scope="session")
def tied_vocab_adapter_dirs(tmp_path_factory, tiny_tied_model_dir):
    return _write_adapters(tmp_path_factory.mktemp("tied-vocab-adapters"), tiny_tied_model_dir,
                           {**TINY_VOCAB_ADAPTERS, **TIED_VOCAB_ADAPTERS})


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """A LORAPLEX_CACHE_DIR with the real demo model (SmolLM2-135M-Instruct) converted."""
    from server.tools.smollm2_demo import build_smollm2_demo

    root = tmp_path_factory.mktemp("loraplex-smollm2-cache")
    build_smollm2_demo(root, progress=None)
    return root


@pytest.fixture
def failing_build(monkeypatch):
    """fail(native): a NativeModule (server/native.py) whose build fails as on a machine
    without a compiler; the module is unbuilt and unfailed until its next load()."""
    def fail(native):
        def no_compiler():
            raise RuntimeError(f"Error building extension '{native.name}': c++: not found")

        monkeypatch.setattr(native, "_build", no_compiler)
        monkeypatch.setattr(native, "_module", None)
        monkeypatch.setattr(native, "_failed", False)
    return fail


# ---- S3: moto's server ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's standalone S3-compatible server, a subprocess on loopback, for the session."""
    log = tmp_path_factory.mktemp("moto") / "server.log"

    def launch(port: int):
        endpoint = f"http://127.0.0.1:{port}"
        with open(log, "wb") as out:
            proc = processes.start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                    "-p", str(port)], stdout=out, stderr=out)
        _wait_until_answering(endpoint, proc, log)
        return proc, endpoint

    proc, endpoint = processes.retrying_on_a_taken_port(launch)
    try:
        yield endpoint
    finally:
        processes.stop(proc, timeout=10)


def _wait_until_answering(endpoint: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if "Address already in use" in log.read_text():
                raise processes.PortTaken()
            pytest.fail(f"moto server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"moto server at {endpoint} did not answer within 30 s:\n{log.read_text()}")
