"""The offline demo assets: tokenizer, random Llama checkpoints and PEFT-format LoRA adapters."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from server.tools import demo

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=demo.TOKENIZER_VOCAB_SIZE,
)
ODD_TEXTS = [
    "Hello, world!",
    "",
    " ",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n",
    "héllo wörld, naïve café, Ελληνικά, русский, 日本語, 한국어",
    "emoji 🦙🎉👩‍👩‍👧 and flags 🇫🇷",
    "symbols {}[]()`~|\\ <s > < /s> <|im_start |>",
    "\x00\x01 control bytes \x7f",
]
PROMPT = "The harbor town woke slowly on winter mornings."


@pytest.fixture(scope="module")
def demo_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo-model")
    demo.write_llama_model(directory, **demo.DEMO_MODEL_SHAPE, seed=0)
    return directory


def test_tokenizer_round_trips_and_has_special_tokens(tmp_path):
    demo.write_tokenizer(tmp_path, model_max_length=1024)
    tok = AutoTokenizer.from_pretrained(tmp_path)

    assert len(tok) == demo.TOKENIZER_VOCAB_SIZE
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (demo.BOS_ID, demo.EOS_ID, demo.PAD_ID)
    assert tok.model_max_length == 1024
    for text in ODD_TEXTS:
        ids = tok(text).input_ids
        assert ids[0] == demo.BOS_ID
        assert max(ids) < demo.TOKENIZER_VOCAB_SIZE
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok(PROMPT).input_ids) < 0.6 * len(PROMPT), "merges should compress English text"
    assert tok("Bye.</s>", add_special_tokens=False).input_ids[-1] == demo.EOS_ID, "special tokens in text are parsed"


def test_chat_template_renders(tmp_path):
    demo.write_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🦙"}]

    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]

    assert text == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 🦙<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids[:2] == [demo.BOS_ID, demo.IM_START_ID]
    assert ids.count(demo.IM_END_ID) == 2
    assert tok.decode(ids) == text


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_model_loads_without_missing_keys_and_runs(tmp_path, tie_word_embeddings):
    messages = []
    demo.write_llama_model(
        tmp_path, **TINY_SHAPE, seed=3, tie_word_embeddings=tie_word_embeddings, progress=messages.append
    )
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    tok = AutoTokenizer.from_pretrained(tmp_path)

    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert len(messages) == TINY_SHAPE["num_hidden_layers"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32"
    assert model.config.tie_word_embeddings == tie_word_embeddings
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], TINY_SHAPE["vocab_size"])
    assert logits.isfinite().all() and 0.05 < logits.std() < 5
    assert tok.decode(ids[0], skip_special_tokens=True) == PROMPT


def test_model_weights_follow_the_documented_init(tmp_path):
    demo.write_llama_model(tmp_path, **TINY_SHAPE, seed=0)
    tensors = load_file(tmp_path / "model.safetensors")

    assert torch.equal(tensors["model.layers.1.input_layernorm.weight"], torch.ones(TINY_SHAPE["hidden_size"]))
    assert torch.equal(tensors["model.norm.weight"], torch.ones(TINY_SHAPE["hidden_size"]))
    std = tensors["model.layers.0.mlp.down_proj.weight"].std().item()
    assert abs(std - demo.INIT_STD) < 0.002
    q0, q1 = tensors["model.layers.0.self_attn.q_proj.weight"], tensors["model.layers.1.self_attn.q_proj.weight"]
    assert not torch.equal(q0, q1)


@pytest.mark.parametrize("name", list(demo.DEMO_ADAPTERS))
def test_peft_loads_demo_adapter_exactly_and_it_changes_the_output(demo_model_dir, tmp_path, name):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    kwargs = demo.DEMO_ADAPTERS[name]
    demo.write_lora_adapter(tmp_path, base_model_dir=demo_model_dir, seed=7, **kwargs)
    file_tensors = load_file(tmp_path / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    ids = AutoTokenizer.from_pretrained(demo_model_dir)(PROMPT, return_tensors="pt").input_ids
    base_logits, base_tokens = _logits_and_greedy(base, ids)

    model = PeftModel.from_pretrained(base, tmp_path)
    loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    lora_logits, lora_tokens = _logits_and_greedy(model, ids)

    assert set(loaded) == set(file_tensors), "missing or unexpected adapter keys"
    for key, tensor in file_tensors.items():
        assert tensor.dtype == kwargs.get("dtype", torch.float32)
        assert torch.equal(loaded[key].detach(), tensor.float()), key
    r, alpha = kwargs["r"], kwargs["lora_alpha"]
    expected_scale = alpha / math.sqrt(r) if kwargs.get("use_rslora") else alpha / r
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(lora_layers) == len(kwargs["target_modules"]) * demo.DEMO_MODEL_SHAPE["num_hidden_layers"]
    assert all(m.scaling["default"] == pytest.approx(expected_scale) for m in lora_layers)
    assert (lora_logits - base_logits).abs().max() > 0.1
    assert not torch.equal(lora_tokens, base_tokens)


def _logits_and_greedy(model, ids):
    """The model's logits on `ids` and its 16 greedy tokens after them."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        tokens = model.generate(input_ids=ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :]
    return logits, tokens


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_config_matches_what_peft_writes(demo_model_dir, tmp_path, use_rslora):
    from peft import LoraConfig

    modules = ["q_proj", "v_proj", "down_proj"]
    demo.write_lora_adapter(
        tmp_path / "ours", base_model_dir=demo_model_dir, r=4, lora_alpha=8, target_modules=modules,
        use_rslora=use_rslora, seed=1,
    )
    LoraConfig(
        r=4, lora_alpha=8, target_modules=modules, use_rslora=use_rslora, lora_dropout=0.0,
        task_type="CAUSAL_LM", base_model_name_or_path=str(demo_model_dir), inference_mode=True,
    ).save_pretrained(tmp_path / "peft")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())

    theirs.pop("peft_version")
    assert sorted(theirs.pop("target_modules")) == ours.pop("target_modules") == sorted(modules)
    assert ours == theirs


