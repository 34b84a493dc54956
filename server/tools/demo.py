"""Tiny Llama models, a tokenizer and LoRA adapters, built offline and deterministically.

Everything here is random weights in real formats: a Hugging Face Llama checkpoint directory
(config.json, model.safetensors, generation_config.json, tokenizer files) and LoRA adapters
exactly as PEFT's `save_pretrained` writes them. The same arguments always give byte-identical
files, so tests, the demo server and the benchmark need no network and no downloads.

Uses only torch, transformers, tokenizers and safetensors (peft is a test-only dependency).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig

Progress = Callable[[str], None]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
"""Special tokens, in id order: they take ids 0..4."""
PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))
BYTE_TOKEN_OFFSET = len(SPECIAL_TOKENS)
"""Id of the token for byte 0; byte b has id BYTE_TOKEN_OFFSET + b."""
TOKENIZER_VOCAB_SIZE = 512
"""Tokens in the demo tokenizer: 5 special + 256 byte tokens + 251 learned merges."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML-like: `<s><|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n`."""

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES

INIT_STD = 0.02
"""Std of the random Linear and embedding weights (Hugging Face's initializer_range)."""

DEMO_MODEL_SHAPE = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=TOKENIZER_VOCAB_SIZE,
    max_position_embeddings=2048,
)
"""The demo model: ~3.4M parameters, head_dim 64; every Linear fits bitsandbytes' 4-bit CPU path
(in_features % 64 == 0, out_features % 32 == 0)."""

SMOLLM2_135M_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
"""HuggingFaceTB/SmolLM2-135M's shape, for benchmarks: `write_llama_model(d, **SMOLLM2_135M_SHAPE,
seed=0)`. The tokenizer covers only the first TOKENIZER_VOCAB_SIZE embedding rows."""

DEMO_VERSION = "v1"
"""Bump when the demo assets change, so caches built by older code are not reused."""

