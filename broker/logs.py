"""Logging set-up for every MeshMQ process: one line per record on stderr.

Why: a node is several processes (supervisor, workers, relay, store) writing to one terminal or
journal. Each line says when (UTC, milliseconds), how bad, which process and which module, so
interleaved lines from different processes stay readable and greppable:

    2026-11-29T12:00:00.123Z INFO  worker-1 broker.net: listening on 0.0.0.0:1883

Must not: print anything itself, or let one record span several lines through its message (a
client id or topic with a newline in it would forge log lines): newlines in messages are shown
as `\\n`. Only a traceback continues on the following lines, each indented, so that a reader (or
`grep -v '^  '`) can tell it from records.

Invariants: `configure_logging` is idempotent (it replaces the handler it installed before, and
no other); it sets the root level and each configured logger's level, nothing else.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Final

from broker.config import LoggingConfig

__all__ = ["configure_logging"]

_HANDLER_NAME: Final = "meshmq-stderr"


class _LineFormatter(logging.Formatter):
    def __init__(self, process_name: str) -> None:
        super().__init__()
        self._process_name = process_name

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        seconds = int(record.created)
        millis = int((record.created - seconds) * 1000)
        return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{millis:03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace("\r", "\\r").replace("\n", "\\n")
        line = (
            f"{self.formatTime(record)} {record.levelname:<5} {self._process_name} {record.name}: {message}"
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        details = [record.exc_text] if record.exc_text else []
        if record.stack_info:
            details.append(self.formatStack(record.stack_info))
        for text in details:
            line += "".join(f"\n  {part}" for part in text.splitlines())
        return line


def configure_logging(cfg: LoggingConfig, process_name: str) -> None:
    """Send every record at or above the configured levels to stderr, one line each."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(_LineFormatter(process_name))
    root.addHandler(handler)
    root.setLevel(cfg.level)
    for name, level in cfg.loggers:
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(True)  # warnings.warn() goes through the same handler, not raw stderr
