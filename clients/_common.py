"""What the sync and asyncio clients share: result types, errors, request building, upload files.

Imports only grpc, protobuf and the generated stubs: a client machine needs no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from loraplex.v1 import admin_pb2, inference_pb2

DEFAULT_TARGET = "127.0.0.1:50051"
ADAPTER_HEADER = "x-adapter-id"  # Inference calls carry the adapter here too, for proxies
UPLOAD_CHUNK_BYTES = 1 << 20  # the size admin.proto recommends

# The protobuf messages are the public types: typed by their .pyi stubs, nothing to keep in sync.
AdapterInfo = admin_pb2.AdapterInfo
ServerInfo = admin_pb2.ServerInfo

Progress = Callable[[int, int], None]  # (sent_bytes, total_bytes)
PathOrPem = str | os.PathLike | bytes  # a PEM file's path, or its content


class LoraplexError(Exception):
    """An RPC failed. `code`: a grpc.StatusCode; `str()`: "CODE: details", e.g.
    "NOT_FOUND: adapter 'x' is not registered"."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    def __reduce__(self):  # picklable, e.g. across a process pool
        return type(self), (self.code, self.details)


@contextmanager
def rpc_errors() -> Iterator[None]:
    """Re-raises a grpc.RpcError (sync or aio) as a LoraplexError."""
    try:
        yield
    except grpc.RpcError as error:
        raise LoraplexError(error.code(), error.details() or "") from None


@dataclass(frozen=True)
class GenerateResult:
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "length", "stop", "eos" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float]  # one per token id when requested, else empty
    cached_prompt_tokens: int = 0  # of prompt_tokens, found in the server's prefix cache
    # per token, with top_logprobs: the most likely (token id, logprob), most likely first
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass(frozen=True)
class StreamDelta:
    text: str  # the new text only
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None  # set on the last delta
    prompt_tokens: int | None = None  # usage: set on the last delta
    completion_tokens: int | None = None
    cached_prompt_tokens: int | None = None
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass(frozen=True)
class Models:
    """What a server serves (ListModels, as HTTP's /v1/models)."""

    base_model: str  # the base model's id
    chat_template: bool  # its tokenizer has one: `chat=True` works
    adapters: list[str]  # the adapters usable now, by name


def models_result(response: inference_pb2.ListModelsResponse) -> Models:
    return Models(base_model=response.base_model, chat_template=response.chat_template,
                  adapters=list(response.adapters))


def _finish_reason(value: int) -> str | None:
    if value == inference_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    return inference_pb2.FinishReason.Name(value).lower()


def generate_request(prompt: str | None, prompt_token_ids: Sequence[int] | None,
                     adapter: str | None, logprobs: bool, chat: bool = False,
                     top_logprobs: int = 0, structured_output: dict | None = None,
                     adapter_mixture: dict | None = None,
                     **params) -> inference_pb2.GenerateRequest:
    """`params` are SamplingParams fields; only those not None are set, and `params` itself only
    when one is, so the server's defaults apply to everything the caller left out. `chat`: the
    prompt is sent as one user message, for the server to render with the model's chat
    template."""
    if (prompt is None) == (prompt_token_ids is None):
        raise ValueError("give exactly one of prompt and prompt_token_ids")
    if chat and prompt is None:
        raise ValueError("chat needs a prompt (text), not token ids")
    messages = [inference_pb2.ChatMessage(role="user", content=prompt)] if chat else ()
    request = inference_pb2.GenerateRequest(
        prompt="" if chat else prompt or "", prompt_token_ids=prompt_token_ids or (),
        messages=messages, adapter_id=adapter or "", return_logprobs=logprobs or top_logprobs > 0,
        top_logprobs=top_logprobs)
    if structured_output is not None:
        request.structured_output.CopyFrom(_structured_output(structured_output))
    if adapter_mixture is not None:
        if adapter:
            raise ValueError("give adapter or adapter_mixture, not both")
        request.adapter_mixture.CopyFrom(_adapter_mixture(adapter_mixture))
    given = {key: value for key, value in params.items() if value is not None}
    if isinstance(given.get("stop"), str):
        given["stop"] = [given["stop"]]
    if given:
        request.params.CopyFrom(inference_pb2.SamplingParams(**given))
    return request


def _structured_output(spec: dict) -> inference_pb2.StructuredOutput:
    """{"json_schema": schema (a dict or its text)} | {"json_object": True} | {"regex": str} |
    {"choice": [str, ...]} | {"grammar": EBNF text}."""
    if len(spec) != 1:
        raise ValueError("structured_output names one of json_schema, json_object, regex, "
                         "choice, grammar")
    (kind, value), = spec.items()
    if kind == "json_schema" and not isinstance(value, str):
        value = json.dumps(value)
    if kind == "choice":
        return inference_pb2.StructuredOutput(choice=inference_pb2.Choices(choices=list(value)))
    return inference_pb2.StructuredOutput(**{kind: value})


def _adapter_mixture(spec: dict) -> inference_pb2.AdapterMixture:
    """{"adapters": [names], "weights": [numbers], "combination_type": "linear" (default) |
    "cat" | "svd" | "ties", "density": number (ties)}: the same object as the HTTP API's."""
    unknown = set(spec) - {"adapters", "weights", "combination_type", "density"}
    if unknown:
        raise ValueError(f"adapter_mixture has unknown keys: {', '.join(sorted(unknown))}")
    return inference_pb2.AdapterMixture(
        adapter_ids=list(spec.get("adapters", ())), weights=list(spec.get("weights", ())),
        combination_type=spec.get("combination_type") or "", density=spec.get("density"))


def _top(response: inference_pb2.GenerateResponse) -> list[list[tuple[int, float]]]:
    return [list(zip(t.token_ids, t.logprobs)) for t in response.top_logprobs]


