"""The blocking client: one channel, the Inference, Admin and health stubs on it."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients._common import (
    DEFAULT_RETRIES, DEFAULT_TARGET, UPLOAD_CHUNK_BYTES, AdapterFiles, AdapterInfo, GenerateResult,
    LoraplexError, Models, PathOrPem, Progress, ServerInfo, StreamDelta, bearer,
    channel_credentials, channel_options, generate_request, generate_result, inference_metadata,
    models_result, rpc_errors, stream_delta, upload_requests)
from loraplex.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc


class LoraplexClient:
    """A loraplex server. `token` goes with Inference calls, `admin_token` with Admin calls;
    `timeout` (seconds) is the default deadline of every call;
    `retries`: more attempts of an idempotent call after UNAVAILABLE or RESOURCE_EXHAUSTED
    (gRPC's retry policy, honouring the server's retry hint; 0 = off). Every RPC failure raises
    LoraplexError."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 admin_token: str | None = None, root_certificates: PathOrPem | None = None,
                 client_certificate: PathOrPem | None = None, client_key: PathOrPem | None = None,
                 timeout: float | None = None, retries: int = DEFAULT_RETRIES):
        credentials = channel_credentials(root_certificates, client_certificate, client_key)
        options = channel_options(retries)
        self._channel = (grpc.secure_channel(target, credentials, options) if credentials
                         else grpc.insecure_channel(target, options))
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._inference_metadata = bearer(token)
        self._admin_metadata = bearer(admin_token)
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LoraplexClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call_admin(self, method, request):
        with rpc_errors():
            return method(request, metadata=self._admin_metadata, timeout=self._timeout)

    # Inference

    def generate(self, prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                 adapter: str | None = None, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None,
                 stop_token_ids: Sequence[int] | None = None,
                 repetition_penalty: float | None = None, ignore_eos: bool | None = None,
                 logprobs: bool = False, top_logprobs: int = 0,
                 structured_output: dict | None = None,
                 adapter_mixture: dict | None = None,
                 chat: bool = False, timeout: float | None = None) -> GenerateResult:
        """A whole completion. Sampling parameters left None take the server's defaults.
        `adapter_mixture`, instead of `adapter`: several adapters with weights, as
        {"adapters": [names], "weights": [numbers], "combination_type": "linear" | "cat" |
        "svd" | "ties", "density": number (ties only)}."""
        request = generate_request(
            prompt, prompt_token_ids, adapter, logprobs, chat, top_logprobs, structured_output,
            adapter_mixture, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            stop_token_ids=stop_token_ids, repetition_penalty=repetition_penalty,
            ignore_eos=ignore_eos)
        with rpc_errors():
            response = self._inference.Generate(
                request, metadata=inference_metadata(self._inference_metadata, adapter),
                timeout=self._timeout if timeout is None else timeout)
        return generate_result(response)

    def stream(self, prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
               adapter: str | None = None, max_new_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None,
               top_k: int | None = None, seed: int | None = None,
               stop: str | Sequence[str] | None = None,
               stop_token_ids: Sequence[int] | None = None,
               repetition_penalty: float | None = None, ignore_eos: bool | None = None,
               logprobs: bool = False, top_logprobs: int = 0,
               structured_output: dict | None = None,
               adapter_mixture: dict | None = None,
               chat: bool = False, timeout: float | None = None) -> Iterator[StreamDelta]:
        """Deltas as they are produced; the last carries finish_reason and usage. Closing the
        iterator, or dropping it as leaving a for loop early does, cancels the request."""
        request = generate_request(
            prompt, prompt_token_ids, adapter, logprobs, chat, top_logprobs, structured_output,
            adapter_mixture, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            stop_token_ids=stop_token_ids, repetition_penalty=repetition_penalty,
            ignore_eos=ignore_eos)
        call = self._inference.GenerateStream(
            request, metadata=inference_metadata(self._inference_metadata, adapter),
            timeout=self._timeout if timeout is None else timeout)
        return _deltas(call)

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        request = inference_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        with rpc_errors():
            response = self._inference.Tokenize(request, metadata=self._inference_metadata,
                                                timeout=self._timeout)
        return list(response.token_ids)

    def list_models(self) -> Models:
        """The base model, whether it has a chat template, and the adapters usable now; needs
        only the inference token (unlike list_adapters, and on a server without the Admin
        service too)."""
        with rpc_errors():
            response = self._inference.ListModels(
                inference_pb2.ListModelsRequest(), metadata=self._inference_metadata,
                timeout=self._timeout)
        return models_result(response)

    # Admin

    def upload_adapter(self, name: str, directory: str | os.PathLike, *, version: int | None = None,
                       chunk_size: int = UPLOAD_CHUNK_BYTES,
                       progress: Progress | None = None) -> AdapterInfo:
        """Uploads the PEFT adapter in `directory` (adapter_config.json and
        adapter_model.safetensors). Raises FileNotFoundError before any RPC if one is missing."""
        files = AdapterFiles.read(directory)
        requests = upload_requests(name, files, version, chunk_size, progress)
        return self._call_admin(self._admin.UploadAdapter, requests)

    def register_adapter(self, name: str, source: str) -> AdapterInfo:
        """`source`: s3://bucket/prefix, or a directory under the server's adapter source roots."""
        return self._call_admin(self._admin.RegisterAdapter,
                                admin_pb2.RegisterAdapterRequest(name=name, source=source))

    def get_adapter(self, name: str) -> AdapterInfo:
        return self._call_admin(self._admin.GetAdapter, admin_pb2.GetAdapterRequest(name=name))

    def list_adapters(self, page_size: int = 100) -> list[AdapterInfo]:
        """All adapters in name order, fetched `page_size` at a time."""
        adapters, token = [], ""
        while True:
            page = self._call_admin(self._admin.ListAdapters, admin_pb2.ListAdaptersRequest(
                page_size=page_size, page_token=token))
            adapters.extend(page.adapters)
            if not page.next_page_token:
                return adapters
            if page.next_page_token == token:
                raise LoraplexError(grpc.StatusCode.INTERNAL,
                                    f"server repeated page token {token!r}")
            token = page.next_page_token

    def delete_adapter(self, name: str) -> None:
        self._call_admin(self._admin.DeleteAdapter, admin_pb2.DeleteAdapterRequest(name=name))

    def pin_adapter(self, name: str) -> AdapterInfo:
        return self._call_admin(self._admin.PinAdapter, admin_pb2.PinAdapterRequest(name=name))

    def unpin_adapter(self, name: str) -> AdapterInfo:
        return self._call_admin(self._admin.UnpinAdapter, admin_pb2.UnpinAdapterRequest(name=name))

    def server_info(self) -> ServerInfo:
        return self._call_admin(self._admin.GetServerInfo, admin_pb2.GetServerInfoRequest())

    # Health (needs no token)

    def health(self, service: str = "") -> str:
        """"SERVING", "NOT_SERVING", ...; `service` "" = the whole server."""
        with rpc_errors():
            response = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                          timeout=self._timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _deltas(call) -> Iterator[StreamDelta]:
    try:
        with rpc_errors():
            for response in call:
                yield stream_delta(response)
    finally:
        call.cancel()  # a no-op once the stream is done
