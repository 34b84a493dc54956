"""Python client of the loraplex gRPC API (Inference, Admin, health), sync and asyncio.

Needs only grpc, protobuf and the generated `loraplex.v1` stubs: no torch.

    with LoraplexClient("127.0.0.1:50051", admin_token=...) as client:
        client.upload_adapter("my-adapter", "path/to/peft-dir")
        print(client.generate("Hello", adapter="my-adapter", max_new_tokens=32).text)
"""

from clients._common import (
    AdapterInfo, GenerateResult, LoraplexError, Models, ServerInfo, StreamDelta)
from clients.aio import AsyncLoraplexClient
from clients.sync import LoraplexClient

__all__ = ["AdapterInfo", "AsyncLoraplexClient", "GenerateResult", "LoraplexClient",
           "LoraplexError", "Models", "ServerInfo", "StreamDelta"]