def generate_result(response: inference_pb2.GenerateResponse) -> GenerateResult:
    return GenerateResult(
        text=response.text, token_ids=list(response.token_ids),
        finish_reason=_finish_reason(response.finish_reason),
        prompt_tokens=response.usage.prompt_tokens,
        completion_tokens=response.usage.completion_tokens, logprobs=list(response.logprobs),
        cached_prompt_tokens=response.usage.cached_prompt_tokens, top_logprobs=_top(response))


def stream_delta(response: inference_pb2.GenerateResponse) -> StreamDelta:
    usage = response.usage if response.HasField("usage") else None
    return StreamDelta(
        text=response.text, token_ids=list(response.token_ids), logprobs=list(response.logprobs),
        finish_reason=_finish_reason(response.finish_reason),
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        cached_prompt_tokens=usage.cached_prompt_tokens if usage else None,
        top_logprobs=_top(response))


@dataclass(frozen=True)
class AdapterFiles:
    """The two files of a PEFT adapter directory, as UploadAdapter sends them."""

    config_json: str
    weights: Path
    size: int
    sha256: str

    @classmethod
    def read(cls, directory: str | os.PathLike) -> AdapterFiles:
        """Raises FileNotFoundError, before any RPC, when a file is missing."""
        directory = Path(directory)
        config, weights = directory / "adapter_config.json", directory / "adapter_model.safetensors"
        if not weights.is_file():
            bin_file = directory / "adapter_model.bin"
            found = f" (found {bin_file.name})" if bin_file.exists() else ""
            raise FileNotFoundError(
                f"{weights} not found{found}: only safetensors weights are accepted; convert a "
                f"pickle .bin adapter to adapter_model.safetensors first (e.g. load it with PEFT "
                f"and save_pretrained(..., safe_serialization=True))")
        if not config.is_file():
            raise FileNotFoundError(f"{config} not found: not a PEFT adapter directory")
        digest = hashlib.sha256()
        with weights.open("rb") as f:
            for block in iter(lambda: f.read(UPLOAD_CHUNK_BYTES), b""):
                digest.update(block)
        return cls(config_json=config.read_text(encoding="utf-8"), weights=weights,
                   size=weights.stat().st_size, sha256=digest.hexdigest())


def upload_requests(name: str, files: AdapterFiles, version: int | None, chunk_size: int,
                    progress: Progress | None) -> Iterator[admin_pb2.UploadAdapterRequest]:
    """The header, then the weights in chunks of at most `chunk_size` bytes. `progress` is called
    with 0 after the header and after each chunk is taken by gRPC, ending at (size, size)."""
    if chunk_size <= 0:  # here, not in the generator: gRPC would turn it into CANCELLED
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _upload_requests(name, files, version, chunk_size, progress)


def _upload_requests(name, files, version, chunk_size, progress):
    header = admin_pb2.UploadHeader(name=name, version=version, sha256=files.sha256,
                                    size=files.size, adapter_config_json=files.config_json)
    yield admin_pb2.UploadAdapterRequest(header=header)
    sent = 0
    if progress:
        progress(sent, files.size)
    with files.weights.open("rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            yield admin_pb2.UploadAdapterRequest(chunk=chunk)
            sent += len(chunk)
            if progress:
                progress(sent, files.size)


def _pem(value: PathOrPem | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


DEFAULT_RETRIES = 3
RETRYABLE = ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
IDEMPOTENT = {  # safe to send again: they change nothing on the server
    "loraplex.v1.Inference": ["Generate", "GenerateStream", "Tokenize", "ListModels"],
    "loraplex.v1.Admin": ["GetAdapter", "ListAdapters", "GetServerInfo"],
}


def channel_options(retries: int) -> list[tuple[str, object]]:
    """gRPC's own retry policy (its service config) for the idempotent calls: up to `retries`
    more attempts after UNAVAILABLE or RESOURCE_EXHAUSTED, with exponential backoff, or after
    the delay the server asks for in `grpc-retry-pushback-ms`. A stream is retried only before
    its first message. 0 turns retries off; uploads, registrations, deletes and pins are never
    retried."""
    if retries <= 0:
        return [("grpc.enable_retries", 0)]
    policy = {"maxAttempts": min(retries + 1, 5), "initialBackoff": "0.2s",
              "maxBackoff": "5s", "backoffMultiplier": 2, "retryableStatusCodes": RETRYABLE}
    names = [{"service": service, "method": method}
             for service, methods in IDEMPOTENT.items() for method in methods]
    config = {"methodConfig": [{"name": names, "retryPolicy": policy}]}
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]


def channel_credentials(root_certificates: PathOrPem | None, client_certificate: PathOrPem | None,
                        client_key: PathOrPem | None) -> grpc.ChannelCredentials | None:
    """TLS when any of the three is given (no root certificates: the system's); else None."""
    if (client_certificate is None) != (client_key is None):
        raise ValueError("client_certificate and client_key go together (mTLS)")
    if root_certificates is None and client_certificate is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=_pem(root_certificates),
                                        private_key=_pem(client_key),
                                        certificate_chain=_pem(client_certificate))


def bearer(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def inference_metadata(metadata: tuple[tuple[str, str], ...] | None, adapter: str | None
                       ) -> tuple[tuple[str, str], ...] | None:
    """`metadata` plus `x-adapter-id: <adapter>`, so that a proxy can route by adapter (consistent
    hashing) without parsing the protobuf body. A name that cannot be a header value (not
    printable ASCII) is left out: the server then answers for it as for any invalid name."""
    if not adapter or not (adapter.isascii() and adapter.isprintable()):
        return metadata
    return (*(metadata or ()), (ADAPTER_HEADER, adapter))
