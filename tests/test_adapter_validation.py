"""PEFT adapter reading and validation: a malformed-adapter corpus, names, uploads, and PEFT parity."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from adapters_registry.peft_format import (CONFIG_FILE, MAX_HEADER_BYTES, WEIGHTS_FILE,
                                           AdapterFormatError, parse_peft_adapter,
                                           read_peft_adapter, validate_adapter_name)
from tests.conftest import TINY_ADAPTERS, TINY_SHAPE

BASE = "attn-r4"  # r=4, lora_alpha=8, q_proj + v_proj, both layers of the tiny model
HIDDEN, KV_OUT, INTER = 128, 64, 256  # TINY_SHAPE: 4 heads of 32, 2 KV heads


def key(layer: int, module: str, half: str) -> str:
    block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{half}.weight"


Q0A, Q0B, V1B = key(0, "q_proj", "A"), key(0, "q_proj", "B"), key(1, "v_proj", "B")
VOCAB = TINY_SHAPE["vocab_size"]
EMBED = "base_model.model.model.embed_tokens."
HEAD = "base_model.model.lm_head."
EMB_A, EMB_B, EMB_W = (EMBED + t for t in ("lora_embedding_A", "lora_embedding_B", "base_layer.weight"))
HEAD_A, HEAD_B, HEAD_W = (HEAD + t for t in ("lora_A.weight", "lora_B.weight", "base_layer.weight"))


def load_base(model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def spec(tiny_model_dir):
    from server.model.loading import model_spec

    return model_spec(load_base(tiny_model_dir))


@pytest.fixture(scope="module")
def base_files(tiny_adapter_dirs):
    """(config dict, tensors dict) of the valid BASE adapter, to be mutated per case."""
    directory = tiny_adapter_dirs[BASE]
    return (json.loads((directory / CONFIG_FILE).read_text()),
            load_safetensors((directory / WEIGHTS_FILE).read_bytes()))


def as_json(config) -> bytes:
    return json.dumps(config).encode()


def as_safetensors(tensors) -> bytes:
    return save_safetensors(tensors, metadata={"format": "pt"})


# ---- the malformed-adapter corpus ----------------------------------------------------------------
# Each builder takes (config, tensors) copies of the valid BASE adapter and returns
# (adapter_config.json bytes, adapter_model.safetensors bytes, parse_peft_adapter kwargs).

DELETE = object()


def config_with(**changes):
    def build(config, tensors):
        for k, v in changes.items():
            config.pop(k) if v is DELETE else config.__setitem__(k, v)
        return as_json(config), as_safetensors(tensors), {}
    return build


def tensors_with(edit):
    def build(config, tensors):
        edit(tensors)
        return as_json(config), as_safetensors(tensors), {}
    return build


def raw_config(raw: bytes):
    return lambda config, tensors: (raw, as_safetensors(tensors), {})


def raw_weights(make):
    """`make(valid safetensors bytes) -> bytes`."""
    return lambda config, tensors: (as_json(config), make(as_safetensors(tensors)), {})


def with_kwargs(build, **kwargs):
    def wrapped(config, tensors):
        c, w, k = build(config, tensors)
        return c, w, {**k, **kwargs}
    return wrapped


def header_only(header) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw


def set_item(k, v):
    return lambda t: t.__setitem__(k, v)


def delete(k):
    return lambda t: t.pop(k)


def poke(k, index, value):
    def edit(t):
        t[k] = t[k].clone()
        t[k][index] = value
    return edit


def retype(k, dtype):
    return lambda t: t.__setitem__(k, t[k].to(dtype))


def add_pair(layer, module, r, in_features, out_features, block=None):
    def edit(t):
        a, b = key(layer, module, "A"), key(layer, module, "B")
        if block:
            a, b = (k.replace(".self_attn.", f".{block}.").replace(".mlp.", f".{block}.") for k in (a, b))
        t[a] = torch.zeros(r, in_features)
        t[b] = torch.zeros(out_features, r)
    return edit


def vocab_pair(target: str, r: int = 4) -> dict:
    """Zero LoRA tensors for embed_tokens or lm_head, in PEFT's layouts."""
    if target == "embed_tokens":
        return {EMB_A: torch.zeros(r, VOCAB), EMB_B: torch.zeros(HIDDEN, r)}
    return {HEAD_A: torch.zeros(r, HIDDEN), HEAD_B: torch.zeros(VOCAB, r)}


