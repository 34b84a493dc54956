"""The serving layer between the network faces and the engine.

The faces (server/api/: gRPC, HTTP, admin, metrics) translate wire formats; what they share is
here, once: the typed `Backend` they serve from, the bearer-token check, and the conversion of
wire parameters (`SamplingParams.given`, where None means "the default"). Errors are classified
once, in server/errors.py; each face maps the kinds to its own codes.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from adapters_registry.registry import AdapterRegistry
from server.config import ServerConfig
from server.engine.async_engine import Engine
from server.engine.core import EngineCore
from server.errors import ConfigError, NotReady, PermissionDenied, Unauthenticated
from server.model.memory import CostReport, cost_report


@dataclass(frozen=True)
class Ready:
    engine: Engine
    cost: CostReport  # measured at load: the base as served, slot tables, one full copy

    @property
    def core(self) -> EngineCore:
        return self.engine.core

    @property
    def registry(self) -> AdapterRegistry:
        return self.engine.registry


class Backend:
    """What the faces serve from: nothing until the model is loaded."""

    def __init__(self):
        self._ready: Ready | None = None

    @property
    def is_ready(self) -> bool:
        return self._ready is not None

    def ready(self) -> Ready:
        """The loaded engine; NotReady while the model loads."""
        if self._ready is None:
            raise NotReady("the model is still loading; retry when health is SERVING")
        return self._ready

    def set_ready(self, engine: Engine) -> None:
        model = engine.core.model
        self._ready = Ready(engine, cost_report(model, {}, model.model_dir))


@dataclass(frozen=True)
class Tokens:
    admin: bytes | None  # None: the Admin service is off
    inference: bytes | None  # None: Inference needs no token


def load_tokens(config: ServerConfig) -> Tokens:
    """The bearer tokens, from their files or LORAPLEX_ADMIN_TOKEN / LORAPLEX_INFERENCE_TOKEN
    (never from a flag: flags are visible in `ps`)."""
    return Tokens(admin=_token(config.admin_token_file, "LORAPLEX_ADMIN_TOKEN",
                               "--admin-token-file"),
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


def check_bearer(authorization: str | None, tokens: Tokens, *, admin: bool) -> None:
    """Checks an `authorization` header or metadata value for the Admin service (admin=True) or
    for inference; raises Unauthenticated or PermissionDenied. Comparisons are constant-time.

    Admin calls need the admin token. Inference calls need the inference token when one is set
    (the admin token is accepted too), and nothing otherwise.
    """
    if not admin and tokens.inference is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    presented = token.strip().encode() if scheme.lower() == "bearer" else b""
    if not presented:
        raise Unauthenticated("missing 'authorization: Bearer <token>'")
    if _equal(presented, tokens.admin):
        return
    if _equal(presented, tokens.inference):
        if admin:
            raise PermissionDenied("the inference token cannot call Admin")
        return
    raise Unauthenticated("invalid bearer token")


def _equal(presented: bytes, expected: bytes | None) -> bool:
    return expected is not None and hmac.compare_digest(presented, expected)
