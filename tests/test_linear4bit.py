"""loraplex's 4-bit CPU kernel equals bitsandbytes' own dequantize_4bit + matmul within bf16
rounding; where it cannot run, bitsandbytes serves after one warning.

The bound is per output element and principled: the kernel multiplies x rounded to bf16 (as
bitsandbytes' CPU kernel does) with weights bf16(code) * bf16(absmax), so each weight is within
2**-8 of bitsandbytes' fp32 dequantization, and an output within 2**-8 * (|x| @ |W|ᵀ) of the
reference on the same bf16 x (plus one bf16 rounding of the output when it is bf16).
"""

from __future__ import annotations

import logging

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch

from server.model import linear4bit
from server.model.linear4bit import CpuLinear4bit, use_cpu_kernel

WEIGHT_STEP = 2**-8
BF16_STEP = 2**-8


@pytest.fixture(scope="module")
def kernel():
    if linear4bit.load() is None:
        pytest.skip("the 4-bit CPU kernel cannot run here (see the logged warning)")


def quantized_layer(n_in, n_out, quant_type, compute_dtype, *, blocksize=64, bias=False, seed=0):
    """A bnb Linear4bit quantized on the CPU, and its weight as bitsandbytes dequantizes it."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_out, n_in, generator=gen) * 0.05
    layer = bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=compute_dtype,
                              quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type,
                                     blocksize=blocksize)
    layer.weight._quantize("cpu")
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(n_out, generator=gen), requires_grad=False)
    dequantized = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return layer.eval(), dequantized


def reference_bound(x, w, bias, out_dtype):
    """bitsandbytes' weights times x as the kernel reads it (bf16), and the allowed error."""
    xb = x.to(torch.bfloat16).float()
    ref = xb @ w.t() + (0 if bias is None else bias.float())
    bound = WEIGHT_STEP * (xb.abs() @ w.abs().t()) + 1e-6
    if out_dtype == torch.bfloat16:
        bound += BF16_STEP * ref.abs()
    return ref, bound


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, n_in, n_out, blocksize", [
    (1, 64, 32, 64),      # one quantization block, one 32-row block
    (7, 128, 96, 64),     # a 64-row pair and a single 32-row block
    (65, 192, 64, 64),    # tokens past one chunk of 64
    (33, 256, 160, 128),  # larger quantization blocks
    (5, 576, 1536, 64),   # the SmolLM2 MLP shape
])
def test_kernel_equals_bitsandbytes_dequantize_and_matmul(kernel, quant_type, dtype, tokens,
                                                          n_in, n_out, blocksize):
    layer, w = quantized_layer(n_in, n_out, quant_type, dtype, blocksize=blocksize)
    assert use_cpu_kernel(torch.nn.Sequential(layer)) == 1 and type(layer) is CpuLinear4bit
    x = torch.randn(tokens, n_in, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.inference_mode():
        y = layer(x)
    assert y.dtype == dtype and y.shape == (tokens, n_out)
    ref, bound = reference_bound(x, w, None, dtype)
    assert ((y.float() - ref).abs() <= bound).all()


def test_bias_leading_dims_and_strided_input(kernel):
    layer, w = quantized_layer(128, 64, "nf4", torch.float32, bias=True)
    use_cpu_kernel(torch.nn.Sequential(layer))
    x = torch.randn(3, 4, 256)[..., ::2]  # [3, 4, 128], rows not unit-stride
    with torch.inference_mode():
        y = layer(x)
    ref, bound = reference_bound(x.reshape(-1, 128), w, layer.bias, torch.float32)
    assert y.shape == (3, 4, 64)
    assert ((y.reshape(-1, 64) - ref).abs() <= bound).all()


def test_the_weight_stays_bitsandbytes_and_saves_as_bitsandbytes_own_layer_does(kernel):
    ours, _ = quantized_layer(128, 64, "nf4", torch.float32)
    theirs, _ = quantized_layer(128, 64, "nf4", torch.float32)
    use_cpu_kernel(torch.nn.Sequential(ours))
    with torch.inference_mode():  # each repacks into bitsandbytes' CPU layout
        ours(torch.randn(2, 128))
        theirs(torch.randn(2, 128))
    assert isinstance(ours.weight, bnb.nn.Params4bit)
    assert ours.weight.quant_state.packing_format_for_cpu
    saved, expected = ours.state_dict(), theirs.state_dict()
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)


def test_layers_the_kernel_cannot_take_stay_with_bitsandbytes(kernel):
    fits, _ = quantized_layer(64, 32, "nf4", torch.float32)
    odd, _ = quantized_layer(64, 48, "nf4", torch.float32)  # 48 rows: not whole 32-row blocks
    assert use_cpu_kernel(torch.nn.Sequential(fits, odd)) == 1
    assert type(fits) is CpuLinear4bit and type(odd) is bnb.nn.Linear4bit


def test_a_cpu_without_the_instructions_warns_once_and_bitsandbytes_serves(monkeypatch, caplog):
    class NoBf16:
        @staticmethod
        def supported():
            return False

    monkeypatch.setattr(linear4bit.KERNEL, "load", lambda: NoBf16)
    monkeypatch.setattr(linear4bit, "_warned_unsupported", False)
    with caplog.at_level(logging.WARNING, logger=linear4bit.__name__):
        for _ in range(3):  # three models loading
            layer, _ = quantized_layer(64, 32, "nf4", torch.float32)
            assert use_cpu_kernel(torch.nn.Sequential(layer)) == 0
            assert type(layer) is bnb.nn.Linear4bit
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "AVX512-BF16" in warnings[0].getMessage()


def test_a_failed_build_warns_once_and_bitsandbytes_serves(failing_build, caplog):
    failing_build(linear4bit.KERNEL)
    with caplog.at_level(logging.WARNING, logger=linear4bit.__name__):
        for _ in range(2):
            layer, w = quantized_layer(64, 32, "nf4", torch.float32)
            assert use_cpu_kernel(torch.nn.Sequential(layer)) == 0
            with torch.inference_mode():
                y = layer(torch.ones(1, 64))
            torch.testing.assert_close(y, torch.ones(1, 64) @ w.t(), rtol=2e-2, atol=2e-2)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "c++: not found" in warnings[0].getMessage()


def test_the_loaded_model_uses_the_kernel_unless_told_otherwise(kernel, tiny_model_dir):
    from server.model.loading import load_model

    auto = load_model(tiny_model_dir, quantize="nf4", device="cpu")
    plain = load_model(tiny_model_dir, quantize="nf4", device="cpu", quant_kernel="bitsandbytes")
    kinds = lambda model: {type(m) for m in model.hf.modules()  # noqa: E731
                           if isinstance(m, bnb.nn.Linear4bit)}
    assert kinds(auto) == {CpuLinear4bit} and kinds(plain) == {bnb.nn.Linear4bit}
