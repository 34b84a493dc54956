"""Bearer tokens for the gRPC services, and TLS credentials.

Admin calls must carry `authorization: Bearer <admin token>`; Inference calls must carry the
inference token when one is configured (the admin token is accepted there too). Tokens come from
a file (`--admin-token-file`) or the environment (`LORAPLEX_ADMIN_TOKEN`), never from a flag
(flags are visible in `ps`). Comparison is constant-time. Health and reflection stay open so
probes and tools work.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from server.config import ConfigError, ServerConfig

ADMIN_PREFIX = "/loraplex.v1.Admin/"
INFERENCE_PREFIX = "/loraplex.v1.Inference/"


@dataclass(frozen=True)
class Tokens:
    admin: bytes | None  # None: the Admin service is off
    inference: bytes | None  # None: Inference needs no token


def load_tokens(config: ServerConfig) -> Tokens:
    return Tokens(admin=_token(config.admin_token_file, "LORAPLEX_ADMIN_TOKEN", "--admin-token-file"),
                  inference=_token(config.inference_token_file, "LORAPLEX_INFERENCE_TOKEN",
                                   "--inference-token-file"))


def _token(path: str, env: str, flag: str) -> bytes | None:
    if path:
        token = Path(path).read_text().strip()
        if not token:
            raise ConfigError(f"{flag}: {path} is empty")
        return token.encode()
    token = os.environ.get(env, "").strip()
    return token.encode() if token else None


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
        presented = _bearer(handler_call_details.invocation_metadata)
        refusal = None
        if method.startswith(ADMIN_PREFIX):
            refusal = self._check(presented, self.tokens.admin, admin=True)
        elif method.startswith(INFERENCE_PREFIX) and self.tokens.inference is not None:
            refusal = self._check(presented, self.tokens.inference, admin=False)
        handler = await continuation(handler_call_details)
        if refusal is None or handler is None:
            return handler
        return _refusing(handler, *refusal)

    def _check(self, presented: bytes | None, expected: bytes | None, admin: bool
               ) -> tuple[grpc.StatusCode, str] | None:
        if presented is None:
            return grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata"
        if expected is not None and hmac.compare_digest(presented, expected):
            return None
        if not admin and self.tokens.admin and hmac.compare_digest(presented, self.tokens.admin):
            return None  # the admin token may also call Inference
        if admin and self.tokens.inference and hmac.compare_digest(presented,
                                                                  self.tokens.inference):
            return grpc.StatusCode.PERMISSION_DENIED, "the inference token cannot call Admin"
        return grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"


def _bearer(metadata) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            value = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip().encode()
            return b""  # present but not a bearer token: never equal to a configured one
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
