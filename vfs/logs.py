"""Where the log goes and how it looks: text lines or one JSON object per line, never the token.

JSON lines carry `time` (UTC, ISO 8601), `level`, `logger` and `message`, plus `model`,
`file` and `offset` when the line is about a place in a file (call sites pass them with
`extra=where(describe, offset)`), and `exception` for a traceback.

The token is kept out by construction (nothing logs it), and a filter on the handler
replaces its text wherever it would still appear, in either format, as a last line of
defence: a log line is the easiest place for a secret to leak from.
"""

import datetime
import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "[redacted]"
QUIET_LOGGERS = ("urllib3", "httpx", "httpx2", "huggingface_hub", "filelock", "gguf")


def where(describe: str, offset: int | None = None) -> dict[str, object]:
    """`extra=` fields for a line about "model/path/in/repo" (at `offset`)."""
    model, _, file = describe.partition("/")
    fields: dict[str, object] = {"model": model, "file": file}
    if offset is not None:
        fields["offset"] = offset
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
                 .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key in ("model", "file", "offset"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_text:
            entry["exception"] = record.exc_text
        elif record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class Redact(logging.Filter):
    """Replace each secret's text in a record's message (after formatting its arguments)."""

    def __init__(self, secrets: Iterable[str | None]):
        super().__init__()
        self.secrets = [secret for secret in secrets if secret]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(secret in message for secret in self.secrets):
            for secret in self.secrets:
                message = message.replace(secret, REDACTED)
            record.msg, record.args = message, None
        if record.exc_info and self.secrets:
            # Tracebacks are formatted later; format now, redacted, and drop the original.
            text = logging.Formatter().formatException(record.exc_info)
            for secret in self.secrets:
                text = text.replace(secret, REDACTED)
            record.exc_info, record.exc_text = None, text
        return True


def setup(verbose: bool = False, log_file: str | None = None, log_format: str = "text",
          secrets: Iterable[str | None] = ()) -> None:
    """Send every logger's lines to `log_file` (default stderr) in `log_format`."""
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(Redact(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
