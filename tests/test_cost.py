"""The cost explainer: every figure it reports equals the arithmetic done by hand.

The demo model (server.tools.demo.DEMO_MODEL_SHAPE, float32 checkpoint, lm_head NOT tied):
  hidden 256, MLP 768, 4 layers, 4 heads, 2 KV heads -> head_dim 64, KV width 128, vocab 512
  (the demo tokenizer's size: embedding and lm_head have one row per token).

  Linear weights per layer (out x in):
    q 256x256 = 65,536   k 128x256 = 32,768   v 128x256 = 32,768   o 256x256 = 65,536
    gate 768x256 = 196,608   up 768x256 = 196,608   down 256x768 = 196,608
    -> 786,432 per layer, 3,145,728 in 4 layers (28 Linears)
  embed_tokens 512x256 = 131,072; lm_head 512x256 = 131,072
  RMSNorm weights: 2 x 256 per layer + 256 final = 2,304
  parameters: 3,145,728 + 262,144 + 2,304 = 3,410,176 -> x 4 bytes (fp32) = 13,640,704 bytes

  Served in NF4 (bitsandbytes 0.50, CPU, as loaded, before any forward):
    packed weights: 2 weights per byte           3,145,728 / 2      = 1,572,864
    absmax: one fp32 per 64-weight block        3,145,728 / 64 x 4  =   196,608
    code book: 16 fp32 per Linear (each Linear's quant_state holds its own copy, not shared)
                                                 28 x 16 x 4         =     1,792
    (no nested/double quantization: state2 is None)
    unquantized fp32: embed + lm_head + norms    264,448 x 4         = 1,057,792
    buffers: rotary inv_freq and original_inv_freq, 32 fp32 each       =       256
    total                                                              = 2,829,312
  Served in int8: 3,145,728 int8 weights + one fp32 scale (SCB) per output row
    (2,560 rows per layer x 4 layers x 4 = 40,960) + 1,057,792 + 256 = 4,244,736
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from adapters_registry.peft_format import read_peft_adapter
from server.model.memory import (CostReport, cost_report, full_precision_bytes,
                                 model_bytes_as_served, slot_table_bytes)
from server.tools.cost import format_table
from server.tools.demo import (DEMO_ADAPTERS, DEMO_MODEL_SHAPE, MLP_MODULES, build_demo,
                         write_llama_model)
from server.lora.layer import LoraContext, wrap_lora_targets
from server.model.loading import load_model
from tests.conftest import TINY_SHAPE

HIDDEN, MLP, LAYERS = 256, 768, 4
HEADS, KV_HEADS, VOCAB = 4, 2, 512
HEAD_DIM = HIDDEN // HEADS  # 64
KV = KV_HEADS * HEAD_DIM  # 128
# (in, out) of each Linear of a decoder layer
LINEARS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV),
           "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, MLP), "up_proj": (HIDDEN, MLP),
           "down_proj": (MLP, HIDDEN)}

LINEAR_WEIGHTS = LAYERS * sum(i * o for i, o in LINEARS.values())  # 3,145,728
EMBED = LM_HEAD = VOCAB * HIDDEN  # 131,072 each; the demo does not tie them
NORMS = 2 * HIDDEN * LAYERS + HIDDEN  # 2,304
ROTARY_BUFFERS = 2 * (HEAD_DIM // 2) * 4  # inv_freq + original_inv_freq, fp32
UNQUANTIZED_FP32 = (EMBED + LM_HEAD + NORMS) * 4  # 1,057,792

PARAMETERS = LINEAR_WEIGHTS + EMBED + LM_HEAD + NORMS  # 3,410,176
FULL_COPY_BYTES = PARAMETERS * 4
NF4_BLOCK = 64
NF4_SERVED = (LINEAR_WEIGHTS // 2  # packed: 2 weights per byte
              + LINEAR_WEIGHTS // NF4_BLOCK * 4  # fp32 absmax per block
              + LAYERS * len(LINEARS) * 16 * 4  # 16-entry fp32 code book per Linear
              + UNQUANTIZED_FP32 + ROTARY_BUFFERS)
INT8_SERVED = (LINEAR_WEIGHTS  # 1 byte per weight
               + LAYERS * sum(o for _, o in LINEARS.values()) * 4  # SCB: fp32 per output row
               + UNQUANTIZED_FP32 + ROTARY_BUFFERS)


def adapter_bytes_by_hand(name: str) -> int:
    """rank x (in + out) per targeted module, x layers, x bytes of the file's dtype."""
    spec = DEMO_ADAPTERS[name]
    dtype_bytes = torch.finfo(spec.get("dtype", torch.float32)).bits // 8
    per_layer = sum(spec["r"] * sum(LINEARS[m]) for m in spec["target_modules"])
    return per_layer * LAYERS * dtype_bytes


