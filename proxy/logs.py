"""Logging setup with a redaction safety net.

The proxy's own log calls never pass secrets. As a second line of defence every record goes
through :class:`RedactingFilter`, which masks strings registered as secrets (access and refresh
tokens as the broker sees them) and anything shaped like a credential (``auth=Bearer ...``,
``"refresh_token": "..."``, ``password=...``). Third-party loggers that may dump HTTP bodies
(msal, urllib3) are capped at WARNING whatever the verbosity.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time

_MASK = "[redacted]"
_PATTERNS = [
    re.compile(r"(?i)(auth=Bearer\s+)[^\s\x01'\"]+"),
    re.compile(r"(?i)(Bearer\s+)[A-Za-z0-9\-._~+/]{16,}=*"),
    re.compile(r"(?i)([\"']?(?:access_token|refresh_token|id_token|client_secret|password|code_verifier|"
               r"device_code)[\"']?\s*[:=]\s*[\"']?)[^\s\"'&,}]+"),
]
# Every pattern needs one of these words (in any case): ASCII text without any of them is left as is.
_HINTS = ("bearer", "token", "secret", "password", "code_verifier", "device_code")
_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_MAX_SECRETS = 10_000


def register_secret(value: str | None) -> None:
    """Mask ``value`` in every later log record (tokens, passwords, client secrets)."""
    if not value or len(value) < 8:
        return
    with _secrets_lock:
        if len(_secrets) >= _MAX_SECRETS:
            _secrets.clear()  # old tokens are expired by then; the patterns still apply
        _secrets.add(value)


def redact(text: str) -> str:
    with _secrets_lock:
        known = list(_secrets)
    for secret in known:
        if secret in text:
            text = text.replace(secret, _MASK)
    if text.isascii():  # (re's IGNORECASE also matches a few non-ASCII letters that lower() keeps)
        lowered = text.lower()
        if not any(hint in lowered for hint in _HINTS):
            return text
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + _MASK, text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = None
        record.msg, record.args = redact(message), None
        return True


def log_event(logger: logging.Logger, message: str, *args: object, level: int = logging.INFO,
              **fields: object) -> None:
    """Log ``message % args`` with ``fields`` as structured data (top-level keys in JSON lines).

    Used for the per-session lines (``event`` = session_start, login, session_end) so a log
    collector can count and filter them without parsing text. Never pass a secret.
    """
    logger.log(level, message, *args, extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) +
                 f".{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        for key, value in (getattr(record, "fields", {}) or {}).items():
            if key not in entry:
                entry[key] = redact(value) if isinstance(value, str) else value
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(level: str = "INFO", fmt: str = "text", stream=None, log_file: str | None = None) -> None:
    """Configure the root logger once for the CLI: to ``stream`` (standard error), or appended to
    ``log_file`` in UTF-8 (for a Windows task or service, which has no console; a few lines per
    session, so it grows slowly and is not rotated: nothing is lost while a reader holds it open).
    Raises OSError if the file cannot be opened."""
    if log_file:
        handler: logging.Handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactingFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Neither format shows the caller, thread or process: do not look them up for every record
    # (the logging HOWTO's "Optimization"; half the cost of the log line per SMTP message).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # aiosmtpd's "mail.log" logs commands, and message lines at DEBUG.
    for noisy in ("msal", "urllib3", "requests", "asyncio", "mail.log"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
