"""What an adapter is checked against: the shapes of the served base model's target modules."""

from __future__ import annotations

from dataclasses import dataclass, field

# The Linear modules of a Llama-family decoder layer that LoRA adapters may target.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTENTION_MODULES + MLP_MODULES
# The vocabulary-side modules LoRA adapters may also target, by their path in a HF causal LM.
EMBED_TOKENS = "model.embed_tokens"  # [vocab] -> [hidden]: PEFT's lora_embedding_A / _B
LM_HEAD = "lm_head"  # [hidden] -> [vocab] logits: a Linear, PEFT's lora_A / lora_B
VOCAB_MODULES = (EMBED_TOKENS, LM_HEAD)


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
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens' weight
    vocab_weights: dict = field(default_factory=dict, compare=False)
    """The served [vocab, hidden] weights of EMBED_TOKENS and LM_HEAD (torch tensors), against
    which the copies PEFT saves with embedding adapters (`*.base_layer.weight`) are checked."""

    def module_shape(self, path: str) -> tuple[int, int]:
        """(in, out) of a vocabulary-side module: what its lora_A [r, in] / lora_B [out, r] use."""
        if path == EMBED_TOKENS:
            return self.vocab_size, self.hidden_size
        return self.hidden_size, self.vocab_size