def test_adapter_shapes_follow_the_base_config(demo_model_dir, tmp_path):
    demo.write_lora_adapter(
        tmp_path, base_model_dir=demo_model_dir, r=4, lora_alpha=8, target_modules=demo.ALL_LINEAR_MODULES, seed=1
    )
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    hidden, inter = demo.DEMO_MODEL_SHAPE["hidden_size"], demo.DEMO_MODEL_SHAPE["intermediate_size"]
    kv_out = demo.DEMO_MODEL_SHAPE["num_key_value_heads"] * hidden // demo.DEMO_MODEL_SHAPE["num_attention_heads"]
    prefix = "base_model.model.model.layers.3"

    assert tensors[f"{prefix}.self_attn.q_proj.lora_A.weight"].shape == (4, hidden)
    assert tensors[f"{prefix}.self_attn.k_proj.lora_B.weight"].shape == (kv_out, 4)
    assert tensors[f"{prefix}.mlp.up_proj.lora_B.weight"].shape == (inter, 4)
    assert tensors[f"{prefix}.mlp.down_proj.lora_A.weight"].shape == (4, inter)
    assert len(tensors) == 2 * 7 * demo.DEMO_MODEL_SHAPE["num_hidden_layers"]
    with pytest.raises(ValueError):
        demo.write_lora_adapter(
            tmp_path, base_model_dir=demo_model_dir, r=4, lora_alpha=8, target_modules=["lm_head"], seed=1
        )


def test_same_arguments_give_byte_identical_files_across_processes(tmp_path):
    script = "import sys; from pathlib import Path; import test_demo_assets as t; t._write_assets(Path(sys.argv[1]))"
    pythonpath = os.pathsep.join([str(REPO_ROOT), str(Path(__file__).parent)])
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": pythonpath}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "a")], check=True, env=env)
    _write_assets(tmp_path / "b")
    demo.write_llama_model(tmp_path / "other-seed", **TINY_SHAPE, seed=6)

    hashes_a, hashes_b = _file_hashes(tmp_path / "a"), _file_hashes(tmp_path / "b")
    assert len(hashes_a) == 8
    assert hashes_a == hashes_b
    assert _file_hashes(tmp_path / "other-seed")["model.safetensors"] != hashes_a["model/model.safetensors"]


def _write_assets(directory: Path) -> None:
    """A tiny model with its tokenizer and an rsLoRA adapter for it, always from the same arguments."""
    demo.write_llama_model(directory / "model", **TINY_SHAPE, seed=5)
    demo.write_lora_adapter(
        directory / "adapter", base_model_dir=directory / "model", base_model_name_or_path="base",
        r=8, lora_alpha=16, target_modules=demo.ALL_LINEAR_MODULES, use_rslora=True, seed=9,
    )


def _file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_build_demo_is_idempotent(tmp_path):
    first_messages, second_messages = [], []
    assets = demo.build_demo(tmp_path, progress=first_messages.append)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    again = demo.build_demo(tmp_path, progress=second_messages.append)

    assert again == assets
    assert first_messages and not second_messages
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == mtimes
    assert assets.model_dir == tmp_path / "demo" / demo.DEMO_VERSION / "model"
    assert list(assets.adapters) == list(demo.DEMO_ADAPTERS)
    assert [p.name for p in (tmp_path / "demo").iterdir()] == [demo.DEMO_VERSION], "no temporary build left"
    for adapter_dir in assets.adapters.values():
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(assets.model_dir)
        assert (adapter_dir / "adapter_model.safetensors").is_file()


def test_build_demo_uses_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path
    assert demo.build_demo(progress=None).model_dir == tmp_path / "demo" / demo.DEMO_VERSION / "model"


def test_build_demo_crash_leaves_nothing_and_incomplete_build_is_replaced(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(demo, "write_lora_adapter", crash)
        with pytest.raises(RuntimeError, match="disk full"):
            demo.build_demo(tmp_path, progress=None)
    assert list((tmp_path / "demo").iterdir()) == []

    final = tmp_path / "demo" / demo.DEMO_VERSION
    (final / "model").mkdir(parents=True)
    (final / "model" / "junk").write_text("half-built")
    assets = demo.build_demo(tmp_path, progress=None)
    assert not (final / "model" / "junk").exists()
    assert (assets.model_dir / "model.safetensors").is_file()


def test_demo_model_fits_4bit_and_runs_quantized(tmp_path):
    import bitsandbytes as bnb

    assets = demo.build_demo(tmp_path, progress=None)
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert len(linears) == 7 * demo.DEMO_MODEL_SHAPE["num_hidden_layers"]
    for name, linear in linears.items():
        assert linear.in_features % 64 == 0 and linear.out_features % 32 == 0, name

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    quantized = AutoModelForCausalLM.from_pretrained(assets.model_dir, quantization_config=quantization)
    ids = AutoTokenizer.from_pretrained(assets.model_dir)(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = quantized(ids).logits
        reference = model(ids).logits

    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in quantized.modules()) == len(linears)
    assert logits.isfinite().all()
    assert torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0) > 0.9
