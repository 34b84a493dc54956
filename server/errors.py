"""The one error taxonomy: every error a user can cause or fix says which kind it is, once.

A face never lists exception classes; it maps kinds to its own codes in one small table (gRPC
status: server/api/grpc_errors.py; HTTP status and OpenAI error type: server/api/http_api.py;
metrics outcome: server/api/metrics.py; CLI exit code: server/cli.py). An exception without a
kind is a bug: INTERNAL, HTTP 500, outcome "error", a traceback in the log.

loraplex's own errors carry their kind as a class attribute. The registry's errors are declared
in `REGISTRY_KINDS`, here, because adapters_registry imports nothing from server/. This module
imports nothing from server/ either, so every layer may raise these errors.
"""

from __future__ import annotations

import enum

from adapters_registry.mixtures import MixtureError
from adapters_registry.peft_format import AdapterFormatError
from adapters_registry.registry import AdapterCacheFullError, AdapterLoadError
from adapters_registry.resolver import AdapterResolveError
from adapters_registry.sources import SourceUnavailableError
from adapters_registry.store import (AdapterCorruptError, InvalidContentError, InvalidNameError,
                                     StoreError, UnknownAdapterError)


class ErrorKind(enum.Enum):
    INVALID = "invalid"  # the request, its parameters or an adapter's files: fix and resend
    NOT_FOUND = "not_found"  # an adapter that is not registered
    OVERLOADED = "overloaded"  # too much work right now (queue, host cache): retry later
    UNAVAILABLE = "unavailable"  # not ready yet, or the adapter source failed: retry later
    FAILED_PRECONDITION = "failed_precondition"  # well-formed, but the state it needs is broken
    UNAUTHENTICATED = "unauthenticated"  # a missing or wrong bearer token
    PERMISSION_DENIED = "permission_denied"  # a valid token that may not do this


class LoraplexError(Exception):
    """Base of loraplex's own domain errors; the message says what and why, in one line."""

    kind: ErrorKind


class InvalidRequest(LoraplexError, ValueError):
    """A request's input or parameters are invalid; the message says which and why."""

    kind = ErrorKind.INVALID


class ConfigError(LoraplexError, ValueError):
    """A configuration value is invalid; the message says which and why."""

    kind = ErrorKind.INVALID


class Overloaded(LoraplexError, RuntimeError):
    """The waiting queue is full (--max-queue); the caller should retry later."""

    kind = ErrorKind.OVERLOADED


class NotReady(LoraplexError, RuntimeError):
    """The server is up but the model is still loading."""

    kind = ErrorKind.UNAVAILABLE


class Unauthenticated(LoraplexError, PermissionError):
    """No bearer token, or not one the server knows."""

    kind = ErrorKind.UNAUTHENTICATED


class PermissionDenied(LoraplexError, PermissionError):
    """A known token that may not call this (the inference token on the Admin service)."""

    kind = ErrorKind.PERMISSION_DENIED


REGISTRY_KINDS: dict[type[Exception], ErrorKind] = {
    # First match wins: subclasses before their bases.
    SourceUnavailableError: ErrorKind.UNAVAILABLE,  # the storage's fault: retry later
    AdapterFormatError: ErrorKind.INVALID,  # a bad adapter or source
    MixtureError: ErrorKind.INVALID,  # a mixture of adapters that cannot be combined
    InvalidNameError: ErrorKind.INVALID,
    UnknownAdapterError: ErrorKind.NOT_FOUND,
    AdapterCacheFullError: ErrorKind.OVERLOADED,  # running requests and pins hold the cache
    AdapterLoadError: ErrorKind.FAILED_PRECONDITION,  # a stored adapter that cannot be loaded
    AdapterResolveError: ErrorKind.FAILED_PRECONDITION,  # a resolver source's adapter is bad
    AdapterCorruptError: ErrorKind.FAILED_PRECONDITION,
    InvalidContentError: ErrorKind.FAILED_PRECONDITION,  # e.g. a version not above the last
    StoreError: ErrorKind.FAILED_PRECONDITION,  # e.g. the store is locked by another process
}

RETRY_AFTER_SECONDS = {ErrorKind.OVERLOADED: 1}
"""When a caller refused for this kind may try again: each face sends it its way (gRPC trailing
metadata `grpc-retry-pushback-ms`, which gRPC's retry policy honours; HTTP `Retry-After`)."""

DOMAIN_ERRORS: tuple[type[Exception], ...] = (LoraplexError, *REGISTRY_KINDS)
"""Every exception class that has a kind (for `except DOMAIN_ERRORS`)."""


def kind_of(exc: BaseException) -> ErrorKind | None:
    """The error's kind; None for anything else (a bug)."""
    if isinstance(exc, LoraplexError):
        return exc.kind
    return next((kind for cls, kind in REGISTRY_KINDS.items() if isinstance(exc, cls)), None)
