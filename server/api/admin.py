"""The Admin gRPC service: upload, register, inspect, pin and delete adapters while serving.

Store writes (fsync) and loads run on threads, never on the event loop. Errors are the
registry's own exceptions; the error interceptor (server/api/grpc_errors.py) maps them to status
codes.
"""

from __future__ import annotations

import asyncio
import json
import re
from importlib.metadata import PackageNotFoundError, version

from adapters_registry.peft_format import MAX_CONFIG_BYTES
from adapters_registry.registry import AdapterRegistry, AdapterStatus
from adapters_registry.store import check_name
from loraplex.v1 import admin_pb2, admin_pb2_grpc
from server.errors import InvalidRequest
from server.model.memory import CostReport, stored_cost
from server.serving import Backend

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_SHA256 = re.compile(r"[0-9a-f]{64}")


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, backend: Backend):
        self.backend = backend

    @property
    def registry(self) -> AdapterRegistry:
        return self.backend.ready().registry

    async def UploadAdapter(self, request_iterator, context):
        header, weights = await _receive_upload(request_iterator, self.registry.max_adapter_bytes)
        record = await asyncio.to_thread(
            self.registry.register, header.name, header.adapter_config_json.encode(), weights,
            expected_sha256=header.sha256,
            version=header.version if header.HasField("version") else None)
        return await self._info(record.name)

    async def RegisterAdapter(self, request, context):
        if not request.source:
            raise InvalidRequest("source is empty: give s3://bucket/prefix or a directory path")
        record = await asyncio.to_thread(self.registry.register_source, request.name,
                                         request.source)
        return await self._info(record.name)

    async def GetAdapter(self, request, context):
        return await self._info(request.name)

    async def ListAdapters(self, request, context):
        size = request.page_size or DEFAULT_PAGE_SIZE
        if size > MAX_PAGE_SIZE:
            raise InvalidRequest(f"page_size must be at most {MAX_PAGE_SIZE}")
        if request.page_token:
            check_name(request.page_token)  # the token is the last name of the previous page
        names = [r.name for r in self.registry.store.list() if r.name > request.page_token]
        page = names[:size]
        infos = [await self._info(name) for name in page]
        return admin_pb2.ListAdaptersResponse(
            adapters=infos, next_page_token=page[-1] if len(names) > size else "")

    async def DeleteAdapter(self, request, context):
        await asyncio.to_thread(self.registry.delete, request.name)
        return admin_pb2.DeleteAdapterResponse()

    async def PinAdapter(self, request, context):
        await asyncio.wrap_future(self.registry.pin(request.name))
        return await self._info(request.name)

    async def UnpinAdapter(self, request, context):
        self.registry.unpin(request.name)
        return await self._info(request.name)

    async def GetServerInfo(self, request, context):
        return server_info(self.backend)

    async def _info(self, name: str) -> admin_pb2.AdapterInfo:
        status = self.registry.status(name)
        config = b""
        if status.record.error is None:
            config = await asyncio.to_thread(self.registry.store.read_config, name,
                                             status.record.version)
        return adapter_info(status, config)


async def _receive_upload(request_iterator, max_bytes: int | None
                          ) -> tuple[admin_pb2.UploadHeader, bytearray]:
    """The header and the safetensors bytes, checked against the header's size as they come."""
    header = None
    weights = bytearray()
    async for message in request_iterator:
        part = message.WhichOneof("part")
        if header is None:
            if part != "header":
                raise InvalidRequest("the first UploadAdapter message must be the header")
            header = message.header
            _check_header(header, max_bytes)
            weights = bytearray()
        elif part == "header":
            raise InvalidRequest("only the first UploadAdapter message may be a header")
        else:
            weights += message.chunk
            if len(weights) > header.size:
                raise InvalidRequest(f"received more than the {header.size} bytes the header "
                                     "announced")
    if header is None:
        raise InvalidRequest("empty upload: no header")
    if len(weights) != header.size:
        raise InvalidRequest(f"upload ended after {len(weights)} of {header.size} bytes")
    return header, weights


