"""What serving N adapters costs in memory: one base + N adapters against N fine-tuned copies.

Every figure is counted from tensors, never estimated from a parameter count:
- the base model as served: every parameter and buffer of the loaded model plus the tensors
  bitsandbytes keeps beside its quantized weights (4-bit: the packed uint8 weight, one absmax
  per 64-weight block and the 16-entry code book of each layer; int8: the int8 weight and one
  fp32 scale per output row, `SCB`), each storage counted once (a tied lm_head is not counted
  twice), unquantized Linear weights in oneDNN's packed layout included (server/model/dense.py);
- loraplex's slot tables (`MultiLoraLinear` lora_a / lora_b / scale / lora_rank), reserved up
  front for max_slots adapters of max_rank, apart from the base;
- one fully fine-tuned copy, two ways: served like the base (the same quantization: a copy
  weighs what the base as served weighs), and in bfloat16 (how copies are usually served: two
  bytes per checkpoint parameter); the checkpoint as stored is reported too (headers only, no
  tensor is read). Comparing with copies as served shows the saving LoRA brings, apart from
  the one quantization brings;
- each adapter: the A and B tensors read from its file, in the file's dtype.

Measured as loaded. bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks each 4-bit weight at
its first forward and keeps absmax as bf16 from then on (2 bytes per block instead of 4); a model
that has served requests there is that much smaller.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from adapters_registry.weights import LoraWeights
from server.lora.layer import MultiLoraLinear
from server.model.dense import packed_bytes

MAX_HEADER_BYTES = 100 * 1000 * 1000
"""Cap on a safetensors JSON header (the safetensors library's own limit)."""


_SAFETENSORS_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16",
                            "F16": "float16", "I64": "int64", "I32": "int32", "I16": "int16",
                            "I8": "int8", "U8": "uint8", "BOOL": "bool",
                            "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@dataclass
class CostReport:
    """Memory of the base as served, its slot tables, one full copy, and each adapter (bytes).

    N adapters are taken in the order of `adapter_bytes`, cycling: adapter i of N is
    `list(adapter_bytes)[i % len(adapter_bytes)]`, so every figure is an exact byte count and N
    that is a multiple of the number of adapters holds each of them equally often.
    """

    base_served_bytes: int
    quantization: str  # "nf4", "fp4", "int8" or "none"
    full_copy_bytes: int  # the checkpoint as stored
    full_copy_dtype: str  # "float32", "bfloat16", ... ("bfloat16+float32" when mixed)
    adapter_bytes: dict[str, int] = field(default_factory=dict)
    slot_table_bytes: int = 0  # 0 when the model is not wrapped for serving
    full_copy_parameters: int = 0  # elements in the checkpoint

    def adapters_bytes(self, n: int) -> int:
        """Bytes of N adapters, cycling through `adapter_bytes` in order."""
        if n < 0:
            raise ValueError(f"number of adapters must be >= 0, got {n}")
        if n == 0:
            return 0
        if not self.adapter_bytes:
            raise ValueError("no adapters to count: the report holds none")
        sizes = list(self.adapter_bytes.values())
        full_cycles, rest = divmod(n, len(sizes))
        return full_cycles * sum(sizes) + sum(sizes[:rest])

    def loraplex_bytes(self, n: int) -> int:
        """One base as served + its slot tables + N adapters."""
        return self.base_served_bytes + self.slot_table_bytes + self.adapters_bytes(n)

    def full_copies_bytes(self, n: int) -> int:
        """N fully fine-tuned copies of the base at its checkpoint's precision."""
        return n * self.full_copy_bytes

    def served_copies_bytes(self, n: int) -> int:
        """N fine-tuned copies served as the base is (the same quantization)."""
        return n * self.base_served_bytes

    def bf16_copies_bytes(self, n: int) -> int:
        """N fine-tuned copies in bfloat16."""
        return n * 2 * self.full_copy_parameters

    def ratio(self, n: int) -> float:
        """How many times more memory N full copies take than loraplex with N adapters."""
        return self.full_copies_bytes(n) / self.loraplex_bytes(n)

    def rows(self, ns: Sequence[int] = (1, 10, 100, 1000)) -> list[tuple[int, int, int, float]]:
        """(N, loraplex bytes, full copies bytes, ratio) for each N."""
        return [(n, self.loraplex_bytes(n), self.full_copies_bytes(n), self.ratio(n)) for n in ns]


def cost_report(loaded_model, adapters: Mapping[str, LoraWeights],
                model_dir: str | Path) -> CostReport:
    """The report for a `server.model.loading.LoadedModel` loaded from `model_dir` and these adapters."""
    full_bytes, full_dtype = full_precision_bytes(model_dir)
    return CostReport(base_served_bytes=model_bytes_as_served(loaded_model.hf),
                      quantization=loaded_model.quantize,
                      full_copy_bytes=full_bytes, full_copy_dtype=full_dtype,
                      adapter_bytes={name: w.nbytes for name, w in adapters.items()},
                      slot_table_bytes=slot_table_bytes(loaded_model.hf),
                      full_copy_parameters=checkpoint_parameters(model_dir))


def stored_cost(base: CostReport, records) -> CostReport:
    """`base` (a report without adapters) with the stored adapters `records` (the store's
    `list()`), each counted by the size of its adapter_model.safetensors (tensor bytes plus a
    small header)."""
    return replace(base, adapter_bytes={r.name: r.weights_size for r in records})


def model_bytes_as_served(hf: torch.nn.Module) -> int:
    """Bytes of every parameter, buffer and bitsandbytes quantization tensor of `hf`, each
    storage once, without loraplex's slot tables (see `slot_table_bytes`)."""
    slot_tables = {id(t) for m in hf.modules() if isinstance(m, MultiLoraLinear)
                   for t in m._buffers.values() if t is not None}
    tensors = [t for t in (*hf.parameters(), *hf.buffers()) if id(t) not in slot_tables]
    for module in hf.modules():
        if any(cls.__module__.startswith("bitsandbytes") for cls in type(module).__mro__):
            tensors.extend(_bnb_tensors(module))  # bitsandbytes' layers, ours included
    return _bytes_once(tensors) + packed_bytes(hf)


def slot_table_bytes(hf: torch.nn.Module) -> int:
    """Bytes of the LoRA slot tables of every `MultiLoraLinear` in `hf` (0 if none)."""
    return _bytes_once([t for m in hf.modules() if isinstance(m, MultiLoraLinear)
                        for t in m._buffers.values() if t is not None])


def full_precision_bytes(model_dir: str | Path) -> tuple[int, str]:
    """(bytes, dtype name) of one full copy of the checkpoint in `model_dir`, from the headers of
    its safetensors files: exact dtypes and shapes, tied weights as stored (once).

    A pre-quantized checkpoint reports what it stores, which is not the original precision.
    """
    by_dtype: dict[str, int] = {}
    for path in _checkpoint_files(Path(model_dir)):
        for name, entry in _safetensors_header(path).items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            dtype = _SAFETENSORS_DTYPE_NAMES.get(entry["dtype"], entry["dtype"].lower())
            by_dtype[dtype] = by_dtype.get(dtype, 0) + (end - start)
    if not by_dtype:
        raise ValueError(f"{model_dir}: the safetensors files hold no tensors")
    names = sorted(by_dtype, key=lambda d: -by_dtype[d])
    return sum(by_dtype.values()), "+".join(names)


def checkpoint_parameters(model_dir: str | Path) -> int:
    """Elements in the checkpoint's safetensors files, from their headers (tied weights once)."""
    return sum(math.prod(entry["shape"]) for path in _checkpoint_files(Path(model_dir))
               for name, entry in _safetensors_header(path).items() if name != "__metadata__")


def _bnb_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Tensors a bitsandbytes layer keeps outside its parameters and buffers: the weight's
    quant_state (absmax, code, nested state), Int8Params' CB/SCB and the layer's MatmulLtState."""
    weight = module._parameters.get("weight")
    for owner in (getattr(weight, "quant_state", None), getattr(module, "state", None)):
        if owner is not None:
            yield from _tensors_in(owner)
    for attr in ("CB", "SCB"):
        tensor = getattr(weight, attr, None)
        if isinstance(tensor, torch.Tensor):
            yield tensor


def _tensors_in(obj, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors held by a bitsandbytes state object, including nested states (QuantState.state2)."""
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif (depth < 2 and type(value).__module__.startswith("bitsandbytes")
              and hasattr(value, "__dict__")):
            yield from _tensors_in(value, depth + 1)


def _bytes_once(tensors: Sequence[torch.Tensor]) -> int:
    """Total bytes, each memory region once: tied weights and aliases share a data_ptr."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t.device.type == "meta" or t.numel() == 0:
            continue
        key = (str(t.device), t.data_ptr())
        seen[key] = max(seen.get(key, 0), t.numel() * t.element_size())
    return sum(seen.values())


def _checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those of the shard index if there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no *.safetensors files")
    return files


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= MAX_HEADER_BYTES:
            raise ValueError(f"{path}: not a safetensors file (header length {size})")
        return json.loads(f.read(size))