def with_vocab(target: str, edit=None, **config_changes):
    """BASE with `target` (embed_tokens or lm_head) added, then `edit`ed."""
    def build(config, tensors):
        config["target_modules"] = config["target_modules"] + [target]
        config.update(config_changes)
        tensors.update(vocab_pair(target))
        if edit is not None:
            edit(tensors)
        return as_json(config), as_safetensors(tensors), {}
    return build


def edits(*steps):
    return lambda t: [step(t) for step in steps]


ANY = object()  # the case does not pin the tensor named in the error

CORPUS = [
    # (id, builder, file, tensor, message fragment)
    ("invalid-json", raw_config(b'{"peft_type": "LORA", "r": '), CONFIG_FILE, None, "not valid JSON"),
    ("config-not-utf8", raw_config(b"\xff\xfe{}"), CONFIG_FILE, None, "not valid JSON"),
    ("config-nan-constant", raw_config(b'{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}'),
     CONFIG_FILE, None, "not valid JSON"),
    ("config-not-object", raw_config(b"[1, 2]"), CONFIG_FILE, None, "expected a JSON object, got list"),
    ("peft-type-missing", config_with(peft_type=DELETE), CONFIG_FILE, None, "peft_type missing"),
    ("wrong-peft-type", config_with(peft_type="IA3"), CONFIG_FILE, None,
     "peft_type 'IA3' is not supported (only 'LORA')"),
    ("wrong-task-type", config_with(task_type="SEQ_CLS"), CONFIG_FILE, None,
     "task_type 'SEQ_CLS' is not supported"),
    ("r-zero", config_with(r=0), CONFIG_FILE, None, "r must be a positive integer, got 0"),
    ("r-not-integer", config_with(r=4.5), CONFIG_FILE, None, "r must be a positive integer, got 4.5"),
    ("alpha-negative", config_with(lora_alpha=-8), CONFIG_FILE, None,
     "lora_alpha must be a positive number, got -8"),
    ("use-dora-not-bool", config_with(use_dora="yes"), CONFIG_FILE, None,
     "use_dora must be true or false"),
    ("dora-without-magnitude", config_with(use_dora=True), WEIGHTS_FILE, Q0A,
     "use_dora is set but model.layers.0.self_attn.q_proj has no lora_magnitude_vector"),
    ("bias", config_with(bias="all"), CONFIG_FILE, None, "bias='all' is not supported (only 'none')"),
    ("modules-to-save", config_with(modules_to_save=["lm_head"]), CONFIG_FILE, None,
     "modules_to_save=['lm_head']: replaces whole base modules"),
    ("fan-in-fan-out", config_with(fan_in_fan_out=True), CONFIG_FILE, None, "fan_in_fan_out=True"),
    ("lora-bias", config_with(lora_bias=True), CONFIG_FILE, None, "a bias on lora_B is not supported"),
    ("layer-replication", config_with(layer_replication=[[0, 2]]), CONFIG_FILE, None,
     "layer replication is not supported"),
    ("trainable-tokens", config_with(trainable_token_indices=[1, 2]), CONFIG_FILE, None,
     "trainable token embeddings are not supported"),
    ("target-modules-regex", config_with(target_modules=r".*\.(q_proj|v_proj)"), CONFIG_FILE, None,
     "target_modules as a regular expression"),
    ("target-modules-missing", config_with(target_modules=DELETE), CONFIG_FILE, None,
     "target_modules must be a non-empty list"),
    ("target-not-in-base", config_with(target_modules=["q_proj", "v_proj", "foo_proj"]), CONFIG_FILE,
     None, "target_modules entry 'foo_proj' names no module of the base model"),
    ("target-norm", config_with(target_modules=["q_proj", "v_proj", "norm"]), CONFIG_FILE, None,
     "LoRA on norm is not supported"),
    ("dora-on-lm-head", with_vocab("lm_head", use_dora=True), CONFIG_FILE, None,
     "use_dora with LoRA on lm_head is not supported"),
    ("dora-on-embed-tokens", with_vocab("embed_tokens", use_dora=True), CONFIG_FILE, None,
     "use_dora with LoRA on model.embed_tokens is not supported"),
    ("layers-pattern", config_with(layers_to_transform=[0], layers_pattern="h"), CONFIG_FILE, None,
     "layers_pattern='h' is not supported"),
    ("targets-nothing", config_with(layers_to_transform=[5]), CONFIG_FILE, None, "select no module"),
    ("rank-above-max", with_kwargs(config_with(), max_rank=2), CONFIG_FILE, None,
     "rank 4 of model.layers.0.self_attn.q_proj (r) exceeds the server's max rank 2"),
    ("rank-pattern-above-max", with_kwargs(config_with(rank_pattern={"v_proj": 32}), max_rank=8),
     CONFIG_FILE, None, "rank 32 of model.layers.0.self_attn.v_proj (rank_pattern 'v_proj') exceeds"),
    ("rank-pattern-bad-value", config_with(rank_pattern={"q_proj": "big"}), CONFIG_FILE, None,
     "rank_pattern['q_proj'] must be a positive integer"),
    ("rank-pattern-bad-regex", config_with(rank_pattern={"q_proj(": 2}), CONFIG_FILE, None,
     "is not a valid pattern"),
    # the safetensors file's structure
    ("shorter-than-length-field", raw_weights(lambda raw: raw[:5]), WEIGHTS_FILE, None,
     "truncated: 5 bytes, shorter than the 8-byte header length"),
    ("truncated-header", raw_weights(lambda raw: raw[:40]), WEIGHTS_FILE, None,
     "truncated or corrupt: header length"),
    ("truncated-data", raw_weights(lambda raw: raw[:-100]), WEIGHTS_FILE, ANY,
     "truncated: data ends at byte"),
    ("oversized-header-length", raw_weights(lambda raw: (2 * MAX_HEADER_BYTES).to_bytes(8, "little")
                                            + raw[8:]),
     WEIGHTS_FILE, None, f"header length {2 * MAX_HEADER_BYTES} bytes exceeds the limit"),
    ("text-not-safetensors", raw_weights(lambda raw: b"this is not a safetensors file at all\n"),
     WEIGHTS_FILE, None, "exceeds the limit"),
    ("garbage-header", raw_weights(lambda raw: (16).to_bytes(8, "little") + bytes(range(200, 232))),
     WEIGHTS_FILE, None, "header is not valid JSON"),
    ("header-not-object", raw_weights(lambda raw: header_only([1, 2])), WEIGHTS_FILE, None,
     "header is not a JSON object"),
    ("header-entry-malformed", raw_weights(lambda raw: header_only({Q0A: {"dtype": "F32"}})),
     WEIGHTS_FILE, Q0A, "malformed header entry"),
    ("offsets-mismatch", raw_weights(lambda raw: header_only(
        {Q0A: {"dtype": "F32", "shape": [4, HIDDEN], "data_offsets": [0, 8]}}) + bytes(8)),
     WEIGHTS_FILE, Q0A, "do not hold 2048 bytes"),
    ("overlapping-offsets", raw_weights(lambda raw: header_only(
        {Q0A: {"dtype": "F32", "shape": [4, HIDDEN], "data_offsets": [0, 2048]},
         Q0B: {"dtype": "F32", "shape": [HIDDEN, 4], "data_offsets": [0, 2048]}}) + bytes(2048)),
     WEIGHTS_FILE, Q0B, "data_offsets [0, 2048] overlaps another tensor"),
    ("gap-between-tensors", raw_weights(lambda raw: header_only(
        {Q0A: {"dtype": "F32", "shape": [4, HIDDEN], "data_offsets": [0, 2048]},
         Q0B: {"dtype": "F32", "shape": [HIDDEN, 4], "data_offsets": [2056, 4104]}}) + bytes(4104)),
     WEIGHTS_FILE, Q0B, "data_offsets [2056, 4104] leaves a gap"),
    ("bytes-after-the-last-tensor", raw_weights(lambda raw: raw + bytes(8)), WEIGHTS_FILE, None,
     "8 bytes after the last tensor"),
    ("no-tensors", raw_weights(lambda raw: as_safetensors({})), WEIGHTS_FILE, None,
     "holds no LoRA tensors"),
    # tensor keys
    ("unknown-tensor-key", tensors_with(set_item(Q0A.replace("lora_A.weight", "weight"),
                                                 torch.zeros(HIDDEN, HIDDEN))),
     WEIGHTS_FILE, Q0A.replace("lora_A.weight", "weight"), "unknown tensor key"),
    ("unknown-module-path", tensors_with(set_item("base_model.model.model.norm.lora_A.weight",
                                                  torch.zeros(4, HIDDEN))),
     WEIGHTS_FILE, "base_model.model.model.norm.lora_A.weight", "unknown module model.norm"),
    ("embedding-tensor-on-linear", tensors_with(set_item(Q0A.replace("lora_A.weight",
                                                                     "lora_embedding_A"),
                                                         torch.zeros(4, HIDDEN))),
     WEIGHTS_FILE, Q0A.replace("lora_A.weight", "lora_embedding_A"),
     "model.layers.0.self_attn.q_proj has no lora_embedding_A"),
    ("linear-tensor-on-embedding", with_vocab("embed_tokens", set_item(EMBED + "lora_A.weight",
                                                                        torch.zeros(4, VOCAB))),
     WEIGHTS_FILE, EMBED + "lora_A.weight", "model.embed_tokens has no lora_A.weight"),
    ("tensor-for-untargeted-lm-head", tensors_with(lambda t: t.update(vocab_pair("lm_head"))),
     WEIGHTS_FILE, ANY, "module lm_head is not targeted"),
    ("embedding-A-shape", with_vocab("embed_tokens", set_item(EMB_A, torch.zeros(4, HIDDEN))),
     WEIGHTS_FILE, EMB_A, "shape [4, 128], expected [4, 512]"),
    ("lm-head-B-shape", with_vocab("lm_head", set_item(HEAD_B, torch.zeros(VOCAB - 1, 4))),
     WEIGHTS_FILE, HEAD_B, "shape [511, 4], expected [512, 4]"),
    ("embedding-B-without-A", with_vocab("embed_tokens", delete(EMB_A)), WEIGHTS_FILE, EMB_B,
     "lora_B without lora_A for model.embed_tokens"),
    ("base-copy-differs", with_vocab("embed_tokens", set_item(EMB_W, torch.ones(VOCAB, HIDDEN))),
     WEIGHTS_FILE, EMB_W, "differs from the served model's"),
    ("base-copy-shape", with_vocab("lm_head", set_item(HEAD_W, torch.zeros(VOCAB, 64))),
     WEIGHTS_FILE, HEAD_W, "shape [512, 64], expected [512, 128]"),
    ("base-copy-alone", with_vocab("lm_head", edits(delete(HEAD_A), delete(HEAD_B),
                                                    set_item(HEAD_W, torch.zeros(VOCAB, HIDDEN)))),
     WEIGHTS_FILE, HEAD_W, "a copy of the base weight without lora_A and lora_B for lm_head"),
    ("magnitude-without-use-dora", tensors_with(set_item(
        Q0A.replace("lora_A.weight", "lora_magnitude_vector"), torch.ones(HIDDEN))),
     WEIGHTS_FILE, Q0A.replace("lora_A.weight", "lora_magnitude_vector"),
     "a DoRA magnitude vector, but adapter_config.json does not set use_dora"),
    ("dora-magnitude-wrong-shape", lambda c, t: config_with(use_dora=True)(c, {
        **t, **{k.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(7)
                for k in t if "lora_A" in k}}),
     WEIGHTS_FILE, ANY, "the magnitude is [out_features]"),
    ("unknown-module", tensors_with(set_item(Q0A.replace("q_proj", "foo_proj"), torch.zeros(4, HIDDEN))),
     WEIGHTS_FILE, Q0A.replace("q_proj", "foo_proj"), "unknown module self_attn.foo_proj"),
    ("module-in-wrong-block", tensors_with(set_item(Q0A.replace("self_attn", "mlp"),
                                                    torch.zeros(4, HIDDEN))),
     WEIGHTS_FILE, Q0A.replace("self_attn", "mlp"), "unknown module mlp.q_proj"),
    ("layer-out-of-range", tensors_with(add_pair(2, "q_proj", 4, HIDDEN, HIDDEN)), WEIGHTS_FILE, ANY,
     "layer 2 out of range (the base model has 2 layers)"),
    ("tensor-for-untargeted-module", tensors_with(add_pair(0, "k_proj", 4, HIDDEN, KV_OUT)),
     WEIGHTS_FILE, ANY, "module model.layers.0.self_attn.k_proj is not targeted"),
    ("tensor-outside-layers-to-transform", config_with(layers_to_transform=[1]), WEIGHTS_FILE, ANY,
     "module model.layers.0.self_attn.q_proj is not targeted"),
    ("lora-A-without-lora-B", tensors_with(delete(Q0B)), WEIGHTS_FILE, Q0A,
     "lora_A without lora_B for model.layers.0.self_attn.q_proj"),
    ("lora-B-without-lora-A", tensors_with(delete(Q0A)), WEIGHTS_FILE, Q0B,
     "lora_B without lora_A for model.layers.0.self_attn.q_proj"),
    # tensor contents
    ("shape-mismatch-A", tensors_with(set_item(Q0A, torch.zeros(5, HIDDEN))), WEIGHTS_FILE, Q0A,
     "shape [5, 128], expected [4, 128]"),
    ("shape-mismatch-B", tensors_with(set_item(V1B, torch.zeros(KV_OUT, 3))), WEIGHTS_FILE, V1B,
     "shape [64, 3], expected [64, 4]"),
    ("shape-vs-rank-pattern", config_with(rank_pattern={"q_proj": 2}), WEIGHTS_FILE, Q0A,
     "shape [4, 128], expected [2, 128]"),
    ("int-dtype", tensors_with(retype(Q0A, torch.int32)), WEIGHTS_FILE, Q0A,
     "dtype I32 not allowed"),
    ("float64-dtype", tensors_with(retype(Q0B, torch.float64)), WEIGHTS_FILE, Q0B,
     "dtype F64 not allowed"),
    ("nan", tensors_with(poke(Q0A, (0, 0), float("nan"))), WEIGHTS_FILE, Q0A, "contains NaN"),
    ("inf", tensors_with(poke(V1B, (1, 1), float("-inf"))), WEIGHTS_FILE, V1B, "contains Inf"),
    # upload checks
    ("empty-upload", raw_weights(lambda raw: b""), WEIGHTS_FILE, None, "empty upload"),
    ("empty-config-upload", raw_config(b""), CONFIG_FILE, None, "empty upload"),
    ("checksum-mismatch", with_kwargs(config_with(), expected_sha256="0" * 64), WEIGHTS_FILE, None,
     "checksum mismatch"),
    ("upload-over-size-cap", with_kwargs(config_with(), max_bytes=1000), WEIGHTS_FILE, None,
     "exceeds the limit of 1000 bytes"),
]