@pytest.fixture(scope="module")
def demo(demo_cache):
    return build_demo(demo_cache, progress=None)


@pytest.fixture(scope="module")
def nf4(demo):
    return load_model(demo.model_dir, quantize="nf4", device="cpu")


@pytest.fixture(scope="module")
def adapters(demo, nf4):
    return {name: read_peft_adapter(path, nf4.spec, name=name)
            for name, path in demo.adapters.items()}


def test_the_hand_computation_describes_the_demo_model(nf4):
    assert DEMO_MODEL_SHAPE == dict(hidden_size=HIDDEN, intermediate_size=MLP,
                                    num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                    num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                                    max_position_embeddings=2048)
    assert len(nf4.tokenizer) == VOCAB
    assert not nf4.hf.config.tie_word_embeddings
    assert nf4.hf.lm_head.weight.data_ptr() != nf4.hf.model.embed_tokens.weight.data_ptr()
    assert (LINEAR_WEIGHTS, NORMS, FULL_COPY_BYTES) == (3_145_728, 2_304, 13_640_704)
    assert (NF4_SERVED, INT8_SERVED) == (2_829_312, 4_244_736)


def test_bitsandbytes_keeps_packed_weights_absmax_and_a_code_book_per_4bit_linear(nf4):
    """What the NF4 figure counts, as bitsandbytes 0.50 holds it on CPU right after loading."""
    linear = nf4.hf.model.layers[0].mlp.down_proj
    state = linear.weight.quant_state
    assert linear.weight.dtype == torch.uint8 and linear.weight.numel() == MLP * HIDDEN // 2
    assert state.blocksize == NF4_BLOCK and not state.nested
    assert state.absmax.dtype == torch.float32 and state.absmax.numel() == MLP * HIDDEN // 64
    assert state.code.dtype == torch.float32 and state.code.numel() == 16
    other = nf4.hf.model.layers[1].mlp.down_proj.weight.quant_state.code
    assert other.data_ptr() != state.code.data_ptr()  # a copy per Linear, counted per Linear


def test_full_copy_is_what_the_checkpoint_stores_at_its_original_precision(demo):
    assert full_precision_bytes(demo.model_dir) == (FULL_COPY_BYTES, "float32")
    file_size = (demo.model_dir / "model.safetensors").stat().st_size
    header_size = 8 + int.from_bytes((demo.model_dir / "model.safetensors").read_bytes()[:8],
                                     "little")
    assert file_size - header_size == FULL_COPY_BYTES


def test_nf4_report_equals_the_hand_computation(nf4, adapters, demo):
    report = cost_report(nf4, adapters, demo.model_dir)
    assert report.base_served_bytes == NF4_SERVED == 2_829_312
    assert report.quantization == "nf4"
    assert report.slot_table_bytes == 0  # not wrapped for serving
    assert (report.full_copy_bytes, report.full_copy_dtype) == (13_640_704, "float32")
    assert report.adapter_bytes == {name: adapter_bytes_by_hand(name) for name in DEMO_ADAPTERS}


def test_int8_report_counts_the_int8_weights_and_their_row_scales(demo):
    int8 = load_model(demo.model_dir, quantize="int8", device="cpu")
    assert model_bytes_as_served(int8.hf) == INT8_SERVED == 4_244_736


def test_adapter_bytes_are_rank_times_in_plus_out_per_module_in_the_file_dtype(adapters):
    # attn-r4: q, v at rank 4, fp32: 4 x ((256 + 256) + (256 + 128)) x 4 layers x 4 bytes
    assert adapters["attn-r4"].nbytes == 4 * (512 + 384) * 4 * 4 == 57_344
    # mlp-r8-bf16: gate, up, down at rank 8, bf16: 8 x 3 x (256 + 768) x 4 layers x 2 bytes
    assert DEMO_ADAPTERS["mlp-r8-bf16"]["target_modules"] == MLP_MODULES
    assert adapters["mlp-r8-bf16"].nbytes == 8 * 3 * 1024 * 4 * 2 == 196_608
    # all-r64-rslora: all 7 Linears at rank 64, fp32
    assert adapters["all-r64-rslora"].nbytes == 64 * 4864 * 4 * 4 == 4_980_736


def test_slot_tables_are_counted_apart_from_the_base(demo):
    model = load_model(demo.model_dir, quantize="nf4", device="cpu")
    wrap_lora_targets(model.hf, LoraContext(), max_slots=2, max_rank=8, dtype=torch.bfloat16,
                      device=model.device)
    # lora_a [2, 8, in] + lora_b [2, 8, out] in bf16, scale [2] fp32, lora_rank [2] int32
    per_layer_in_plus_out = sum(i + o for i, o in LINEARS.values())  # 4,864
    expected = (2 * 8 * per_layer_in_plus_out * LAYERS * 2
                + LAYERS * len(LINEARS) * (2 * 4 + 2 * 4))
    assert slot_table_bytes(model.hf) == expected == 623_040
    assert model_bytes_as_served(model.hf) == NF4_SERVED
    report = cost_report(model, {}, demo.model_dir)
    assert report.slot_table_bytes == expected
    assert report.loraplex_bytes(0) == NF4_SERVED + expected


