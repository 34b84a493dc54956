"""Domain errors -> gRPC status codes, in one interceptor for every service.

A servicer raises the engine's or the registry's own exception; the interceptor aborts the call
with the status of its kind (server/errors.py) and the exception's message. Anything else is a
bug and becomes INTERNAL (grpc's default), with its traceback in the server log.
"""

from __future__ import annotations

import grpc

from server.errors import DOMAIN_ERRORS, RETRY_AFTER_SECONDS, ErrorKind, InvalidRequest, kind_of

GRPC_STATUS = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
}


def status_of(exc: Exception) -> grpc.StatusCode:
    """The status of a domain error (one of DOMAIN_ERRORS)."""
    return GRPC_STATUS[kind_of(exc)]


async def abort_with(context, exc: Exception) -> None:
    """Ends the call with the error's status and message, and its retry hint when it has one."""
    retry = RETRY_AFTER_SECONDS.get(kind_of(exc))
    if retry is not None:
        context.set_trailing_metadata((("grpc-retry-pushback-ms", str(retry * 1000)),))
    await context.abort(status_of(exc), str(exc))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Aborts an RPC that raised a domain error with the matching status and its message; a
    request message that does not parse is INVALID_ARGUMENT (grpc itself would say UNKNOWN)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        decode = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _returning(handler.unary_unary), decode, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _returning(handler.stream_unary, stream=True), decode,
                handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream), decode, handler.response_serializer)
        return handler


class _Undecodable:
    """Stands for a request message whose bytes did not parse."""

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def decode(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf raises DecodeError and others for bad bytes
            return _Undecodable(exc)
    return decode


def _check(request):
    if isinstance(request, _Undecodable):
        raise InvalidRequest(f"the request message does not parse: {request.error}")
    return request


async def _checked(requests):
    async for request in requests:
        yield _check(request)


def _returning(behavior, stream: bool = False):
    async def wrapped(request, context):
        try:
            request = _checked(request) if stream else _check(request)
            return await behavior(request, context)
        except DOMAIN_ERRORS as exc:
            await abort_with(context, exc)
    return wrapped


def _streaming(behavior):
    async def wrapped(request, context):
        try:
            async for message in behavior(_check(request), context):
                yield message
        except DOMAIN_ERRORS as exc:
            await abort_with(context, exc)
    return wrapped