def assert_rejection(exc: AdapterFormatError, name, file, tensor, fragment):
    message = str(exc)
    assert fragment in message
    assert exc.adapter == name and exc.file == file
    prefix = f"adapter {name!r}: {file}: "
    assert message.startswith(prefix)
    if tensor is not ANY:
        assert exc.tensor == tensor
        if tensor is not None:
            assert message.startswith(f"{prefix}tensor {tensor!r}: ")


@pytest.mark.parametrize("build,file,tensor,fragment",
                         [case[1:] for case in CORPUS], ids=[case[0] for case in CORPUS])
def test_malformed_upload_rejected(spec, base_files, build, file, tensor, fragment):
    config, tensors = json.loads(json.dumps(base_files[0])), dict(base_files[1])
    config_raw, weights_raw, kwargs = build(config, tensors)
    with pytest.raises(AdapterFormatError) as info:
        parse_peft_adapter("bad", config_raw, weights_raw, spec, **kwargs)
    assert_rejection(info.value, "bad", file, tensor, fragment)


@pytest.mark.parametrize("build,file,tensor,fragment",
                         [case[1:] for case in CORPUS if case[0] not in
                          ("empty-upload", "empty-config-upload", "checksum-mismatch",
                           "upload-over-size-cap")],
                         ids=[case[0] for case in CORPUS if case[0] not in
                              ("empty-upload", "empty-config-upload", "checksum-mismatch",
                               "upload-over-size-cap")])
