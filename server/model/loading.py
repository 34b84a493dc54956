"""Loading a local Hugging Face Llama-family model, quantized with bitsandbytes.

The model is built by transformers, then transformed: `server.lora.layer.wrap_lora_targets`
swaps each target Linear for a multi-LoRA wrapper. Our own code only replaces attention (to read
the paged KV cache); embeddings, norms, rotary embeddings and MLPs stay the HF modules.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters_registry.spec import (EMBED_TOKENS, LM_HEAD, TARGET_MODULES, BaseModelSpec,
                                    module_path)
from server.errors import ErrorKind, LoraplexError

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtype names of the configuration (--dtype, --lora-dtype)."""
# bitsandbytes' 4-bit CPU kernels need these multiples (quantization block / output tiling).
FOUR_BIT_IN_MULTIPLE = 64
FOUR_BIT_OUT_MULTIPLE = 32


class ModelLoadError(LoraplexError, RuntimeError):
    """The model cannot be served; the message is one line that says why."""

    kind = ErrorKind.FAILED_PRECONDITION


@dataclass
class LoadedModel:
    hf: torch.nn.Module  # a *ForCausalLM
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    spec: BaseModelSpec
    name: str
    model_dir: Path  # where it was loaded from (its checkpoint: what a full copy weighs)
    quantize: str
    device: torch.device
    dtype: torch.dtype

    @property
    def config(self):
        return self.hf.config


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def load_model(model_dir: str | Path, *, quantize: str = "nf4", device: str = "auto",
               dtype: torch.dtype = torch.float32, quant_kernel: str = "auto",
               prepack: str = "auto") -> LoadedModel:
    """Loads `model_dir` (config.json, *.safetensors, tokenizer files) for serving.

    quant_kernel: "auto" serves 4-bit layers on a CPU with loraplex's kernel where the CPU can
    run it (server/model/linear4bit.py), "bitsandbytes" always with bitsandbytes' own path.
    prepack: "auto" packs the unquantized decoder Linears on a CPU, "all" lm_head too
    (server/model/dense.py)."""
    model_dir = Path(model_dir)
    config = _read_model_config(model_dir)
    target = resolve_device(device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub for a local directory
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = _load_tokenizer(AutoTokenizer, model_dir)
    kwargs = {"dtype": dtype, "trust_remote_code": False, "low_cpu_mem_usage": True,
              "device_map": {"": str(target)}}
    if quantize != "none":
        kwargs["quantization_config"] = _bnb_config(quantize, dtype, config)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except Exception as exc:  # transformers raises many kinds; the user needs one line
        raise ModelLoadError(f"cannot load model from {model_dir}: {_first_line(exc)}") from None
    hf.eval().requires_grad_(False)
    if quantize in ("nf4", "fp4") and target.type == "cpu" and quant_kernel == "auto":
        from server.model import linear4bit
        served = linear4bit.use_cpu_kernel(hf)
        log.info("%d 4-bit layers served by loraplex's CPU kernel", served)
    if target.type == "cpu" and prepack != "off":
        from server.model import dense
        packed = dense.use_packed_linears(hf, lm_head=prepack == "all")
        log.info("%d unquantized Linear layers prepacked for oneDNN", packed)
    return LoadedModel(hf=hf, tokenizer=tokenizer, spec=model_spec(hf), name=model_dir.name,
                       model_dir=model_dir, quantize=quantize, device=target, dtype=dtype)


def model_spec(hf: torch.nn.Module) -> BaseModelSpec:
    """Shapes of the target modules, read from layer 0 (all decoder layers are alike)."""
    shapes = {}
    for name in TARGET_MODULES:
        linear = hf.get_submodule(module_path(0, name))
        shapes[name] = _linear_in_out(linear)
    cfg = hf.config
    embed, lm_head = hf.get_input_embeddings(), hf.get_output_embeddings()
    embed, lm_head = getattr(embed, "base", embed), getattr(lm_head, "base", lm_head)  # unwrapped
    return BaseModelSpec(model_type=cfg.model_type, num_layers=cfg.num_hidden_layers,
                         hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
                         linear_shapes=shapes,
                         tie_word_embeddings=lm_head.weight is embed.weight,
                         vocab_weights={EMBED_TOKENS: embed.weight, LM_HEAD: lm_head.weight})


def _linear_in_out(linear: torch.nn.Module) -> tuple[int, int]:
    # bitsandbytes' Linear4bit keeps in/out_features; its weight is packed.
    return int(linear.in_features), int(linear.out_features)


def _read_model_config(model_dir: Path) -> dict:
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory not found: {model_dir}")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_file}: not valid JSON ({exc})") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"model type {model_type!r} in {config_file} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if not any(model_dir.glob("*.safetensors")):
        raise ModelLoadError(f"{model_dir} has no *.safetensors weights "
                             "(pickle checkpoints are never loaded)")
    return config


def _load_tokenizer(auto_tokenizer, model_dir: Path):
    try:
        return auto_tokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {model_dir}: {_first_line(exc)}") from None


def _bnb_config(quantize: str, dtype: torch.dtype, config: dict):
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    if quantize not in ("nf4", "fp4"):
        raise ModelLoadError(f"unknown quantization {quantize!r}")
    skip = ["lm_head"] + _unquantizable_4bit(config)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize,
                              bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)


def _unquantizable_4bit(config: dict) -> list[str]:
    """Target modules whose shapes bitsandbytes' 4-bit kernels cannot take; they stay unquantized."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    mlp = config["intermediate_size"]
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
              "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, mlp),
              "up_proj": (hidden, mlp), "down_proj": (mlp, hidden)}
    skip = []
    for name, (fan_in, fan_out) in shapes.items():
        if fan_in % FOUR_BIT_IN_MULTIPLE or fan_out % FOUR_BIT_OUT_MULTIPLE:
            log.warning("%s (%d -> %d) is left unquantized: 4-bit needs in_features %% %d == 0 "
                        "and out_features %% %d == 0", name, fan_in, fan_out,
                        FOUR_BIT_IN_MULTIPLE, FOUR_BIT_OUT_MULTIPLE)
            skip.append(name)
    return skip


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