def test_tied_lm_head_is_counted_once(tmp_path):
    write_llama_model(tmp_path, **TINY_SHAPE, seed=0, tie_word_embeddings=True)
    model = load_model(tmp_path, quantize="none", device="cpu")
    assert model.hf.lm_head.weight.data_ptr() == model.hf.model.embed_tokens.weight.data_ptr()
    full, dtype = full_precision_bytes(tmp_path)
    hidden, mlp, layers, vocab = (TINY_SHAPE[k] for k in ("hidden_size", "intermediate_size",
                                                          "num_hidden_layers", "vocab_size"))
    kv = TINY_SHAPE["num_key_value_heads"] * hidden // TINY_SHAPE["num_attention_heads"]
    linears = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp
    assert (full, dtype) == ((layers * (linears + 2 * hidden) + hidden + vocab * hidden) * 4,
                             "float32")
    head_dim = hidden // TINY_SHAPE["num_attention_heads"]
    assert model_bytes_as_served(model.hf) == full + 2 * (head_dim // 2) * 4  # + rotary buffers


def test_n_adapters_cycle_through_the_given_ones_in_order():
    report = CostReport(base_served_bytes=1000, quantization="nf4", full_copy_bytes=500,
                        full_copy_dtype="float32", adapter_bytes={"a": 1, "b": 10},
                        slot_table_bytes=100)
    assert [report.adapters_bytes(n) for n in (0, 1, 2, 3, 4)] == [0, 1, 11, 12, 22]
    assert report.loraplex_bytes(3) == 1000 + 100 + 12
    assert report.full_copies_bytes(3) == 1500
    assert report.rows((1, 2)) == [(1, 1101, 500, 500 / 1101), (2, 1111, 1000, 1000 / 1111)]
    with pytest.raises(ValueError, match="no adapters"):
        CostReport(1, "nf4", 1, "float32").loraplex_bytes(1)


def test_ratio_at_100_is_full_copies_over_loraplex(nf4, adapters, demo):
    report = cost_report(nf4, adapters, demo.model_dir)
    five_adapters = sum(adapter_bytes_by_hand(name) for name in DEMO_ADAPTERS)  # 6,709,248
    assert five_adapters == 6_709_248
    loraplex = NF4_SERVED + 20 * five_adapters  # 100 adapters = each of the 5 demo ones 20x
    assert report.loraplex_bytes(100) == loraplex == 137_014_272
    assert report.full_copies_bytes(100) == 100 * FULL_COPY_BYTES == 1_364_070_400
    assert report.ratio(100) == 1_364_070_400 / 137_014_272
    # The table compares with copies served like the base (NF4) and with bf16 copies.
    assert report.served_copies_bytes(100) == 100 * NF4_SERVED == 282_931_200
    assert report.bf16_copies_bytes(100) == 100 * 2 * PARAMETERS == 682_035_200
    table = format_table(report)
    assert f"{282_931_200 / 137_014_272:.2f}x" in table and f"{682_035_200 / 137_014_272:.2f}x" in table


def test_cost_command_prints_the_table_and_writes_a_png(demo_cache, tmp_path):
    png = tmp_path / "cost.png"
    env = {**os.environ, "LORAPLEX_CACHE_DIR": str(demo_cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "server.cli", "cost", "--out", str(png)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # Default slot tables: 32 slots x rank 64 x fp32 over every Linear, + scale and rank vectors
    slot_tables = 32 * 64 * 4864 * LAYERS * 4 + LAYERS * len(LINEARS) * (32 * 4 + 32 * 4)
    assert slot_tables == 159_390_720
    assert f"({NF4_SERVED:,} bytes)" in done.stdout
    assert f"({slot_tables:,} bytes)" in done.stdout
    assert f"({FULL_COPY_BYTES:,} bytes)" in done.stdout
    loraplex_100 = NF4_SERVED + slot_tables + 20 * 6_709_248
    assert f"{100 * NF4_SERVED / loraplex_100:.2f}x" in done.stdout  # 0.95x: the slot tables
    assert f"{100 * 2 * PARAMETERS / loraplex_100:.2f}x" in done.stdout  # 2.30x
    assert f"({2 * PARAMETERS:,} bytes)" in done.stdout  # one bf16 copy
    assert f"chart: {png}" in done.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