def test_malformed_directory_rejected_the_same(spec, base_files, tmp_path, build, file, tensor,
                                               fragment):
    config, tensors = json.loads(json.dumps(base_files[0])), dict(base_files[1])
    config_raw, weights_raw, kwargs = build(config, tensors)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CONFIG_FILE).write_bytes(config_raw)
    (tmp_path / "bad" / WEIGHTS_FILE).write_bytes(weights_raw)
    with pytest.raises(AdapterFormatError) as info:
        read_peft_adapter(tmp_path / "bad", spec, **kwargs)
    assert_rejection(info.value, "bad", file, tensor, fragment)


def test_corpus_has_the_required_kinds():
    ids = {case[0] for case in CORPUS}
    assert len(ids) == len(CORPUS) >= 40


# ---- directory-only cases -------------------------------------------------------------------------

class _CreatesFileWhenUnpickled:
    """A pickle that, if ever loaded, writes the file `path` (what a malicious .bin could do)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "pwned"))


def test_directory_missing_config(spec, tiny_adapter_dirs, tmp_path):
    (tmp_path / "no-config").mkdir()
    shutil.copy(tiny_adapter_dirs[BASE] / WEIGHTS_FILE, tmp_path / "no-config")
    with pytest.raises(AdapterFormatError) as info:
        read_peft_adapter(tmp_path / "no-config", spec)
    assert_rejection(info.value, "no-config", CONFIG_FILE, None, "missing in")


def test_directory_missing_weights(spec, tiny_adapter_dirs, tmp_path):
    (tmp_path / "no-weights").mkdir()
    shutil.copy(tiny_adapter_dirs[BASE] / CONFIG_FILE, tmp_path / "no-weights")
    with pytest.raises(AdapterFormatError) as info:
        read_peft_adapter(tmp_path / "no-weights", spec)
    assert_rejection(info.value, "no-weights", WEIGHTS_FILE, None, "missing in")


def test_directory_not_found(spec, tmp_path):
    with pytest.raises(AdapterFormatError, match="adapter directory not found"):
        read_peft_adapter(tmp_path / "nowhere", spec)


@pytest.mark.parametrize("pickle_name", ["adapter_model.bin", "adapter_model.pt", "weights.pth"])
@pytest.mark.parametrize("with_config", [True, False])
def test_only_pickle_weights_rejected_unopened(spec, tiny_adapter_dirs, tmp_path, pickle_name,
                                               with_config):
    adapter = tmp_path / "pickled"
    adapter.mkdir()
    if with_config:
        shutil.copy(tiny_adapter_dirs[BASE] / CONFIG_FILE, adapter)
    sentinel = tmp_path / "unpickled.txt"
    (adapter / pickle_name).write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(sentinel)))
    with pytest.raises(AdapterFormatError) as info:
        read_peft_adapter(adapter, spec)
    assert_rejection(info.value, "pickled", WEIGHTS_FILE, None, "convert them to safetensors")
    assert pickle_name in str(info.value)
    assert not sentinel.exists()


def test_other_files_in_directory_ignored(spec, tiny_adapter_dirs, tmp_path):
    adapter = tmp_path / "with-extras"
    shutil.copytree(tiny_adapter_dirs[BASE], adapter)
    sentinel = tmp_path / "unpickled.txt"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(sentinel)))
    (adapter / "tokenizer.json").write_text("{not json")
    (adapter / "tokenizer_config.json").write_text("{}")
    (adapter / "README.md").write_text("# my adapter\n")
    (adapter / "modeling_custom.py").write_text("raise SystemExit('never imported')\n")
    (adapter / "checkpoint").mkdir()
    loaded = read_peft_adapter(adapter, spec)
    reference = read_peft_adapter(tiny_adapter_dirs[BASE], spec)
    assert_same_weights(loaded, reference)
    assert not sentinel.exists()


# ---- adapter names --------------------------------------------------------------------------------

BAD_NAMES = ["../x", "a/b/c", "/a", "a/", "a\\b", "..", ".hidden", "", "a" * 129, "a..b", "-x", "sp ace",
             "naïve", "x\n"]


@pytest.mark.parametrize("bad_name", BAD_NAMES, ids=[repr(n)[:20] for n in BAD_NAMES])
def test_bad_adapter_names_rejected(spec, tiny_adapter_dirs, bad_name):
    directory = tiny_adapter_dirs[BASE]
    with pytest.raises(AdapterFormatError, match="invalid adapter name"):
        validate_adapter_name(bad_name)
    with pytest.raises(AdapterFormatError, match="invalid adapter name"):
        parse_peft_adapter(bad_name, (directory / CONFIG_FILE).read_bytes(),
                           (directory / WEIGHTS_FILE).read_bytes(), spec)
    with pytest.raises(AdapterFormatError, match="invalid adapter name"):
        read_peft_adapter(directory, spec, name=bad_name)


def test_directory_name_used_as_adapter_name_is_validated(spec, tiny_adapter_dirs, tmp_path):
    shutil.copytree(tiny_adapter_dirs[BASE], tmp_path / ".hidden")
    with pytest.raises(AdapterFormatError, match="invalid adapter name"):
        read_peft_adapter(tmp_path / ".hidden", spec)
    assert read_peft_adapter(tmp_path / ".hidden", spec, name="ok").name == "ok"


@pytest.mark.parametrize("good_name", ["a", "A" * 128, "org_model-v1.2", "0.x"])
def test_good_adapter_names_accepted(good_name):
    assert validate_adapter_name(good_name) == good_name


def test_random_corruption_only_ever_raises_adapter_format_error(spec, tiny_adapter_dirs):
    config = (tiny_adapter_dirs[BASE] / CONFIG_FILE).read_bytes()
    valid = (tiny_adapter_dirs[BASE] / WEIGHTS_FILE).read_bytes()
    header_end = 8 + int.from_bytes(valid[:8], "little")
    rng = random.Random(0)
    for _ in range(200):
        raw = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(header_end + 16)] = rng.randrange(256)
        if rng.random() < 0.3:
            raw = raw[:rng.randrange(len(raw))]
        try:
            parse_peft_adapter("fuzz", config, bytes(raw), spec)
        except AdapterFormatError:
            pass


# ---- valid adapters: what PEFT computes -----------------------------------------------------------

def assert_same_weights(ours, theirs):
    assert ours.rank == theirs.rank and ours.modules.keys() == theirs.modules.keys()
    for k, module in ours.modules.items():
        assert torch.equal(module.a, theirs.modules[k].a)
        assert torch.equal(module.b, theirs.modules[k].b)
        assert module.scale == theirs.modules[k].scale


def assert_matches_peft(weights, peft_model, expected_modules):
    assert set(weights.modules) == expected_modules
    for (layer, module), w in weights.modules.items():
        block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        lora = peft_model.get_submodule(f"base_model.model.model.layers.{layer}.{block}.{module}")
        assert w.a.dtype == w.b.dtype == torch.float32
        assert torch.equal(w.a, lora.lora_A["default"].weight.detach())
        assert torch.equal(w.b, lora.lora_B["default"].weight.detach())
        assert w.scale == pytest.approx(lora.scaling["default"], rel=1e-12)


@pytest.mark.parametrize("adapter", list(TINY_ADAPTERS))
def test_valid_tiny_adapters_match_peft(spec, tiny_model_dir, tiny_adapter_dirs, adapter):
    from peft import PeftModel

    kwargs = TINY_ADAPTERS[adapter]
    weights = read_peft_adapter(tiny_adapter_dirs[adapter], spec, max_rank=64)
    assert weights.name == adapter and weights.rank == kwargs["r"]
    scale = kwargs["lora_alpha"] / (math.sqrt(kwargs["r"]) if kwargs.get("use_rslora")
                                    else kwargs["r"])
    assert {m.scale for m in weights.modules.values()} == {scale}
    peft_model = PeftModel.from_pretrained(load_base(tiny_model_dir), tiny_adapter_dirs[adapter])
    expected = {(layer, m) for layer in range(TINY_SHAPE["num_hidden_layers"])
                for m in kwargs["target_modules"]}
    assert_matches_peft(weights, peft_model, expected)


def test_upload_equals_directory(spec, tiny_adapter_dirs):
    directory = tiny_adapter_dirs["all-r16-rslora"]
    raw = (directory / WEIGHTS_FILE).read_bytes()
    uploaded = parse_peft_adapter("all-r16-rslora", (directory / CONFIG_FILE).read_text(), raw, spec,
                                  max_rank=16, expected_sha256=hashlib.sha256(raw).hexdigest().upper(),
                                  max_bytes=len(raw))
    assert_same_weights(uploaded, read_peft_adapter(directory, spec))


def test_peft_saved_adapter_with_patterns_matches_peft(spec, tiny_model_dir, tmp_path):
    """rank_pattern, alpha_pattern, rsLoRA, exclude_modules and layers_to_transform as PEFT
    resolves them, on an adapter that PEFT itself saved (with its README.md)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
                        rank_pattern={"k_proj": 4, "layers.1.mlp.up_proj": 2},
                        alpha_pattern={"down_proj": 3}, use_rslora=True, exclude_modules=["q_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(load_base(tiny_model_dir), config)
    peft_model.save_pretrained(tmp_path / "patterns")
    weights = read_peft_adapter(tmp_path / "patterns", spec)
    expected = {(layer, m) for layer in range(2) for m in ("k_proj", "up_proj", "down_proj")}
    assert_matches_peft(weights, peft_model, expected)
    assert weights.rank == 8 and weights.modules[(1, "up_proj")].a.shape == (2, HIDDEN)

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "gate_proj"],
                        layers_to_transform=[1], init_lora_weights=False)
    peft_model = get_peft_model(load_base(tiny_model_dir), config)
    peft_model.save_pretrained(tmp_path / "layer1")
    weights = read_peft_adapter(tmp_path / "layer1", spec)
    assert_matches_peft(weights, peft_model, {(1, "v_proj"), (1, "gate_proj")})


