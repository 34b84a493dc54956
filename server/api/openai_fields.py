"""OpenAI request fields that map onto the engine's, and the log-probability pieces of answers.

Structured output comes as OpenAI's `response_format` (`json_object`, `json_schema`) or with
vLLM's names in `extra_body`: `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`,
or `structured_outputs: {json | regex | choice | grammar}`. A request names at most one.

A weighted mixture of adapters comes in `extra_body` as `adapter_mixture: {adapters: [names],
weights: [numbers], combination_type: linear | cat | svd | ties, density: number}` (PEFT's
add_weighted_adapter names), with `model` naming the base model.
"""

from __future__ import annotations

import json

from adapters_registry.mixtures import AdapterMix
from server.engine.structured import StructuredOutput
from server.errors import InvalidRequest

MIN_LOGPROB = -9999.0  # -inf is not JSON
GUIDED_FIELDS = {"guided_json": "json_schema", "guided_regex": "regex",
                 "guided_choice": "choice", "guided_grammar": "grammar"}
STRUCTURED_OUTPUTS_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice",
                           "grammar": "grammar"}


def structured_output(fields: dict) -> StructuredOutput | None:
    """The one constraint among a body's fields (`fields`: its undeclared ones), or None."""
    found = []
    response_format = fields.get("response_format")
    if response_format is not None:
        found += _response_format(response_format)
    for name, kind in GUIDED_FIELDS.items():
        if fields.get(name) is not None:
            found.append((name, _constraint(kind, fields[name], name)))
    outputs = fields.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, dict):
            raise InvalidRequest("structured_outputs must be an object")
        for key, kind in STRUCTURED_OUTPUTS_KEYS.items():
            if outputs.get(key) is not None:
                found.append((f"structured_outputs.{key}",
                              _constraint(kind, outputs[key], f"structured_outputs.{key}")))
    if len(found) > 1:
        raise InvalidRequest(f"give one structured output constraint, not "
                             f"{', '.join(name for name, _ in found)}")
    return found[0][1] if found else None


def adapter_mixture(fields: dict) -> AdapterMix | None:
    """The body's `adapter_mixture` (`fields`: its undeclared ones), or None."""
    value = fields.get("adapter_mixture")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest("adapter_mixture must be an object: {adapters, weights, "
                             "combination_type, density}")
    unknown = set(value) - {"adapters", "weights", "combination_type", "density"}
    if unknown:
        raise InvalidRequest(f"adapter_mixture has unknown fields: {', '.join(sorted(unknown))}")
    adapters, weights = value.get("adapters"), value.get("weights")
    if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
        raise InvalidRequest("adapter_mixture.adapters must be a list of adapter names")
    if not isinstance(weights, list) or not all(_is_number(w) for w in weights):
        raise InvalidRequest("adapter_mixture.weights must be a list of numbers")
    combination = value.get("combination_type", "linear")
    if not isinstance(combination, str):
        raise InvalidRequest("adapter_mixture.combination_type must be a string")
    density = value.get("density")
    if density is not None and not _is_number(density):
        raise InvalidRequest("adapter_mixture.density must be a number")
    return AdapterMix(tuple(adapters), tuple(weights), combination, density)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _response_format(value) -> list[tuple[str, StructuredOutput]]:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return []
    if kind == "json_object":
        return [("response_format", StructuredOutput("json_object"))]
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            raise InvalidRequest("response_format.json_schema.schema is required")
        return [("response_format", _constraint("json_schema", schema, "response_format"))]
    raise InvalidRequest("response_format.type must be text, json_object or json_schema")


def _constraint(kind: str, value, name: str) -> StructuredOutput:
    if kind == "json_schema":
        if isinstance(value, str):
            return StructuredOutput(kind, value)
        if isinstance(value, (dict, bool)):
            return StructuredOutput(kind, json.dumps(value))
        raise InvalidRequest(f"{name} must be a JSON schema (an object, or its text)")
    if kind == "choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise InvalidRequest(f"{name} must be a list of strings")
        return StructuredOutput(kind, tuple(value))
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string")
    return StructuredOutput(kind, value)


# ---- log-probabilities in answers ---------------------------------------------------------------

def token_texts(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([t]) for t in ids]


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


def completion_logprobs(tokenizer, ids: list[int], lps: list[float],
                        tops: list[list[tuple[int, float]]] | None, offset: int) -> dict:
    """The completions API's `logprobs` for these tokens; `offset`: the characters of text
    before the first of them (the echoed prompt, earlier chunks)."""
    texts = token_texts(tokenizer, ids)
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    top = None
    if tops is not None:
        top = [{tokenizer.decode([t]): _logprob(lp) for t, lp in alternatives}
               for alternatives in tops]
    return {"tokens": texts, "token_logprobs": [_logprob(lp) for lp in lps],
            "top_logprobs": top, "text_offset": offsets}


def echoed_prompt_logprobs(tokenizer, ids: list[int],
                           entries: list[tuple[float, list[tuple[int, float]]]],
                           top: int) -> dict:
    """The completions API's `logprobs` for an echoed prompt: its first token has none."""
    texts = token_texts(tokenizer, ids)
    offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    alternatives = [{tokenizer.decode([t]): _logprob(lp) for t, lp in alts} for _, alts in entries]
    return {"tokens": texts, "token_logprobs": [None] + [_logprob(lp) for lp, _ in entries],
            "top_logprobs": [None] + alternatives if top else None, "text_offset": offsets}


def chat_logprobs(tokenizer, ids: list[int], lps: list[float],
                  tops: list[list[tuple[int, float]]] | None) -> dict:
    content = []
    for i, (text, lp) in enumerate(zip(token_texts(tokenizer, ids), lps)):
        alternatives = []
        for t, alt in (tops[i] if tops else []):
            alt_text = tokenizer.decode([t])
            alternatives.append({"token": alt_text, "logprob": _logprob(alt),
                                 "bytes": _bytes(alt_text)})
        content.append({"token": text, "logprob": _logprob(lp), "bytes": _bytes(text),
                        "top_logprobs": alternatives})
    return {"content": content}


def _bytes(text: str) -> list[int] | None:
    """A token holding part of a UTF-8 character decodes to U+FFFD: its bytes are unknown."""
    return None if "\ufffd" in text else list(text.encode())
