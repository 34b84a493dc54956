"""Reading and validating PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors).

The result is a plain `LoraWeights`: for each (layer, module) the tensors A: [r, in], B: [out, r]
and the scalar scale that PEFT applies (lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA); the
same for `embed_tokens` (PEFT's lora_embedding_A [r, vocab] / lora_embedding_B [hidden, r]) and
`lm_head` (lora_A [r, hidden] / lora_B [vocab, r]) when the adapter targets them. PEFT saves a copy
of the base model's embedding weights with such adapters (`*.base_layer.weight`, and loads it over
the base model's): it is accepted only when it equals the served weights, then dropped.

Two entry points share one validation path (`_validate`):
- `read_peft_adapter(path, spec)`: an adapter directory on disk. Only adapter_config.json and
  adapter_model.safetensors are read; tokenizer files, README, code are ignored. Pickle weights
  (`adapter_model.bin`, `.pt`, ...) are never opened: a directory holding only those is rejected
  with a message to convert them to safetensors.
- `parse_peft_adapter(name, config_json, safetensors, spec)`: an upload held in memory; it never
  touches the filesystem and adds the upload checks (empty, size cap, SHA-256).

Everything an adapter may get wrong raises `AdapterFormatError` with the message
"adapter 'NAME': FILE: [tensor 'KEY': ]reason". The safetensors header is parsed here, before any
tensor is allocated, so a truncated, oversized or garbled file is rejected with a clear reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters_registry.names import NAME_RULE, is_valid_adapter_name, shown_name
from adapters_registry.spec import (EMBED_TOKENS, LM_HEAD, TARGET_MODULES, VOCAB_MODULES,
                                    BaseModelSpec, module_path)
from adapters_registry.weights import LoraModuleWeights, LoraWeights

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Weights in these files are pickles (can run code when loaded): never opened."""
PICKLE_FILES = tuple(f"adapter_model{suffix}" for suffix in PICKLE_SUFFIXES)
ALLOWED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CONVERT_PICKLES = "convert them to safetensors (PEFT: save_pretrained(..., safe_serialization=True))"
MAX_CONFIG_BYTES = 1 << 20
"""adapter_config.json is a few KB; anything above 1 MiB is not a PEFT config."""
MAX_HEADER_BYTES = 100 * 1000 * 1000
"""Cap on the safetensors JSON header (the safetensors library uses the same 100 MB)."""

# safetensors dtype name -> (torch dtype, bytes per element), for the dtypes an adapter may use.
_SAFETENSORS_DTYPES = {"F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
                       "F32": (torch.float32, 4)}


# base_model.model.PATH.TENSOR, e.g. base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight
_KEY = re.compile(r"base_model\.model\.([A-Za-z0-9_.]+?)\.(lora_A\.weight|lora_B\.weight|"
                  r"lora_magnitude_vector|lora_embedding_A|lora_embedding_B|base_layer\.weight)",
                  re.ASCII)
_DECODER_PATH = re.compile(r"model\.layers\.(0|[1-9][0-9]*)\.(self_attn|mlp)\.([A-Za-z0-9_]+)",
                           re.ASCII)
# Each module kind's tensors: A [r, in], B [out, r], M (DoRA magnitude) [out], W (PEFT's copy of
# the base weight) [vocab, hidden].
_DECODER_TENSORS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "M"}
_VOCAB_TENSORS = {
    EMBED_TOKENS: {"lora_embedding_A": "A", "lora_embedding_B": "B", "base_layer.weight": "W"},
    LM_HEAD: {"lora_A.weight": "A", "lora_B.weight": "B", "base_layer.weight": "W"},
}
_KEY_FORM = ("base_model.model. followed by model.layers.N.(self_attn|mlp).MODULE.(lora_A.weight|"
             "lora_B.weight|lora_magnitude_vector), model.embed_tokens.(lora_embedding_A|"
             "lora_embedding_B|base_layer.weight) or lm_head.(lora_A.weight|lora_B.weight|"
             "base_layer.weight)")

# Modules of a Llama-family model that exist but that LoRA is not served on.
_UNSERVED_MODULES = ("norm", "input_layernorm", "post_attention_layernorm", "rotary_emb",
                     "self_attn", "mlp", "act_fn", "layers", "model")