def test_huge_finite_values_are_accepted(spec, base_files):
    """The fast finite check sums the data; a sum that overflows falls back to exact checks."""
    config, tensors = dict(base_files[0]), dict(base_files[1])
    tensors[Q0A] = torch.full_like(tensors[Q0A], 3e38)
    weights = parse_peft_adapter("huge", as_json(config), as_safetensors(tensors), spec)
    assert float(weights.modules[(0, "q_proj")].a.min()) == pytest.approx(3e38)


def test_all_linear_and_half_precision_accepted(spec, base_files):
    config, tensors = dict(base_files[0]), dict(base_files[1])
    config["target_modules"] = "all-linear"
    half = {k: t.to(torch.bfloat16 if "lora_A" in k else torch.float16) for k, t in tensors.items()}
    weights = parse_peft_adapter("half", as_json(config), as_safetensors(half), spec)
    for (layer, module), w in weights.modules.items():  # kept in the file's dtype: no 2x in RAM
        assert w.a.dtype == torch.bfloat16 and w.b.dtype == torch.float16
        assert torch.equal(w.a, half[key(layer, module, "A")])
        assert torch.equal(w.b, half[key(layer, module, "B")])


def test_missing_module_pair_allowed_like_peft(spec, base_files):
    """PEFT loads an adapter with a targeted module's tensors missing (it warns and keeps lora_B at
    zero, so the module has no LoRA); so do we, as long as A and B come in pairs."""
    config, tensors = dict(base_files[0]), dict(base_files[1])
    del tensors[Q0A], tensors[Q0B]
    weights = parse_peft_adapter("partial", as_json(config), as_safetensors(tensors), spec)
    assert set(weights.modules) == {(0, "v_proj"), (1, "q_proj"), (1, "v_proj")}


