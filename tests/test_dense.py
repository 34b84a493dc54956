"""Unquantized Linear layers prepacked for oneDNN equal F.linear. The decoder's Linears keep only
the packed weight (no memory cost); lm_head, packed only with --prepack all, keeps its plain weight
too, and the copy is counted in the base as served."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.model import dense
from server.model.dense import PackedLinear, pack_linear
from server.model.loading import load_model
from server.model.memory import model_bytes_as_served

pytestmark = pytest.mark.skipif(not dense.available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 32, 100])
def test_packed_equals_f_linear(dtype, tokens):
    gen = torch.Generator().manual_seed(tokens)
    layer = torch.nn.Linear(96, 160, bias=True).to(dtype)
    x = torch.randn(tokens, 96, generator=gen).to(dtype)
    want = F.linear(x, layer.weight, layer.bias)
    pack_linear(layer, keep_weight=False)
    assert type(layer) is PackedLinear and layer.weight.numel() == 0
    with torch.inference_mode():
        got = layer(x)
    assert got.dtype == dtype and got.shape == want.shape
    # fp32: sums in another order; bf16: one rounding of the output apart
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return {mode: load_model(tiny_model_dir, quantize="none", device="cpu", prepack=mode)
            for mode in ("auto", "all", "off")}


def test_auto_packs_the_decoder_in_place_and_all_adds_a_copy_of_lm_head(models):
    def packed(model):
        return {name for name, m in model.hf.named_modules() if isinstance(m, PackedLinear)}

    decoder = {name for name, m in models["off"].hf.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    assert len(decoder) == 14 and not packed(models["off"])
    assert packed(models["auto"]) == decoder
    assert packed(models["all"]) == decoder | {"lm_head"}
    head = models["all"].hf.lm_head
    head_bytes = head.weight.numel() * head.weight.element_size()
    assert head_bytes > 0  # lm_head keeps its plain weight beside the packed copy
    off = model_bytes_as_served(models["off"].hf)
    assert model_bytes_as_served(models["auto"].hf) == off
    assert model_bytes_as_served(models["all"].hf) == off + head_bytes


def test_packed_models_give_the_same_logits(models):
    ids = torch.tensor([[1, 5, 9, 200, 17]])
    with torch.inference_mode():
        logits = {mode: model.hf(ids).logits for mode, model in models.items()}
    torch.testing.assert_close(logits["auto"], logits["off"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits["all"], logits["off"], rtol=1e-4, atol=1e-4)
