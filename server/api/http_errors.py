"""The HTTP API's errors: OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
with the status a domain error's kind (server/errors.py) maps to in `HTTP_ERRORS`, once."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from adapters_registry.store import InvalidNameError
from server.engine.async_engine import Engine
from server.engine.core import FinishReason
from server.errors import DOMAIN_ERRORS, RETRY_AFTER_SECONDS, ErrorKind, kind_of

# A domain error's kind -> HTTP status, OpenAI error type, error code. The code is OpenAI's
# where it has one, else the gRPC status name.
HTTP_ERRORS = {
    ErrorKind.INVALID: (400, "invalid_request_error", "invalid_argument"),
    ErrorKind.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    ErrorKind.OVERLOADED: (429, "rate_limit_error", "resource_exhausted"),
    # A stored adapter that cannot be loaded: the request is well-formed, the model is unusable.
    ErrorKind.FAILED_PRECONDITION: (422, "invalid_request_error", "failed_precondition"),
    ErrorKind.UNAVAILABLE: (503, "server_error", "unavailable"),
    ErrorKind.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    ErrorKind.PERMISSION_DENIED: (403, "invalid_request_error", "permission_denied"),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)
        self.retry_after = retry_after  # seconds, sent as Retry-After


class ClientGone(Exception):
    """The client disconnected before its answer was ready; the generation was cancelled."""


@contextlib.contextmanager
def model_errors(model: str, engine: Engine) -> Iterator[None]:
    """An unknown adapter (or a name no adapter can have) is an unknown model: 404. With the
    base model as `model`, the adapter is one of an adapter_mixture's: its own message."""
    try:
        yield
    except DOMAIN_ERRORS as exc:
        if kind_of(exc) is not ErrorKind.NOT_FOUND and not isinstance(exc, InvalidNameError):
            raise
        if model == engine.core.model.name:
            raise ApiError(404, str(exc), param="adapter_mixture",
                           code="adapter_not_found") from exc
        raise ApiError(404, f"model {model!r} does not exist: it is neither the base model "
                            f"{engine.core.model.name!r} nor a stored adapter", param="model",
                       code="model_not_found") from exc


def check_finished(finish_reason: str) -> None:
    if finish_reason == FinishReason.CANCELLED:
        raise ApiError(503, "the server cancelled the request (shutting down, or an engine "
                            "failure: see its log)", type="server_error", code="cancelled")


def error_body(e: ApiError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
    if e.retry_after is not None:
        headers["Retry-After"] = str(e.retry_after)
    return JSONResponse(error_body(e), status_code=e.status, headers=headers or None)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error_response(exc)

    async def domain_error(request, exc: Exception):
        status, kind, code = HTTP_ERRORS[kind_of(exc)]
        return error_response(ApiError(status, str(exc), kind, code=code,
                                       retry_after=RETRY_AFTER_SECONDS.get(kind_of(exc))))

    for kind in DOMAIN_ERRORS:
        app.add_exception_handler(kind, domain_error)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first["type"] == "json_invalid":  # its loc is a character position
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
            return error_response(ApiError(400, message, code="invalid_argument"))
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return error_response(ApiError(400, message, param=param, code="invalid_argument"))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error_response(ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(ClientGone)
    async def client_gone(request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it; "client closed request"

    @app.exception_handler(Exception)
    async def bug(request, exc: Exception):  # Starlette logs the traceback after this
        return error_response(ApiError(500, "internal error", "server_error"))
