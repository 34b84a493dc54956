"""Adapters the served model cannot take, refused through the Admin API with INVALID_ARGUMENT and a
message that says why: a rank above --max-rank, and real PEFT adapters trained on Llamas of
another shape (fewer layers; another width)."""

from __future__ import annotations

import grpc
import pytest
import torch

from clients import LoraplexClient, LoraplexError
from server.serving import Tokens
from server.tools.demo import write_llama_model, write_lora_adapter
from tests.conftest import ALL_LINEAR, TINY_SHAPE
from tests.engine_helpers import make_core
from tests.inprocess_server import serving

MAX_RANK = 8
ADMIN = "admin-token"


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    core = make_core(tiny_model_dir, {}, max_slots=2, max_rank=MAX_RANK)
    with serving(core, tokens=Tokens(admin=ADMIN.encode(), inference=None)) as (_, running):
        with LoraplexClient(f"127.0.0.1:{running.port}", admin_token=ADMIN, timeout=60) as c:
            yield c


def peft_adapter(directory, base_model_dir):
    """A LoRA adapter saved by PEFT itself for the model in `base_model_dir`, B made nonzero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2, generator=torch.Generator().manual_seed(5))
    model.save_pretrained(str(directory))
    return directory


def assert_refused(client, name: str, directory, *words: str) -> None:
    with pytest.raises(LoraplexError) as error:
        client.upload_adapter(name, directory)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert all(word in error.value.details for word in words), error.value.details
    with pytest.raises(LoraplexError) as missing:  # nothing was stored
        client.get_adapter(name)
    assert missing.value.code == grpc.StatusCode.NOT_FOUND


def test_a_rank_above_max_rank_is_invalid_argument(client, tiny_model_dir, tmp_path):
    directory = tmp_path / "r16"
    write_lora_adapter(directory, base_model_dir=tiny_model_dir, r=2 * MAX_RANK, lora_alpha=16,
                       target_modules=["q_proj", "v_proj"], seed=3, init_std=0.2)
    assert_refused(client, "too-wide", directory, "rank 16", "max rank 8")


@pytest.mark.parametrize("other, why", [
    (dict(num_hidden_layers=3), ["layer 2 out of range", "2 layers"]),  # one layer more
    (dict(hidden_size=64, intermediate_size=128), ["shape [4, 128], expected [4, 256]"]),  # narrower
])
def test_a_real_adapter_for_another_base_shape_is_invalid_argument(client, tmp_path, other, why):
    base = tmp_path / "other-base"
    write_llama_model(base, **{**TINY_SHAPE, **other}, seed=9)
    directory = peft_adapter(tmp_path / "adapter", base)
    assert_refused(client, "other-base", directory, *why)
