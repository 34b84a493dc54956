"""The web page on the HTTP port: a playground and a live panel, and the JSON routes it reads.

`/` is plain static HTML, JS and CSS (server/api/web/: no build chain, nothing from a CDN).
The page streams answers from the OpenAI routes (`/v1/chat/completions` when the model has a
chat template, else `/v1/completions`), polls `/api/status` for the live panel, and sends admin
actions to `/api/admin/...` (server/api/http_admin.py) with the admin token. The page itself holds no data and needs no
token; every JSON route checks the same bearer tokens as the rest of the HTTP API.
"""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from adapters_registry.registry import adapter_key
from server.model.memory import stored_cost
from server.serving import Backend, Ready, Tokens, check_bearer
from server.tools.cost import chart_series

WEB_DIR = Path(__file__).with_name("web")
CHART_MAX_ADAPTERS = 1000  # as `loraplex cost`'s chart
CHART_POINTS = 60


def add_web_routes(app: FastAPI, backend: Backend, tokens: Tokens) -> None:
    """`/` and its files, and `/api/status` (inference token). The page's admin actions use
    the HTTP admin routes (server/api/http_admin.py)."""
    app.mount("/ui", StaticFiles(directory=WEB_DIR), name="ui")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB_DIR / "index.html")

    api = APIRouter(prefix="/api", dependencies=[Depends(_inference_bearer(tokens))])

    @api.get("/status")
    def status():  # a plain def: reading the store runs on a worker thread
        return server_status(backend.ready(), admin_api=tokens.admin is not None)

    app.include_router(api)


def _inference_bearer(tokens: Tokens):
    async def authorize(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), tokens, admin=False)

    return authorize


# ---- what the live panel shows ----------------------------------------------------------------

def server_status(ready: Ready, *, admin_api: bool) -> dict:
    """The model, the requests, every stored adapter with its tier, memory and the cost figures.

    `generated_tokens` and `time` (seconds, monotonic) let the page compute tokens/s between
    two polls.
    """
    core, registry, stats = ready.core, ready.registry, ready.engine.stats
    records = registry.store.list()
    in_host_memory = registry.resident()  # one snapshot for every adapter
    adapters = [_adapter_entry(stats, record, in_host_memory=adapter_key(record) in in_host_memory,
                               pinned=registry.is_pinned(record.name))
                for record in records]
    report = stored_cost(ready.cost, records)
    n = len(report.adapter_bytes)
    return {
        "model": {"name": core.model.name, "quantization": core.model.quantize,
                  "device": str(core.model.device), "max_slots": core.config.max_slots,
                  "max_rank": core.config.max_rank,
                  "chat_template": bool(getattr(core.tokenizer, "chat_template", None))},
        "admin_api": admin_api,
        "requests": {"running": stats.running, "waiting": stats.waiting},
        "generated_tokens": stats.generated_tokens, "time": time.monotonic(),
        "kv_usage": stats.kv_usage,
        "adapters": adapters,
        "memory": {"base_model_bytes": ready.cost.base_served_bytes,
                   "kv_cache_bytes": core.kv.nbytes,
                   "adapter_slot_bytes": ready.cost.slot_table_bytes,
                   "host_adapter_bytes": registry.cache.used_bytes,
                   "host_adapter_limit_bytes": registry.cache.max_bytes,
                   "store_bytes": registry.store.total_bytes()},
        "cost": {"adapters": n, "loraplex_bytes": report.loraplex_bytes(n),
                 "served_copies_bytes": report.served_copies_bytes(n),
                 "bf16_copies_bytes": report.bf16_copies_bytes(n),
                 "full_copy_dtype": report.full_copy_dtype,
                 "chart": vars(chart_series(report, CHART_MAX_ADAPTERS, CHART_POINTS))
                 if n else None},
    }


def adapter_status(ready: Ready, name: str) -> dict:
    status = ready.registry.status(name)
    return _adapter_entry(ready.engine.stats, status.record,
                          in_host_memory=status.in_host_memory, pinned=status.pinned)


def _adapter_entry(stats, record, *, in_host_memory: bool, pinned: bool) -> dict:
    """One adapter and its fastest tier: "slot" (its current version in a device slot), "host"
    (in the host-RAM cache) or "store"."""
    if (record.name, record.version) in stats.slot_adapters:
        tier = "slot"
    else:
        tier = "host" if in_host_memory else "store"
    return {"name": record.name, "version": record.version, "tier": tier,
            "pinned": pinned, "size_bytes": record.weights_size,
            "running": stats.running_by_adapter.get(record.name, 0),
            "waiting": stats.waiting_by_adapter.get(record.name, 0),
            "error": record.error}