def _check_header(header: admin_pb2.UploadHeader, max_bytes: int | None) -> None:
    check_name(header.name)
    if not _SHA256.fullmatch(header.sha256):
        raise InvalidRequest("sha256 must be 64 lower-case hex digits")
    if header.size == 0:
        raise InvalidRequest("size is 0: adapter_model.safetensors is empty")
    if max_bytes is not None and header.size > max_bytes:
        raise InvalidRequest(f"adapter_model.safetensors of {header.size} bytes exceeds the "
                             f"server's limit of {max_bytes} bytes (--max-adapter-mb)")
    if len(header.adapter_config_json.encode()) > MAX_CONFIG_BYTES:
        raise InvalidRequest(f"adapter_config_json exceeds {MAX_CONFIG_BYTES} bytes")


def adapter_info(status: AdapterStatus, config_json: bytes) -> admin_pb2.AdapterInfo:
    record = status.record
    rank, targets = _rank_and_targets(config_json)
    return admin_pb2.AdapterInfo(
        name=record.name, version=record.version, config_sha256=record.config_sha256,
        weights_sha256=record.weights_sha256, size_bytes=record.weights_size,
        created_at=record.created_at, rank=rank, target_modules=targets, pinned=status.pinned,
        in_host_memory=status.in_host_memory, running_requests=status.running_requests,
        error=record.error or "")


def _rank_and_targets(config_json: bytes) -> tuple[int, list[str]]:
    """The largest rank and the target_modules of a stored (so valid) adapter_config.json."""
    if not config_json:
        return 0, []
    config = json.loads(config_json)
    ranks = [config.get("r", 0), *(config.get("rank_pattern") or {}).values()]
    targets = config.get("target_modules") or []
    return max(ranks), [targets] if isinstance(targets, str) else sorted(targets)


def server_info(backend: Backend) -> admin_pb2.ServerInfo:
    ready = backend.ready()
    core, registry, stats = ready.core, ready.registry, ready.engine.stats
    statuses = registry.resident()
    return admin_pb2.ServerInfo(
        version=_loraplex_version(), base_model=core.model.name,
        model_type=core.model.config.model_type, quantization=core.model.quantize,
        device=str(core.model.device), max_slots=core.config.max_slots,
        max_rank=core.config.max_rank,
        memory=admin_pb2.MemoryUse(
            base_model_bytes=ready.cost.base_served_bytes,
            kv_cache_bytes=core.kv.nbytes,
            adapter_slot_bytes=ready.cost.slot_table_bytes,
            host_adapter_bytes=registry.cache.used_bytes,
            host_adapter_limit_bytes=registry.cache.max_bytes,
            store_bytes=registry.store.total_bytes()),
        adapters_stored=len(registry.store), adapters_in_host_memory=len(statuses),
        adapters_in_slots=stats.slots_in_use,
        adapters_pinned=sum(state.pinned for state in statuses.values()),
        running_requests=stats.running, waiting_requests=stats.waiting,
        cost=_cost_explainer(stored_cost(ready.cost, registry.store.list())))


def _cost_explainer(report: CostReport) -> admin_pb2.CostExplainer:
    n = len(report.adapter_bytes)
    return admin_pb2.CostExplainer(
        base_served_bytes=report.base_served_bytes, slot_table_bytes=report.slot_table_bytes,
        full_copy_bytes=report.full_copy_bytes, full_copy_dtype=report.full_copy_dtype,
        adapters=n, adapters_bytes=report.adapters_bytes(n),
        loraplex_bytes=report.loraplex_bytes(n), full_copies_bytes=report.full_copies_bytes(n),
        ratio=report.ratio(n))


def _loraplex_version() -> str:
    try:
        return version("loraplex")
    except PackageNotFoundError:
        return "unknown"