DEMO_ADAPTERS = {
    "attn-r4": dict(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj")),
    "attn-r8": dict(r=8, lora_alpha=16, target_modules=ATTENTION_MODULES),
    "all-r16": dict(r=16, lora_alpha=32, target_modules=ALL_LINEAR_MODULES),
    "all-r64-rslora": dict(r=64, lora_alpha=16, target_modules=ALL_LINEAR_MODULES, use_rslora=True),
    "mlp-r8-bf16": dict(r=8, lora_alpha=16, target_modules=MLP_MODULES, dtype=torch.bfloat16),
}
"""Demo adapters by name: write_lora_adapter keyword arguments (the seed is the position + 1)."""

_DEMO_MANIFEST = "demo.json"

_CORPUS = """\
The harbor town woke slowly on winter mornings. Fishermen walked down to the water before the
sun came up, carrying nets, ropes and thermos flasks of strong coffee. The baker had already been
working for hours, and the smell of fresh bread drifted along the narrow streets between the
stone houses. Children waited for the school bus at the corner, talking about the storm that was
supposed to arrive in the evening, and about whether the ferry would still be running tomorrow.

In the old lighthouse at the end of the pier lived a woman who repaired clocks. Her workshop was
full of small drawers, each one labeled by hand: springs, wheels, screws, hands, glass. People
brought her watches that had stopped working years ago, and she listened to each one before she
opened it, as if the silence itself could tell her what was wrong. She said that most machines
fail for simple reasons, and that the hard part is being patient enough to find them.

Learning a new language is a little like learning a new town. At first every street looks the
same and every sentence sounds like noise. Then you start to recognize the corners, the common
words, the shops that are always open. After a few weeks you can give directions to a stranger,
and after a few months you notice that you are thinking in the new language without trying.
Reading helps, listening helps, and making mistakes in front of other people helps most of all.

A good recipe for soup begins with onions, carrots and celery cooked gently in butter until they
are soft. Add garlic, a bay leaf and a pinch of salt, then pour in water or stock and let it
simmer. Beans, lentils, potatoes or rice can make it more filling. Taste it often, because the
right amount of salt and pepper depends on everything else in the pot. The best soups are made
the day before and warmed again, when all the flavors have had time to settle together.

Computers read text as numbers. A tokenizer splits each sentence into pieces, and each piece has
an index in a fixed vocabulary. Common words become single tokens, while rare words are broken
into several smaller parts, and anything at all can still be written as a sequence of bytes. A
language model then predicts the next token from the tokens before it, one step at a time, and
the text that it generates is simply the sequence of those predictions turned back into words.

The weather station on the hill recorded the temperature, the wind and the rain every ten
minutes. On clear nights the temperature dropped quickly, and in the morning the grass was white
with frost. The students who maintained the station wrote their notes in a shared notebook:
which sensor needed cleaning, which battery was getting weak, what the clouds looked like before
the rain started. Over the years the notebook became a history of the hill and of the people who
had climbed it, with drawings of birds, questions, answers and a few bad jokes in the margins.

Small teams often build the most reliable systems. They write down what each part is supposed
to do, test it with simple examples, and only then make it fast. When something breaks, they
read the error carefully, reproduce it, and fix the cause instead of the symptom. They keep the
code short and the names clear, so that a new person can understand it in an afternoon. Their
work is rarely dramatic, but it keeps running through long nights and busy holidays.
"""


@dataclass(frozen=True)
class DemoAssets:
    """A built demo: the base model directory and the adapter directories, in DEMO_ADAPTERS order."""

    model_dir: Path
    adapters: dict[str, Path]


def write_tokenizer(directory: str | os.PathLike, *, model_max_length: int = 2048) -> None:
    """Write a byte-level BPE fast tokenizer of TOKENIZER_VOCAB_SIZE tokens into `directory`.

    Files: tokenizer.json, tokenizer_config.json, chat_template.jinja. Any text round-trips
    through encode/decode. Encoding prepends `<s>`; eos is `</s>`, pad is `<pad>` (left side),
    and the chat template is CHAT_TEMPLATE.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(_build_tokenizer().to_str(pretty=True) + "\n", encoding="utf-8")
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    tokenizer_config = {
        "backend": "tokenizers",
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "clean_up_tokenization_spaces": False,
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "model_max_length": model_max_length,
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(directory / "tokenizer_config.json", tokenizer_config)


def write_llama_model(
    directory: str | os.PathLike,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    vocab_size: int,
    seed: int,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 2048,
    rope_theta: float = 10000.0,
    progress: Progress | None = None,
) -> None:
    """Write a random-weight float32 LlamaForCausalLM checkpoint with the tokenizer into `directory`.

    Linear and embedding weights are N(0, INIT_STD²), RMSNorm weights are 1; each tensor is drawn
    from its own generator seeded by (seed, tensor name). Tensors are generated and streamed to
    model.safetensors one layer at a time, so memory never holds more than the largest tensor
    group (the embedding); `progress` gets one line per layer.
    """
    if vocab_size < TOKENIZER_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} < tokenizer size {TOKENIZER_VOCAB_SIZE}")
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ValueError("hidden_size must divide into heads, and heads into KV heads")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        rms_norm_eps=1e-5,
        initializer_range=INIT_STD,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        architectures=["LlamaForCausalLM"],
        dtype=torch.float32,
    )
    config.save_pretrained(directory)
    GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=[EOS_ID, IM_END_ID], pad_token_id=PAD_ID
    ).save_pretrained(directory)
    write_tokenizer(directory, model_max_length=max_position_embeddings)
    groups = _llama_tensor_groups(config.to_dict())
    with open(directory / "model.safetensors", "wb") as f:
        f.write(_safetensors_header([spec for group in groups for spec in group]))
        for i, group in enumerate(groups):
            for name, shape in group:
                f.write(_random_tensor(seed, name, shape).numpy().tobytes())
            if progress and 0 < i <= num_hidden_layers:  # groups 1..n are the decoder layers
                progress(f"{directory.name}: layer {i}/{num_hidden_layers} written")


def write_lora_adapter(
    directory: str | os.PathLike,
    *,
    base_model_dir: str | os.PathLike,
    r: int,
    lora_alpha: float,
    target_modules: Sequence[str],
    seed: int,
    use_rslora: bool = False,
    dtype: torch.dtype = torch.float32,
    init_std: float = 0.02,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write a random LoRA adapter for the Llama model in `base_model_dir`, in PEFT's format.

    Files: adapter_config.json and adapter_model.safetensors, as PEFT 0.21's `save_pretrained`
    writes them (without its README.md and peft_version). lora_A [r, in] is N(0, 1/in) and
    lora_B [out, r] is N(0, init_std²): unlike PEFT's init, B is non-zero, so the adapter changes
    the model's output by about scale·sqrt(r/in) of each target layer's output, where scale is
    lora_alpha/r (lora_alpha/sqrt(r) with use_rslora). Tensors are stored in `dtype`.
    `base_model_name_or_path` defaults to `base_model_dir`.
    """
    unknown = sorted(set(target_modules) - set(ALL_LINEAR_MODULES))
    if unknown or not target_modules:
        raise ValueError(f"target_modules must be a non-empty subset of {ALL_LINEAR_MODULES}")
    if r <= 0:
        raise ValueError(f"r must be positive, got {r}")
    config = json.loads((Path(base_model_dir) / "config.json").read_text())
    shapes = _linear_shapes(config)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in sorted(target_modules):
            in_features, out_features = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{_module_parent(module)}.{module}"
            a = _random_tensor(seed, f"{prefix}.lora_A", (r, in_features), 1 / math.sqrt(in_features))
            b = _random_tensor(seed, f"{prefix}.lora_B", (out_features, r), init_std)
            tensors[f"{prefix}.lora_A.weight"] = a.to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = b.to(dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    name = base_model_name_or_path if base_model_name_or_path is not None else str(base_model_dir)
    adapter_config = _peft_lora_config(name, r, lora_alpha, sorted(target_modules), use_rslora)
    _write_json(directory / "adapter_config.json", adapter_config)


def default_cache_dir() -> Path:
    """--cache-dir's default: `$LORAPLEX_CACHE_DIR`, else ~/.cache/loraplex."""
    from server.config import DemoConfig, from_environment

    return from_environment(DemoConfig).cache_path


def build_demo(cache_dir: str | os.PathLike | None = None, progress: Progress | None = print) -> DemoAssets:
    """Return the demo model and adapters under `<cache_dir>/demo/<DEMO_VERSION>`, building them once.

    The build goes into a temporary sibling directory that is renamed into place when complete,
    so a crash never leaves a half-built demo behind and concurrent builders are safe. When the
    complete assets exist, returns at once.
    """
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()).expanduser().absolute()
    final = root / "demo" / DEMO_VERSION
    if (final / _DEMO_MANIFEST).is_file():
        return _read_demo(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_VERSION}-building-", dir=final.parent))
    try:
        if progress:
            progress(f"building demo model and adapters in {final}")
        _write_demo(tmp, final, progress)
        publish_build(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _read_demo(final)


def _write_demo(tmp: Path, final: Path, progress: Progress | None) -> None:
    """Write the demo model, adapters and manifest into `tmp`, to be renamed to `final`."""
    write_llama_model(tmp / "model", **DEMO_MODEL_SHAPE, seed=0, progress=progress)
    for seed, (name, kwargs) in enumerate(DEMO_ADAPTERS.items(), start=1):
        write_lora_adapter(
            tmp / "adapters" / name,
            base_model_dir=tmp / "model",
            base_model_name_or_path=str(final / "model"),
            seed=seed,
            **kwargs,
        )
        if progress:
            progress(f"adapter {name} written")
    manifest = {"model": "model", "adapters": {name: f"adapters/{name}" for name in DEMO_ADAPTERS}}
    _write_json(tmp / _DEMO_MANIFEST, manifest)


def publish_build(tmp: Path, final: Path) -> None:
    """Rename the complete build `tmp` to `final`; a complete `final` from a concurrent build wins."""
    if final.exists() and not (final / _DEMO_MANIFEST).is_file():
        shutil.rmtree(final)
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / _DEMO_MANIFEST).is_file():
            raise


def _read_demo(final: Path) -> DemoAssets:
    """DemoAssets from the manifest of a complete build."""
    manifest = json.loads((final / _DEMO_MANIFEST).read_text())
    adapters = {name: final / rel for name, rel in manifest["adapters"].items()}
    return DemoAssets(model_dir=final / manifest["model"], adapters=adapters)


def _linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each Llama decoder Linear, from a config.json dict."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    return {
        "q_proj": (hidden, q_out),
        "k_proj": (hidden, kv_out),
        "v_proj": (hidden, kv_out),
        "o_proj": (q_out, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def _module_parent(module: str) -> str:
    """`self_attn` or `mlp`: where a Llama decoder layer keeps `module`."""
    return "self_attn" if module in ATTENTION_MODULES else "mlp"


def _llama_tensor_groups(config: dict) -> list[list[tuple[str, tuple[int, ...]]]]:
    """(name, shape) of every LlamaForCausalLM weight: [embedding], one group per layer, [norm, head]."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    shapes = _linear_shapes(config)
    groups = [[("model.embed_tokens.weight", (vocab, hidden))]]
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        group = [(f"{prefix}.input_layernorm.weight", (hidden,))]
        group += [(f"{prefix}.post_attention_layernorm.weight", (hidden,))]
        for module in ALL_LINEAR_MODULES:
            in_features, out_features = shapes[module]
            group.append((f"{prefix}.{_module_parent(module)}.{module}.weight", (out_features, in_features)))
        groups.append(group)
    last = [("model.norm.weight", (hidden,))]
    if not config["tie_word_embeddings"]:
        last.append(("lm_head.weight", (vocab, hidden)))
    groups.append(last)
    return groups


def _random_tensor(seed: int, name: str, shape: Sequence[int], std: float = INIT_STD) -> torch.Tensor:
    """float32 N(0, std²) tensor drawn from a generator seeded by (seed, name); norm weights are 1."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(tuple(shape), generator=generator) * std


def _safetensors_header(specs: Sequence[tuple[str, tuple[int, ...]]]) -> bytes:
    """The safetensors header for float32 tensors stored back to back in `specs` order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        end = offset + 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _peft_lora_config(
    base_model_name_or_path: str, r: int, lora_alpha: float, target_modules: list[str], use_rslora: bool
) -> dict:
    """adapter_config.json with the fields and defaults PEFT 0.21 writes for a plain LoRA."""
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": lora_alpha,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "qalora_group_size": 16,
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": target_modules,
        "target_parameters": None,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": use_rslora,
        "velora_config": None,
    }


def _write_json(path: Path, obj: dict) -> None:
    """Write `obj` as indented JSON with a trailing newline."""
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _build_tokenizer() -> Tokenizer:
    """The byte-level BPE tokenizer: special tokens, 256 byte tokens, then the learned merges."""
    vocab, merges = _learned_vocab_and_merges()
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    bos = SPECIAL_TOKENS[BOS_ID]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, BOS_ID)]
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


@lru_cache(maxsize=1)
def _learned_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from byte-level BPE on _CORPUS, up to TOKENIZER_VOCAB_SIZE tokens.

    Each step merges the most frequent adjacent pair; ties go to the smallest pair, so the result
    never depends on dict or hash order.
    """
    byte_chars = _bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab |= {byte_chars[b]: BYTE_TOKEN_OFFSET + b for b in range(256)}
    words: dict[tuple[str, ...], int] = {}
    for word, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(_CORPUS):
        words[tuple(word)] = words.get(tuple(word), 0) + 1
    merges = []
    while len(vocab) < TOKENIZER_VOCAB_SIZE:
        pair = _most_frequent_pair(words)
        merges.append(pair)
        vocab.setdefault(pair[0] + pair[1], len(vocab))
        words = {_merge_pair(word, pair): count for word, count in words.items()}
    return vocab, merges


def _most_frequent_pair(words: dict[tuple[str, ...], int]) -> tuple[str, str]:
    """The adjacent symbol pair with the highest count in `words` (word -> count); smallest on ties."""
    counts: dict[tuple[str, str], int] = {}
    for word, count in words.items():
        for pair in zip(word, word[1:]):
            counts[pair] = counts.get(pair, 0) + count
    if not counts:
        raise RuntimeError("BPE corpus too small for TOKENIZER_VOCAB_SIZE")
    return min(counts, key=lambda pair: (-counts[pair], pair))


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """`word` with every occurrence of `pair` (left to right) joined into one symbol."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _bytes_to_unicode() -> list[str]:
    """The printable character that byte-level BPE (GPT-2) uses for each byte value 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]

