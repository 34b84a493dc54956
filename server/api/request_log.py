"""One log line per request, and the JSON log format (`--log-format json`)."""

from __future__ import annotations

import json
import logging
import time

from server.api.metrics import outcome
from server.engine.async_engine import RequestRecord

log = logging.getLogger("loraplex.requests")


def log_request(record: RequestRecord) -> None:
    """`request r12 adapter=sql outcome=length prompt_tokens=5 ... total_ms=812.4`; with the
    JSON format the same fields are keys of the line's object."""
    fields = {"request_id": record.request_id, "adapter": record.adapter or "",
              **({"combination": record.combination} if record.combination else {}),
              "outcome": outcome(record), "prompt_tokens": record.prompt_tokens,
              "completion_tokens": record.completion_tokens,
              "cached_tokens": record.cached_tokens,
              "queue_ms": _ms(record.queue_seconds), "ttft_ms": _ms(record.ttft_seconds),
              "total_ms": _ms(record.e2e_seconds)}
    text = " ".join(f"{k}={'-' if v is None else v}" for k, v in fields.items()
                    if k != "request_id")
    log.info("request %s %s", record.request_id, text, extra={"fields": fields})


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z",
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)
