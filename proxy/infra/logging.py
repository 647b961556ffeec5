"""JSON logs on stderr: one object per line, one line per request."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from proxy.services.chat import ExchangeRecord

REQUEST_LOGGER = "llm_proxy.request"

# Attributes every LogRecord has; anything else was passed in `extra` and belongs in the line.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


_LINE_BREAKS = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        text = json.dumps(line, default=str, ensure_ascii=False)
        if text.isascii():
            return text
        # JSON leaves these unescaped, but log shippers (and `str.splitlines`) end a line at
        # them: a client's model name or id holding one would start a line of its choosing.
        return text.translate(_LINE_BREAKS)


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The per-request line has its own switch (`access_log`), as in uvicorn and nginx: a quieter
    # `log_level` must not turn it off.
    logging.getLogger(REQUEST_LOGGER).setLevel(logging.INFO)
    # hypercorn's own access log would duplicate our per-request line.
    logging.getLogger("hypercorn.access").disabled = True


class RequestLog:
    """The per-request line: trace id, model, backend, timings, tokens, outcome."""

    def __init__(self, enabled: bool = True) -> None:
        self._logger = logging.getLogger(REQUEST_LOGGER)
        self._enabled = enabled

    def __call__(self, record: ExchangeRecord) -> None:
        if not self._enabled or not self._logger.isEnabledFor(logging.INFO):
            return
        fields = record.as_log()
        # Named fields, as documented, not the `Reserved` tuple as a bare array.
        reserved = fields.pop("reserved")
        fields["reserved_tokens"], fields["reserved_budget"] = reserved.tokens, reserved.budget
        # A client that left before the response began got no status: nginx's 499, as in the metrics.
        fields["status"] = record.status or 499
        fields["total_ms"] = round(record.total_ms, 2)
        if record.ttft_ms is not None:
            fields["ttft_ms"] = round(record.ttft_ms, 2)
        fields["at"] = time.time()
        self._logger.info("chat", extra=fields)
