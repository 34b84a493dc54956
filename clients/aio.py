"""The asyncio client: LoraplexClient's API as coroutines and async iterators, over grpc.aio."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients._common import (
    DEFAULT_RETRIES, DEFAULT_TARGET, UPLOAD_CHUNK_BYTES, AdapterFiles, AdapterInfo, GenerateResult,
    LoraplexError, Models, PathOrPem, Progress, ServerInfo, StreamDelta, bearer,
    channel_credentials, channel_options, generate_request, generate_result, inference_metadata,
    models_result, rpc_errors, stream_delta, upload_requests)
from loraplex.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc


class AsyncLoraplexClient:
    """A loraplex server, from asyncio code (create it inside the running loop). Same arguments
    and errors as LoraplexClient."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 admin_token: str | None = None, root_certificates: PathOrPem | None = None,
                 client_certificate: PathOrPem | None = None, client_key: PathOrPem | None = None,
                 timeout: float | None = None, retries: int = DEFAULT_RETRIES):
        credentials = channel_credentials(root_certificates, client_certificate, client_key)
        options = channel_options(retries)
        self._channel = (grpc.aio.secure_channel(target, credentials, options) if credentials
                         else grpc.aio.insecure_channel(target, options))
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._inference_metadata = bearer(token)
        self._admin_metadata = bearer(admin_token)
        self._timeout = timeout

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncLoraplexClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call_admin(self, method, request):
        with rpc_errors():
            return await method(request, metadata=self._admin_metadata, timeout=self._timeout)

    # Inference

    async def generate(self, prompt: str | None = None, *,
                       prompt_token_ids: Sequence[int] | None = None, adapter: str | None = None,
                       max_new_tokens: int | None = None, temperature: float | None = None,
                       top_p: float | None = None, top_k: int | None = None,
                       seed: int | None = None, stop: str | Sequence[str] | None = None,
                       stop_token_ids: Sequence[int] | None = None,
                       repetition_penalty: float | None = None, ignore_eos: bool | None = None,
                       logprobs: bool = False, top_logprobs: int = 0,
                       structured_output: dict | None = None,
                       adapter_mixture: dict | None = None,
                       chat: bool = False, timeout: float | None = None) -> GenerateResult:
        request = generate_request(
            prompt, prompt_token_ids, adapter, logprobs, chat, top_logprobs, structured_output,
            adapter_mixture, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            stop_token_ids=stop_token_ids, repetition_penalty=repetition_penalty,
            ignore_eos=ignore_eos)
        with rpc_errors():
            response = await self._inference.Generate(
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
               chat: bool = False, timeout: float | None = None) -> AsyncIterator[StreamDelta]:
        """`async for delta in client.stream(...)`; `aclose()` on it, or dropping it as leaving
        the loop early does, cancels the request."""
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

    async def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        request = inference_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        with rpc_errors():
            response = await self._inference.Tokenize(request, metadata=self._inference_metadata,
                                                      timeout=self._timeout)
        return list(response.token_ids)

    async def list_models(self) -> Models:
        with rpc_errors():
            response = await self._inference.ListModels(
                inference_pb2.ListModelsRequest(), metadata=self._inference_metadata,
                timeout=self._timeout)
        return models_result(response)

    # Admin

    async def upload_adapter(self, name: str, directory: str | os.PathLike, *,
                             version: int | None = None, chunk_size: int = UPLOAD_CHUNK_BYTES,
                             progress: Progress | None = None) -> AdapterInfo:
        files = await asyncio.to_thread(AdapterFiles.read, directory)  # hashes the weights
        requests = upload_requests(name, files, version, chunk_size, progress)
        return await self._call_admin(self._admin.UploadAdapter, requests)

    async def register_adapter(self, name: str, source: str) -> AdapterInfo:
        return await self._call_admin(self._admin.RegisterAdapter,
                                      admin_pb2.RegisterAdapterRequest(name=name, source=source))

    async def get_adapter(self, name: str) -> AdapterInfo:
        return await self._call_admin(self._admin.GetAdapter,
                                      admin_pb2.GetAdapterRequest(name=name))

    async def list_adapters(self, page_size: int = 100) -> list[AdapterInfo]:
        adapters, token = [], ""
        while True:
            page = await self._call_admin(self._admin.ListAdapters, admin_pb2.ListAdaptersRequest(
                page_size=page_size, page_token=token))
            adapters.extend(page.adapters)
            if not page.next_page_token:
                return adapters
            if page.next_page_token == token:
                raise LoraplexError(grpc.StatusCode.INTERNAL,
                                    f"server repeated page token {token!r}")
            token = page.next_page_token

    async def delete_adapter(self, name: str) -> None:
        await self._call_admin(self._admin.DeleteAdapter, admin_pb2.DeleteAdapterRequest(name=name))

    async def pin_adapter(self, name: str) -> AdapterInfo:
        return await self._call_admin(self._admin.PinAdapter,
                                      admin_pb2.PinAdapterRequest(name=name))

    async def unpin_adapter(self, name: str) -> AdapterInfo:
        return await self._call_admin(self._admin.UnpinAdapter,
                                      admin_pb2.UnpinAdapterRequest(name=name))

    async def server_info(self) -> ServerInfo:
        return await self._call_admin(self._admin.GetServerInfo, admin_pb2.GetServerInfoRequest())

    # Health (needs no token)

    async def health(self, service: str = "") -> str:
        with rpc_errors():
            response = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                                timeout=self._timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def _deltas(call) -> AsyncIterator[StreamDelta]:
    try:
        with rpc_errors():
            async for response in call:
                yield stream_delta(response)
    finally:
        call.cancel()  # a no-op once the stream is done
