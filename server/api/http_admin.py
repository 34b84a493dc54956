"""Adapter management over HTTP, with the admin token (Bearer), on the registry that gRPC Admin
uses, with its validation, source roots and S3 rules.

- vLLM's routes, as the Gateway API Inference Extension's lora-syncer and operators call them:
  `POST /v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace"}` registers an adapter
  from a directory under --adapter-source-roots or s3://bucket/prefix (a name already loaded
  is 400 unless `load_inplace`, which stores the new content as the next version), and
  `POST /v1/unload_lora_adapter {"lora_name"}` deletes one (404 when unknown). Success is
  200 with vLLM's plain-text sentence.
- The web page's: `POST /api/admin/adapters/NAME/pin|unpin`, `DELETE /api/admin/adapters/NAME`
  and `PUT /api/admin/adapters/NAME` (multipart: `adapter_config`, `adapter_model`), answered
  with the adapter's entry on the live panel.

On a server without an admin token every route is 404 and says how to turn it on. Errors keep
the app's OpenAI shape and one taxonomy (server/errors.py).
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from adapters_registry.peft_format import MAX_CONFIG_BYTES
from adapters_registry.store import check_name
from server.api.web import adapter_status
from server.errors import InvalidRequest
from server.serving import Backend, Tokens, check_bearer

NO_ADMIN_API = "this server has no admin API: start it with --admin-token-file FILE"
UPLOAD_OVERHEAD_BYTES = 1 << 20  # multipart framing around the two files
MAX_ADMIN_BODY_BYTES = 64 << 10
T = TypeVar("T")


class LoadLoraAdapter(BaseModel):
    lora_name: str = ""
    lora_path: str = ""
    load_inplace: bool = False


class UnloadLoraAdapter(BaseModel):
    lora_name: str = ""


def add_admin_routes(app: FastAPI, backend: Backend, tokens: Tokens) -> None:
    admin = [Depends(_admin_bearer(tokens))]
    vllm = APIRouter(prefix="/v1", dependencies=admin)
    page = APIRouter(prefix="/api/admin", dependencies=admin)

    @vllm.post("/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(request: Request):
        body = await _small_body(request, LoadLoraAdapter)
        if not body.lora_name or not body.lora_path:
            raise HTTPException(400, "Both 'lora_name' and 'lora_path' must be provided.")
        registry = backend.ready().registry
        if body.lora_name in registry.store and not body.load_inplace:
            raise HTTPException(400, f"The lora adapter '{body.lora_name}' has already been "
                                     "loaded. If you want to load the adapter in place, set "
                                     "'load_inplace' to True.")
        await asyncio.to_thread(registry.register_source, body.lora_name, body.lora_path)
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @vllm.post("/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(request: Request):
        body = await _small_body(request, UnloadLoraAdapter)
        if not body.lora_name:
            raise HTTPException(400, "'lora_name' must be provided.")
        registry = backend.ready().registry
        if body.lora_name not in registry.store:
            raise HTTPException(404, f"The lora adapter '{body.lora_name}' cannot be found.")
        await asyncio.to_thread(registry.delete, body.lora_name)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    @page.post("/adapters/{name:path}/pin")
    async def pin(name: str):
        await asyncio.wrap_future(backend.ready().registry.pin(name))
        return adapter_status(backend.ready(), name)

    @page.post("/adapters/{name:path}/unpin")
    async def unpin(name: str):
        backend.ready().registry.unpin(name)
        return adapter_status(backend.ready(), name)

    @page.delete("/adapters/{name:path}")
    async def delete(name: str):
        await asyncio.to_thread(backend.ready().registry.delete, name)
        return {"deleted": name}

    @page.put("/adapters/{name:path}")
    async def upload(name: str, request: Request):
        """Stores a new version of `name`, as gRPC's UploadAdapter does."""
        check_name(name)
        registry = backend.ready().registry
        config, weights = await _adapter_files(request, registry.max_adapter_bytes)
        await asyncio.to_thread(registry.register, name, config, weights)
        return adapter_status(backend.ready(), name)

    app.include_router(vllm)
    app.include_router(page)


def _admin_bearer(tokens: Tokens):
    async def authorize(request: Request) -> None:
        if tokens.admin is None:
            raise HTTPException(404, NO_ADMIN_API)
        check_bearer(request.headers.get("authorization"), tokens, admin=True)

    return authorize


async def _small_body(request: Request, model: type[T]) -> T:
    """A small JSON body as `model`, read after the token was checked."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_ADMIN_BODY_BYTES:
            raise InvalidRequest(f"the request body is larger than {MAX_ADMIN_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        return model.model_validate_json(b"".join(chunks))
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"{where + ': ' if where else ''}{first['msg']}") from None


async def _adapter_files(request: Request, max_adapter_bytes: int | None) -> tuple[bytes, bytes]:
    """The two uploaded files' bytes; a body announced over the limits is refused unread."""
    declared = request.headers.get("content-length", "")
    if max_adapter_bytes is not None:
        if not declared.isdigit():
            raise InvalidRequest("an upload must declare its Content-Length")
        if int(declared) > max_adapter_bytes + MAX_CONFIG_BYTES + UPLOAD_OVERHEAD_BYTES:
            raise InvalidRequest(f"the upload is larger than the server's limit of "
                                 f"{max_adapter_bytes} bytes (--max-adapter-mb)")
    # A malformed body or extra parts: Starlette answers 400 with the parser's reason.
    async with request.form(max_files=2, max_fields=0) as form:
        files = {}
        for field, name in (("adapter_config", "adapter_config.json"),
                            ("adapter_model", "adapter_model.safetensors")):
            part = form.get(field)
            if part is None or isinstance(part, str):
                raise InvalidRequest(f"the upload needs the file {field} ({name})")
            files[field] = await part.read()
    if len(files["adapter_config"]) > MAX_CONFIG_BYTES:
        raise InvalidRequest(f"adapter_config.json exceeds {MAX_CONFIG_BYTES} bytes")
    return files["adapter_config"], files["adapter_model"]
