"""Logging for ``dataport api`` and ``dataport worker``: one JSON object a line, or text for people.

A job binds its task to the context (``bind_job``, the first line of every job function); a filter
on the handler copies it onto every record logged while that job runs, from any logger, including
the tasks the job starts (they inherit the context). arq runs each job in an asyncio task of its
own, so jobs running side by side never see each other's task.

JSON lines carry ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, then ``task_id``,
``kind`` (the job: export, import or notify), ``run`` and ``attempt`` inside a job, ``exception``
(the whole traceback, as one string) when there is one, and the fields of uvicorn's access lines
(``client``, ``method``, ``path``, ``status``). Anything passed as ``extra=`` is kept too.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import re
import sys
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from rich.console import Console

LogFormat = Literal["json", "text"]

_JOB: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("dataport_job", default=None)
JOB_FIELDS = ("task_id", "kind", "run", "attempt")

log = logging.getLogger("dataport.worker")

# Attributes every LogRecord has; anything else on a record came from ``extra=`` or the filter.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def bind_job(kind: str, task_id: str, run: int, ctx: dict[str, Any]) -> None:
    """Mark the rest of this job (this asyncio task and those it starts) as working on ``task_id``,
    and log that the attempt started."""
    _JOB.set({"task_id": task_id, "kind": kind, "run": run, "attempt": ctx.get("job_try")})
    log.info("%s job started: task %s, run %s, attempt %s", kind, task_id, run, ctx.get("job_try"))


def current_job() -> dict[str, Any] | None:
    return _JOB.get()


class JobContextFilter(logging.Filter):
    """Copies the bound job's fields onto each record (never over a field the call set itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        job = _JOB.get()
        if job:
            for name, value in job.items():
                if not hasattr(record, name):
                    setattr(record, name, value)
        return True


_SIGNATURE = re.compile(r"(?i)((?:x-amz-)?signature=)[^&\s]+")


class RedactSignatures(logging.Filter):
    """Access lines would otherwise carry the signatures of download and upload links, which grant
    access to a file until they expire: keep the path, mask the signature."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, version, status = record.args
            if isinstance(path, str) and "ignature=" in path:
                record.args = (client, method, _SIGNATURE.sub(r"\1***", path), version, status)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: newlines inside messages and tracebacks are escaped, so every line
    parses on its own."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in JOB_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, _version, status = record.args
            entry.update(client=client, method=method, path=path, status=status)
        for name, value in vars(record).items():
            if name not in _STANDARD and name not in entry and not name.startswith("_") and name != "color_message":
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
            if record.exc_info[0] is not None:
                entry["exception_type"] = record.exc_info[0].__name__
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic one-line text, with ``[task … attempt …]`` inside a job."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        task_id = getattr(record, "task_id", None)
        if task_id is None:
            return line
        head, sep, rest = line.partition("\n")  # a traceback stays below the first line
        return f"{head} [{getattr(record, 'kind', '')} {task_id} attempt {getattr(record, 'attempt', '')}]{sep}{rest}"


def configure_logging(log_format: LogFormat = "json", level: str | int = "INFO") -> None:
    """Every record of the process (Dataport's, arq's, uvicorn's when it is started with
    ``log_config=None``) goes through one stderr handler in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobContextFilter())
    handler.addFilter(RedactSignatures())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "arq"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def message_console() -> Console:
    """The console every command writes its messages to: stderr, never hard-wrapped, since a path
    or URL broken over two lines (rich wraps at 80 columns without a terminal) cannot be copied."""
    from rich.console import Console  # here: the api and workers log without ever loading rich

    return Console(stderr=True, soft_wrap=True)
