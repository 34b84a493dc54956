"""Unquantized Linear layers prepacked for oneDNN equal F.linear; the copy is counted; off = plain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.model import dense
from server.model.dense import PackedLinear, use_packed_linears
from server.model.memory import model_bytes_as_served

pytestmark = pytest.mark.skipif(not dense.available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 32, 100])
def test_packed_equals_f_linear(dtype, tokens):
    gen = torch.Generator().manual_seed(tokens)
    layer = torch.nn.Linear(96, 160, bias=True).to(dtype)
    x = torch.randn(tokens, 96, generator=gen).to(dtype)
    want = F.linear(x, layer.weight, layer.bias)
    assert use_packed_linears(torch.nn.Sequential(layer)) == 1 and type(layer) is PackedLinear
    with torch.inference_mode():
        got = layer(x)
    assert got.dtype == dtype and got.shape == want.shape
    # fp32: sums in another order; bf16: one rounding of the output apart
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)


def test_an_input_of_another_dtype_runs_the_plain_weight():
    layer = torch.nn.Linear(32, 32).bfloat16()
    use_packed_linears(torch.nn.Sequential(layer))
    x = torch.randn(3, 32)  # fp32 into a bf16 layer: what F.linear does (here: a dtype error)
    with pytest.raises(RuntimeError, match="dtype"):
        layer(x)


def test_the_packed_copy_is_counted_and_off_packs_nothing(tiny_model_dir):
    from server.model.loading import load_model

    packed = load_model(tiny_model_dir, quantize="none", device="cpu")
    plain = load_model(tiny_model_dir, quantize="none", device="cpu", prepack="off")
    linears = [m for m in packed.hf.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is PackedLinear for m in linears)
    assert not any(isinstance(m, PackedLinear) for m in plain.hf.modules())
    copies = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    assert model_bytes_as_served(packed.hf) == model_bytes_as_served(plain.hf) + copies
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.inference_mode():
        torch.testing.assert_close(packed.hf(ids).logits, plain.hf(ids).logits,
                                   rtol=1e-4, atol=1e-4)
