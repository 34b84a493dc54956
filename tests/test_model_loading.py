"""Loading a model directory: quantization choices and the shapes 4-bit kernels cannot take."""

from __future__ import annotations

import logging

import bitsandbytes as bnb
import pytest
import torch

from adapters_registry.spec import module_path
from server.tools.demo import write_llama_model
from server.model.loading import ModelLoadError, load_model
from tests.conftest import TINY_SHAPE
from tests.engine_helpers import greedy_request, make_core, run_to_completion

QUANTIZED_TYPES = {"nf4": bnb.nn.Linear4bit, "fp4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt,
                   "none": torch.nn.Linear}


@pytest.mark.parametrize("quantize", sorted(QUANTIZED_TYPES))
def test_every_target_linear_gets_the_asked_quantization(tiny_model_dir, quantize):
    model = load_model(tiny_model_dir, quantize=quantize, device="cpu")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert isinstance(model.hf.get_submodule(module_path(1, name)), QUANTIZED_TYPES[quantize])
    assert isinstance(model.hf.lm_head, torch.nn.Linear)  # the output head stays full precision


@pytest.mark.parametrize("quantize", ["fp4", "int8"])
def test_other_quantizations_serve_adapters(tiny_model_dir, tiny_adapter_dirs, quantize):
    core = make_core(tiny_model_dir, tiny_adapter_dirs, quantize=quantize, max_rank=64)
    results = run_to_completion(core, {0: [("base", greedy_request([1, 4, 5], None, 4)),
                                           ("lora", greedy_request([1, 4, 5], "all-r8", 4))]})
    assert all(len(tokens) == 4 for tokens, _, _ in results.values())


def test_a_layer_4bit_cannot_take_stays_unquantized_with_a_warning(tmp_path, caplog):
    # intermediate 96: down_proj's in_features is not a multiple of 64.
    write_llama_model(tmp_path, **{**TINY_SHAPE, "intermediate_size": 96}, seed=1)
    with caplog.at_level(logging.WARNING, logger="server.model.loading"):
        model = load_model(tmp_path, quantize="nf4", device="cpu")
    assert "down_proj (96 -> 128) is left unquantized" in caplog.text
    assert isinstance(model.hf.get_submodule(module_path(0, "down_proj")), torch.nn.Linear)
    assert isinstance(model.hf.get_submodule(module_path(0, "up_proj")), bnb.nn.Linear4bit)
    with torch.inference_mode():
        model.hf(torch.tensor([[1, 2, 3]]))


def test_pickle_only_model_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights"):
        load_model(tmp_path, quantize="none", device="cpu")
