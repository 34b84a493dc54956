"""Reading PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors).

The result is a plain `LoraWeights`: for each (layer, module) the tensors A: [r, in], B: [out, r]
and the scalar scale that PEFT applies (lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA).
Pickle files are never opened.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from adapters_registry.spec import TARGET_MODULES, BaseModelSpec, module_path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
ALLOWED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class AdapterFormatError(ValueError):
    """An adapter cannot be served; the message names the adapter, file, tensor and reason."""


@dataclass
class LoraModuleWeights:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float


@dataclass
class LoraWeights:
    """One adapter's tensors, keyed by (layer index, module name)."""

    name: str
    rank: int
    modules: dict[tuple[int, str], LoraModuleWeights] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())


def read_peft_adapter(path: str | Path, spec: BaseModelSpec, *, name: str | None = None,
                      max_rank: int | None = None) -> LoraWeights:
    """Reads and checks one PEFT LoRA adapter directory against the base model's spec."""
    path = Path(path)
    name = name or path.name
    config = _read_config(path, name)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        if any((path / p).exists() for p in PICKLE_FILES):
            raise AdapterFormatError(
                f"adapter {name!r}: {WEIGHTS_FILE} missing; only a pickle file is present, which "
                "is never opened — convert it to safetensors")
        raise AdapterFormatError(f"adapter {name!r}: {WEIGHTS_FILE} missing in {path}")
    pairs = _read_tensor_pairs(weights_file, name, spec)
    weights = LoraWeights(name=name, rank=0)
    for (layer, module), (a, b) in sorted(pairs.items()):
        where = f"adapter {name!r}: {WEIGHTS_FILE}: {module_path(layer, module)}"
        r, alpha, use_rslora = _module_hparams(config, module_path(layer, module))
        _check_shapes(where, a, b, r, spec.linear_shapes[module])
        if max_rank is not None and r > max_rank:
            raise AdapterFormatError(f"{where}: rank {r} exceeds the server's --max-rank {max_rank}")
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        weights.modules[(layer, module)] = LoraModuleWeights(a=a, b=b, scale=scale)
        weights.rank = max(weights.rank, r)
    return weights


def _read_config(path: Path, name: str) -> dict:
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise AdapterFormatError(f"adapter {name!r}: {CONFIG_FILE} missing in {path}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"adapter {name!r}: {CONFIG_FILE}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"adapter {name!r}: {CONFIG_FILE}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(
            f"adapter {name!r}: {CONFIG_FILE}: peft_type {config.get('peft_type')!r} is not "
            "supported (only LORA)")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise AdapterFormatError(f"adapter {name!r}: {CONFIG_FILE}: {key} must be a positive number")
    if config.get("use_dora"):
        raise AdapterFormatError(f"adapter {name!r}: {CONFIG_FILE}: use_dora is not supported yet")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(
            f"adapter {name!r}: {CONFIG_FILE}: bias={config['bias']!r} is not supported (only 'none')")
    if config.get("modules_to_save"):
        raise AdapterFormatError(f"adapter {name!r}: {CONFIG_FILE}: modules_to_save is not supported")
    if config.get("fan_in_fan_out"):
        raise AdapterFormatError(f"adapter {name!r}: {CONFIG_FILE}: fan_in_fan_out is not supported")
    return config


def _read_tensor_pairs(weights_file: Path, name: str, spec: BaseModelSpec
                       ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            for key in f.keys():
                where = f"adapter {name!r}: {WEIGHTS_FILE}: tensor {key!r}"
                layer, module, half = _parse_key(where, key, spec)
                tensor = f.get_tensor(key)
                if tensor.dtype not in ALLOWED_DTYPES:
                    raise AdapterFormatError(f"{where}: dtype {tensor.dtype} not allowed "
                                             "(fp16, bf16 or fp32)")
                if not torch.isfinite(tensor).all():
                    raise AdapterFormatError(f"{where}: contains NaN or Inf")
                halves.setdefault((layer, module), {})[half] = tensor.float()
    except AdapterFormatError:
        raise
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise AdapterFormatError(f"adapter {name!r}: {WEIGHTS_FILE}: unreadable ({exc})") from None
    pairs = {}
    for (layer, module), h in halves.items():
        if set(h) != {"A", "B"}:
            missing = "lora_B" if "A" in h else "lora_A"
            raise AdapterFormatError(
                f"adapter {name!r}: {WEIGHTS_FILE}: {module_path(layer, module)}: {missing} missing")
        pairs[(layer, module)] = (h["A"], h["B"])
    if not pairs:
        raise AdapterFormatError(f"adapter {name!r}: {WEIGHTS_FILE}: holds no LoRA tensors")
    return pairs


def _parse_key(where: str, key: str, spec: BaseModelSpec) -> tuple[int, str, str]:
    match = _KEY.match(key)
    if not match:
        raise AdapterFormatError(f"{where}: unknown key (expected "
                                 "base_model.model.model.layers.N.<block>.<module>.lora_A|B.weight)")
    layer, block, module, half = int(match[1]), match[2], match[3], match[4]
    if module not in TARGET_MODULES or module_path(layer, module).split(".")[3] != block:
        raise AdapterFormatError(f"{where}: module {block}.{module} is not a supported target "
                                 f"(supported: {', '.join(TARGET_MODULES)})")
    if layer >= spec.num_layers:
        raise AdapterFormatError(f"{where}: layer {layer} does not exist "
                                 f"(the base model has {spec.num_layers})")
    return layer, module, half


def _module_hparams(config: dict, path: str) -> tuple[int, float, bool]:
    """Rank and alpha of one module, honouring PEFT's rank_pattern / alpha_pattern."""
    r = _pattern_value(config.get("rank_pattern") or {}, path, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"])
    return int(r), float(alpha), bool(config.get("use_rslora", False))


def _pattern_value(patterns: dict, path: str, default):
    """PEFT matches a pattern key against the end of the module name, on a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _check_shapes(where: str, a: torch.Tensor, b: torch.Tensor, r: int,
                  in_out: tuple[int, int]) -> None:
    in_features, out_features = in_out
    if tuple(a.shape) != (r, in_features):
        raise AdapterFormatError(f"{where}.lora_A: shape {tuple(a.shape)}, expected {(r, in_features)}")
    if tuple(b.shape) != (out_features, r):
        raise AdapterFormatError(f"{where}.lora_B: shape {tuple(b.shape)}, expected {(out_features, r)}")