# PEFT LoraConfig options that change what the adapter computes, and that we do not serve.
# Each is rejected when set to anything but its default (None / False / empty).
_UNSUPPORTED_OPTIONS = {
    "modules_to_save": "replaces whole base modules, which is not supported",
    "fan_in_fan_out": "is for Conv1D (GPT-2 style) weights, not supported",
    "lora_bias": "a bias on lora_B is not supported",
    "layer_replication": "layer replication is not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "target_parameters": "LoRA on parameters (not modules) is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "use_qalora": "QALoRA is not supported",
    "use_bdlora": "BD-LoRA is not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "KaSA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "velora_config": "VeLoRA is not supported",
}


class AdapterFormatError(ValueError):
    """An adapter cannot be served; the message names the adapter, file, tensor and reason.

    The parts are also attributes (`adapter`, `file`, `tensor`, `reason`; None when not known).
    """

    def __init__(self, message: str, *, adapter: str | None = None, file: str | None = None,
                 tensor: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.adapter, self.file, self.tensor, self.reason = adapter, file, tensor, reason


def _fail(name: str, file: str, reason: str, tensor: str | None = None) -> AdapterFormatError:
    where = f"tensor {tensor!r}: " if tensor is not None else ""
    return AdapterFormatError(f"adapter {name!r}: {file}: {where}{reason}",
                              adapter=name, file=file, tensor=tensor, reason=reason)


@dataclass(frozen=True)
class _Module:
    """A module LoRA may target: a decoder Linear (`layer` set) or embed_tokens / lm_head."""

    path: str  # model.layers.3.self_attn.q_proj, model.embed_tokens or lm_head
    layer: int | None
    name: str  # q_proj, ..., or the path of a vocabulary-side module
    in_features: int
    out_features: int

    @property
    def tensors(self) -> dict[str, str]:
        return _DECODER_TENSORS if self.layer is not None else _VOCAB_TENSORS[self.path]


@dataclass(frozen=True)
class _Target:
    """One module the config targets: its rank and PEFT scale."""

    r: int
    scale: float


def validate_adapter_name(name: object) -> str:
    """Returns `name` if it is a safe adapter name (adapters_registry.names), else raises."""
    if is_valid_adapter_name(name):
        return name
    shown = shown_name(name)
    raise AdapterFormatError(
        f"adapter {shown!r}: invalid adapter name: {NAME_RULE}",
        adapter=str(shown), reason="invalid adapter name")


def read_peft_adapter(path: str | Path, spec: BaseModelSpec, *, name: str | None = None,
                      max_rank: int | None = None) -> LoraWeights:
    """Reads and checks one PEFT LoRA adapter directory against the base model's spec.

    `name` defaults to the directory's name. Other files in the directory are ignored.
    """
    path = Path(path)
    name = validate_adapter_name(name if name is not None else (path.name or path.resolve().name))
    config_raw, weights_raw = read_adapter_files(path, name)
    return _validate(name, config_raw, weights_raw, spec, max_rank)


def read_adapter_files(path: Path, name: str, max_bytes: int | None = None) -> tuple[bytes, bytes]:
    """(adapter_config.json bytes, adapter_model.safetensors bytes) of an adapter directory.

    Only those two files are read; pickle weights are never opened, tokenizer and code files are
    ignored. Raises AdapterFormatError naming the adapter, the file and the reason.
    """
    if not path.is_dir():
        raise _fail(name, str(path), "adapter directory not found")
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not weights_file.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise _fail(name, WEIGHTS_FILE, f"missing; only pickle weights ({', '.join(pickles)}) "
                        f"are present, which are never opened: {CONVERT_PICKLES}")
    if not config_file.is_file():
        raise _fail(name, CONFIG_FILE, f"missing in {path}")
    if not weights_file.is_file():
        raise _fail(name, WEIGHTS_FILE, f"missing in {path}")
    return _read_file(name, config_file, MAX_CONFIG_BYTES), _read_file(name, weights_file, max_bytes)


def parse_peft_adapter(name: str, config_json: bytes | str,
                       safetensors: bytes | bytearray | mmap.mmap, spec: BaseModelSpec, *, max_rank: int | None = None,
                       expected_sha256: str | None = None,
                       max_bytes: int | None = None) -> LoraWeights:
    """Checks one uploaded adapter held in memory; never touches the filesystem.

    `config_json` is the content of adapter_config.json, `safetensors` the content of
    adapter_model.safetensors. `expected_sha256` (hex) is checked against the safetensors bytes;
    `max_bytes` caps their size. Then the same validation as `read_peft_adapter`. A bytearray
    (any writable buffer) is not copied: the returned tensors are views into it, so the caller
    hands it over.
    """
    name = validate_adapter_name(name)
    config_raw = config_json.encode() if isinstance(config_json, str) else bytes(config_json)
    if not config_raw:
        raise _fail(name, CONFIG_FILE, "empty upload")
    if not safetensors:
        raise _fail(name, WEIGHTS_FILE, "empty upload")
    if max_bytes is not None and len(safetensors) > max_bytes:
        raise _fail(name, WEIGHTS_FILE,
                    f"upload of {len(safetensors)} bytes exceeds the limit of {max_bytes} bytes")
    if expected_sha256 is not None:
        actual = hashlib.sha256(safetensors).hexdigest()
        if actual != expected_sha256.strip().lower():
            raise _fail(name, WEIGHTS_FILE,
                        f"checksum mismatch: sha256 is {actual}, expected {expected_sha256}")
    return _validate(name, config_raw, safetensors, spec, max_rank)


def _read_file(name: str, path: Path, limit: int | None) -> bytes:
    try:
        size = path.stat().st_size
        if limit is not None and size > limit:
            raise _fail(name, path.name, f"{size} bytes, more than the limit of {limit}")
        return path.read_bytes()
    except OSError as exc:
        raise _fail(name, path.name, f"cannot read ({exc.strerror or exc})") from None


def _validate(name: str, config_raw: bytes, weights_raw: bytes | bytearray | mmap.mmap,
              spec: BaseModelSpec,
              max_rank: int | None) -> LoraWeights:
    """The one validation path: config, then safetensors header and layout, then tensor values.

    The returned tensors are views into one writable copy of `weights_raw` (the buffer itself
    when it is writable, e.g. a bytearray or mmap): no per-tensor copies, and host RAM equal to
    the file's size.
    """
    config = _parse_config(name, config_raw)
    modules = _servable_modules(spec)
    targets = _targets(name, config, spec, modules, max_rank)
    entries, data_start = _parse_header(name, weights_raw)
    halves = _check_tensor_index(name, entries, data_start, len(weights_raw), targets, spec,
                                 modules, dora=config.get("use_dora", False))
    _check_layout(name, entries, len(weights_raw) - data_start)
    writable = not memoryview(weights_raw).readonly
    buffer = weights_raw if writable else bytearray(weights_raw)
    tensors = {key: _tensor_view(buffer, data_start, entry) for key, entry in entries.items()}
    _check_finite(name, buffer, data_start, entries, tensors)
    base_copies = {path: h.pop("W") for path, h in halves.items() if "W" in h}
    for path, key in base_copies.items():
        _check_base_copy(name, key, tensors[key], spec.vocab_weights.get(path))
    if base_copies:  # hold only the LoRA tensors, not the file with its copies of the base
        tensors = {key: t.clone() for key, t in tensors.items() if key not in base_copies.values()}
    weights = LoraWeights(name=name, rank=0, rslora=config.get("use_rslora", False))
    for path, h in halves.items():
        target, module = targets[path], modules[path]
        lora = LoraModuleWeights(a=tensors[h["A"]], b=tensors[h["B"]], scale=target.scale,
                                 magnitude=tensors[h["M"]] if "M" in h else None)
        if module.layer is not None:
            weights.modules[(module.layer, module.name)] = lora
        elif path == EMBED_TOKENS:
            weights.embed_tokens = lora
        else:
            weights.lm_head = lora
        weights.rank = max(weights.rank, target.r)
    weights.modules = dict(sorted(weights.modules.items()))
    return weights


def _check_base_copy(name: str, key: str, copy: torch.Tensor, served) -> None:
    """PEFT loads `copy` over the base model's weight: serve the adapter only when that changes
    nothing, i.e. the copy equals the served weight (in the copy's dtype)."""
    if served is None:
        raise _fail(name, WEIGHTS_FILE, "a copy of a base weight that this server cannot check", key)
    if not torch.equal(copy, served.to(device="cpu", dtype=copy.dtype)):
        raise _fail(name, WEIGHTS_FILE,
                    "a copy of the base model's weight that differs from the served model's "
                    "(PEFT would load it over the base weights): the adapter was trained on "
                    "another base model or changes the embeddings, which is not supported", key)


# ---- adapter_config.json ------------------------------------------------------------------------

def _reject_constant(constant: str):
    raise ValueError(f"{constant} is not valid JSON")


def _parse_config(name: str, raw: bytes) -> dict:
    if len(raw) > MAX_CONFIG_BYTES:
        raise _fail(name, CONFIG_FILE, f"{len(raw)} bytes, more than the limit of {MAX_CONFIG_BYTES}")
    try:
        config = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(name, CONFIG_FILE, f"not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _fail(name, CONFIG_FILE, f"expected a JSON object, got {type(config).__name__}")

    def bad(reason: str) -> AdapterFormatError:
        return _fail(name, CONFIG_FILE, reason)

    if "peft_type" not in config:
        raise bad("peft_type missing (only 'LORA' is supported)")
    if config["peft_type"] != "LORA":
        raise bad(f"peft_type {config['peft_type']!r} is not supported (only 'LORA')")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise bad(f"task_type {config['task_type']!r} is not supported (only 'CAUSAL_LM')")
    if not _is_positive_int(config.get("r")):
        raise bad(f"r must be a positive integer, got {config.get('r')!r}")
    if not _is_positive_number(config.get("lora_alpha")):
        raise bad(f"lora_alpha must be a positive number, got {config.get('lora_alpha')!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise bad(f"use_rslora must be true or false, got {config['use_rslora']!r}")
    if not isinstance(config.get("use_dora", False), bool):
        raise bad(f"use_dora must be true or false, got {config['use_dora']!r}")
    if config.get("bias", "none") != "none":
        raise bad(f"bias={config['bias']!r} is not supported (only 'none')")
    for option, reason in _UNSUPPORTED_OPTIONS.items():
        if config.get(option) not in (None, False, [], {}, ""):
            raise bad(f"{option}={config[option]!r}: {reason}")
    for key, check, what in (("rank_pattern", _is_positive_int, "a positive integer"),
                             ("alpha_pattern", _is_positive_number, "a positive number")):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise bad(f"{key} must be an object, got {type(patterns).__name__}")
        for pattern, value in patterns.items():
            if not check(value):
                raise bad(f"{key}[{pattern!r}] must be {what}, got {value!r}")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise bad(f"{key} key {pattern!r} is not a valid pattern ({exc})") from None
    return config


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_positive_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _servable_modules(spec: BaseModelSpec) -> dict[str, _Module]:
    """Every module of the base model that LoRA is served on, by path."""
    modules = {}
    for layer in range(spec.num_layers):
        for m in TARGET_MODULES:
            if m in spec.linear_shapes:
                path = module_path(layer, m)
                modules[path] = _Module(path, layer, m, *spec.linear_shapes[m])
    for path in VOCAB_MODULES:
        modules[path] = _Module(path, None, path, *spec.module_shape(path))
    return modules


def _servable_names(spec: BaseModelSpec) -> list[str]:
    """The module names target_modules may list, for messages."""
    return [m for m in TARGET_MODULES if m in spec.linear_shapes] + ["embed_tokens", LM_HEAD]


def _targets(name: str, config: dict, spec: BaseModelSpec, modules: dict[str, _Module],
             max_rank: int | None) -> dict[str, _Target]:
    """The modules (by path) the config targets, as PEFT resolves target_modules,
    exclude_modules, layers_to_transform and ensure_weight_tying on a Llama-family model, with
    each one's rank and scale."""

    def bad(reason: str) -> AdapterFormatError:
        return _fail(name, CONFIG_FILE, reason)

    servable = _servable_names(spec)
    candidates = {path: (module.layer, module.name) for path, module in modules.items()}
    decoder = {path for path, module in modules.items() if module.layer is not None}
    wanted = config.get("target_modules")
    if wanted == "all-linear":  # PEFT: every Linear but the output layer
        selected = set(decoder)
    elif isinstance(wanted, str):
        raise bad(f"target_modules as a regular expression ({wanted!r}) is not supported: "
                  "list the module names, e.g. [\"q_proj\", \"v_proj\"]")
    elif not isinstance(wanted, list) or not wanted:
        raise bad(f"target_modules must be a non-empty list of module names, got {wanted!r}")
    else:
        selected = set()
        for entry in wanted:
            if not isinstance(entry, str) or not entry:
                raise bad(f"target_modules entry {entry!r} is not a module name")
            matched = _matching(candidates, entry)
            if not matched:
                last = entry.rsplit(".", 1)[-1]
                if last in _UNSERVED_MODULES:
                    raise bad(f"target_modules entry {entry!r}: LoRA on {last} is not supported "
                              f"(supported: {', '.join(servable)})")
                raise bad(f"target_modules entry {entry!r} names no module of the base model "
                          f"(supported: {', '.join(servable)})")
            selected |= matched

    excluded = config.get("exclude_modules") or []
    if isinstance(excluded, str):
        raise bad(f"exclude_modules as a regular expression ({excluded!r}) is not supported: "
                  "list the module names")
    if not isinstance(excluded, list) or not all(isinstance(e, str) for e in excluded):
        raise bad(f"exclude_modules must be a list of module names, got {excluded!r}")
    for entry in excluded:
        selected -= _matching(candidates, entry)

    layers = config.get("layers_to_transform")
    if layers not in (None, []):
        layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
        if not isinstance(layers, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise bad(f"layers_to_transform must be a layer index or a list of them, got {layers!r}")
        pattern = config.get("layers_pattern")
        if pattern not in (None, "", [], "layers", ["layers"]):
            raise bad(f"layers_pattern={pattern!r} is not supported: the base model's decoder "
                      "layers are 'layers'")
        # The file decides for embed_tokens / lm_head: PEFT keeps lm_head and drops
        # embed_tokens here, so both stay allowed and a module without tensors adds nothing.
        selected = {p for p in selected if p not in decoder or candidates[p][0] in layers}
    if spec.tie_word_embeddings and config.get("ensure_weight_tying") and \
            selected & set(VOCAB_MODULES):
        selected |= set(VOCAB_MODULES)  # PEFT ties the two adapters of a tied embedding
    if config.get("use_dora", False) and selected & set(VOCAB_MODULES):
        vocab = " and ".join(sorted(selected & set(VOCAB_MODULES)))
        raise bad(f"use_dora with LoRA on {vocab} is not supported (DoRA is served on the "
                  "decoder layers' Linear modules)")
    if not selected:
        raise bad("target_modules, exclude_modules and layers_to_transform select no module "
                  "of the base model")

    targets = {}
    for path in sorted(selected):
        r, alpha, source = _module_hparams(config, path)
        if max_rank is not None and r > max_rank:
            raise bad(f"rank {r} of {path} ({source}) exceeds the server's max rank {max_rank}")
        scale = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
        targets[path] = _Target(r=r, scale=scale)
    return targets


def _matching(candidates: dict[str, tuple[int, str]], entry: str) -> set[str]:
    """PEFT's list matching: the module name equals the entry or ends with '.' + entry."""
    return {p for p in candidates if p == entry or p.endswith("." + entry)}


def _module_hparams(config: dict, path: str) -> tuple[int, float, str]:
    """Rank and alpha of one module, honouring PEFT's rank_pattern / alpha_pattern, and where the
    rank came from."""
    rank_key = _pattern_key(config.get("rank_pattern") or {}, path)
    alpha_key = _pattern_key(config.get("alpha_pattern") or {}, path)
    r = config["rank_pattern"][rank_key] if rank_key is not None else config["r"]
    alpha = config["alpha_pattern"][alpha_key] if alpha_key is not None else config["lora_alpha"]
    source = f"rank_pattern {rank_key!r}" if rank_key is not None else "r"
    return int(r), float(alpha), source


def _pattern_key(patterns: dict, path: str) -> str | None:
    """PEFT's get_pattern_key: the first key that matches the end of the module name on a dot
    boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


# ---- adapter_model.safetensors ------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    """One tensor's header entry."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _parse_header(name: str, raw: bytes) -> tuple[dict[str, _Entry], int]:
    """The safetensors header (8-byte little-endian length N, then N bytes of JSON), checked for
    structure before anything is allocated. Returns the entries and where the data starts."""

    def bad(reason: str, tensor: str | None = None) -> AdapterFormatError:
        return _fail(name, WEIGHTS_FILE, reason, tensor)

    if len(raw) < 8:
        raise bad(f"truncated: {len(raw)} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(raw[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise bad(f"header length {n} bytes exceeds the limit of {MAX_HEADER_BYTES} "
                  "(corrupt file or not safetensors)")
    if 8 + n > len(raw):
        raise bad(f"truncated or corrupt: header length {n} bytes, but only {len(raw) - 8} "
                  "bytes follow")
    try:
        header = json.loads(bytes(raw[8:8 + n]).decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"header is not valid JSON (corrupt file or not safetensors: {exc})") from None
    if not isinstance(header, dict):
        raise bad(f"header is not a JSON object (got {type(header).__name__})")
    header.pop("__metadata__", None)
    entries = {}
    for key, info in header.items():
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)
                and isinstance(info.get("shape"), list)
                and all(_is_index(d) for d in info["shape"])
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
                and all(_is_index(o) for o in info["data_offsets"])):
            raise bad("malformed header entry (expected dtype, shape, data_offsets)", key)
        begin, end = info["data_offsets"]
        entries[key] = _Entry(info["dtype"], tuple(info["shape"]), begin, end)
    return entries, 8 + n


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tensor_index(name: str, entries: dict[str, _Entry], data_start: int, total: int,
                        targets: dict[str, _Target], spec: BaseModelSpec,
                        modules: dict[str, _Module], dora: bool) -> dict[str, dict[str, str]]:
    """Checks every header entry (key, module, layer, target, dtype, shape, extent) and that
    lora_A and lora_B come in pairs, with a DoRA magnitude vector exactly when `dora`.
    Returns module path -> {"A": lora_A key, "B": lora_B key, and "M": magnitude key,
    "W": base weight copy key when present}.

    A targeted module without any tensors is allowed, as PEFT allows it (with a warning): its
    lora_B keeps PEFT's zero init, so the module is left without LoRA.
    """

    def bad(reason: str, tensor: str | None = None) -> AdapterFormatError:
        return _fail(name, WEIGHTS_FILE, reason, tensor)

    data_bytes = total - data_start
    halves: dict[str, dict[str, str]] = {}
    for key, entry in entries.items():
        match = _KEY.fullmatch(key)
        if not match:
            raise bad(f"unknown tensor key (expected {_KEY_FORM})", key)
        module = _module_of_key(name, key, match[1], spec, modules)
        half = module.tensors.get(match[2])
        if half is None:
            raise bad(f"unknown tensor key: {module.path} has no {match[2]} "
                      f"(expected {', '.join(module.tensors)})", key)
        target = targets.get(module.path)
        if target is None:
            raise bad(f"module {module.path} is not targeted by {CONFIG_FILE} "
                      "(target_modules / exclude_modules / layers_to_transform)", key)
        if entry.dtype not in _SAFETENSORS_DTYPES:
            raise bad(f"dtype {entry.dtype} not allowed (only F16, BF16 or F32)", key)
        if half == "M" and not dora:
            raise bad(f"a DoRA magnitude vector, but {CONFIG_FILE} does not set use_dora", key)
        r, fan_in, fan_out = target.r, module.in_features, module.out_features
        expected, form = {"A": ((r, fan_in), f"{match[2]} is [r, {fan_in}]"),
                          "B": ((fan_out, r), f"{match[2]} is [{fan_out}, r]"),
                          "M": ((fan_out,), "the magnitude is [out_features]"),
                          "W": ((spec.vocab_size, spec.hidden_size), "the base weight is "
                                "[vocab_size, hidden_size]")}[half]
        if entry.shape != expected:
            raise bad(f"shape {list(entry.shape)}, expected {list(expected)} "
                      f"({form}, r={target.r})", key)
        size = math.prod(entry.shape) * _SAFETENSORS_DTYPES[entry.dtype][1]
        if entry.end - entry.begin != size:
            raise bad(f"data_offsets {[entry.begin, entry.end]} do not hold {size} bytes "
                      f"for shape {list(entry.shape)} {entry.dtype}", key)
        if entry.end > data_bytes:
            raise bad(f"truncated: data ends at byte {entry.end} but the file holds only "
                      f"{data_bytes} data bytes", key)
        halves.setdefault(module.path, {})[half] = key
    if not any({"A", "B"} & set(h) for h in halves.values()):
        raise bad("holds no LoRA tensors")
    for path, h in halves.items():
        if not {"A", "B"} <= set(h):
            if {"A", "B"} & set(h):
                have, missing = ("A", "B") if "A" in h else ("B", "A")
                raise bad(f"lora_{have} without lora_{missing} for {path}", h[have])
            if "M" in h:
                raise bad(f"a DoRA magnitude vector without lora_A and lora_B for {path}", h["M"])
            raise bad(f"a copy of the base weight without lora_A and lora_B for {path}", h["W"])
        if dora and "M" not in h:
            raise bad(f"use_dora is set but {path} has no lora_magnitude_vector", h["A"])
    return {path: halves[path] for path in sorted(halves)}


def _module_of_key(name: str, key: str, path: str, spec: BaseModelSpec,
                   modules: dict[str, _Module]) -> _Module:
    """The servable module a tensor key's path names, or an error saying why it is none."""
    if path in modules:
        return modules[path]
    supported = ", ".join(_servable_names(spec))
    match = _DECODER_PATH.fullmatch(path)
    if match is None:
        raise _fail(name, WEIGHTS_FILE, f"unknown module {path} (supported: {supported})", key)
    layer, block, module = int(match[1]), match[2], match[3]
    if module not in spec.linear_shapes or module not in TARGET_MODULES \
            or module_path(layer, module).split(".")[3] != block:
        raise _fail(name, WEIGHTS_FILE, f"unknown module {block}.{module} (supported: {supported})",
                    key)
    raise _fail(name, WEIGHTS_FILE,
                f"layer {layer} out of range (the base model has {spec.num_layers} layers)", key)


def _check_layout(name: str, entries: dict[str, _Entry], data_bytes: int) -> None:
    """Tensor data must tile the data section exactly, in some order, as safetensors requires:
    no overlaps (two tensors sharing bytes), no gaps, nothing after the last tensor."""
    position = 0
    for key in sorted(entries, key=lambda k: (entries[k].begin, k)):
        entry = entries[key]
        if entry.begin != position:
            how = "overlaps another tensor" if entry.begin < position else "leaves a gap"
            raise _fail(name, WEIGHTS_FILE, f"data_offsets {[entry.begin, entry.end]} {how} "
                        f"(expected the data to start at byte {position})", key)
        position = entry.end
    if position != data_bytes:
        raise _fail(name, WEIGHTS_FILE, f"{data_bytes - position} bytes after the last tensor")


def _tensor_view(buffer: bytearray | mmap.mmap, data_start: int, entry: _Entry) -> torch.Tensor:
    dtype, size = _SAFETENSORS_DTYPES[entry.dtype]
    offset = data_start + entry.begin
    view = torch.frombuffer(buffer, dtype=dtype, count=math.prod(entry.shape), offset=offset)
    view = view.view(entry.shape)
    return view if offset % size == 0 else view.clone()  # an unaligned tensor gets its own copy


def _check_finite(name: str, buffer: bytearray | mmap.mmap, data_start: int, entries: dict[str, _Entry],
                  tensors: dict[str, torch.Tensor]) -> None:
    """No NaN or Inf anywhere.

    Fast path, when every tensor has the same dtype (the usual case): the fp32 sum of the whole
    data section is finite iff every value is, barring an overflow that real LoRA weights never
    reach (~20x faster than isfinite here, and 420 small checks cost more than one large one).
    Otherwise, or when the sum is not finite, each tensor is checked, to name the culprit.
    """
    dtypes = {entry.dtype for entry in entries.values()}
    if len(dtypes) == 1:
        dtype, size = _SAFETENSORS_DTYPES[dtypes.pop()]
        count = (len(buffer) - data_start) // size
        if data_start % size == 0:
            data = torch.frombuffer(buffer, dtype=dtype, count=count, offset=data_start)
            if math.isfinite(float(data.sum(dtype=torch.float32))):
                return
    for key in sorted(entries, key=lambda k: entries[k].begin):
        tensor = tensors[key]
        if not bool(torch.isfinite(tensor).all()):
            what = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            raise _fail(name, WEIGHTS_FILE, f"contains {what}", key)
