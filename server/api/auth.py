"""Bearer tokens on the gRPC services, and TLS credentials.

Admin calls must carry `authorization: Bearer <admin token>`; Inference calls must carry the
inference token when one is configured (the admin token is accepted there too). The check itself
is server/serving.py's `check_bearer`, shared with the HTTP API. Health and reflection stay open
so probes and tools work.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from server.api.grpc_errors import status_of
from server.config import ServerConfig
from server.errors import PermissionDenied, Unauthenticated
from server.serving import Tokens, check_bearer

ADMIN_PREFIX = "/loraplex.v1.Admin/"
INFERENCE_PREFIX = "/loraplex.v1.Inference/"


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (and mTLS with a client CA) from PEM files, or None for plaintext."""
    if not config.tls_cert_file:
        return None
    pair = (Path(config.tls_key_file).read_bytes(), Path(config.tls_cert_file).read_bytes())
    client_ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call without the token its service needs: UNAUTHENTICATED when it is missing or
    wrong, PERMISSION_DENIED for the inference token on an Admin call."""

    def __init__(self, tokens: Tokens):
        self.tokens = tokens

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        refusal = None
        if method.startswith((ADMIN_PREFIX, INFERENCE_PREFIX)):
            try:
                check_bearer(_authorization(handler_call_details.invocation_metadata),
                             self.tokens, admin=method.startswith(ADMIN_PREFIX))
            except (Unauthenticated, PermissionDenied) as exc:
                refusal = status_of(exc), str(exc)
        handler = await continuation(handler_call_details)
        if refusal is None or handler is None:
            return handler
        return _refusing(handler, *refusal)


def _authorization(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value.decode() if isinstance(value, bytes) else value
    return None


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str):
    """A handler of the same kind as `handler` that aborts with (code, message)."""
    async def abort_unary(request_or_iterator, context):
        await context.abort(code, message)

    async def abort_stream(request_or_iterator, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler, abort_unary),
             ("unary_stream", grpc.unary_stream_rpc_method_handler, abort_stream),
             ("stream_unary", grpc.stream_unary_rpc_method_handler, abort_unary),
             ("stream_stream", grpc.stream_stream_rpc_method_handler, abort_stream))
    for attribute, make, behavior in kinds:
        if getattr(handler, attribute):
            return make(behavior, handler.request_deserializer, handler.response_serializer)
    return handler
