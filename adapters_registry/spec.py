"""What an adapter is checked against: the shapes of the served base model's target modules."""

from __future__ import annotations

from dataclasses import dataclass

# The Linear modules of a Llama-family decoder layer that LoRA adapters may target.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTENTION_MODULES + MLP_MODULES


def module_path(layer: int, module: str) -> str:
    """The module's name inside a HF causal LM, e.g. `model.layers.3.self_attn.q_proj`."""
    block = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"model.layers.{layer}.{block}.{module}"


@dataclass(frozen=True)
class BaseModelSpec:
    """Shapes of the base model that adapters must match.

    `linear_shapes[module] = (in_features, out_features)`; every decoder layer has the same.
    """

    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    linear_shapes: dict[str, tuple[int, int]]