def test_embedding_and_lm_head_adapters_match_peft(spec, tiny_model_dir, tiny_vocab_adapter_dirs):
    """PEFT's layouts: embed_tokens lora_embedding_A [r, vocab] / _B [hidden, r], lm_head lora_A
    [r, hidden] / lora_B [vocab, r]; PEFT's copies of the base weights are checked, then dropped."""
    from peft import PeftModel

    directory = tiny_vocab_adapter_dirs["embed-head-r16-rslora"]
    assert {EMB_W, HEAD_W} <= set(load_safetensors((directory / WEIGHTS_FILE).read_bytes()))
    weights = read_peft_adapter(directory, spec)
    peft_model = PeftModel.from_pretrained(load_base(tiny_model_dir), directory)
    embed = peft_model.get_submodule("base_model.model.model.embed_tokens")
    head = peft_model.get_submodule("base_model.model.lm_head")
    assert torch.equal(weights.embed_tokens.a, embed.lora_embedding_A["default"].detach())
    assert torch.equal(weights.embed_tokens.b, embed.lora_embedding_B["default"].detach())
    assert torch.equal(weights.lm_head.a, head.lora_A["default"].weight.detach())
    assert torch.equal(weights.lm_head.b, head.lora_B["default"].weight.detach())
    assert weights.embed_tokens.scale == pytest.approx(embed.scaling["default"], rel=1e-12)
    assert weights.lm_head.scale == pytest.approx(head.scaling["default"], rel=1e-12)
    assert_matches_peft(weights, peft_model, {(0, "down_proj"), (1, "down_proj")})
    lora_bytes = 4 * 16 * (2 * VOCAB + 2 * HIDDEN) + 4 * 16 * 2 * (INTER + HIDDEN)
    assert weights.nbytes == lora_bytes  # the base copies are not held


def test_tied_embedding_adapter_brings_its_lm_head(tiny_tied_model_dir, tied_vocab_adapter_dirs):
    """On a tied base, ensure_weight_tying makes PEFT save lm_head tensors that its config does
    not list: they are served (PEFT serves them), and on an untied base they are refused."""
    from server.model.loading import model_spec

    directory = tied_vocab_adapter_dirs["tied-embed-head-r8"]
    tied = model_spec(load_base(tiny_tied_model_dir))
    assert tied.tie_word_embeddings
    weights = read_peft_adapter(directory, tied)
    assert weights.embed_tokens is not None and weights.lm_head is not None
    assert torch.equal(weights.lm_head.a, weights.embed_tokens.b.t())
    untied = dataclasses.replace(tied, tie_word_embeddings=False)
    with pytest.raises(AdapterFormatError, match="module lm_head is not targeted"):
        read_peft_adapter(directory, untied)
